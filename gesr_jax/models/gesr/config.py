"""GESRConfig (``model.kind = "gesr"``): the two-tower backbone, the Mixture-of-Attention (MoA) config and MLPG.

It extends :class:`~gesr_jax.models.two_tower.config.TwoTowerConfig` (the tower fields). Every MoA component
has a switch; with all of them off (:meth:`GESRConfig.moa_off`) the model is exactly the two-tower baseline
and no MoA parameter is created.
Choices the GESR paper leaves unconfirmed (see ../shared/spec/PAPERS_SPEC.md) are
fields here, with the spec's proposal as the default, and each is marked UNCONFIRMED.

Field names in ``history_fields`` / ``candidate_fields`` / ``hma_pairs`` are the
dataset's item-field names: ``item`` (the item id), ``action`` (history only) and the
schema's item features. The defaults fit the synthetic data ("category", "creator");
MovieLens presets must name "genre", "year" (and "director" for ml-1m with the extra
file) instead. The model checks every name against the batch schema when it is built.
"""

from __future__ import annotations

import dataclasses

from gesr_jax.models.gesr import components
from gesr_jax.models.two_tower.config import TwoTowerConfig

CROSS_ATTENTION_KINDS = ("softmax", "silu")
MLPG_BRANCH_KINDS = ("gated", "mlp")
MLPG_GATES = ("sigmoid", "lhuc")
SL_SAMPLING = ("recency", "uniform", "recent")
COMPUTE_DTYPES = ("float32", "bfloat16")


@dataclasses.dataclass(frozen=True)
class GESRConfig(TwoTowerConfig):
    kind: str = "gesr"  # registry key
    # --- MoA switches ---
    use_hma: bool = True  # hard matching attention (explicit match counts)
    use_hstu: bool = True  # HSTU self-attention (off = no self attention at all)
    target_aware: bool = True  # with use_hstu: False = the paper's ablation, last history output for every candidate
    use_ro_cross: bool = True  # RO cross attention with learnable seeds
    use_nro_cross: bool = True  # NRO cross attention with gated update
    use_mlpg: bool = True  # multi-logit parameterized gating; off = its inputs join the main interaction MLP
    extra_moa: tuple[str, ...] = ()  # names of user MoA components (components.register_component) to switch on
    # --- MoA config: which inputs feed which module ---
    history_fields: tuple[str, ...] = ("item", "category", "creator", "action")  # summed into a history token
    candidate_fields: tuple[str, ...] = ("item", "category", "creator")  # summed into a candidate token
    nro_query_fields: tuple[str, ...] = ()  # sum-pooled NRO cross-attention query; () = candidate_fields
    # (history field, candidate field) pairs whose matches HMA counts; the paper's pairs are UNCONFIRMED
    hma_pairs: tuple[tuple[str, str], ...] = (("item", "item"), ("category", "category"), ("creator", "creator"))
    # --- HMA ---
    hma_max_count: int = 8  # M: counts are capped at M; table stride M+1 (UNCONFIRMED: paper shows stride M)
    hma_dim: int = 8  # width of one count embedding (D in the paper's Fig. 4)
    hma_mlp: tuple[int, ...] = (32,)  # MLP over the flattened per-pair count embeddings; last = output width
    # --- target-aware HSTU ---
    hstu_layers: int = 2  # stacked HSTU layers
    hstu_heads: int = 2  # attention heads
    hstu_qk_dim: int = 16  # per-head query/key width
    hstu_v_dim: int = 16  # per-head value width
    hstu_normalizer: float = 64.0  # fixed attention normaliser (not the padded length)
    hstu_alpha: float | None = None  # score scale inside silu; None = 1/sqrt(hstu_qk_dim) (production STU)
    # "cached": candidates attend to each layer's cached history K/V (O(N^2 + C N) per request, the serving
    # path); "full": one pass over the packed [history ; candidates] sequence (O((N + C)^2), the form before
    # the request/candidate split; same logits to float tolerance, kept as the benchmark baseline)
    hstu_scoring: str = "cached"
    attention_impl: str | None = None  # kernels.hstu_attention implementation; None = best for platform
    use_position_emb: bool = True  # position counted from the most recent event; candidates share one position
    use_time_emb: bool = True  # bucketised log(request_time - event_time); candidates use bucket 0
    num_time_buckets: int = 64  # time buckets incl. bucket 0 (candidates); larger gaps clip to the last
    time_bucket_width: float = 0.301  # bucket = 1 + floor(ln(max(dt, 1)) / width), as in HSTU's rab
    # --- cross attention (formulas are spec proposals, UNCONFIRMED) ---
    ro_num_seeds: int = 4  # k learnable query seeds for RO cross attention
    ro_profile_query: bool = True  # extra RO query: sum-pooled user profile embeddings -> "User Profile Embs"
    cross_heads: int = 2  # heads in RO/NRO cross attention
    cross_head_dim: int = 16  # per-head width in RO/NRO cross attention
    cross_attention: str = "softmax"  # "softmax" or "silu" (HSTU-style pointwise, divided by hstu_normalizer)
    # --- MLPG ---
    # One entry per branch: "KIND" or "KIND:IN+IN" with KIND in MLPG_BRANCH_KINDS and IN a MoA output name
    # (components.py); without inputs a branch reads the MLPG-routed outputs that are on (spec §1.9 routing,
    # UNCONFIRMED). At least one "gated" branch.
    mlpg_branches: tuple[str, ...] = ("gated", "mlp")  # the MLPG logit branches (syntax above)
    mlpg_hidden: int = 32  # hidden width inside each branch
    mlpg_gate: str = "sigmoid"  # "sigmoid" or "lhuc" (2*sigmoid); UNCONFIRMED
    # --- training-time efficiency ---
    stochastic_length: bool = False  # HSTU stochastic-length history subsampling during training
    sl_alpha: float = 1.6  # SL exponent: keep full history if len <= N^(alpha/2)
    sl_sampling: str = "recency"  # which events a subsampled history keeps: "recency", "uniform" or "recent"
    compute_dtype: str = "float32"  # activation dtype of the HSTU stack ("bfloat16" on accelerators)

    def moa_off(self) -> "GESRConfig":
        """The same backbone with every MoA component off: the two-tower baseline as a GESR config."""
        return dataclasses.replace(
            self, use_hma=False, use_hstu=False, use_ro_cross=False, use_nro_cross=False, use_mlpg=False
        )

    @property
    def uses_tokens(self) -> bool:
        """Whether any attention module needs the MoA token embeddings (the RO/NRO shared tables)."""
        return self.use_hstu or self.use_ro_cross or self.use_nro_cross

    @property
    def query_fields(self) -> tuple[str, ...]:
        return self.nro_query_fields or self.candidate_fields

    def mlpg_branch_specs(self) -> tuple[tuple[str, tuple[str, ...]], ...]:
        """(kind, inputs) per MLPG branch, with default inputs resolved against the switches."""
        available = self.mlpg_available_inputs()
        specs = []
        for entry in self.mlpg_branches:
            kind, _, rest = entry.partition(":")
            default = components.mlpg_route_outputs(self)
            inputs = tuple(rest.split("+")) if rest else tuple(i for i in default if i in available)
            specs.append((kind, inputs))
        return tuple(specs)

    def mlpg_available_inputs(self) -> tuple[str, ...]:
        """MoA outputs that exist under the current switches (the component table's enabled outputs)."""
        return tuple(name for name, _ in components.enabled_outputs(self))

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first bad field (schema-dependent names are checked by the model)."""
        super().validate()
        positive = (
            "hma_max_count", "hma_dim", "hstu_layers", "hstu_heads", "hstu_qk_dim", "hstu_v_dim",
            "num_time_buckets", "ro_num_seeds", "cross_heads", "cross_head_dim", "mlpg_hidden",
        )
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"model.{name} must be >= 1, got {getattr(self, name)}")
        if not self.hma_mlp or min(self.hma_mlp) < 1:
            raise ValueError(f"model.hma_mlp needs at least one width and all >= 1, got {self.hma_mlp}")
        for name in ("hstu_normalizer", "time_bucket_width"):
            if not 0 < getattr(self, name) < float("inf"):
                raise ValueError(f"model.{name} must be finite and > 0, got {getattr(self, name)}")
        if self.hstu_alpha is not None and not 0 < self.hstu_alpha < float("inf"):
            raise ValueError(f"model.hstu_alpha must be None or finite and > 0, got {self.hstu_alpha}")
        if not 1.0 < self.sl_alpha <= 2.0:
            raise ValueError(f"model.sl_alpha must be in (1, 2], got {self.sl_alpha}")
        _one_of("cross_attention", self.cross_attention, CROSS_ATTENTION_KINDS)
        _one_of("hstu_scoring", self.hstu_scoring, ("cached", "full"))
        _one_of("mlpg_gate", self.mlpg_gate, MLPG_GATES)
        _one_of("sl_sampling", self.sl_sampling, SL_SAMPLING)
        _one_of("compute_dtype", self.compute_dtype, COMPUTE_DTYPES)
        if self.attention_impl is not None:
            from kernels.hstu_attention import IMPLEMENTATIONS

            _one_of("attention_impl", self.attention_impl, (None, *IMPLEMENTATIONS))
        if self.uses_tokens and not self.history_fields:
            raise ValueError("model.history_fields is empty, but HSTU / cross attention need history tokens")
        if self.uses_tokens and not self.candidate_fields:
            raise ValueError("model.candidate_fields is empty, but HSTU / cross attention need candidate tokens")
        if "action" in self.candidate_fields or "action" in self.query_fields:
            raise ValueError("model.candidate_fields / model.nro_query_fields cannot hold 'action' (history only)")
        if self.use_hma and not self.hma_pairs:
            raise ValueError("model.hma_pairs is empty while model.use_hma=true")
        for pair in self.hma_pairs:
            if len(pair) != 2 or "action" in pair:
                raise ValueError(f"model.hma_pairs entry {pair} must be (history field, candidate field), not 'action'")
        if self.use_mlpg:
            self._validate_mlpg_syntax()

    def _validate_mlpg_syntax(self) -> None:
        if not self.mlpg_branches:
            raise ValueError("model.mlpg_branches is empty while model.use_mlpg=true")
        for entry in self.mlpg_branches:
            kind, _, rest = entry.partition(":")
            _one_of("mlpg_branches", kind, MLPG_BRANCH_KINDS)
            known = components.all_output_names(self)
            for name in rest.split("+") if rest else ():
                if name not in known:
                    raise ValueError(f"model.mlpg_branches entry {entry!r}: unknown input {name!r}; known {known}")
        if not any(e.partition(":")[0] == "gated" for e in self.mlpg_branches):
            raise ValueError(f"model.mlpg_branches needs at least one 'gated' branch, got {self.mlpg_branches}")

    def validate_for_build(self) -> None:
        """:meth:`validate` plus cross-field consistency that only a finished config must satisfy.

        ``--set`` overrides are validated one at a time, so switching components off one by
        one passes through states (e.g. MLPG on with no MoA output left) that are fine to
        hold but not to build; the model calls this when it is built.
        """
        self.validate()
        known = [c.name for c in components.MOA_COMPONENTS]
        for name in self.extra_moa:
            if name not in known:
                raise ValueError(f"model.extra_moa names {name!r}, which is no registered MoA component; known {known}")
        if not self.use_mlpg:
            return
        available = self.mlpg_available_inputs()
        for entry in self.mlpg_branches:
            _, _, rest = entry.partition(":")
            for name in rest.split("+") if rest else ():
                if name not in available:
                    raise ValueError(
                        f"model.mlpg_branches entry {entry!r} reads {name!r}, whose module is switched off; "
                        f"available inputs: {list(available)}"
                    )
        if any(not inputs for _, inputs in self.mlpg_branch_specs()):
            raise ValueError(
                "model.use_mlpg=true but an MLPG branch has no input: switch on one of use_hstu, use_nro_cross, "
                f"use_ro_cross, or name inputs explicitly (e.g. 'gated:hma'); available: {list(available)}"
            )


def _one_of(name: str, value: object, options: tuple[object, ...]) -> None:
    if value not in options:
        raise ValueError(f"model.{name} must be one of {list(options)}, got {value!r}")

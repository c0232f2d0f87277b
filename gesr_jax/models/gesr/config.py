"""GESRConfig (``model.kind = "gesr"``): the two-tower backbone, the Mixture-of-Attention (MoA) sections and MLPG.

It extends :class:`~gesr_jax.models.two_tower.config.TwoTowerConfig` (the tower fields). Each MoA module has its
own typed section (``gesr_jax/models/config_sections.py``): ``model.hma``, ``model.hstu``, ``model.cross``
(RO and NRO), ``model.mlpg``, ``model.stochastic_length`` and the token ``model.context``, each with its switch.
With every switch off (:meth:`GESRConfig.moa_off`) the model is exactly the two-tower baseline and no MoA
parameter is created. Choices the GESR paper leaves unconfirmed (see ../shared/spec/PAPERS_SPEC.md) are fields,
with the spec's proposal as the default, and each is marked UNCONFIRMED.

Field names in ``history_fields`` / ``candidate_fields`` / ``hma.pairs`` are the dataset's item-field names:
``item`` (the item id), ``action`` (history only) and the schema's item features. The defaults fit the synthetic
data ("category", "creator"); MovieLens presets must name "genre", "year" (and "director" for ml-1m with the
extra file) instead. The model checks every name against the batch schema when it is built.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

from gesr_jax.models import config_sections as sections
from gesr_jax.models.gesr import components
from gesr_jax.models.two_tower.config import TwoTowerConfig

MLPG_BRANCH_KINDS = ("gated", "mlp")


# Where each field of the flat GESR config (workdirs written before the sections) lives now.
MOVED_FIELDS = {
    "use_hma": "hma.enabled", "hma_pairs": "hma.pairs", "hma_max_count": "hma.max_count", "hma_dim": "hma.dim",
    "hma_mlp": "hma.mlp",
    "use_hstu": "hstu.enabled", "target_aware": "hstu.target_aware", "hstu_layers": "hstu.layers",
    "hstu_heads": "hstu.heads", "hstu_qk_dim": "hstu.qk_dim", "hstu_v_dim": "hstu.v_dim",
    "hstu_normalizer": "hstu.normalizer", "hstu_alpha": "hstu.alpha", "hstu_scoring": "hstu.scoring",
    "attention_impl": "hstu.attention_impl", "compute_dtype": "hstu.compute_dtype",
    "use_position_emb": "context.position", "use_time_emb": "context.time",
    "num_time_buckets": "context.num_time_buckets", "time_bucket_width": "context.time_bucket_width",
    "use_ro_cross": "cross.ro", "use_nro_cross": "cross.nro", "ro_num_seeds": "cross.num_seeds",
    "ro_profile_query": "cross.profile_query", "cross_heads": "cross.heads", "cross_head_dim": "cross.head_dim",
    "cross_attention": "cross.kind", "nro_query_fields": "cross.nro_query_fields",
    "use_mlpg": "mlpg.enabled", "mlpg_branches": "mlpg.branches", "mlpg_hidden": "mlpg.hidden",
    "mlpg_gate": "mlpg.gate",
    "stochastic_length": "stochastic_length.enabled", "sl_alpha": "stochastic_length.alpha",
    "sl_sampling": "stochastic_length.sampling",
}  # fmt: skip


@dataclasses.dataclass(frozen=True)
class GESRConfig(TwoTowerConfig):
    kind: str = "gesr"  # registry key
    extra_moa: tuple[str, ...] = ()  # names of user MoA components (components.register_component) to switch on
    # --- which inputs feed the MoA tokens ---
    history_fields: tuple[str, ...] = ("item", "category", "creator", "action")  # summed into a history token
    candidate_fields: tuple[str, ...] = ("item", "category", "creator")  # summed into a candidate token
    # --- the MoA modules, one section each ---
    hma: sections.HMASection = sections.HMASection()  # hard matching attention
    hstu: sections.HSTUSection = sections.HSTUSection()  # target-aware HSTU self-attention
    cross: sections.CrossSection = sections.CrossSection()  # RO / NRO cross attention
    mlpg: sections.MLPGSection = sections.MLPGSection()  # multi-logit parameterized gating
    context: sections.TimeContext = sections.TimeContext()  # position and time embeddings of the MoA tokens
    stochastic_length: sections.StochasticLengthSection = sections.StochasticLengthSection()  # training only

    # flat field of an older config.json -> its path now (config.from_dict moves them; --set names the new path)
    moved_fields: ClassVar[dict[str, str]] = MOVED_FIELDS

    @staticmethod
    def upgrade_old_values(data: dict[str, Any], moved: list[str]) -> dict[str, Any]:
        """An old ``target_aware=true`` meant "target-aware whenever HSTU is on": today's unset (None)."""
        if "target_aware" in moved and data["hstu"].get("target_aware") is True:
            data["hstu"] = {**data["hstu"], "target_aware": None}
        return data

    def moa_off(self) -> GESRConfig:
        """The same backbone with every MoA component off: the two-tower baseline as a GESR config."""
        return dataclasses.replace(
            self,
            hma=dataclasses.replace(self.hma, enabled=False),
            hstu=dataclasses.replace(self.hstu, enabled=False, target_aware=None),
            cross=dataclasses.replace(self.cross, ro=False, nro=False),
            mlpg=dataclasses.replace(self.mlpg, enabled=False),
        )

    @property
    def uses_tokens(self) -> bool:
        """Whether any attention module needs the MoA token embeddings (the RO/NRO shared tables)."""
        return self.hstu.enabled or self.cross.ro or self.cross.nro

    @property
    def query_fields(self) -> tuple[str, ...]:
        return self.cross.nro_query_fields or self.candidate_fields

    def mlpg_branch_specs(self) -> tuple[tuple[str, tuple[str, ...]], ...]:
        """(kind, inputs) per MLPG branch, with default inputs resolved against the switches."""
        available = self.mlpg_available_inputs()
        specs = []
        for entry in self.mlpg.branches:
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
        if self.uses_tokens and not self.history_fields:
            raise ValueError("model.history_fields is empty, but HSTU / cross attention need history tokens")
        if self.uses_tokens and not self.candidate_fields:
            raise ValueError("model.candidate_fields is empty, but HSTU / cross attention need candidate tokens")
        if "action" in self.candidate_fields:
            raise ValueError("model.candidate_fields cannot hold 'action' (history only)")
        if self.mlpg.enabled:
            self._validate_mlpg_syntax()

    def _validate_mlpg_syntax(self) -> None:
        branches = self.mlpg.branches
        if not branches:
            raise ValueError("model.mlpg.branches is empty while model.mlpg.enabled=true")
        for entry in branches:
            kind, _, rest = entry.partition(":")
            if kind not in MLPG_BRANCH_KINDS:
                raise ValueError(f"model.mlpg.branches entry {entry!r}: kind must be one of {list(MLPG_BRANCH_KINDS)}")
            known = components.all_output_names(self)
            for name in rest.split("+") if rest else ():
                if name not in known:
                    raise ValueError(f"model.mlpg.branches entry {entry!r}: unknown input {name!r}; known {known}")
        if not any(e.partition(":")[0] == "gated" for e in branches):
            raise ValueError(f"model.mlpg.branches needs at least one 'gated' branch, got {branches}")

    def validate_for_build(self) -> None:
        """:meth:`validate` plus the checks that read the component table (user components included)."""
        self.validate()
        known = [c.name for c in components.MOA_COMPONENTS]
        for name in self.extra_moa:
            if name not in known:
                raise ValueError(f"model.extra_moa names {name!r}, which is no registered MoA component; known {known}")
        if not self.mlpg.enabled:
            return
        available = self.mlpg_available_inputs()
        for entry in self.mlpg.branches:
            _, _, rest = entry.partition(":")
            for name in rest.split("+") if rest else ():
                if name not in available:
                    raise ValueError(
                        f"model.mlpg.branches entry {entry!r} reads {name!r}, whose module is switched off; "
                        f"available inputs: {list(available)}"
                    )
        if any(not inputs for _, inputs in self.mlpg_branch_specs()):
            raise ValueError(
                "model.mlpg.enabled=true but an MLPG branch has no input: switch on one of model.hstu.enabled, "
                f"model.cross.nro, model.cross.ro, or name inputs explicitly (e.g. 'gated:hma'); available: "
                f"{list(available)}"
            )

"""Typed config sections shared by the model families: ``model.hstu``, ``model.hma``, ``model.cross``, ``model.mlpg``,
``model.stochastic_length``, ``model.context`` (GESR) and ``model.decoder``, ``model.tokens`` (GenRank).

Each section is a frozen dataclass. A string choice is a ``Literal`` type, so ``--set`` checks it from the type
(``config.parse_value``) and :func:`check_choices` checks it for configs built in Python, with no hand-written
list of options. Every section validates its own fields and names them with its path (``model.hstu.heads``).
The attention stacks of both families (GESR's HSTU, GenRank's decoder) share :class:`AttentionStack`: the kernel
implementation, the activation dtype and the fixed normaliser of the pointwise (SiLU) score. GESR's token context
and GenRank's token section share :class:`TimeContext`.

Kept free of JAX, like every config module (reading a config stays cheap).
"""

from __future__ import annotations

import dataclasses
import math
import typing
from typing import Any, Literal

ComputeDtype = Literal["float32", "bfloat16"]


def check_choices(section: Any, path: str) -> None:
    """Raise ``ValueError`` for the first ``Literal`` field of ``section`` holding a value outside its type."""
    for name, hint in typing.get_type_hints(type(section)).items():
        value, options = getattr(section, name), typing.get_args(hint)
        if typing.get_origin(hint) is Literal and value not in options:
            raise ValueError(f"{path}.{name} must be one of {list(options)}, got {value!r}")


def check_positive(section: Any, path: str, names: tuple[str, ...]) -> None:
    for name in names:
        if getattr(section, name) < 1:
            raise ValueError(f"{path}.{name} must be >= 1, got {getattr(section, name)}")


def check_finite_positive(section: Any, path: str, names: tuple[str, ...]) -> None:
    for name in names:
        value = getattr(section, name)
        if value is not None and not 0 < value < math.inf:
            raise ValueError(f"{path}.{name} must be finite and > 0, got {value}")


@dataclasses.dataclass(frozen=True)
class AttentionStack:
    """What every attention stack of the project has: execution settings of the shared kernels."""

    layers: int = 2  # stacked attention layers
    heads: int = 2  # attention heads
    normalizer: float = 64.0  # fixed divisor of the pointwise (SiLU) attention weights (not the padded length)
    attention_impl: str | None = None  # kernels.hstu_attention implementation; None = best for the platform
    compute_dtype: ComputeDtype = "float32"  # activation dtype of the stack ("bfloat16" on accelerators)

    def validate(self, path: str) -> None:
        check_choices(self, path)
        check_positive(self, path, ("layers", "heads"))
        check_finite_positive(self, path, ("normalizer",))
        if self.attention_impl is not None:
            # Lazy: the kernel registry imports JAX, which config reading avoids; only a named backend needs it.
            from kernels.hstu_attention import IMPLEMENTATIONS

            if self.attention_impl not in IMPLEMENTATIONS:
                raise ValueError(
                    f"{path}.attention_impl must be None or one of {list(IMPLEMENTATIONS)}, got {self.attention_impl!r}"
                )


@dataclasses.dataclass(frozen=True)
class HSTUSection(AttentionStack):
    """GESR's target-aware HSTU (``model.hstu``)."""

    enabled: bool = True  # HSTU self-attention (off = no self attention at all)
    # The paper's ablation: false = every candidate reads the last history output. None = on whenever HSTU is on;
    # true with enabled=false is a config error (it would train without HSTU, silently).
    target_aware: bool | None = None
    qk_dim: int = 16  # per-head query/key width
    v_dim: int = 16  # per-head value width
    alpha: float | None = None  # score scale inside silu; None = 1/sqrt(qk_dim) (production STU)
    # "cached": candidates attend to each layer's cached history K/V (O(N^2 + C N) per request, the serving
    # path); "full": one pass over the packed [history ; candidates] sequence (O((N + C)^2), the form before
    # the request/candidate split; same logits to float tolerance, kept as the benchmark baseline)
    scoring: Literal["cached", "full"] = "cached"

    @property
    def is_target_aware(self) -> bool:
        return self.enabled and self.target_aware is not False

    def validate(self, path: str = "model.hstu") -> None:
        super().validate(path)
        check_positive(self, path, ("qk_dim", "v_dim"))
        check_finite_positive(self, path, ("alpha",))
        if self.target_aware and not self.enabled:
            raise ValueError(
                f"{path}.target_aware=true needs {path}.enabled=true: without HSTU there is nothing to make "
                f"target-aware (set {path}.target_aware=false or leave it unset)"
            )


@dataclasses.dataclass(frozen=True)
class HMASection:
    """Hard Matching Attention (``model.hma``): capped match counts of (history, candidate) field pairs."""

    enabled: bool = True  # explicit match counts
    # (history field, candidate field) pairs whose matches HMA counts; the paper's pairs are UNCONFIRMED
    pairs: tuple[tuple[str, str], ...] = (("item", "item"), ("category", "category"), ("creator", "creator"))
    max_count: int = 8  # M: counts are capped at M; table stride M+1 (UNCONFIRMED: paper shows stride M)
    dim: int = 8  # width of one count embedding (D in the paper's Fig. 4)
    mlp: tuple[int, ...] = (32,)  # MLP over the flattened per-pair count embeddings; last = output width

    def validate(self, path: str = "model.hma") -> None:
        check_positive(self, path, ("max_count", "dim"))
        if not self.mlp or min(self.mlp) < 1:
            raise ValueError(f"{path}.mlp needs at least one width and all >= 1, got {self.mlp}")
        if self.enabled and not self.pairs:
            raise ValueError(f"{path}.pairs is empty while {path}.enabled=true")
        for pair in self.pairs:
            if len(pair) != 2 or "action" in pair:
                raise ValueError(f"{path}.pairs entry {pair} must be (history field, candidate field), not 'action'")


@dataclasses.dataclass(frozen=True)
class CrossSection:
    """RO / NRO cross attention (``model.cross``; formulas are spec proposals, UNCONFIRMED)."""

    ro: bool = True  # RO cross attention with learnable seeds
    nro: bool = True  # NRO cross attention with gated update
    num_seeds: int = 4  # k learnable query seeds for RO cross attention
    profile_query: bool = True  # extra RO query: sum-pooled user profile embeddings -> "User Profile Embs"
    heads: int = 2  # heads in RO/NRO cross attention
    head_dim: int = 16  # per-head width in RO/NRO cross attention
    kind: Literal["softmax", "silu"] = "softmax"  # "silu": HSTU-style pointwise, divided by model.hstu.normalizer
    nro_query_fields: tuple[str, ...] = ()  # sum-pooled NRO cross-attention query; () = model.candidate_fields

    def validate(self, path: str = "model.cross") -> None:
        check_choices(self, path)
        check_positive(self, path, ("num_seeds", "heads", "head_dim"))
        if "action" in self.nro_query_fields:
            raise ValueError(f"{path}.nro_query_fields cannot hold 'action' (history only)")


@dataclasses.dataclass(frozen=True)
class MLPGSection:
    """Multi-logit parameterized gating (``model.mlpg``); off = its inputs join the main interaction MLP."""

    enabled: bool = True  # the amplified MLPG logits
    # One entry per branch: "KIND" or "KIND:IN+IN" with KIND "gated" or "mlp" and IN a MoA output name
    # (components.py); without inputs a branch reads the MLPG-routed outputs that are on (spec §1.9 routing,
    # UNCONFIRMED). At least one "gated" branch.
    branches: tuple[str, ...] = ("gated", "mlp")
    hidden: int = 32  # hidden width inside each branch
    gate: Literal["sigmoid", "lhuc"] = "sigmoid"  # "lhuc" = 2*sigmoid; UNCONFIRMED

    def validate(self, path: str = "model.mlpg") -> None:
        check_choices(self, path)
        check_positive(self, path, ("hidden",))


@dataclasses.dataclass(frozen=True)
class StochasticLengthSection:
    """HSTU stochastic-length history subsampling during training (``model.stochastic_length``)."""

    enabled: bool = False  # subsample long histories in training steps (never in eval or serving)
    alpha: float = 1.6  # SL exponent: keep full history if len <= N^(alpha/2)
    sampling: Literal["recency", "uniform", "recent"] = "recency"  # which events a subsampled history keeps

    def validate(self, path: str = "model.stochastic_length") -> None:
        check_choices(self, path)
        if not 1.0 < self.alpha <= 2.0:
            raise ValueError(f"{path}.alpha must be in (1, 2], got {self.alpha}")


@dataclasses.dataclass(frozen=True)
class TimeContext:
    """Position and time-gap embeddings added to sequence tokens (shared by GESR's and GenRank's tokens)."""

    position: bool = True  # position counted back from the most recent event; candidates share one position
    time: bool = True  # bucketised log time gap; candidates use bucket 0
    num_time_buckets: int = 64  # time buckets incl. bucket 0 (candidates); larger gaps clip to the last
    time_bucket_width: float = 0.301  # bucket = 1 + floor(ln(max(dt, 1)) / width), as in HSTU's rab

    def validate(self, path: str = "model.context") -> None:
        check_choices(self, path)
        check_positive(self, path, ("num_time_buckets",))
        check_finite_positive(self, path, ("time_bucket_width",))


@dataclasses.dataclass(frozen=True)
class DecoderSection(AttentionStack):
    """GenRank's causal decoder (``model.decoder``)."""

    head_dim: int = 16  # per-head query/key/value width
    mlp: Literal["swiglu", "gelu"] = "swiglu"  # block MLP (UNCONFIRMED)
    mlp_dim: int = 64  # block MLP hidden width
    attention: Literal["softmax", "hstu"] = "softmax"  # score function; "hstu" = pointwise SiLU / normalizer
    alibi: bool = True  # ALiBi over (collapsed) token positions
    time_alibi: bool = False  # ALiBi over time: -slope * log1p(|t_i - t_j|) in seconds
    learnable_slopes: bool = False  # slopes are nnx.Params (init geometric, unconstrained) instead of fixed

    def validate(self, path: str = "model.decoder") -> None:
        super().validate(path)
        check_positive(self, path, ("head_dim", "mlp_dim"))


@dataclasses.dataclass(frozen=True)
class GenRankTokensSection(TimeContext):
    """GenRank's tokens (``model.tokens``): layout and context embeddings; ``time`` is the pre-request time."""

    layout: Literal["action", "interleaved"] = "action"  # one token per event (GenRank), or item then action token
    request: bool = True  # E_req_idx: request (session) counted back; candidates = 0, the current one
    session_gap: int = 1800  # seconds; a gap above this starts a new request (UNCONFIRMED)
    num_requests: int = 16  # request-index table rows incl. 0 (candidates); older requests share the last
    num_time_buckets: int = 32  # pre-request-time buckets incl. 0 (no previous request); larger clip
    time_bucket_width: float = 0.301  # bucket = 1 + floor(ln(max(dt, 1)) / width) (UNCONFIRMED)

    def validate(self, path: str = "model.tokens") -> None:
        super().validate(path)
        check_positive(self, path, ("num_requests",))
        if self.session_gap < 0:
            raise ValueError(f"{path}.session_gap must be >= 0 seconds, got {self.session_gap}")

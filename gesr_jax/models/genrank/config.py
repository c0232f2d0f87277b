"""GenRankConfig (``model.kind = "genrank"``): Xiaohongshu's generative ranker (spec §3, arXiv 2505.04180).

Kept free of JAX (reading a config stays cheap). Choices the paper leaves open are fields here, the spec's
proposal as the default, each marked UNCONFIRMED:

* ``genrank_attention`` = "softmax" (ALiBi "fused into FlashAttention" implies softmax; "hstu" = HSTU's
  pointwise SiLU, divided by ``genrank_hstu_normalizer``) -- UNCONFIRMED;
* ALiBi distance in positions (``genrank_alibi``, on) and/or in time (``genrank_time_alibi``, off), slopes
  2^(-8h/H) (``geometric_alibi_slopes``), fixed or learnable (``genrank_learnable_slopes``), one set shared by
  every layer -- UNCONFIRMED;
* the request (session) of a history event is not in the batch: a new request starts where the gap to the
  previous event exceeds ``genrank_session_gap`` seconds -- UNCONFIRMED;
* the pre-request time bucket 1 + floor(ln(max(dt, 1)) / ``genrank_time_bucket_width``) -- UNCONFIRMED;
* the interleaved baseline's candidates contribute one (item) token each -- UNCONFIRMED (model.py docstring);
* SwiGLU MLP in the decoder blocks, an MLP multi-task head on the candidate outputs -- UNCONFIRMED.

``history_fields`` / ``candidate_fields`` are the dataset's item-field names (``item`` and the schema's item
features: "category", "creator" on the synthetic log; "genre", "year", "director" on ML-1M). The action
embedding phi(a) is always part of a history token, so "action" in ``history_fields`` is accepted and
redundant (a GESR config converted with ``--set model.kind=genrank`` keeps its fields). The model checks every
name against the batch schema when it is built.
"""

from __future__ import annotations

import dataclasses

from gesr_jax.models.config_base import ModelConfigBase

TOKEN_LAYOUTS = ("action", "interleaved")
ATTENTION_KINDS = ("softmax", "hstu")
MLP_KINDS = ("swiglu", "gelu")
COMPUTE_DTYPES = ("float32", "bfloat16")


@dataclasses.dataclass(frozen=True)
class GenRankConfig(ModelConfigBase):
    kind: str = "genrank"  # registry key
    embed_dim: int = 32  # model width D: every embedding table and the decoder's residual stream
    history_fields: tuple[str, ...] = ("item", "category", "creator")  # item fields summed into phi(x) of history
    candidate_fields: tuple[str, ...] = ("item", "category", "creator")  # item fields summed into phi(x) of a candidate
    dropout: float = 0.1  # dropout on attention/MLP residual branches and head hidden layers (train=True only)
    # --- tokens ---
    genrank_tokens: str = "action"  # "action": one token per event (GenRank); "interleaved": item then action token
    genrank_use_position_emb: bool = True  # E_pos: index counted back from the most recent event; candidates share 0
    genrank_use_request_emb: bool = True  # E_req_idx: request (session) counted back; candidates = 0, the current one
    genrank_use_pre_request_time_emb: bool = True  # E_pre_req_time: log bucket of the gap to the previous request
    genrank_session_gap: int = 1800  # seconds; a gap above this starts a new request (UNCONFIRMED)
    genrank_num_requests: int = 16  # request-index table rows incl. 0 (candidates); older requests share the last
    genrank_num_time_buckets: int = 32  # pre-request-time buckets incl. 0 (no previous request); larger clip
    genrank_time_bucket_width: float = 0.301  # bucket = 1 + floor(ln(max(dt, 1)) / width) (UNCONFIRMED)
    # --- decoder ---
    genrank_layers: int = 2  # decoder blocks L (paper: 3 at industrial scale)
    genrank_heads: int = 2  # attention heads H (paper: 8)
    genrank_head_dim: int = 16  # per-head query/key/value width
    genrank_mlp: str = "swiglu"  # block MLP: "swiglu" or "gelu" (UNCONFIRMED)
    genrank_mlp_dim: int = 64  # block MLP hidden width
    genrank_attention: str = "softmax"  # "softmax" or "hstu" (pointwise SiLU) score function (UNCONFIRMED)
    genrank_hstu_normalizer: float = 64.0  # with genrank_attention="hstu": fixed divisor of the SiLU weights
    genrank_alibi: bool = True  # ALiBi over (collapsed) token positions
    genrank_time_alibi: bool = False  # ALiBi over time: -slope * log1p(|t_i - t_j|) in seconds
    genrank_learnable_slopes: bool = False  # slopes are nnx.Params (init geometric, unconstrained) instead of fixed
    # --- head ---
    genrank_head_mlp: tuple[int, ...] = (32,)  # hidden widths of the multi-task head (then one logit per task)
    # --- execution ---
    attention_impl: str | None = None  # kernels.hstu_attention implementation; None = best for the platform
    compute_dtype: str = "float32"  # activation dtype of the decoder ("bfloat16" on accelerators)

    @property
    def interleaved(self) -> bool:
        return self.genrank_tokens == "interleaved"

    @property
    def item_history_fields(self) -> tuple[str, ...]:
        """``history_fields`` without "action" (phi(a) is added separately)."""
        return tuple(f for f in self.history_fields if f != "action")

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first bad field (schema-dependent names are checked by the model)."""
        super().validate()
        positive = (
            "embed_dim", "genrank_num_requests", "genrank_num_time_buckets", "genrank_layers", "genrank_heads",
            "genrank_head_dim", "genrank_mlp_dim",
        )  # fmt: skip
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"model.{name} must be >= 1, got {getattr(self, name)}")
        if self.genrank_session_gap < 0:
            raise ValueError(f"model.genrank_session_gap must be >= 0 seconds, got {self.genrank_session_gap}")
        for name in ("genrank_time_bucket_width", "genrank_hstu_normalizer"):
            if not 0 < getattr(self, name) < float("inf"):
                raise ValueError(f"model.{name} must be finite and > 0, got {getattr(self, name)}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"model.dropout must be in [0, 1), got {self.dropout}")
        if any(w < 1 for w in self.genrank_head_mlp):
            raise ValueError(f"model.genrank_head_mlp widths must be >= 1, got {self.genrank_head_mlp}")
        _one_of("genrank_tokens", self.genrank_tokens, TOKEN_LAYOUTS)
        _one_of("genrank_attention", self.genrank_attention, ATTENTION_KINDS)
        _one_of("genrank_mlp", self.genrank_mlp, MLP_KINDS)
        _one_of("compute_dtype", self.compute_dtype, COMPUTE_DTYPES)
        if self.attention_impl is not None:
            from kernels.hstu_attention import IMPLEMENTATIONS

            _one_of("attention_impl", self.attention_impl, (None, *IMPLEMENTATIONS))
        if not self.item_history_fields:
            raise ValueError("model.history_fields needs at least one item field (e.g. 'item')")
        if not self.candidate_fields:
            raise ValueError("model.candidate_fields needs at least one item field (e.g. 'item')")
        if "action" in self.candidate_fields:
            raise ValueError("model.candidate_fields cannot hold 'action' (candidates carry the mask action M)")
        for name in ("history_fields", "candidate_fields"):
            values = getattr(self, name)
            if len(set(values)) != len(values):
                raise ValueError(f"model.{name} names a field twice: {values}")


def _one_of(name: str, value: object, options: tuple[object, ...]) -> None:
    if value not in options:
        raise ValueError(f"model.{name} must be one of {list(options)}, got {value!r}")

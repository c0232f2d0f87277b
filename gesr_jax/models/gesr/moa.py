"""The built-in MoA components, adapted from the shared layers to GESR's config and two-stage protocol.

A MoA component is an ``nnx.Module`` with

* ``from_config(config, schema, *, rngs)`` (classmethod): build from the GESR config;
* ``encode_request(ctx: RequestContext, *, key) -> cache``: request-only work, once per request. For an "ro"
  component (components.py) the cache IS its outputs ``{name: [B, 1, w]}``;
* ``score_candidates(cache, ctx: CandidateContext, *, key) -> {name: [B, C or 1, w]}`` (only "nro" components).

A new component follows the same pattern in its own file and gets one row in ``components.MOA_COMPONENTS``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
from flax import nnx

from gesr_jax.data.batch import BatchSchema
from gesr_jax.layers.cross_attention import NROCrossAttention, ROCrossAttention
from gesr_jax.layers.hard_matching import HardMatching
from gesr_jax.layers.hstu import TargetAwareHSTU
from gesr_jax.layers.sequence import unpack_candidates
from gesr_jax.models.gesr.config import GESRConfig


@dataclasses.dataclass
class RequestContext:
    """What a component's ``encode`` may read; everything here is per request."""

    request: dict[str, jax.Array]  # the request part of the batch
    history: jax.Array | None  # MoA history tokens [B, N, D] (None when no attention module is on)
    history_valid: jax.Array  # [B, N]
    history_len: jax.Array  # [B]
    profile: jax.Array | None  # sum-pooled user profile embeddings [B, D], None when the user has none


@dataclasses.dataclass
class CandidateContext:
    """What a component's ``score`` may read, for one chunk of candidates."""

    candidates: dict[str, jax.Array]  # the candidate part of the batch
    tokens: jax.Array | None  # candidate tokens for HSTU [B, C, D]
    unified: jax.Array | None  # unified item embeddings [B, C, D]
    query: Any  # callable () -> sum-pooled NRO query [B, C, D]
    valid: jax.Array  # [B, C]
    num_candidates: jax.Array  # [B]
    history_valid: jax.Array  # [B, N]
    history_len: jax.Array  # [B]


class HMAComponent(HardMatching):
    """Hard Matching Attention: sorted history ids per request, capped match counts per candidate."""

    @classmethod
    def from_config(cls, config: GESRConfig, schema: BatchSchema, *, rngs: nnx.Rngs) -> HMAComponent:
        hma = config.hma
        return cls(hma.pairs, max_count=hma.max_count, dim=hma.dim, mlp_widths=hma.mlp, dropout_rate=config.dropout,
                   rngs=rngs)  # fmt: skip

    def encode_request(self, ctx: RequestContext, *, key: jax.Array | None = None) -> dict[str, jax.Array]:
        return HardMatching.encode(self, ctx.request)

    def score_candidates(self, cache, ctx: CandidateContext, *, key: jax.Array | None = None) -> dict[str, jax.Array]:
        return {"hma": HardMatching.score(self, cache, ctx.candidates, key=key)}


class HSTUComponent(TargetAwareHSTU):
    """Target-aware HSTU: history K/V per layer cached per request; candidate rows per chunk."""

    @classmethod
    def from_config(cls, config: GESRConfig, schema: BatchSchema, *, rngs: nnx.Rngs) -> HSTUComponent:
        hstu = config.hstu
        module = cls(
            config.embed_dim, target_aware=hstu.is_target_aware, num_layers=hstu.layers,
            compute_dtype=hstu.compute_dtype, heads=hstu.heads, qk_dim=hstu.qk_dim, v_dim=hstu.v_dim,
            normalizer=hstu.normalizer, alpha=hstu.alpha, attention_impl=hstu.attention_impl,
            dropout_rate=config.dropout, rngs=rngs,
        )  # fmt: skip
        module.full_sequence = hstu.scoring == "full" and hstu.is_target_aware
        return module

    def encode_request(self, ctx: RequestContext, *, key: jax.Array | None = None) -> dict[str, Any]:
        if self.full_sequence:  # the history is re-run with every candidate chunk in score_candidates
            return {"history": ctx.history}
        return TargetAwareHSTU.encode(self, ctx.history, ctx.history_len, key=key)

    def score_candidates(self, cache, ctx: CandidateContext, *, key: jax.Array | None = None) -> dict[str, jax.Array]:
        if self.full_sequence:
            seq = self.sequence(cache["history"], ctx.tokens, ctx.history_len, ctx.num_candidates, key=key)
            return {"hstu": unpack_candidates(seq, ctx.history_len, ctx.num_candidates, ctx.tokens.shape[1])}
        out = TargetAwareHSTU.score(self, cache, ctx.tokens, ctx.history_len, ctx.num_candidates, key=key)
        return {"hstu": out}


class ROCrossComponent(ROCrossAttention):
    """RO cross attention: learnable seeds (and the user profile) into the history, once per request."""

    @classmethod
    def from_config(cls, config: GESRConfig, schema: BatchSchema, *, rngs: nnx.Rngs) -> ROCrossComponent:
        cross = config.cross
        return cls(
            config.embed_dim, num_seeds=cross.num_seeds, profile_query=cross.profile_query,
            dropout_rate=config.dropout, heads=cross.heads, head_dim=cross.head_dim,
            kind=cross.kind, normalizer=config.hstu.normalizer, rngs=rngs,
        )  # fmt: skip

    def encode_request(self, ctx: RequestContext, *, key: jax.Array | None = None) -> dict[str, jax.Array]:
        if self.profile_query and ctx.profile is None:
            raise ValueError(
                "model.cross.profile_query=true needs user profile embeddings, but this model has none "
                "(no user features and model.use_user_id=false)"
            )
        summary, prof = ROCrossAttention.__call__(self, ctx.history, ctx.history_valid, ctx.profile, key=key)
        out = {"ro_summary": summary[:, None, :]}
        if prof is not None:
            out["ro_profile"] = prof[:, None, :]
        return out


class NROCrossComponent(NROCrossAttention):
    """NRO cross attention: history K/V once per request; gated candidate queries per chunk."""

    @classmethod
    def from_config(cls, config: GESRConfig, schema: BatchSchema, *, rngs: nnx.Rngs) -> NROCrossComponent:
        cross = config.cross
        return cls(config.embed_dim, heads=cross.heads, head_dim=cross.head_dim, kind=cross.kind,
                   normalizer=config.hstu.normalizer, rngs=rngs)  # fmt: skip

    def encode_request(self, ctx: RequestContext, *, key: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
        return NROCrossAttention.encode(self, ctx.history)

    def score_candidates(self, cache, ctx: CandidateContext, *, key: jax.Array | None = None) -> dict[str, jax.Array]:
        return {"nro_cross": NROCrossAttention.score(self, ctx.query(), cache, ctx.history_valid)}

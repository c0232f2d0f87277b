"""Target-aware HSTU (spec §1.6, §2.2, §2.7): HSTU layers over [history ; candidates].

One layer (HSTU paper eq. 1-3, research-code form with a learnable input LayerNorm)::

    u, v, q, k = split(silu(W_uvqk LayerNorm(x)))       fused projection, SiLU on all four
    a          = hstu_attention(q, k, v, ...)            pointwise silu(alpha q.k) / normalizer, target-aware mask
    x         <- x + W_o dropout(LayerNorm(a) * u)

All attention goes through ``kernels.hstu_attention``; the normaliser is the fixed
``model.hstu_normalizer``, so a request's outputs never depend on how it was padded.
Position and time are already in the input tokens (features.py), so no attention bias.

Packing: history is right-padded to N and candidates to C separately in the batch; the
kernel wants each row as [valid history ; valid candidates ; padding]. :func:`pack` builds
that [B, N + C, D] sequence with one gather per row, and :func:`unpack_candidates` gathers
the candidate rows back to [B, C, D]; those are the "Target-Aware User Embeddings".
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from gesr_jax.models.config import ModelConfig
from gesr_jax.models.layers import Dense, LayerNorm, dropout, fold
from kernels.hstu_attention import hstu_attention


def pack(history: jax.Array, candidates: jax.Array, history_len: jax.Array, num_candidates: jax.Array) -> jax.Array:
    """[B, N, D] history and [B, C, D] candidates -> [B, N + C, D] rows [hist[:len] ; cand[:nc] ; zeros]."""
    n, c = history.shape[1], candidates.shape[1]
    p = jnp.arange(n + c)[None, :]
    hlen, nc = history_len[:, None], num_candidates[:, None]
    idx = jnp.where(p < hlen, p, n + p - hlen)
    valid = p < hlen + nc
    both = jnp.concatenate([history, candidates], axis=1)
    out = jnp.take_along_axis(both, jnp.clip(idx, 0, n + c - 1)[..., None], axis=1)
    return jnp.where(valid[..., None], out, 0.0)


def unpack_candidates(seq: jax.Array, history_len: jax.Array, num_candidates: jax.Array, c: int) -> jax.Array:
    """Rows of the packed sequence that hold candidates, back in candidate-slot order [B, C, D]; padding zero."""
    length = seq.shape[1]
    slot = jnp.arange(c)[None, :]
    idx = jnp.clip(history_len[:, None] + slot, 0, length - 1)
    out = jnp.take_along_axis(seq, idx[..., None], axis=1)
    return jnp.where((slot < num_candidates[:, None])[..., None], out, 0.0)


def last_history(seq: jax.Array, history_len: jax.Array) -> jax.Array:
    """Output at the most recent history position, [B, D] (zero for an empty history)."""
    idx = jnp.clip(history_len - 1, 0, seq.shape[1] - 1)
    out = jnp.take_along_axis(seq, idx[:, None, None], axis=1)[:, 0]
    return jnp.where((history_len > 0)[:, None], out, 0.0)


class HSTULayer(nnx.Module):
    """One HSTU layer with the fused UVQK projection and U-gated, LayerNorm'd pointwise attention."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        d, h = config.embed_dim, config.hstu_heads
        self.heads, self.qk_dim, self.v_dim = h, config.hstu_qk_dim, config.hstu_v_dim
        self.norm_in = LayerNorm(d, rngs=rngs)
        self.uvqk = Dense(d, 2 * h * (self.v_dim + self.qk_dim), rngs=rngs, names=("embed", "heads"))
        self.norm_attn = LayerNorm(h * self.v_dim, rngs=rngs, name="heads")
        self.out = Dense(h * self.v_dim, d, rngs=rngs, names=("heads", "embed"))
        self.normalizer = float(config.hstu_normalizer)
        self.alpha = config.hstu_alpha
        self.implementation = config.attention_impl
        self.dropout_rate = config.dropout

    def __call__(
        self, x: jax.Array, lengths: jax.Array, num_targets: jax.Array, *, key: jax.Array | None = None
    ) -> jax.Array:
        b, length, _ = x.shape
        h, dqk, dv = self.heads, self.qk_dim, self.v_dim
        uvqk = jax.nn.silu(self.uvqk(self.norm_in(x)))
        u, v, q, k = jnp.split(uvqk, [h * dv, 2 * h * dv, 2 * h * dv + h * dqk], axis=-1)
        attn = hstu_attention(
            q.reshape(b, length, h, dqk),
            k.reshape(b, length, h, dqk),
            v.reshape(b, length, h, dv),
            lengths,
            num_targets,
            normalizer=self.normalizer,
            alpha=self.alpha,
            implementation=self.implementation,
        ).reshape(b, length, h * dv)
        y = self.out(dropout(self.norm_attn(attn) * u, self.dropout_rate, key))
        return x + y


class HSTUStack(nnx.Module):
    """``hstu_layers`` HSTU layers and a final LayerNorm; rows at or beyond ``lengths`` are zero."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        self.layers = nnx.List([HSTULayer(config, rngs=rngs) for _ in range(config.hstu_layers)])
        self.norm_out = LayerNorm(config.embed_dim, rngs=rngs)
        self.dtype = jnp.dtype(config.compute_dtype)

    def __call__(
        self, x: jax.Array, lengths: jax.Array, num_targets: jax.Array, *, key: jax.Array | None = None
    ) -> jax.Array:
        valid = (jnp.arange(x.shape[1])[None, :] < lengths[:, None])[..., None]
        x = x.astype(self.dtype)
        for i, layer in enumerate(self.layers):
            # Re-zero padding rows: they never reach valid rows (the kernel masks them), but zeros keep
            # the residual stream free of whatever the projections make of padding.
            x = jnp.where(valid, layer(x, lengths, num_targets, key=fold(key, i)), 0.0).astype(self.dtype)
        return jnp.where(valid, self.norm_out(x), 0.0).astype(jnp.float32)


class TargetAwareHSTU(nnx.Module):
    """Candidate rows of HSTU([history ; candidates]) (target-aware) or the last history output (ablation)."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        self.stack = HSTUStack(config, rngs=rngs)
        self.target_aware = config.target_aware

    def sequence(
        self,
        history: jax.Array,
        candidates: jax.Array,
        history_len: jax.Array,
        num_candidates: jax.Array,
        *,
        key: jax.Array | None = None,
    ) -> jax.Array:
        """The packed stack output [B, N + C, D] (target-aware) or [B, N, D] over history alone (ablation)."""
        if not self.target_aware:
            return self.stack(history, history_len, jnp.zeros_like(history_len), key=key)
        seq = pack(history, candidates, history_len, num_candidates)
        return self.stack(seq, history_len + num_candidates, num_candidates, key=key)

    def __call__(
        self,
        history: jax.Array,
        candidates: jax.Array,
        history_len: jax.Array,
        num_candidates: jax.Array,
        *,
        key: jax.Array | None = None,
    ) -> jax.Array:
        """Target-aware user embeddings [B, C, D], or [B, 1, D] (one per request, broadcast) in the ablation."""
        seq = self.sequence(history, candidates, history_len, num_candidates, key=key)
        if not self.target_aware:
            return last_history(seq, history_len)[:, None, :]
        return unpack_candidates(seq, history_len, num_candidates, candidates.shape[1])

"""Pure-jnp ranking attention: the oracle every backend is tested against (plain autodiff, no custom_vjp).

`attention_mask` expands `masks.tile_mask` (the one mask definition, shared with the kernels and tested
against a literal transcription of the issue) to [B, L, L]. `hstu_attention_reference` is the full-sequence
forward, `hstu_attention_cached_reference` the cached-prefix one; `jax.grad` of either is the gradient oracle
(slopes included). Scores, biases and activations come from `scores.py`. Both materialise the dense
[B, H, rows, keys] scores and biases: this is the oracle and the CPU fallback, not the fast path.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from kernels.hstu_attention import scores
from kernels.hstu_attention.masks import MaskSpec, tile_mask
from kernels.hstu_attention.scores import ScoreSpec

_HI = jax.lax.Precision.HIGHEST


def attention_mask(
    lengths: jax.Array,
    num_targets: jax.Array | None,
    seq_len: int,
    *,
    contextual_len: int = 0,
    max_attn_len: int | None = None,
) -> jax.Array:
    """Boolean [B, L, L] mask; entry (b, i, j) says whether query i may attend to key j in row b."""
    lengths = lengths.astype(jnp.int32)
    targets = jnp.zeros_like(lengths) if num_targets is None else num_targets.astype(jnp.int32)
    hist = lengths - targets
    pos = jnp.arange(seq_len, dtype=jnp.int32)
    return tile_mask(
        pos[None, :, None],
        pos[None, None, :],
        lengths[:, None, None],
        hist[:, None, None],
        MaskSpec(contextual_len, max_attn_len),
    )


def _scores(q: jax.Array, k: jax.Array, alpha: float) -> jax.Array:
    """alpha * q.k in float32, [B, H, Lq, Lk]."""
    qf = q.astype(jnp.float32)
    kf = k.astype(jnp.float32)
    return alpha * jnp.einsum("bihd,bjhd->bhij", qf, kf, precision=_HI)


def _per_head(x):
    return None if x is None else x.astype(jnp.float32)[None, :, None, None]


def full_bias(spec: ScoreSpec, lengths, num_targets, seq_len, alibi_slopes, timestamps, time_slopes):
    """Dense [B, H, L, L] bias of the full call (None when off): ALiBi on collapsed positions, time buckets."""
    if not spec.has_bias:
        return None
    hist = (lengths - num_targets).astype(jnp.int32)
    pos = jnp.arange(seq_len, dtype=jnp.int32)
    dist = scores.position_distance(pos[None, None, :, None], pos[None, None, None, :], hist[:, None, None, None])
    dt = None if timestamps is None else (timestamps[:, :, None] - timestamps[:, None, :])[:, None]
    return scores.bias(spec, dist, dt, _per_head(alibi_slopes), _per_head(time_slopes))


def cached_bias(spec: ScoreSpec, prefix_len, num_prefix, num_queries, alibi_slopes, timestamps,
                prefix_timestamps, time_slopes):
    """Dense [B, H, C, N + 1] bias of the cached call: N prefix keys (distance prefix_len - j), then the self key
    (distance 0, time difference 0: bias 0)."""
    prefix = cached_prefix_bias(spec, prefix_len, num_prefix, num_queries, alibi_slopes, timestamps,
                                prefix_timestamps, time_slopes)
    if prefix is None:
        return None
    batch, heads = prefix_len.shape[0], prefix.shape[1]
    prefix = jnp.broadcast_to(prefix, (batch, heads, num_queries, num_prefix))
    return jnp.concatenate([prefix, jnp.zeros((batch, heads, num_queries, 1), prefix.dtype)], -1)


def cached_prefix_bias(spec: ScoreSpec, prefix_len, num_prefix, num_queries, alibi_slopes, timestamps,
                       prefix_timestamps, time_slopes):
    """The first N key columns of `cached_bias`, broadcastable to [B, H, C, N] (None when no bias is on). The
    self key's column is 0 (distance 0, time difference 0), so a caller that keeps the self key apart adds none."""
    if not spec.has_bias:
        return None
    j = jnp.arange(num_prefix, dtype=jnp.int32)
    dist = (prefix_len[:, None] - j[None, :])[:, None, None, :].astype(jnp.float32)  # [B, 1, 1, N]: same per row
    dt = None if timestamps is None else (timestamps[:, :, None] - prefix_timestamps[:, None, :])[:, None]
    return scores.bias(spec, dist, dt, _per_head(alibi_slopes), _per_head(time_slopes))


def cached_mask_parts(prefix_len, num_queries, num_prefix, num_rows, *, self_term, contextual_len, max_attn_len):
    """(Boolean [B, C, N] over the prefix keys, [B, C] for the self key): the two parts of `cached_mask`."""
    j = jnp.arange(num_prefix, dtype=jnp.int32)[None, :]
    keys = j < prefix_len[:, None]
    if max_attn_len is not None:
        keys &= ((prefix_len[:, None] - j) <= max_attn_len) | (j < contextual_len)
    rows = jnp.arange(num_rows, dtype=jnp.int32)[None, :] < num_queries[:, None]
    return rows[:, :, None] & keys[:, None, :], rows & self_term


def cached_mask(prefix_len, num_queries, num_prefix, num_rows, *, self_term, contextual_len, max_attn_len):
    """Boolean [B, C, N + 1]: prefix keys j < prefix_len (window: prefix_len - j <= w unless j < contextual_len),
    then the self key (when self_term); rows c >= num_queries see nothing."""
    prefix, selfk = cached_mask_parts(prefix_len, num_queries, num_prefix, num_rows, self_term=self_term,
                                      contextual_len=contextual_len, max_attn_len=max_attn_len)
    return jnp.concatenate([prefix, selfk[:, :, None]], -1)


def softmax_weights(z: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(P, lse): softmax over the valid keys of each row; rows without a valid key get P = 0 and lse = 0."""
    m = jax.lax.stop_gradient(jnp.max(jnp.where(mask, z, -jnp.inf), axis=-1, keepdims=True))
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    # Masked scores are replaced before exp (not after), so a huge masked score cannot leak inf * 0 = NaN
    # into the gradient.
    e = jnp.where(mask, jnp.exp(jnp.where(mask, z, m) - m), 0.0)
    l = jnp.sum(e, axis=-1, keepdims=True)
    empty = l <= 0.0
    safe_l = jnp.where(empty, 1.0, l)
    return e / safe_l, jnp.where(empty, 0.0, m + jnp.log(safe_l))


def weights(spec: ScoreSpec, z, mask, normalizer):
    """Attention weights of dense scores z under mask: silu(z) / normalizer or the masked softmax."""
    if spec.softmax:
        return softmax_weights(z, mask)[0]
    # `where`, not multiplication, so that a huge masked score can never turn into inf * 0.
    return jnp.where(mask, jax.nn.silu(z), 0.0) / normalizer


def hstu_attention_reference(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    lengths: jax.Array,
    num_targets: jax.Array | None = None,
    *,
    score_fn: str = "silu",
    normalizer: float | None = None,
    alpha: float | None = None,
    alibi_slopes: jax.Array | None = None,
    timestamps: jax.Array | None = None,
    time_slopes: jax.Array | None = None,
    contextual_len: int = 0,
    max_attn_len: int | None = None,
) -> jax.Array:
    """Plain full-sequence forward in float32 (see `api.hstu_attention` for the definition); output in q's dtype."""
    alpha = q.shape[-1] ** -0.5 if alpha is None else alpha
    lengths = lengths.astype(jnp.int32)
    targets = jnp.zeros_like(lengths) if num_targets is None else num_targets.astype(jnp.int32)
    spec = ScoreSpec(score_fn, alibi_slopes is not None, time_slopes is not None)
    mask = attention_mask(lengths, targets, q.shape[1], contextual_len=contextual_len, max_attn_len=max_attn_len)
    z = scores.add_bias(
        _scores(q, k, alpha), full_bias(spec, lengths, targets, q.shape[1], alibi_slopes, timestamps, time_slopes)
    )
    p = weights(spec, z, mask[:, None], normalizer)
    out = jnp.einsum("bhij,bjhd->bihd", p, v.astype(jnp.float32), precision=_HI)
    return out.astype(q.dtype)


def self_scores(q, k, alpha):
    """[B, H, C] float32: alpha q.k of each row with its own key (the cached call's self term)."""
    return alpha * jnp.einsum("bchd,bchd->bhc", q.astype(jnp.float32), k.astype(jnp.float32), precision=_HI)


def cached_scores(q, k, k_prefix, alpha):
    """[B, H, C, N + 1] float32: alpha q.k_prefix, then alpha q.k of each row's own key."""
    return jnp.concatenate([_scores(q, k_prefix, alpha), self_scores(q, k, alpha)[..., None]], -1)


def cached_values(p, v, v_prefix):
    """sum over the N prefix keys and the self key of p [B, H, C, N + 1] times the values -> [B, C, H, Dv] f32."""
    out = jnp.einsum("bhcj,bjhd->bchd", p[..., :-1], v_prefix.astype(jnp.float32), precision=_HI)
    return out + jnp.swapaxes(p[..., -1], 1, 2)[..., None] * v.astype(jnp.float32)


def hstu_attention_cached_reference(
    q, k, v, k_prefix, v_prefix, prefix_len, num_queries=None, *, self_term=True, score_fn="silu",
    normalizer=None, alpha=None, alibi_slopes=None, timestamps=None, prefix_timestamps=None, time_slopes=None,
    contextual_len=0, max_attn_len=None,
):
    """Plain cached-prefix forward in float32 (see `api.hstu_attention_cached`); output in q's dtype."""
    batch, rows = q.shape[:2]
    alpha = q.shape[-1] ** -0.5 if alpha is None else alpha
    prefix_len = prefix_len.astype(jnp.int32)
    nq = jnp.full((batch,), rows, jnp.int32) if num_queries is None else num_queries.astype(jnp.int32)
    spec = ScoreSpec(score_fn, alibi_slopes is not None, time_slopes is not None)
    mask = cached_mask(prefix_len, nq, k_prefix.shape[1], rows, self_term=self_term,
                       contextual_len=contextual_len, max_attn_len=max_attn_len)
    b = cached_bias(spec, prefix_len, k_prefix.shape[1], rows, alibi_slopes, timestamps, prefix_timestamps,
                    time_slopes)
    z = scores.add_bias(cached_scores(q, k, k_prefix, alpha), b)
    p = weights(spec, z, mask[:, None], normalizer)
    return cached_values(p, v, v_prefix).astype(q.dtype)

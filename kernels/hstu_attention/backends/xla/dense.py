"""The "xla" backend: the reference forward under a `jax.custom_vjp` whose backward is written out by hand.

The hand-written backward is the formula set the Pallas kernels implement (recomputed scores; softmax from the
saved row log-sum-exp; slope gradients as -sum over (b, i, j) of dS * distance per head), so checking this
backend against autodiff of `reference.py` checks the formulas themselves. Dense [B, H, rows, keys] tensors:
the fallback on every platform and the oracle, not the fast path (on CPU, "xla_blocked" in `blocked.py` runs
these functions a few examples at a time). Supports every dtype, score function, bias and mode.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from kernels.hstu_attention import reference as ref
from kernels.hstu_attention import scores
from kernels.hstu_attention.base import Backend
from kernels.hstu_attention.scores import ScoreSpec

_HI = jax.lax.Precision.HIGHEST


@dataclasses.dataclass(frozen=True)
class _Config:
    spec: ScoreSpec
    normalizer: float | None
    alpha: float
    contextual_len: int
    max_attn_len: int | None
    self_term: bool = True


def _weighted_values(p: jax.Array, v: jax.Array) -> jax.Array:
    """out[b, i, h, d] = sum_j p[b, h, i, j] v[b, j, h, d] in float32, from head-major values [B, H, keys, D].

    With the heads axis between keys and D, XLA on CPU computes the product as v^T p^T (a GEMM whose M is the
    head dim) and writes p transposed. Head-major, GESR's `encode_request` ran 0.63x the time (N=1024, B=1), its
    score call 0.52x as one C=1024 call and 0.92x blocked as the Scorer runs it; the train step did not change
    (0.98-0.99x). Forward only: the same form for all of the backward's products made the train step 1.05x
    slower (one comparison).
    """
    v_heads = jnp.swapaxes(v.astype(jnp.float32), 1, 2)
    return jnp.swapaxes(jnp.einsum("bhij,bhjd->bhid", p, v_heads, precision=_HI), 1, 2)


def _silu_and_grad(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    # jax.nn.sigmoid (not scores.silu_and_grad) keeps the SiLU gradients bit-identical to earlier releases.
    sig = jax.nn.sigmoid(x)
    return x * sig, sig * (1.0 + x * (1.0 - sig))


def _forward_weights(cfg: _Config, z, mask):
    """(P, lse residual or None)."""
    if cfg.spec.softmax:
        return ref.softmax_weights(z, mask)
    return ref.weights(cfg.spec, z, mask, cfg.normalizer), None


def _dz(cfg: _Config, z, mask, dp, lse):
    """(P, dS = dL/dz) from the recomputed scores; silu's 1/normalizer is folded into both."""
    if cfg.spec.softmax:
        p = jnp.where(mask, jnp.exp(jnp.where(mask, z, lse) - lse), 0.0)
        delta = jnp.sum(p * dp, axis=-1, keepdims=True)
        return p, p * (dp - delta)
    act, grad = _silu_and_grad(z)
    p = jnp.where(mask, act, 0.0) / cfg.normalizer
    return p, jnp.where(mask, dp * grad, 0.0) / cfg.normalizer


def _slope_grads(cfg: _Config, ds, dist, dt, alibi_slopes, time_slopes):
    """Per-head -sum_{b,i,j} dS * dist (ALiBi) and -sum dS * bucket(dt) (time); None where the term is off."""
    d_alibi = d_time = None
    if cfg.spec.alibi:
        d_alibi = (-jnp.sum(ds * dist, axis=(0, 2, 3))).astype(alibi_slopes.dtype)
    if cfg.spec.time:
        d_time = (-jnp.sum(ds * scores.time_bucket(dt), axis=(0, 2, 3))).astype(time_slopes.dtype)
    return d_alibi, d_time


# --- full sequence --------------------------------------------------------------------------------------------
def _full_z(cfg, q, k, lengths, targets, alibi_slopes, timestamps, time_slopes):
    mask = ref.attention_mask(lengths, targets, q.shape[1], contextual_len=cfg.contextual_len,
                              max_attn_len=cfg.max_attn_len)[:, None]
    bias = ref.full_bias(cfg.spec, lengths, targets, q.shape[1], alibi_slopes, timestamps, time_slopes)
    return mask, scores.add_bias(ref._scores(q, k, cfg.alpha), bias)


@functools.partial(jax.custom_vjp, nondiff_argnums=(8,))
def _full(q, k, v, lengths, targets, alibi_slopes, timestamps, time_slopes, cfg):
    return _full_fwd(q, k, v, lengths, targets, alibi_slopes, timestamps, time_slopes, cfg)[0]


def _full_fwd(q, k, v, lengths, targets, alibi_slopes, timestamps, time_slopes, cfg):
    mask, z = _full_z(cfg, q, k, lengths, targets, alibi_slopes, timestamps, time_slopes)
    p, lse = _forward_weights(cfg, z, mask)
    out = _weighted_values(p, v).astype(q.dtype)
    # Scores are recomputed in the backward: residuals stay O(L) (plus the softmax row statistics), not O(L^2).
    return out, (q, k, v, lengths, targets, alibi_slopes, timestamps, time_slopes, lse)


def _full_bwd(cfg, res, d_out):
    q, k, v, lengths, targets, alibi_slopes, timestamps, time_slopes, lse = res
    mask, z = _full_z(cfg, q, k, lengths, targets, alibi_slopes, timestamps, time_slopes)
    do = d_out.astype(jnp.float32)
    dp = jnp.einsum("bihd,bjhd->bhij", do, v.astype(jnp.float32), precision=_HI)
    p, ds = _dz(cfg, z, mask, dp, lse)
    dv = jnp.einsum("bhij,bihd->bjhd", p, do, precision=_HI)
    ds_q = ds * cfg.alpha
    dq = jnp.einsum("bhij,bjhd->bihd", ds_q, k.astype(jnp.float32), precision=_HI)
    dk = jnp.einsum("bhij,bihd->bjhd", ds_q, q.astype(jnp.float32), precision=_HI)
    d_alibi, d_time = None, None
    if cfg.spec.has_bias:
        hist = lengths - targets
        pos = jnp.arange(q.shape[1], dtype=jnp.int32)
        dist = scores.position_distance(pos[None, None, :, None], pos[None, None, None, :], hist[:, None, None, None])
        dt = None if timestamps is None else (timestamps[:, :, None] - timestamps[:, None, :])[:, None]
        d_alibi, d_time = _slope_grads(cfg, ds, dist, dt, alibi_slopes, time_slopes)
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None, None, d_alibi, None, d_time


_full.defvjp(_full_fwd, _full_bwd)


# --- cached prefix ----------------------------------------------------------------------------------------------
# The prefix keys and the self key stay apart in both passes: a [B, H, C, N + 1] concatenation would copy the
# largest tensor, and slicing it again for the value products would copy it once more (forward: 1.6x the time
# at a serving block, B=2, C=128, N=1024 on CPU; the backward's copies were ~4 % of the GESR train step).
def _cached_parts(cfg, q, k, k_prefix, prefix_len, nq, alibi_slopes, timestamps, prefix_timestamps, time_slopes):
    """((mask_p [B, 1, C, N], mask_s [B, 1, C]), (z_p [B, H, C, N], z_s [B, H, C])): prefix keys, self key."""
    rows, n = q.shape[1], k_prefix.shape[1]
    mask_p, mask_s = ref.cached_mask_parts(prefix_len, nq, n, rows, self_term=cfg.self_term,
                                           contextual_len=cfg.contextual_len, max_attn_len=cfg.max_attn_len)
    bias = ref.cached_prefix_bias(cfg.spec, prefix_len, n, rows, alibi_slopes, timestamps, prefix_timestamps,
                                  time_slopes)
    z_p = scores.add_bias(ref._scores(q, k_prefix, cfg.alpha), bias)
    return (mask_p[:, None], mask_s[:, None]), (z_p, ref.self_scores(q, k, cfg.alpha))


@functools.partial(jax.custom_vjp, nondiff_argnums=(11,))
def _cached(q, k, v, k_prefix, v_prefix, prefix_len, nq, alibi_slopes, timestamps, prefix_timestamps,
            time_slopes, cfg):
    return _cached_fwd(q, k, v, k_prefix, v_prefix, prefix_len, nq, alibi_slopes, timestamps, prefix_timestamps,
                       time_slopes, cfg)[0]


def _cached_fwd(q, k, v, k_prefix, v_prefix, prefix_len, nq, alibi_slopes, timestamps, prefix_timestamps,
                time_slopes, cfg):
    (mask_p, mask_s), (z_p, z_s) = _cached_parts(cfg, q, k, k_prefix, prefix_len, nq, alibi_slopes, timestamps,
                                                 prefix_timestamps, time_slopes)
    p_p, p_s, lse = _split_weights(cfg, z_p, mask_p, z_s, mask_s)
    out = _weighted_values(p_p, v_prefix)
    out = (out + jnp.swapaxes(p_s, 1, 2)[..., None] * v.astype(jnp.float32)).astype(q.dtype)
    return out, (q, k, v, k_prefix, v_prefix, prefix_len, nq, alibi_slopes, timestamps, prefix_timestamps,
                 time_slopes, lse)


def _split_weights(cfg: _Config, z_p, mask_p, z_s, mask_s):
    """`_forward_weights` of the row [z_p ; z_s] with the self column z_s [B, H, C] kept apart: (P_p, P_s, lse)."""
    if not cfg.spec.softmax:
        return (jnp.where(mask_p, jax.nn.silu(z_p), 0.0) / cfg.normalizer,
                jnp.where(mask_s, jax.nn.silu(z_s), 0.0) / cfg.normalizer, None)  # fmt: skip
    m = jnp.maximum(jnp.max(jnp.where(mask_p, z_p, -jnp.inf), axis=-1), jnp.where(mask_s, z_s, -jnp.inf))
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    e_p = jnp.where(mask_p, jnp.exp(jnp.where(mask_p, z_p, m[..., None]) - m[..., None]), 0.0)
    e_s = jnp.where(mask_s, jnp.exp(jnp.where(mask_s, z_s, m) - m), 0.0)
    total = jnp.sum(e_p, axis=-1) + e_s
    empty = total <= 0.0
    safe = jnp.where(empty, 1.0, total)
    lse = jnp.where(empty, 0.0, m + jnp.log(safe))[..., None]  # [B, H, C, 1], as `ref.softmax_weights` gives it
    return e_p / safe[..., None], e_s / safe, lse


def _split_dz(cfg: _Config, z_p, mask_p, dp_p, z_s, mask_s, dp_s, lse):
    """`_dz` of the row [z_p ; z_s] with the self column kept apart: (P_p, dS_p, P_s, dS_s)."""
    if not cfg.spec.softmax:
        p_p, ds_p = _dz(cfg, z_p, mask_p, dp_p, None)
        p_s, ds_s = _dz(cfg, z_s, mask_s, dp_s, None)
        return p_p, ds_p, p_s, ds_s
    lse_s = lse[..., 0]
    p_p = jnp.where(mask_p, jnp.exp(jnp.where(mask_p, z_p, lse) - lse), 0.0)
    p_s = jnp.where(mask_s, jnp.exp(jnp.where(mask_s, z_s, lse_s) - lse_s), 0.0)
    delta = jnp.sum(p_p * dp_p, axis=-1) + p_s * dp_s  # the softmax row's sum runs over both parts
    return p_p, p_p * (dp_p - delta[..., None]), p_s, p_s * (dp_s - delta)


def _cached_bwd(cfg, res, d_out):
    q, k, v, k_prefix, v_prefix, prefix_len, nq, alibi_slopes, timestamps, prefix_timestamps, time_slopes, lse = res
    (mask_p, mask_s), (z_p, z_s) = _cached_parts(cfg, q, k, k_prefix, prefix_len, nq, alibi_slopes, timestamps,
                                                 prefix_timestamps, time_slopes)
    f32 = lambda x: x.astype(jnp.float32)
    do = f32(d_out)
    dp_p = jnp.einsum("bchd,bjhd->bhcj", do, f32(v_prefix), precision=_HI)
    dp_s = jnp.einsum("bchd,bchd->bhc", do, f32(v), precision=_HI)
    p_p, ds_p, p_s, ds_s = _split_dz(cfg, z_p, mask_p, dp_p, z_s, mask_s, dp_s, lse)
    # alpha scales the [B, C, H, D] gradients, not the [B, H, C, N] dS (z = alpha q.k + bias).
    self_p, self_ds = jnp.swapaxes(p_s, 1, 2)[..., None], jnp.swapaxes(ds_s, 1, 2)[..., None]  # [B, C, H, 1]
    dq = cfg.alpha * (jnp.einsum("bhcj,bjhd->bchd", ds_p, f32(k_prefix), precision=_HI) + self_ds * f32(k))
    dk_prefix = cfg.alpha * jnp.einsum("bhcj,bchd->bjhd", ds_p, f32(q), precision=_HI)
    dv_prefix = jnp.einsum("bhcj,bchd->bjhd", p_p, do, precision=_HI)
    dk, dv = cfg.alpha * self_ds * f32(q), self_p * do
    d_alibi, d_time = None, None
    if cfg.spec.has_bias:
        # The self key's distance and time difference are 0, so only the prefix part enters the slope gradients.
        j = jnp.arange(k_prefix.shape[1], dtype=jnp.int32)
        dist = (prefix_len[:, None] - j)[:, None, None, :].astype(jnp.float32)  # [B, 1, 1, N]
        dt = None if timestamps is None else (timestamps[:, :, None] - prefix_timestamps[:, None, :])[:, None]
        d_alibi, d_time = _slope_grads(cfg, ds_p, dist, dt, alibi_slopes, time_slopes)
    cast = lambda x, like: x.astype(like.dtype)
    return (cast(dq, q), cast(dk, k), cast(dv, v), cast(dk_prefix, k_prefix), cast(dv_prefix, v_prefix),
            None, None, d_alibi, None, None, d_time)


_cached.defvjp(_cached_fwd, _cached_bwd)


# --- backend entry points (validated, clipped int32 inputs; see api.py) ------------------------------------------
def attention(q, k, v, lengths, num_targets, *, spec, normalizer, alpha, alibi_slopes, timestamps, time_slopes,
              contextual_len, max_attn_len, interpret=False, block_sizes=None):
    """Full-sequence call of the "xla" backend."""
    cfg = _Config(spec, normalizer, alpha, contextual_len, max_attn_len)
    return _full(q, k, v, lengths, num_targets, alibi_slopes, timestamps, time_slopes, cfg)


def attention_cached(q, k, v, k_prefix, v_prefix, prefix_len, num_queries, *, self_term, spec, normalizer, alpha,
                     alibi_slopes, timestamps, prefix_timestamps, time_slopes, contextual_len, max_attn_len,
                     interpret=False, block_sizes=None):
    """Cached-prefix call of the "xla" backend."""
    cfg = _Config(spec, normalizer, alpha, contextual_len, max_attn_len, self_term)
    return _cached(q, k, v, k_prefix, v_prefix, prefix_len, num_queries, alibi_slopes, timestamps,
                   prefix_timestamps, time_slopes, cfg)


def hstu_attention_xla(q, k, v, lengths, num_targets, *, normalizer, alpha, contextual_len, max_attn_len):
    """The SiLU-only entry point of earlier releases (kept for callers that import it)."""
    if num_targets is None:
        num_targets = jnp.zeros_like(lengths)
    return attention(q, k, v, lengths, num_targets, spec=ScoreSpec(), normalizer=float(normalizer),
                     alpha=float(alpha), alibi_slopes=None, timestamps=None, time_slopes=None,
                     contextual_len=contextual_len, max_attn_len=max_attn_len)


BACKEND = Backend(
    name="xla",
    module=__name__,
    platforms=("cpu", "gpu", "tpu"),
    dtypes=("float32", "bfloat16", "float16"),
    score_fns=scores.SCORE_FNS,
    biases=frozenset({"alibi", "time"}),
    modes=("full", "cached"),
    priority=0,
    attention=attention,
    attention_cached=attention_cached,
)

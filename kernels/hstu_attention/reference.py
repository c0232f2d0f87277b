"""Pure-jnp target-aware HSTU attention: the oracle every backend is tested against.

`attention_mask` expands `masks.tile_mask` (the one mask definition, shared with the kernels and tested
against a literal transcription of the issue) to [B, L, L]; `hstu_attention_reference` is the plain forward,
differentiated by ordinary JAX autodiff in the tests; `hstu_attention_xla` is the "xla" backend: the same
forward under a `jax.custom_vjp` whose backward is written out by hand, so the gradient formulas the Pallas
kernels implement are themselves checked against autodiff.

Both materialise [B, H, L, L] scores. That is intended: this is the oracle and the CPU fallback, not the
fast path.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from kernels.hstu_attention.masks import MaskSpec, tile_mask


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


def _silu_and_grad(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """silu(x) and its derivative sigma(x) * (1 + x * (1 - sigma(x)))."""
    sig = jax.nn.sigmoid(x)
    return x * sig, sig * (1.0 + x * (1.0 - sig))


def _scores(q: jax.Array, k: jax.Array, alpha: float) -> jax.Array:
    """alpha * q.k in float32, [B, H, L, L]."""
    qf = q.astype(jnp.float32)
    kf = k.astype(jnp.float32)
    return alpha * jnp.einsum("bihd,bjhd->bhij", qf, kf, precision=jax.lax.Precision.HIGHEST)


def hstu_attention_reference(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    lengths: jax.Array,
    num_targets: jax.Array | None = None,
    *,
    normalizer: float,
    alpha: float | None = None,
    contextual_len: int = 0,
    max_attn_len: int | None = None,
) -> jax.Array:
    """Plain forward: out[b, i] = sum_j mask * silu(alpha q_i.k_j) / normalizer * v_j, computed in float32.

    No custom gradient: `jax.grad` of this function is the gradient oracle. Output has q's dtype.
    """
    alpha = q.shape[-1] ** -0.5 if alpha is None else alpha
    mask = attention_mask(
        lengths, num_targets, q.shape[1], contextual_len=contextual_len, max_attn_len=max_attn_len
    )[:, None]
    s = _scores(q, k, alpha)
    # `where`, not multiplication, so that a huge masked score can never turn into inf * 0.
    p = jnp.where(mask, jax.nn.silu(s), 0.0) / normalizer
    out = jnp.einsum("bhij,bjhd->bihd", p, v.astype(jnp.float32), precision=jax.lax.Precision.HIGHEST)
    return out.astype(q.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7, 8))
def _xla_attention(q, k, v, lengths, num_targets, normalizer, alpha, contextual_len, max_attn_len):
    return hstu_attention_reference(
        q, k, v, lengths, num_targets,
        normalizer=normalizer, alpha=alpha, contextual_len=contextual_len, max_attn_len=max_attn_len,
    )


def _xla_fwd(q, k, v, lengths, num_targets, normalizer, alpha, contextual_len, max_attn_len):
    out = _xla_attention(q, k, v, lengths, num_targets, normalizer, alpha, contextual_len, max_attn_len)
    # Scores are recomputed in the backward: residuals stay O(L), not O(L^2).
    return out, (q, k, v, lengths, num_targets)


def _xla_bwd(normalizer, alpha, contextual_len, max_attn_len, res, d_out):
    q, k, v, lengths, num_targets = res
    mask = attention_mask(
        lengths, num_targets, q.shape[1], contextual_len=contextual_len, max_attn_len=max_attn_len
    )[:, None]
    s = _scores(q, k, alpha)
    act, act_grad = _silu_and_grad(s)
    p = jnp.where(mask, act, 0.0) / normalizer
    do = d_out.astype(jnp.float32)
    hi = jax.lax.Precision.HIGHEST
    dv = jnp.einsum("bhij,bihd->bjhd", p, do, precision=hi)
    dp = jnp.einsum("bihd,bjhd->bhij", do, v.astype(jnp.float32), precision=hi)
    ds = jnp.where(mask, dp * act_grad, 0.0) * (alpha / normalizer)
    dq = jnp.einsum("bhij,bjhd->bihd", ds, k.astype(jnp.float32), precision=hi)
    dk = jnp.einsum("bhij,bihd->bjhd", ds, q.astype(jnp.float32), precision=hi)
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None, None


_xla_attention.defvjp(_xla_fwd, _xla_bwd)


def hstu_attention_xla(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    lengths: jax.Array,
    num_targets: jax.Array | None,
    *,
    normalizer: float,
    alpha: float,
    contextual_len: int,
    max_attn_len: int | None,
) -> jax.Array:
    """The "xla" backend: reference forward with a hand-written, recomputing backward (custom_vjp)."""
    if num_targets is None:
        num_targets = jnp.zeros_like(lengths)
    return _xla_attention(q, k, v, lengths, num_targets, float(normalizer), float(alpha), contextual_len, max_attn_len)

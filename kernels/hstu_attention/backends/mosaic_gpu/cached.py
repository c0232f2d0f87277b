"""The Mosaic GPU cached-prefix mode (`hstu_attention_cached`) as one differentiable function, on the same
kernels as the full mode (`_common.Mode(cached=True)`): C query rows stay resident and stream the cached prefix
K/V blocks they attend to, then, with `self_term`, their own key blocks under an i == j mask. The backward runs
dq the same way, dk/dv of the prefix with prefix keys resident (streaming the live query rows), and dk/dv of the
rows' own keys with a diagonal-only schedule. Rows >= num_queries and prefix keys >= prefix_len get exactly 0.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from kernels.hstu_attention import common
from kernels.hstu_attention.backends.mosaic_gpu import backward_dkdv, backward_dq, forward
from kernels.hstu_attention.backends.mosaic_gpu._common import (
    COMPUTE_WGS,
    WG_TILE,
    Mode,
    check_blocks,
    fit_shared_memory,
)
from kernels.hstu_attention.common import KernelParams
from kernels.hstu_attention.masks import MaskSpec

NAME = "pallas_mosaic_gpu"


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _cached(params, mode, q, k, v, kp, vp, plen, nq, alibi, ts, pts, tslopes):
    return forward.forward(q, k, v, plen, nq, alibi, ts, tslopes, params, mode, (kp, vp, pts))[0]


def _cached_fwd(params, mode, q, k, v, kp, vp, plen, nq, alibi, ts, pts, tslopes):
    out, lse = forward.forward(q, k, v, plen, nq, alibi, ts, tslopes, params, mode, (kp, vp, pts))
    return out, (q, k, v, kp, vp, plen, nq, alibi, ts, pts, tslopes, out if params.score.softmax else None, lse)


def _cached_bwd(params, mode, res, d_out):
    q, k, v, kp, vp, plen, nq, alibi, ts, pts, tslopes, out, lse = res
    d_out = d_out.astype(q.dtype)
    delta = None
    if params.score.softmax:
        delta = jnp.transpose(jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), axis=-1), (0, 2, 1))
    args = (alibi, ts, tslopes, lse, delta, params, mode)
    d_q, ga, gt = backward_dq.dq(q, k, v, d_out, plen, nq, *args, prefix=(kp, vp, pts))
    d_kp, d_vp = backward_dkdv.dkdv(q, kp, vp, d_out, plen, nq, *args, key_ts=pts)
    if mode.self_term:
        d_k, d_v = backward_dkdv.dkdv(q, k, v, d_out, plen, nq, *args, self_keys=True)
    else:
        d_k, d_v = jnp.zeros_like(k), jnp.zeros_like(v)
    live = jnp.arange(q.shape[1])[None, None, :] < nq[:, None, None]
    slope_grad = lambda g: None if g is None else jnp.sum(jnp.where(live, g, 0.0), axis=(0, 2)) * params.acc_scale
    return d_q, d_k, d_v, d_kp, d_vp, None, None, slope_grad(ga), None, None, slope_grad(gt)


_cached.defvjp(_cached_fwd, _cached_bwd)


def attention_cached(q, k, v, k_prefix, v_prefix, prefix_len, num_queries, *, self_term, spec, normalizer, alpha,
                     alibi_slopes, timestamps, prefix_timestamps, time_slopes, contextual_len, max_attn_len,
                     interpret=False, block_sizes=None, default_blocks=None):
    """Mosaic GPU backend of `kernels.hstu_attention.hstu_attention_cached` (validated, clipped int32 lengths)."""
    blocks = block_sizes if block_sizes is not None else default_blocks
    check_blocks(NAME, blocks)
    dqk_p, dv_p = common.round_up(q.shape[-1], 64), common.round_up(v.shape[-1], 64)
    blocks = fit_shared_memory(blocks, dqk_p, dv_p, jnp.dtype(q.dtype).itemsize, shrink=block_sizes is None,
                               score=spec)
    params = KernelParams(normalizer, alpha, MaskSpec(contextual_len, max_attn_len), blocks, interpret, spec)
    multiple = max(COMPUTE_WGS * WG_TILE, blocks.block_k, blocks.block_q_bwd)
    rows, n = q.shape[1], k_prefix.shape[1]
    rp, np_ = common.round_up(rows, multiple), common.round_up(max(n, 1), multiple)
    pad = lambda x, length, d: common.pad_axis(common.pad_axis(x, 1, length), 3, d)
    ts = pts = None
    if spec.time:
        ts = common.pad_axis(timestamps.astype(jnp.int32), 1, rp)
        pts = common.pad_axis(prefix_timestamps.astype(jnp.int32), 1, np_)
    f32 = lambda x: None if x is None else x.astype(jnp.float32)
    out = _cached(params, Mode(cached=True, self_term=bool(self_term)), pad(q, rp, dqk_p), pad(k, rp, dqk_p),
                  pad(v, rp, dv_p), pad(k_prefix, np_, dqk_p), pad(v_prefix, np_, dv_p), prefix_len, num_queries,
                  f32(alibi_slopes), ts, pts, f32(time_slopes))
    return out[:, :rows, :, : v.shape[-1]]

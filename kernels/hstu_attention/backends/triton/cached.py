"""The Triton cached-prefix mode as one differentiable function: `cached_fwd.py`'s kernel under a custom_vjp
whose backward is `cached_bwd.py`. Entry point `attention_cached` (see `api.hstu_attention_cached`)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from kernels.hstu_attention import common
from kernels.hstu_attention.backends.triton import cached_bwd, cached_fwd
from kernels.hstu_attention.common import CachedParams
from kernels.hstu_attention.masks import MaskSpec


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _cached(p, q, k, v, kp, vp, plen, nq, alibi, ts, pts, tslopes):
    return cached_fwd.forward(p, q, k, v, kp, vp, plen, nq, alibi, ts, pts, tslopes)[0]


def _cached_fwd(p, q, k, v, kp, vp, plen, nq, alibi, ts, pts, tslopes):
    out, lse = cached_fwd.forward(p, q, k, v, kp, vp, plen, nq, alibi, ts, pts, tslopes)
    return out, (q, k, v, kp, vp, plen, nq, alibi, ts, pts, tslopes, out, lse)


def _cached_bwd(p, res, d_out):
    q, k, v, kp, vp, plen, nq, alibi, ts, pts, tslopes, out, lse = res
    grads = cached_bwd.backward(p, q, k, v, kp, vp, plen, nq, alibi, ts, pts, tslopes, out, lse, d_out)
    dq, dk, dv, dkp, dvp, d_alibi, d_time = grads
    return dq, dk, dv, dkp, dvp, None, None, d_alibi, None, None, d_time


_cached.defvjp(_cached_fwd, _cached_bwd)


def attention_cached(q, k, v, k_prefix, v_prefix, prefix_len, num_queries, *, self_term, spec, normalizer, alpha,
                     alibi_slopes, timestamps, prefix_timestamps, time_slopes, contextual_len, max_attn_len,
                     interpret=False, block_sizes=None, default_blocks=None):
    """Triton backend of `kernels.hstu_attention.hstu_attention_cached` (validated, clipped int32 lengths)."""
    rows, n = q.shape[1], k_prefix.shape[1]
    blocks = block_sizes if block_sizes is not None else common.fit_cached_blocks(default_blocks, rows, n)
    p = CachedParams(normalizer, alpha, MaskSpec(contextual_len, max_attn_len), blocks, interpret, spec, self_term)
    rp = common.round_up(rows, max(blocks.block_q, blocks.block_q_bwd))
    np_ = common.round_up(max(n, 1), max(blocks.block_k, blocks.block_k_bwd))
    dqk_p, dv_p = common.next_power_of_two(q.shape[-1]), common.next_power_of_two(v.shape[-1])
    pad = lambda x, length, d: common.pad_axis(common.pad_axis(x, 1, length), 3, d)
    ts = pts = None
    if spec.time:
        ts, pts = common.pad_axis(timestamps, 1, rp), common.pad_axis(prefix_timestamps, 1, np_)
    alibi = None if alibi_slopes is None else alibi_slopes.astype(jnp.float32)
    tslopes = None if time_slopes is None else time_slopes.astype(jnp.float32)
    out = _cached(p, pad(q, rp, dqk_p), pad(k, rp, dqk_p), pad(v, rp, dv_p), pad(k_prefix, np_, dqk_p),
                  pad(v_prefix, np_, dv_p), prefix_len, num_queries, alibi, ts, pts, tslopes)
    return out[:, :rows, :, : v.shape[-1]]

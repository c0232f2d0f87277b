"""Cached-prefix ranking attention (`hstu_attention_cached`) in Pallas for TPU (Mosaic TPU).

The design of `backend_pallas_triton_cached.py`, laid out for TPU: arrays are [B, H, rows, D] and every grid is
(batch, head, resident block, reduction block) with the reduction axis "arbitrary". prefix_len and num_queries
are scalar-prefetched, so the index maps clamp the reduction index into the live range [lo, hi) (the pipeline
re-uses the resident tile instead of fetching a skipped one) and `pl.when` skips the compute:
  * forward: a query block streams prefix key blocks [lo, hi) (`key_blocks`: hi = cdiv(prefix_len, block_k),
    none for a block past num_queries; a window raises lo), interior blocks without a mask; the self term is
    added row-wise at the last step; silu accumulates silu(z) V, softmax runs the online softmax (the self key
    is its last step) and saves the row LSE [B, H, C, 1] for the backward;
  * dq and dk_prefix/dv_prefix: `backend_pallas_tpu_cached_bwd.py`.
Rows >= num_queries and prefix keys >= prefix_len get exactly 0. Scores come from `scores.py`.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from kernels.hstu_attention import common, scores
from kernels.hstu_attention.backend_pallas_triton_cached import CachedParams, fit_blocks, key_blocks, key_valid
from kernels.hstu_attention.masks import MaskSpec

SEMANTICS = ("parallel", "parallel", "parallel", "arbitrary")


def interpret_params(interpret):
    return pltpu.InterpretParams(uninitialized_memory="nan") if interpret is True else interpret


def clamp(idx, lo, hi):
    """Reduction index for an index map: outside [lo, hi) it repeats the nearest live block (no new DMA)."""
    return jnp.maximum(jnp.minimum(idx, hi - 1), jnp.minimum(lo, jnp.maximum(hi - 1, 0)))


def tile_spec(block: int, dim: int, index) -> pl.BlockSpec:
    return pl.BlockSpec((None, None, block, dim), index)


def resident(b, h, i, j, *_):
    """The grid's resident block (axis 2)."""
    return b, h, i, 0


def streamed(b, h, i, j, *_):
    """The grid's reduction block (axis 3), unclamped."""
    return b, h, j, 0


def prefix_index(p: CachedParams, bq: int, bk: int):
    """Index map of prefix key blocks for a query block: clamped into the forward / dq walk."""

    def index(b, h, i, j, plen_ref, nq_ref):
        lo, _, hi = key_blocks(plen_ref[b], bk, p.mask, i * bq < nq_ref[b])
        return b, h, clamp(j, lo, hi), 0

    return index


def self_score(p: CachedParams, q, k):
    return p.alpha * jnp.sum(q.astype(jnp.float32) * k.astype(jnp.float32), axis=1, keepdims=True)


def tile_scores(p: CachedParams, q, k):
    """z = alpha q.k of one [rows, keys] tile (float32)."""
    return p.alpha * common.matmul(q, k, trans_b=True)


def _fwd_kernel(plen_ref, nq_ref, q_ref, k_ref, v_ref, kp_ref, vp_ref, *refs, p: CachedParams):
    sm = p.score.softmax
    if sm:
        o_ref, lse_ref, acc_ref, m_ref, l_ref = refs
    else:
        o_ref, acc_ref = refs
    bq, bk = p.blocks.block_q, p.blocks.block_k
    b, rb, kb = pl.program_id(0), pl.program_id(2), pl.program_id(3)
    plen, nq = plen_ref[b], nq_ref[b]
    i0 = rb * bq
    lo, full_hi, hi = key_blocks(plen, bk, p.mask, i0 < nq)

    @pl.when(kb == 0)
    def _init():
        acc_ref[...] = jnp.zeros_like(acc_ref)
        if sm:
            m_ref[...] = jnp.full_like(m_ref, scores.MASK_VALUE)
            l_ref[...] = jnp.zeros_like(l_ref)

    def step(masked: bool):
        q, k, v = q_ref[...], kp_ref[...], vp_ref[...]
        z = tile_scores(p, q, k)
        valid = None
        if masked:
            cols = kb * bk + lax.broadcasted_iota(jnp.int32, (bq, bk), 1)
            valid = key_valid(cols, plen, p.mask)
        if sm:
            m, corr, w, l = scores.online_softmax_step(m_ref[...], l_ref[...], z, valid)
            m_ref[...], l_ref[...] = m, l
            acc_ref[...] = acc_ref[...] * corr + common.matmul(w.astype(v.dtype), v)
        else:
            w = scores.silu(z)
            if masked:
                w = jnp.where(valid, w, 0.0)
            acc_ref[...] += common.matmul(w.astype(v.dtype), v)

    pl.when((kb >= lo) & (kb < full_hi))(functools.partial(step, False))
    pl.when((kb >= full_hi) & (kb < hi))(functools.partial(step, True))

    @pl.when(kb == pl.num_programs(3) - 1)
    def _finish():
        rows = i0 + lax.broadcasted_iota(jnp.int32, (bq, 1), 0)
        acc = acc_ref[...]
        vs = v_ref[...].astype(jnp.float32)
        s = self_score(p, q_ref[...], k_ref[...])
        if sm:
            m, l = m_ref[...], l_ref[...]
            if p.self_term:
                m, corr, w, l = scores.online_softmax_step(m, l, s, None)
                acc = acc * corr + w * vs
            inv_l, lse = scores.softmax_finish(m, l)
            acc = acc * inv_l
            lse_ref[...] = jnp.where(rows < nq, lse, 0.0)
        else:
            if p.self_term:
                acc += scores.silu(s) * vs
            acc = acc * p.scale
        o_ref[...] = jnp.where(rows < nq, acc, 0.0).astype(o_ref.dtype)


def forward(p: CachedParams, q, k, v, kp, vp, plen, nq):
    """(out [B, H, C, Dv], lse [B, H, C, 1] or None) on padded [B, H, rows, D] operands."""
    batch, heads, rows, dqk = q.shape
    n, dv = kp.shape[2], v.shape[-1]
    bq, bk = p.blocks.block_q, p.blocks.block_k
    kv = prefix_index(p, bq, bk)
    out_specs = [tile_spec(bq, dv, resident)]
    out_shape = [jax.ShapeDtypeStruct((batch, heads, rows, dv), q.dtype)]
    scratch = [pltpu.VMEM((bq, dv), jnp.float32)]
    if p.score.softmax:
        out_specs.append(tile_spec(bq, 1, resident))
        out_shape.append(jax.ShapeDtypeStruct((batch, heads, rows, 1), jnp.float32))
        scratch += [pltpu.VMEM((bq, 1), jnp.float32)] * 2
    outs = pl.pallas_call(
        functools.partial(_fwd_kernel, p=p),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=2,
            grid=(batch, heads, rows // bq, n // bk),
            in_specs=[tile_spec(bq, dqk, resident), tile_spec(bq, dqk, resident), tile_spec(bq, dv, resident),
                      tile_spec(bk, dqk, kv), tile_spec(bk, dv, kv)],
            out_specs=out_specs,
            scratch_shapes=scratch,
        ),
        out_shape=out_shape,
        compiler_params=pltpu.CompilerParams(dimension_semantics=SEMANTICS),
        interpret=interpret_params(p.interpret),
        name="hstu_attention_cached_fwd",
    )(plen, nq, q, k, v, kp, vp)
    return outs[0], (outs[1] if p.score.softmax else None)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _cached(p, q, k, v, kp, vp, plen, nq):
    return forward(p, q, k, v, kp, vp, plen, nq)[0]


def _cached_fwd(p, q, k, v, kp, vp, plen, nq):
    out, lse = forward(p, q, k, v, kp, vp, plen, nq)
    return out, (q, k, v, kp, vp, plen, nq, out if p.score.softmax else None, lse)


def _cached_bwd(p, res, d_out):
    from kernels.hstu_attention.backend_pallas_tpu_cached_bwd import backward  # builds on this module

    q, k, v, kp, vp, plen, nq, out, lse = res
    dq, dk, dv, dkp, dvp = backward(p, q, k, v, kp, vp, plen, nq, out, lse, d_out)
    return dq, dk, dv, dkp, dvp, None, None


_cached.defvjp(_cached_fwd, _cached_bwd)


def attention_cached(q, k, v, k_prefix, v_prefix, prefix_len, num_queries, *, self_term, spec, normalizer, alpha,
                     alibi_slopes, timestamps, prefix_timestamps, time_slopes, contextual_len, max_attn_len,
                     interpret=False, block_sizes=None, default_blocks=None):
    """TPU backend of `kernels.hstu_attention.hstu_attention_cached` (validated, clipped int32 lengths)."""
    if spec.has_bias:
        raise NotImplementedError("pallas_tpu runs the cached mode without biases only")
    rows, n = q.shape[1], k_prefix.shape[1]
    blocks = block_sizes if block_sizes is not None else fit_blocks(default_blocks, rows, n)
    p = CachedParams(normalizer, alpha, MaskSpec(contextual_len, max_attn_len), blocks, interpret, spec, self_term)
    rp = common.round_up(rows, max(blocks.block_q, blocks.block_q_bwd))
    np_ = common.round_up(max(n, 1), max(blocks.block_k, blocks.block_k_bwd))
    # [B, L, H, D] -> [B, H, L, D] (TPU tiles want (rows, head dim) as the two minor dims), rows padded.
    bhld = lambda x, length: jnp.swapaxes(common.pad_axis(x, 1, length), 1, 2)
    out = _cached(p, bhld(q, rp), bhld(k, rp), bhld(v, rp), bhld(k_prefix, np_), bhld(v_prefix, np_), prefix_len,
                  num_queries)
    return jnp.swapaxes(out, 1, 2)[:, :rows]

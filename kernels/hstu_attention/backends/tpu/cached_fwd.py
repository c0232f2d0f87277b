"""Cached-prefix ranking attention (`hstu_attention_cached`) in Pallas for TPU (Mosaic TPU).

The design of the Triton backend's `cached_fwd.py`, laid out for TPU: arrays are [B, H, rows, D] and every grid is
(batch, head, resident block, reduction block) with the reduction axis "arbitrary". prefix_len and num_queries
are scalar-prefetched, so the index maps clamp the reduction index into the live range [lo, hi) (the pipeline
re-uses the resident tile instead of fetching a skipped one) and `pl.when` skips the compute:
  * forward: a query block streams prefix key blocks [lo, hi) (`key_blocks`: hi = cdiv(prefix_len, block_k),
    none for a block past num_queries; a window raises lo), interior blocks without a mask; the self term is
    added row-wise at the last step; silu accumulates silu(z) V, softmax runs the online softmax (the self key
    is its last step) and saves the row LSE [B, H, C, 1] for the backward;
  * dq and dk_prefix/dv_prefix: `cached_bwd.py`; the custom_vjp that joins them: `cached.py`.
Rows >= num_queries and prefix keys >= prefix_len get exactly 0. Scores and biases come from `scores.py`
(ALiBi distance prefix_len - j; slopes in SMEM, a [block_q, 1] tile of row timestamps and a [1, block_k] tile of
prefix timestamps); the self key has distance 0 and time difference 0, so it never carries a bias.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from kernels.hstu_attention import common, scores
from kernels.hstu_attention.backends.tpu import _common as tc
from kernels.hstu_attention.common import CachedParams
from kernels.hstu_attention.masks import prefix_key_blocks, prefix_key_valid


def _fwd_kernel(plen_ref, nq_ref, q_ref, k_ref, v_ref, kp_ref, vp_ref, *refs, p: CachedParams):
    sm = p.score.softmax
    br, refs = tc.take_bias_refs(refs, p.score)
    if sm:
        o_ref, lse_ref, acc_ref, m_ref, l_ref = refs
    else:
        o_ref, acc_ref = refs
    bq, bk = p.blocks.block_q, p.blocks.block_k
    b, h, rb, kb = pl.program_id(0), pl.program_id(1), pl.program_id(2), pl.program_id(3)
    plen, nq = plen_ref[b], nq_ref[b]
    i0 = rb * bq
    lo, full_hi, hi = prefix_key_blocks(plen, bk, p.mask, i0 < nq)

    @pl.when(kb == 0)
    def _init():
        acc_ref[...] = jnp.zeros_like(acc_ref)
        if sm:
            m_ref[...] = jnp.full_like(m_ref, scores.MASK_VALUE)
            l_ref[...] = jnp.zeros_like(l_ref)

    def step(masked: bool):
        q, k, v = q_ref[...], kp_ref[...], vp_ref[...]
        cols = kb * bk + lax.broadcasted_iota(jnp.int32, (bq, bk), 1)
        z = tc.cached_tile_scores(p, q, k, br, h, cols, plen)
        valid = prefix_key_valid(cols, plen, p.mask) if masked else None
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
        s = tc.self_score(p, q_ref[...], k_ref[...])
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


def forward(p: CachedParams, q, k, v, kp, vp, plen, nq, alibi, ts, pts, tslopes):
    """(out [B, H, C, Dv], lse [B, H, C, 1] or None) on padded [B, H, rows, D] operands; ts [B, C] and pts [B, N]
    are the row and prefix timestamps (None without the time bias)."""
    batch, heads, rows, dqk = q.shape
    n, dv = kp.shape[2], v.shape[-1]
    bq, bk = p.blocks.block_q, p.blocks.block_k
    kv = tc.prefix_index(p, bq, bk)
    out_specs = [tc.tile_spec(bq, dv, tc.resident)]
    out_shape = [jax.ShapeDtypeStruct((batch, heads, rows, dv), q.dtype)]
    scratch = [pltpu.VMEM((bq, dv), jnp.float32)]
    if p.score.softmax:
        out_specs.append(tc.tile_spec(bq, 1, tc.resident))
        out_shape.append(jax.ShapeDtypeStruct((batch, heads, rows, 1), jnp.float32))
        scratch += [pltpu.VMEM((bq, 1), jnp.float32)] * 2
    outs = pl.pallas_call(
        functools.partial(_fwd_kernel, p=p),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=2,
            grid=(batch, heads, rows // bq, n // bk),
            in_specs=[tc.tile_spec(bq, dqk, tc.resident), tc.tile_spec(bq, dqk, tc.resident),
                      tc.tile_spec(bq, dv, tc.resident), tc.tile_spec(bk, dqk, kv), tc.tile_spec(bk, dv, kv)]
            + tc.bias_specs(p.score, bq, tc.resident, bk, kv),
            out_specs=out_specs,
            scratch_shapes=scratch,
        ),
        out_shape=out_shape,
        compiler_params=pltpu.CompilerParams(dimension_semantics=tc.SEMANTICS),
        interpret=tc.interpret_params(p.interpret),
        name="hstu_attention_cached_fwd",
    )(plen, nq, q, k, v, kp, vp, *tc.bias_args(p.score, alibi, tslopes, ts, pts))
    return outs[0], (outs[1] if p.score.softmax else None)

"""Target-aware HSTU attention in Pallas for TPU (Mosaic TPU), with block skipping by scalar prefetch.

Arrays are laid out [B, H, L, D] so that a tile is (rows, head dim) in VMEM. Grids end in a reduction axis
("arbitrary") over key blocks (forward, dq) or row blocks (dk/dv). `lengths` and `hist` are scalar-prefetched
so that both the index maps and the kernel bodies know each row's live range: index maps clamp the reduction
index into [lo, hi), which makes the pipeline re-use the resident tile instead of fetching a skipped one, and
`pl.when` skips the compute. Candidate diagonal terms not reached by the walk are added at the last step from
an extra tile of k/v (or q/dO) at the resident block's own rows. score_fn "silu" accumulates silu(z) V;
"softmax" runs the online softmax (m, l in VMEM scratch) and saves the row LSE [B, H, L, 1] for the backward.
Biases (`scores.bias`): per-head slopes sit in SMEM; the time bias reads a [block_q, 1] tile of row timestamps
and a [1, block_k] tile of key timestamps beside q and k. The candidate diagonal is at distance 0 and time
difference 0, so it carries no bias.
Backward kernels: `full_bwd.py`, joined to this forward by `full.py`; the cached-prefix mode: `cached*.py`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from kernels.hstu_attention import scores
from kernels.hstu_attention.backends.tpu import _common as tc
from kernels.hstu_attention.common import KernelParams, silu
from kernels.hstu_attention.masks import key_blocks_for_rows, tile_mask, uncovered_diagonal
from kernels.hstu_attention.scores import position_distance


def _fwd_kernel(len_ref, hist_ref, q_ref, k_ref, v_ref, kd_ref, vd_ref, *refs, params: KernelParams):
    sm, score = params.score.softmax, params.score
    br, refs = tc.take_bias_refs(refs, score)
    if sm:
        o_ref, lse_ref, acc_ref, m_ref, l_ref = refs
    else:
        o_ref, acc_ref = refs
    bq, bk = params.blocks.block_q, params.blocks.block_k
    b, h, qb, kb = pl.program_id(0), pl.program_id(1), pl.program_id(2), pl.program_id(3)
    length, hist = len_ref[b], hist_ref[b]
    i0 = qb * bq
    lo, full_hi, hi = key_blocks_for_rows(i0, bq, bk, length, hist, params.spec)
    rows = i0 + lax.broadcasted_iota(jnp.int32, (bq, bk), 0)

    def scores_of(q, k):
        z = params.alpha * tc.mm(q, k, trans_b=True)
        if not score.has_bias:
            return z
        cols = kb * bk + lax.broadcasted_iota(jnp.int32, (bq, bk), 1)
        dist = position_distance(rows, cols, hist) if score.alibi else None
        return scores.add_bias(z, br.tile_bias(score, h, dist))

    @pl.when(kb == 0)
    def _init():
        acc_ref[...] = jnp.zeros_like(acc_ref)
        if sm:
            m_ref[...] = jnp.full_like(m_ref, scores.MASK_VALUE)
            l_ref[...] = jnp.zeros_like(l_ref)

    def step(masked: bool):
        q, k, v = q_ref[...], k_ref[...], v_ref[...]
        if sm:
            valid = None
            if masked:
                cols = kb * bk + lax.broadcasted_iota(jnp.int32, (bq, bk), 1)
                valid = tile_mask(rows, cols, length, hist, params.spec)
            z = scores_of(q, k)
            m, corr, w, l = scores.online_softmax_step(m_ref[...], l_ref[...], z, valid)
            m_ref[...], l_ref[...] = m, l
            acc_ref[...] = acc_ref[...] * corr + tc.mm(w.astype(v.dtype), v)
            return
        p = silu(scores_of(q, k))
        if masked:
            cols = kb * bk + lax.broadcasted_iota(jnp.int32, (bq, bk), 1)
            p = jnp.where(tile_mask(rows, cols, length, hist, params.spec), p, 0.0)
        acc_ref[...] += tc.mm(p.astype(v.dtype), v)

    pl.when((kb >= lo) & (kb < full_hi))(functools.partial(step, False))
    pl.when((kb >= full_hi) & (kb < hi))(functools.partial(step, True))

    @pl.when(kb == pl.num_programs(3) - 1)
    def _finish():
        pos = i0 + lax.broadcasted_iota(jnp.int32, (bq, 1), 0)
        diag = uncovered_diagonal(pos, length, hist, lo, hi, bk)
        q = q_ref[...].astype(jnp.float32)
        sd = params.alpha * jnp.sum(q * kd_ref[...].astype(jnp.float32), axis=1, keepdims=True)
        if sm:
            m, corr, w, l = scores.online_softmax_step(m_ref[...], l_ref[...], sd, diag)
            inv_l, lse = scores.softmax_finish(m, l)
            acc = (acc_ref[...] * corr + w * vd_ref[...].astype(jnp.float32)) * inv_l
            o_ref[...] = jnp.where(pos < length, acc, 0.0).astype(o_ref.dtype)
            lse_ref[...] = jnp.where(pos < length, lse, 0.0)
            return
        acc = acc_ref[...] + jnp.where(diag, silu(sd), 0.0) * vd_ref[...].astype(jnp.float32)
        o_ref[...] = jnp.where(pos < length, acc * params.inv_normalizer, 0.0).astype(o_ref.dtype)


def forward(q, k, v, lengths, hist, alibi, ts, tslopes, params: KernelParams):
    """(out, lse [B, H, L, 1] or None) on padded [B, H, L, D] operands; ts [B, L] (None without the time bias)."""
    batch, heads, seq_len, dqk = q.shape
    dv = v.shape[-1]
    bq, bk = params.blocks.block_q, params.blocks.block_k
    kv_index = tc.key_index(params, bq, bk)
    out_specs = [tc.tile_spec(bq, dv, tc.resident)]
    out_shape = [jax.ShapeDtypeStruct((batch, heads, seq_len, dv), q.dtype)]
    scratch = [pltpu.VMEM((bq, dv), jnp.float32)]
    if params.score.softmax:
        out_specs.append(tc.tile_spec(bq, 1, tc.resident))
        out_shape.append(jax.ShapeDtypeStruct((batch, heads, seq_len, 1), jnp.float32))
        scratch += [pltpu.VMEM((bq, 1), jnp.float32)] * 2
    outs = pl.pallas_call(
        functools.partial(_fwd_kernel, params=params),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=2,
            grid=(batch, heads, seq_len // bq, seq_len // bk),
            in_specs=[
                tc.tile_spec(bq, dqk, tc.resident),
                tc.tile_spec(bk, dqk, kv_index),
                tc.tile_spec(bk, dv, kv_index),
                tc.tile_spec(bq, dqk, tc.resident),
                tc.tile_spec(bq, dv, tc.resident),
            ] + tc.bias_specs(params.score, bq, tc.resident, bk, kv_index),
            out_specs=out_specs,
            scratch_shapes=scratch,
        ),
        out_shape=out_shape,
        compiler_params=pltpu.CompilerParams(dimension_semantics=tc.SEMANTICS),
        interpret=tc.interpret_params(params.interpret),
        name="hstu_attention_fwd",
    )(lengths, hist, q, k, v, k, v, *tc.bias_args(params.score, alibi, tslopes, ts, ts))
    return outs[0], (outs[1] if params.score.softmax else None)

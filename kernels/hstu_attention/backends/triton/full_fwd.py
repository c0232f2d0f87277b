"""Target-aware ranking attention in Pallas lowered through Triton (any CUDA GPU; interpretable on CPU).

Full mode (`hstu_attention`), three kernels, one program per (row or key block, batch, head):
  * forward (here): a row block keeps q and its accumulator in registers and walks the key blocks that
    `masks.key_blocks_for_rows` says it needs, mask-free blocks first, then the masked edge blocks; silu
    accumulates silu(z) V, softmax runs the online softmax and saves the row LSE for the backward;
  * dq and dk/dv (`full_bwd.py`): the same walks, with the slope gradients as partial sums.
Each candidate's own diagonal pair, when the walk does not reach it, is added as a row-wise term instead of
visiting a mostly empty block (it is at distance 0 and time difference 0, so it carries no bias). alpha and
1/normalizer are applied once to the accumulators, not per score. Scores and biases (ALiBi on the collapsed
index, the log1p time bias) come from `scores.py`. The cached-prefix mode is `cached*.py`; the
custom_vjp that joins forward and backward is `full.py`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from kernels.hstu_attention import common, scores
from kernels.hstu_attention.backends.triton import _common as tc
from kernels.hstu_attention.common import KernelParams, silu
from kernels.hstu_attention.masks import key_blocks_for_rows, tile_mask, uncovered_diagonal

_FWD_NAMES = ("q", "k", "v", "ts?ts", "o", "lse?sm")


def _fwd_kernel(*refs, params: KernelParams, nq: int):
    r = tc.take_refs(refs, params, _FWD_NAMES)
    bq, bk = params.blocks.block_q, params.blocks.block_k
    spec, softmax = params.spec, params.score.softmax
    k_ref, v_ref = r["k"], r["v"]
    length, hist = r["plen"][...], r["nq"][...]
    i0 = (nq - 1 - pl.program_id(0)) * bq
    q = r["q"][...]
    rows = i0 + lax.broadcasted_iota(jnp.int32, (bq, 1), 0)
    lo, full_hi, hi = key_blocks_for_rows(i0, bq, bk, length, hist, spec)

    def step(kb, carry, masked):
        j0 = pl.multiple_of(kb * bk, bk)
        k = k_ref[pl.ds(j0, bk), :]
        v = v_ref[pl.ds(j0, bk), :]
        cols = j0 + lax.broadcasted_iota(jnp.int32, (1, bk), 1)
        z = tc.full_tile_scores(params, q, k, rows, cols, hist, r, i0, j0, bq, bk)
        if softmax:
            acc, m, l = carry
            valid = tile_mask(rows, cols, length, hist, spec) if masked else None
            m, corr, w, l = scores.online_softmax_step(m, l, z, valid)
            return acc * corr + common.matmul(w.astype(v.dtype), v), m, l
        p = silu(z)
        if masked:
            p = jnp.where(tile_mask(rows, cols, length, hist, spec), p, 0.0)
        return (carry[0] + common.matmul(p.astype(v.dtype), v),)

    carry = (jnp.zeros((bq, v_ref.shape[-1]), jnp.float32),)
    if softmax:
        carry += (jnp.full((bq, 1), scores.MASK_VALUE, jnp.float32), jnp.zeros((bq, 1), jnp.float32))
    carry = lax.fori_loop(lo, full_hi, functools.partial(step, masked=False), carry)
    carry = lax.fori_loop(full_hi, hi, functools.partial(step, masked=True), carry)
    acc = carry[0]

    # The candidate's own pair: distance 0 and time difference 0, so it never carries a bias.
    pos = i0 + lax.broadcasted_iota(jnp.int32, (bq,), 0)
    diag = uncovered_diagonal(pos, length, hist, lo, hi, bk)
    kd = k_ref[pl.ds(i0, bq), :].astype(jnp.float32)
    vd = v_ref[pl.ds(i0, bq), :].astype(jnp.float32)
    sd = params.alpha * jnp.sum(q.astype(jnp.float32) * kd, axis=1)
    if softmax:
        _, m, l = carry
        m, corr, w, l = scores.online_softmax_step(m, l, sd[:, None], diag[:, None])
        inv_l, lse = scores.softmax_finish(m, l)
        out = jnp.where(rows < length, (acc * corr + w * vd) * inv_l, 0.0)
        r["lse"][...] = jnp.where(rows < length, lse, 0.0)[:, 0]
    else:
        acc += jnp.where(diag, silu(sd), 0.0)[:, None] * vd
        out = jnp.where(rows < length, acc * params.inv_normalizer, 0.0)
    r["o"][...] = out.astype(r["o"].dtype)


def forward(params: KernelParams, q, k, v, lengths, hist, alibi, ts, tslopes):
    batch, seq_len, heads, dqk = q.shape
    dv = v.shape[-1]
    bq = params.blocks.block_q
    nq = seq_len // bq
    out_specs = [tc.rows_spec(bq, dv, reverse_blocks=nq)]
    out_shape = [jax.ShapeDtypeStruct((batch, seq_len, heads, dv), q.dtype)]
    if params.score.softmax:
        out_specs.append(tc.row_stat_spec(bq, reverse_blocks=nq))
        out_shape.append(jax.ShapeDtypeStruct((batch, heads, seq_len), jnp.float32))
    outs = pl.pallas_call(
        functools.partial(_fwd_kernel, params=params, nq=nq),
        grid=(nq, batch, heads),
        in_specs=tc.statics_specs(params) + [
            tc.rows_spec(bq, dqk, reverse_blocks=nq),
            tc.whole_spec(seq_len, dqk),
            tc.whole_spec(seq_len, dv),
        ] + ([tc.ts_whole_spec(seq_len)] if params.score.time else []),
        out_specs=out_specs,
        out_shape=out_shape,
        compiler_params=tc.compiler_params(params.blocks),
        interpret=params.interpret,
        name="hstu_attention_fwd",
    )(lengths, hist, *tc.slope_args(alibi, tslopes), q, k, v, *([ts] if params.score.time else []))
    return outs[0], (outs[1] if params.score.softmax else None)

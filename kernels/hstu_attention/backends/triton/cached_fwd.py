"""Cached-prefix ranking attention (`hstu_attention_cached`) in Pallas lowered through Triton: the forward kernel.

C query rows attend to a cached prefix k_prefix/v_prefix [B, N, H, D] of valid length prefix_len and, with
`self_term`, each to its own k, v (never to another row). The mask is separable (valid row x valid key), which
keeps the walks simple. Three kernels, one program per (block, batch, head):
  * forward: a query block stays resident and streams prefix key blocks [lo, hi) only (hi = cdiv(prefix_len,
    block_k); with a window, lo skips keys further than max_attn_len), the interior blocks without a mask;
    the self term is added row-wise; silu accumulates silu(z) V, softmax runs the online softmax (the self
    key is its last step) and saves the row LSE for the backward;
  * dq (`cached_bwd.py`): the same walk, accumulating dS K_prefix; it also writes the self-term d(k, v) row-wise and the
    slope gradients as per-(row block, batch, head) partial sums, reduced outside the kernel;
  * dk_prefix/dv_prefix: a prefix key block walks the query blocks [0, cdiv(num_queries, block_q_bwd)).
Scores and biases come from `scores.py` (ALiBi distance prefix_len - j; the self key has distance 0 and time
difference 0, so it never carries a bias). Rows >= num_queries and prefix keys >= prefix_len get exactly 0.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from kernels.hstu_attention import common, scores
from kernels.hstu_attention.backends.triton import _common as tc
from kernels.hstu_attention.common import CachedParams
from kernels.hstu_attention.masks import prefix_key_blocks, prefix_key_valid

# --- kernel ---------------------------------------------------------------------------------------------------
_FWD_NAMES = ("q", "k", "v", "kp", "vp", "ts?ts", "pts?ts", "o", "lse?sm")


def _fwd_kernel(*refs, p: CachedParams):
    r = tc.take_refs(refs, p, _FWD_NAMES)
    bq, bk = p.blocks.block_q, p.blocks.block_k
    plen, nq = r["plen"][...], r["nq"][...]
    i0 = pl.program_id(0) * bq
    q = r["q"][...]
    rows = i0 + lax.broadcasted_iota(jnp.int32, (bq, 1), 0)
    row_ts = r["ts"][...] if p.score.time else None
    a_slope, t_slope = tc.read_slopes(r)
    lo, full_hi, hi = prefix_key_blocks(plen, bk, p.mask, i0 < nq)

    def step(kb, carry, masked):
        j0 = pl.multiple_of(kb * bk, bk)
        k, v = r["kp"][pl.ds(j0, bk), :], r["vp"][pl.ds(j0, bk), :]
        cols = j0 + lax.broadcasted_iota(jnp.int32, (1, bk), 1)
        col_ts = r["pts"][pl.ds(j0, bk)] if p.score.time else None
        z = tc.cached_tile_scores(p, q, k, cols, plen, row_ts, col_ts, a_slope, t_slope)
        valid = prefix_key_valid(cols, plen, p.mask) if masked else None
        if p.score.softmax:
            acc, m, l = carry
            m, corr, w, l = scores.online_softmax_step(m, l, z, valid)
            return acc * corr + common.matmul(w.astype(v.dtype), v), m, l
        w = scores.silu(z)
        if masked:
            w = jnp.where(valid, w, 0.0)
        return (carry[0] + common.matmul(w.astype(v.dtype), v),)

    dv = r["vp"].shape[-1]
    carry = (jnp.zeros((bq, dv), jnp.float32),)
    if p.score.softmax:
        carry += (jnp.full((bq, 1), scores.MASK_VALUE, jnp.float32), jnp.zeros((bq, 1), jnp.float32))
    carry = lax.fori_loop(lo, full_hi, functools.partial(step, masked=False), carry)
    carry = lax.fori_loop(full_hi, hi, functools.partial(step, masked=True), carry)

    acc = carry[0]
    vs = r["v"][...].astype(jnp.float32)
    s = tc.self_score(p, q, r["k"][...])
    if p.score.softmax:
        _, m, l = carry
        if p.self_term:
            m, corr, w, l = scores.online_softmax_step(m, l, s, None)
            acc = acc * corr + w * vs
        inv_l, lse = scores.softmax_finish(m, l)
        acc = acc * inv_l
        r["lse"][...] = jnp.where(rows < nq, lse, 0.0)[:, 0]
    else:
        if p.self_term:
            acc += scores.silu(s) * vs
        acc = acc * p.scale
    r["o"][...] = jnp.where(rows < nq, acc, 0.0).astype(r["o"].dtype)


def forward(p: CachedParams, q, k, v, kp, vp, plen, nq, alibi, ts, pts, tslopes):
    batch, rows, heads, dqk = q.shape
    n, dv = kp.shape[1], v.shape[-1]
    bq = p.blocks.block_q
    time_specs = [tc.ts_rows_spec(bq), tc.ts_whole_spec(n)] if p.score.time else []
    out_specs = [tc.rows_spec(bq, dv)]
    out_shape = [jax.ShapeDtypeStruct((batch, rows, heads, dv), q.dtype)]
    if p.score.softmax:
        out_specs.append(tc.row_stat_spec(bq))
        out_shape.append(jax.ShapeDtypeStruct((batch, heads, rows), jnp.float32))
    outs = pl.pallas_call(
        functools.partial(_fwd_kernel, p=p),
        grid=(rows // bq, batch, heads),
        in_specs=tc.statics_specs(p)
        + [tc.rows_spec(bq, dqk), tc.rows_spec(bq, dqk), tc.rows_spec(bq, dv), tc.whole_spec(n, dqk), tc.whole_spec(n, dv)]
        + time_specs,
        out_specs=out_specs,
        out_shape=out_shape,
        compiler_params=tc.compiler_params(p.blocks),
        interpret=p.interpret,
        name="hstu_attention_cached_fwd",
    )(plen, nq, *tc.slope_args(alibi, tslopes), q, k, v, kp, vp, *([ts, pts] if p.score.time else []))
    return outs[0], (outs[1] if p.score.softmax else None)

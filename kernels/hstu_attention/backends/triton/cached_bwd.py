"""Backward kernels of the cached-prefix Triton backend (forward: `cached_fwd.py`).

  * dq pass (grid over query blocks): the forward's walk over prefix key blocks, accumulating dS K_prefix;
    it also writes each row's self-term d(k, v) and, per (query block, batch, head), the partial sums
    -sum dS * distance (ALiBi) and -sum dS * bucket(dt) (time) that are reduced to the slope gradients here;
  * dk_prefix/dv_prefix pass (grid over prefix key blocks): a key block walks the query blocks
    [0, cdiv(num_queries, block_q_bwd)), or none when it holds no valid key.
silu recomputes silu'(z); softmax uses the saved row LSE and delta = rowsum(dO * O) (`scores.weights_and_ds`).
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
from kernels.hstu_attention.masks import prefix_block_has_key, prefix_key_blocks, prefix_key_valid

_DQ_NAMES = ("q", "k", "v", "do", "kp", "vp", "ts?ts", "pts?ts", "lse?sm", "delta?sm",
             "dq", "dk", "dv", "ga?alibi", "gt?ts")
_DKV_NAMES = ("kp", "vp", "q", "do", "ts?ts", "pts?ts", "lse?sm", "delta?sm", "dkp", "dvp")


def _dq_kernel(*refs, p: CachedParams):
    r = tc.take_refs(refs, p, _DQ_NAMES)
    bq, bk = p.blocks.block_q, p.blocks.block_k
    plen, nq = r["plen"][...], r["nq"][...]
    i0 = pl.program_id(0) * bq
    q, do = r["q"][...], r["do"][...]
    rows = i0 + lax.broadcasted_iota(jnp.int32, (bq, 1), 0)
    row_ts = r["ts"][...] if p.score.time else None
    lse = r["lse"][...][:, None] if p.score.softmax else None
    delta = r["delta"][...][:, None] if p.score.softmax else None
    a_slope, t_slope = tc.read_slopes(r)
    lo, full_hi, hi = prefix_key_blocks(plen, bk, p.mask, i0 < nq)

    def step(kb, carry, masked):
        dq, ga, gt = carry
        j0 = pl.multiple_of(kb * bk, bk)
        k, v = r["kp"][pl.ds(j0, bk), :], r["vp"][pl.ds(j0, bk), :]
        cols = j0 + lax.broadcasted_iota(jnp.int32, (1, bk), 1)
        col_ts = r["pts"][pl.ds(j0, bk)] if p.score.time else None
        z = tc.cached_tile_scores(p, q, k, cols, plen, row_ts, col_ts, a_slope, t_slope)
        _, ds = scores.weights_and_ds(p.score, z, common.matmul(do, v, trans_b=True), lse, delta)
        if masked:
            ds = jnp.where(prefix_key_valid(cols, plen, p.mask), ds, 0.0)
        dq = dq + common.matmul(ds.astype(k.dtype), k)
        if p.score.has_bias:
            dist, dt = tc.cached_bias_terms(p, cols, plen, row_ts, col_ts)
            g_a, g_t = scores.slope_grad_terms(p.score, ds, dist, dt)
            ga = ga if g_a is None else ga + g_a
            gt = gt if g_t is None else gt + g_t
        return dq, ga, gt

    zero_rows = jnp.zeros((bq,), jnp.float32)
    carry = (jnp.zeros((bq, q.shape[-1]), jnp.float32), zero_rows, zero_rows)
    carry = lax.fori_loop(lo, full_hi, functools.partial(step, masked=False), carry)
    dq, ga, gt = lax.fori_loop(full_hi, hi, functools.partial(step, masked=True), carry)

    valid = rows < nq
    qf, dof = q.astype(jnp.float32), do.astype(jnp.float32)
    ks, vs = r["k"][...].astype(jnp.float32), r["v"][...].astype(jnp.float32)
    if p.self_term:
        dp_s = jnp.sum(dof * vs, axis=1, keepdims=True)
        w_s, ds_s = scores.weights_and_ds(p.score, tc.self_score(p, q, r["k"][...]), dp_s, lse, delta)
        dq += ds_s * ks
        dk_s, dv_s = ds_s * qf, w_s * dof
    else:
        dk_s, dv_s = jnp.zeros_like(qf), jnp.zeros_like(dof)
    grad_scale = p.alpha * p.scale
    r["dq"][...] = jnp.where(valid, dq * grad_scale, 0.0).astype(r["dq"].dtype)
    r["dk"][...] = jnp.where(valid, dk_s * grad_scale, 0.0).astype(r["dk"].dtype)
    r["dv"][...] = jnp.where(valid, dv_s * p.scale, 0.0).astype(r["dv"].dtype)
    for name, g in (("ga", ga), ("gt", gt)):
        if r[name] is not None:
            total = jnp.sum(jnp.where(valid[:, 0], g, 0.0)) * p.scale
            r[name][...] = jnp.broadcast_to(total, (1,))


def _dkv_kernel(*refs, p: CachedParams):
    r = tc.take_refs(refs, p, _DKV_NAMES)
    bq, bk = p.blocks.block_q_bwd, p.blocks.block_k_bwd
    plen, nq = r["plen"][...], r["nq"][...]
    j0 = pl.program_id(0) * bk
    kp, vp = r["kp"][...], r["vp"][...]
    cols = j0 + lax.broadcasted_iota(jnp.int32, (1, bk), 1)
    col_valid = prefix_key_valid(cols, plen, p.mask)
    col_ts = r["pts"][...] if p.score.time else None
    a_slope, t_slope = tc.read_slopes(r)
    hi = jnp.where(prefix_block_has_key(j0, bk, plen, p.mask), lax.div(nq + (bq - 1), jnp.int32(bq)), 0)

    def step(rb, carry):
        dk, dv = carry
        i0 = pl.multiple_of(rb * bq, bq)
        q, do = r["q"][pl.ds(i0, bq), :], r["do"][pl.ds(i0, bq), :]
        rows = i0 + lax.broadcasted_iota(jnp.int32, (bq, 1), 0)
        row_ts = r["ts"][pl.ds(i0, bq)] if p.score.time else None
        lse = r["lse"][pl.ds(i0, bq)][:, None] if p.score.softmax else None
        delta = r["delta"][pl.ds(i0, bq)][:, None] if p.score.softmax else None
        z = tc.cached_tile_scores(p, q, kp, cols, plen, row_ts, col_ts, a_slope, t_slope)
        w, ds = scores.weights_and_ds(p.score, z, common.matmul(do, vp, trans_b=True), lse, delta)
        valid = (rows < nq) & col_valid
        w, ds = jnp.where(valid, w, 0.0), jnp.where(valid, ds, 0.0)
        dv = dv + common.matmul(w.astype(do.dtype), do, trans_a=True)
        dk = dk + common.matmul(ds.astype(q.dtype), q, trans_a=True)
        return dk, dv

    carry = (jnp.zeros((bk, kp.shape[-1]), jnp.float32), jnp.zeros((bk, vp.shape[-1]), jnp.float32))
    dk, dv = lax.fori_loop(0, hi, step, carry)
    r["dkp"][...] = (dk * (p.alpha * p.scale)).astype(r["dkp"].dtype)
    r["dvp"][...] = (dv * p.scale).astype(r["dvp"].dtype)


def backward(p: CachedParams, q, k, v, kp, vp, plen, nq, alibi, ts, pts, tslopes, out, lse, d_out):
    """(dq, dk, dv, dk_prefix, dv_prefix, d_alibi, d_time) on the padded shapes."""
    batch, rows, heads, dqk = q.shape
    n, dv = kp.shape[1], v.shape[-1]
    d_out = d_out.astype(q.dtype)
    sm, time = p.score.softmax, p.score.time
    stats = []
    if sm:
        delta = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)
        stats = [lse, jnp.transpose(delta, (0, 2, 1))]
    slopes = tc.slope_args(alibi, tslopes)
    bq, bk = p.blocks.block_q, p.blocks.block_k
    nb = rows // bq
    partial = jax.ShapeDtypeStruct((nb, batch, heads, 1), jnp.float32)
    out_specs = [tc.rows_spec(bq, dqk), tc.rows_spec(bq, dqk), tc.rows_spec(bq, dv)]
    out_shape = [jax.ShapeDtypeStruct(x.shape, x.dtype) for x in (q, k, v)]
    for on in (p.score.alibi, time):
        if on:
            out_specs.append(tc.partial_spec())
            out_shape.append(partial)
    dq_outs = pl.pallas_call(
        functools.partial(_dq_kernel, p=p),
        grid=(nb, batch, heads),
        in_specs=tc.statics_specs(p)
        + [tc.rows_spec(bq, dqk), tc.rows_spec(bq, dqk), tc.rows_spec(bq, dv), tc.rows_spec(bq, dv),
           tc.whole_spec(n, dqk), tc.whole_spec(n, dv)]
        + ([tc.ts_rows_spec(bq), tc.ts_whole_spec(n)] if time else [])
        + ([tc.row_stat_spec(bq)] * 2 if sm else []),
        out_specs=out_specs,
        out_shape=out_shape,
        compiler_params=tc.compiler_params(p.blocks),
        interpret=p.interpret,
        name="hstu_attention_cached_dq",
    )(plen, nq, *slopes, q, k, v, d_out, kp, vp, *([ts, pts] if time else []), *stats)
    dq, dk, dv_self = dq_outs[:3]
    partials = iter(dq_outs[3:])
    d_alibi = jnp.sum(next(partials), axis=(0, 1, 3)) if p.score.alibi else None
    d_time = jnp.sum(next(partials), axis=(0, 1, 3)) if time else None

    bqb, bkb = p.blocks.block_q_bwd, p.blocks.block_k_bwd
    dkp, dvp = pl.pallas_call(
        functools.partial(_dkv_kernel, p=p),
        grid=(n // bkb, batch, heads),
        in_specs=tc.statics_specs(p)
        + [tc.rows_spec(bkb, dqk), tc.rows_spec(bkb, dv), tc.whole_spec(rows, dqk), tc.whole_spec(rows, dv)]
        + ([tc.ts_whole_spec(rows), tc.ts_rows_spec(bkb)] if time else [])
        + ([tc.whole_stat_spec(rows)] * 2 if sm else []),
        out_specs=[tc.rows_spec(bkb, dqk), tc.rows_spec(bkb, dv)],
        out_shape=[jax.ShapeDtypeStruct(kp.shape, kp.dtype), jax.ShapeDtypeStruct(vp.shape, vp.dtype)],
        compiler_params=tc.compiler_params(p.blocks),
        interpret=p.interpret,
        name="hstu_attention_cached_dkv",
    )(plen, nq, *slopes, kp, vp, q, d_out, *([ts, pts] if time else []), *stats)
    return dq, dk, dv_self, dkp, dvp, d_alibi, d_time

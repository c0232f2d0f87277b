"""Backward kernels of the full-sequence Triton backend (forward: `full_fwd.py`).

  * dq (grid over row blocks, heaviest first): the forward's key-block walk, accumulating dS K; with a bias on,
    it also writes per-(row block, batch, head) partial sums of -dS * distance (ALiBi) and -dS * bucket(dt)
    (time), reduced to the slope gradients outside the kernel;
  * dk/dv (grid over key blocks): a key block walks the row blocks of `masks.row_blocks_for_keys` and
    accumulates P^T dO and dS^T Q.
Each candidate's own diagonal pair, when the walk does not reach it, is added row-wise (it carries no bias).
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
from kernels.hstu_attention.common import KernelParams
from kernels.hstu_attention.masks import row_blocks_for_keys, key_blocks_for_rows, tile_mask, uncovered_diagonal

_DQ_NAMES = ("q", "do", "k", "v", "ts?ts", "lse?sm", "delta?sm", "dq", "ga?alibi", "gt?ts")
_DKV_NAMES = ("k", "v", "q", "do", "ts?ts", "lse?sm", "delta?sm", "dk", "dv")


def _row_stats(r, start, size):
    """(lse, delta) [size, 1] of rows [start, start + size) (None, None for silu)."""
    if r["lse"] is None:
        return None, None
    return r["lse"][pl.ds(start, size)][:, None], r["delta"][pl.ds(start, size)][:, None]


def _dq_kernel(*refs, params: KernelParams, nq: int):
    r = tc.take_refs(refs, params, _DQ_NAMES)
    bq, bk = params.blocks.block_q, params.blocks.block_k
    spec, score = params.spec, params.score
    k_ref, v_ref = r["k"], r["v"]
    length, hist = r["plen"][...], r["nq"][...]
    i0 = (nq - 1 - pl.program_id(0)) * bq
    q = r["q"][...]
    do = r["do"][...]
    lse = r["lse"][...][:, None] if score.softmax else None
    delta = r["delta"][...][:, None] if score.softmax else None
    rows = i0 + lax.broadcasted_iota(jnp.int32, (bq, 1), 0)
    lo, full_hi, hi = key_blocks_for_rows(i0, bq, bk, length, hist, spec)

    def step(kb, carry, masked):
        acc, ga, gt = carry
        j0 = pl.multiple_of(kb * bk, bk)
        k = k_ref[pl.ds(j0, bk), :]
        v = v_ref[pl.ds(j0, bk), :]
        cols = j0 + lax.broadcasted_iota(jnp.int32, (1, bk), 1)
        z = tc.full_tile_scores(params, q, k, rows, cols, hist, r, i0, j0, bq, bk)
        _, ds = scores.weights_and_ds(score, z, common.matmul(do, v, trans_b=True), lse, delta)
        if masked:
            ds = jnp.where(tile_mask(rows, cols, length, hist, spec), ds, 0.0)
        if score.has_bias:
            dist, dt = tc.full_bias_terms(params, rows, cols, hist, r["ts"], i0, j0, bq, bk)
            g_a, g_t = scores.slope_grad_terms(score, ds, dist, dt)
            ga = ga if g_a is None else ga + g_a
            gt = gt if g_t is None else gt + g_t
        return acc + common.matmul(ds.astype(k.dtype), k), ga, gt

    zero_rows = jnp.zeros((bq,), jnp.float32)
    carry = (jnp.zeros((bq, r["q"].shape[-1]), jnp.float32), zero_rows, zero_rows)
    carry = lax.fori_loop(lo, full_hi, functools.partial(step, masked=False), carry)
    acc, ga, gt = lax.fori_loop(full_hi, hi, functools.partial(step, masked=True), carry)

    pos = i0 + lax.broadcasted_iota(jnp.int32, (bq,), 0)
    diag = uncovered_diagonal(pos, length, hist, lo, hi, bk)
    kd = k_ref[pl.ds(i0, bq), :].astype(jnp.float32)
    vd = v_ref[pl.ds(i0, bq), :].astype(jnp.float32)
    sd = params.alpha * jnp.sum(q.astype(jnp.float32) * kd, axis=1)
    dpd = jnp.sum(do.astype(jnp.float32) * vd, axis=1)
    if score.softmax:
        _, dsd = scores.weights_and_ds(score, sd[:, None], dpd[:, None], lse, delta)
        dsd = dsd[:, 0]
    else:
        _, grad_d = scores.silu_and_grad(sd)
        dsd = dpd * grad_d
    acc += jnp.where(diag, dsd, 0.0)[:, None] * kd

    scale = params.alpha * params.acc_scale
    r["dq"][...] = jnp.where(rows < length, acc * scale, 0.0).astype(r["dq"].dtype)
    for name, g in (("ga", ga), ("gt", gt)):
        if r[name] is not None:
            total = jnp.sum(jnp.where(pos < length, g, 0.0)) * params.acc_scale
            r[name][...] = jnp.broadcast_to(total, (1,))


def _dkdv_kernel(*refs, params: KernelParams):
    r = tc.take_refs(refs, params, _DKV_NAMES)
    bq, bk = params.blocks.block_q_bwd, params.blocks.block_k_bwd
    spec, score = params.spec, params.score
    q_ref, do_ref = r["q"], r["do"]
    length, hist = r["plen"][...], r["nq"][...]
    j0 = pl.program_id(0) * bk
    k = r["k"][...]
    v = r["v"][...]
    cols = j0 + lax.broadcasted_iota(jnp.int32, (1, bk), 1)
    lo, full_lo, full_hi, hi = row_blocks_for_keys(j0, bk, bq, length, hist, spec)

    def step(rb, carry, masked):
        dk, dv = carry
        i0 = pl.multiple_of(rb * bq, bq)
        q = q_ref[pl.ds(i0, bq), :]
        do = do_ref[pl.ds(i0, bq), :]
        rows = i0 + lax.broadcasted_iota(jnp.int32, (bq, 1), 0)
        lse, delta = _row_stats(r, i0, bq)
        z = tc.full_tile_scores(params, q, k, rows, cols, hist, r, i0, j0, bq, bk)
        p, ds = scores.weights_and_ds(score, z, common.matmul(do, v, trans_b=True), lse, delta)
        if masked:
            valid = tile_mask(rows, cols, length, hist, spec)
            p = jnp.where(valid, p, 0.0)
            ds = jnp.where(valid, ds, 0.0)
        dv = dv + common.matmul(p.astype(do.dtype), do, trans_a=True)
        dk = dk + common.matmul(ds.astype(q.dtype), q, trans_a=True)
        return dk, dv

    carry = (jnp.zeros((bk, r["k"].shape[-1]), jnp.float32), jnp.zeros((bk, r["v"].shape[-1]), jnp.float32))
    carry = lax.fori_loop(lo, full_lo, functools.partial(step, masked=True), carry)
    carry = lax.fori_loop(full_lo, full_hi, functools.partial(step, masked=False), carry)
    dk, dv = lax.fori_loop(full_hi, hi, functools.partial(step, masked=True), carry)

    pos = j0 + lax.broadcasted_iota(jnp.int32, (bk,), 0)
    diag = uncovered_diagonal(pos, length, hist, lo, hi, bq)
    qd = q_ref[pl.ds(j0, bk), :].astype(jnp.float32)
    dod = do_ref[pl.ds(j0, bk), :].astype(jnp.float32)
    sd = params.alpha * jnp.sum(qd * k.astype(jnp.float32), axis=1)
    dpd = jnp.sum(dod * v.astype(jnp.float32), axis=1)
    if score.softmax:
        lse, delta = _row_stats(r, j0, bk)
        pd, dsd = scores.weights_and_ds(score, sd[:, None], dpd[:, None], lse, delta)
        pd, dsd = pd[:, 0], dsd[:, 0]
    else:
        pd, grad_d = scores.silu_and_grad(sd)
        dsd = dpd * grad_d
    dv += jnp.where(diag, pd, 0.0)[:, None] * dod
    dk += jnp.where(diag, dsd, 0.0)[:, None] * qd

    valid_key = pos[:, None] < length
    scale = params.acc_scale
    r["dk"][...] = jnp.where(valid_key, dk * (params.alpha * scale), 0.0).astype(r["dk"].dtype)
    r["dv"][...] = jnp.where(valid_key, dv * scale, 0.0).astype(r["dv"].dtype)


def backward(params: KernelParams, q, k, v, lengths, hist, alibi, ts, tslopes, out, lse, d_out):
    """(dq, dk, dv, d_alibi, d_time) on the padded shapes."""
    batch, seq_len, heads, dqk = q.shape
    dv = v.shape[-1]
    blocks = params.blocks
    sm, time = params.score.softmax, params.score.time
    nq = seq_len // blocks.block_q
    d_out = d_out.astype(q.dtype)
    stats = []
    if sm:
        delta = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)
        stats = [lse, jnp.transpose(delta, (0, 2, 1))]
    statics = (lengths, hist, *tc.slope_args(alibi, tslopes))
    time_in = ([tc.ts_whole_spec(seq_len)] if time else [], [ts] if time else [])
    out_specs = [tc.rows_spec(blocks.block_q, dqk, reverse_blocks=nq)]
    out_shape = [jax.ShapeDtypeStruct(q.shape, q.dtype)]
    for on in (params.score.alibi, time):
        if on:
            out_specs.append(tc.partial_spec())
            out_shape.append(jax.ShapeDtypeStruct((nq, batch, heads, 1), jnp.float32))
    dq_outs = pl.pallas_call(
        functools.partial(_dq_kernel, params=params, nq=nq),
        grid=(nq, batch, heads),
        in_specs=tc.statics_specs(params) + [
            tc.rows_spec(blocks.block_q, dqk, reverse_blocks=nq),
            tc.rows_spec(blocks.block_q, dv, reverse_blocks=nq),
            tc.whole_spec(seq_len, dqk),
            tc.whole_spec(seq_len, dv),
        ] + time_in[0] + [tc.row_stat_spec(blocks.block_q, reverse_blocks=nq)] * len(stats),
        out_specs=out_specs,
        out_shape=out_shape,
        compiler_params=tc.compiler_params(blocks),
        interpret=params.interpret,
        name="hstu_attention_dq",
    )(*statics, q, d_out, k, v, *time_in[1], *stats)
    dq = dq_outs[0]
    partials = iter(dq_outs[1:])
    d_alibi = jnp.sum(next(partials), axis=(0, 1, 3)) if params.score.alibi else None
    d_time = jnp.sum(next(partials), axis=(0, 1, 3)) if time else None
    nk = seq_len // blocks.block_k_bwd
    dk, dv_out = pl.pallas_call(
        functools.partial(_dkdv_kernel, params=params),
        grid=(nk, batch, heads),
        in_specs=tc.statics_specs(params) + [
            tc.rows_spec(blocks.block_k_bwd, dqk),
            tc.rows_spec(blocks.block_k_bwd, dv),
            tc.whole_spec(seq_len, dqk),
            tc.whole_spec(seq_len, dv),
        ] + time_in[0] + [tc.whole_stat_spec(seq_len)] * len(stats),
        out_specs=[tc.rows_spec(blocks.block_k_bwd, dqk), tc.rows_spec(blocks.block_k_bwd, dv)],
        out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
        compiler_params=tc.compiler_params(blocks),
        interpret=params.interpret,
        name="hstu_attention_dkdv",
    )(*statics, k, v, q, d_out, *time_in[1], *stats)
    return dq, dk, dv_out, d_alibi, d_time

"""Backward kernels of the full-sequence TPU backend (forward: `full_fwd.py`), same grids and skipping.

  * dq, grid (batch, head, row block, key block): the forward's clamped key-block walk, accumulating dS K;
  * dk/dv, grid (batch, head, key block, row block): a key block walks the row blocks of
    `masks.row_blocks_for_keys` and accumulates P^T dO and dS^T Q.
Candidate diagonals not reached by a walk are added at the last step from the resident block's own rows.
silu recomputes silu'(z); softmax uses the saved row LSE and delta = rowsum(dO * O) (`scores.weights_and_ds`),
both [B, H, L, 1]. With a bias on, the dq pass also writes per-row partial sums of -dS * distance (ALiBi) and
-dS * bucket(dt) (time), [B, H, L, 1], reduced to the slope gradients [H] here.
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
from kernels.hstu_attention.common import KernelParams, silu_and_grad
from kernels.hstu_attention.masks import key_blocks_for_rows, row_blocks_for_keys, tile_mask, uncovered_diagonal
from kernels.hstu_attention.scores import position_distance


def _dq_kernel(len_ref, hist_ref, q_ref, do_ref, k_ref, v_ref, kd_ref, vd_ref, *refs, params):
    sm, score = params.score.softmax, params.score
    if sm:
        lse_ref, delta_ref, *refs = refs
    br, refs = tc.take_bias_refs(refs, score)
    dq_ref, *refs = refs
    n_slopes = int(score.alibi) + int(score.time)
    g_refs, (acc_ref, *g_accs) = refs[:n_slopes], refs[n_slopes:]
    bq, bk = params.blocks.block_q, params.blocks.block_k
    b, h, qb, kb = pl.program_id(0), pl.program_id(1), pl.program_id(2), pl.program_id(3)
    length, hist = len_ref[b], hist_ref[b]
    i0 = qb * bq
    lo, full_hi, hi = key_blocks_for_rows(i0, bq, bk, length, hist, params.spec)
    rows = i0 + lax.broadcasted_iota(jnp.int32, (bq, bk), 0)

    @pl.when(kb == 0)
    def _init():
        acc_ref[...] = jnp.zeros_like(acc_ref)
        for g_acc in g_accs:
            g_acc[...] = jnp.zeros_like(g_acc)

    def step(masked: bool):
        q, do, k, v = q_ref[...], do_ref[...], k_ref[...], v_ref[...]
        cols = kb * bk + lax.broadcasted_iota(jnp.int32, (bq, bk), 1)
        z = params.alpha * tc.mm(q, k, trans_b=True)
        dist = position_distance(rows, cols, hist) if score.alibi else None
        if score.has_bias:
            z = scores.add_bias(z, br.tile_bias(score, h, dist))
        if sm:
            _, ds = scores.weights_and_ds(params.score, z, tc.mm(do, v, trans_b=True), lse_ref[...], delta_ref[...])
        else:
            _, grad = silu_and_grad(z)
            ds = tc.mm(do, v, trans_b=True) * grad
        if masked:
            ds = jnp.where(tile_mask(rows, cols, length, hist, params.spec), ds, 0.0)
        acc_ref[...] += tc.mm(ds.astype(k.dtype), k)
        for g_acc, g in zip(g_accs, (g for g in tc.slope_grad_rows(score, br, ds, dist) if g is not None)):
            g_acc[...] += g

    pl.when((kb >= lo) & (kb < full_hi))(functools.partial(step, False))
    pl.when((kb >= full_hi) & (kb < hi))(functools.partial(step, True))

    @pl.when(kb == pl.num_programs(3) - 1)
    def _finish():
        pos = i0 + lax.broadcasted_iota(jnp.int32, (bq, 1), 0)
        diag = uncovered_diagonal(pos, length, hist, lo, hi, bk)
        kd = kd_ref[...].astype(jnp.float32)
        sd = params.alpha * jnp.sum(q_ref[...].astype(jnp.float32) * kd, axis=1, keepdims=True)
        dpd = jnp.sum(do_ref[...].astype(jnp.float32) * vd_ref[...].astype(jnp.float32), axis=1, keepdims=True)
        if sm:
            _, dsd = scores.weights_and_ds(params.score, sd, dpd, lse_ref[...], delta_ref[...])
        else:
            _, grad_d = silu_and_grad(sd)
            dsd = dpd * grad_d
        acc = acc_ref[...] + jnp.where(diag, dsd, 0.0) * kd
        scale = params.alpha * params.acc_scale
        dq_ref[...] = jnp.where(pos < length, acc * scale, 0.0).astype(dq_ref.dtype)
        # The candidate diagonal carries no bias, so it adds nothing to the slope gradients.
        for g_ref, g_acc in zip(g_refs, g_accs):
            g_ref[...] = jnp.where(pos < length, g_acc[...], 0.0) * params.acc_scale


def _dkdv_kernel(len_ref, hist_ref, k_ref, v_ref, q_ref, do_ref, qd_ref, dod_ref, *refs, params):
    sm, score = params.score.softmax, params.score
    if sm:
        lse_ref, delta_ref, lsed_ref, deltad_ref, *refs = refs
    br, refs = tc.take_bias_refs(refs, score)
    dk_ref, dv_ref, dk_acc, dv_acc = refs
    bq, bk = params.blocks.block_q_bwd, params.blocks.block_k_bwd
    b, h, kb, qb = pl.program_id(0), pl.program_id(1), pl.program_id(2), pl.program_id(3)
    length, hist = len_ref[b], hist_ref[b]
    j0 = kb * bk
    lo, full_lo, full_hi, hi = row_blocks_for_keys(j0, bk, bq, length, hist, params.spec)
    cols = j0 + lax.broadcasted_iota(jnp.int32, (bq, bk), 1)

    @pl.when(qb == 0)
    def _init():
        dk_acc[...] = jnp.zeros_like(dk_acc)
        dv_acc[...] = jnp.zeros_like(dv_acc)

    def step(masked: bool):
        q, do, k, v = q_ref[...], do_ref[...], k_ref[...], v_ref[...]
        rows = qb * bq + lax.broadcasted_iota(jnp.int32, (bq, bk), 0)
        z = params.alpha * tc.mm(q, k, trans_b=True)
        if score.has_bias:
            dist = position_distance(rows, cols, hist) if score.alibi else None
            z = scores.add_bias(z, br.tile_bias(score, h, dist))
        if sm:
            p, ds = scores.weights_and_ds(params.score, z, tc.mm(do, v, trans_b=True), lse_ref[...], delta_ref[...])
        else:
            p, grad = silu_and_grad(z)
            ds = tc.mm(do, v, trans_b=True) * grad
        if masked:
            valid = tile_mask(rows, cols, length, hist, params.spec)
            p = jnp.where(valid, p, 0.0)
            ds = jnp.where(valid, ds, 0.0)
        dv_acc[...] += tc.mm(p.astype(do.dtype), do, trans_a=True)
        dk_acc[...] += tc.mm(ds.astype(q.dtype), q, trans_a=True)

    in_range = (qb >= lo) & (qb < hi)
    unmasked = (qb >= full_lo) & (qb < full_hi)
    pl.when(in_range & unmasked)(functools.partial(step, False))
    pl.when(in_range & ~unmasked)(functools.partial(step, True))

    @pl.when(qb == pl.num_programs(3) - 1)
    def _finish():
        pos = j0 + lax.broadcasted_iota(jnp.int32, (bk, 1), 0)
        diag = uncovered_diagonal(pos, length, hist, lo, hi, bq)
        qd = qd_ref[...].astype(jnp.float32)
        dod = dod_ref[...].astype(jnp.float32)
        sd = params.alpha * jnp.sum(qd * k_ref[...].astype(jnp.float32), axis=1, keepdims=True)
        dpd = jnp.sum(dod * v_ref[...].astype(jnp.float32), axis=1, keepdims=True)
        if sm:
            pd, dsd = scores.weights_and_ds(params.score, sd, dpd, lsed_ref[...], deltad_ref[...])
        else:
            pd, grad_d = silu_and_grad(sd)
            dsd = dpd * grad_d
        dk = dk_acc[...] + jnp.where(diag, dsd, 0.0) * qd
        dv = dv_acc[...] + jnp.where(diag, pd, 0.0) * dod
        valid = pos < length
        scale = params.acc_scale
        dk_ref[...] = jnp.where(valid, dk * (params.alpha * scale), 0.0).astype(dk_ref.dtype)
        dv_ref[...] = jnp.where(valid, dv * scale, 0.0).astype(dv_ref.dtype)


def backward(q, k, v, lengths, hist, alibi, ts, tslopes, out, lse, d_out, params: KernelParams):
    """(dq, dk, dv, d_alibi, d_time) on the padded [B, H, L, D] shapes; out and lse are None for silu."""
    batch, heads, seq_len, dqk = q.shape
    dv = v.shape[-1]
    blocks = params.blocks
    d_out = d_out.astype(q.dtype)
    stats = []
    if params.score.softmax:
        stats = [lse, jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), axis=-1, keepdims=True)]
    bq, bk = blocks.block_q, blocks.block_k
    kv_index = tc.key_index(params, bq, bk)
    score = params.score
    bias_in = tc.bias_args(score, alibi, tslopes, ts, ts)
    g_specs, g_shapes = tc.slope_grad_outputs(score, batch, heads, seq_len, bq, tc.resident)
    dq, *partials = pl.pallas_call(
        functools.partial(_dq_kernel, params=params),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=2,
            grid=(batch, heads, seq_len // bq, seq_len // bk),
            in_specs=[
                tc.tile_spec(bq, dqk, tc.resident),
                tc.tile_spec(bq, dv, tc.resident),
                tc.tile_spec(bk, dqk, kv_index),
                tc.tile_spec(bk, dv, kv_index),
                tc.tile_spec(bq, dqk, tc.resident),
                tc.tile_spec(bq, dv, tc.resident),
            ] + [tc.tile_spec(bq, 1, tc.resident)] * len(stats) + tc.bias_specs(score, bq, tc.resident, bk, kv_index),
            out_specs=[tc.tile_spec(bq, dqk, tc.resident)] + g_specs,
            scratch_shapes=[pltpu.VMEM((bq, dqk), jnp.float32)] + [pltpu.VMEM((bq, 1), jnp.float32)] * len(g_specs),
        ),
        out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype)] + g_shapes,
        compiler_params=pltpu.CompilerParams(dimension_semantics=tc.SEMANTICS),
        interpret=tc.interpret_params(params.interpret),
        name="hstu_attention_dq",
    )(lengths, hist, q, d_out, k, v, k, v, *stats, *bias_in)
    d_alibi, d_time = tc.reduce_slope_grads(score, partials)

    bq, bk = blocks.block_q_bwd, blocks.block_k_bwd

    def q_index(b, h, j, i, len_ref, hist_ref):
        lo, _, _, hi = row_blocks_for_keys(j * bk, bk, bq, len_ref[b], hist_ref[b], params.spec)
        return b, h, tc.clamp(i, lo, hi), 0

    def key_index(b, h, j, i, len_ref, hist_ref):
        return b, h, j, 0

    # Softmax: row statistics of the walked row block, then of the key block's own (diagonal) rows.
    stat_specs = [tc.tile_spec(bq, 1, q_index)] * len(stats) + [tc.tile_spec(bk, 1, key_index)] * len(stats)
    dk, dv_out = pl.pallas_call(
        functools.partial(_dkdv_kernel, params=params),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=2,
            grid=(batch, heads, seq_len // bk, seq_len // bq),
            in_specs=[
                tc.tile_spec(bk, dqk, key_index),
                tc.tile_spec(bk, dv, key_index),
                tc.tile_spec(bq, dqk, q_index),
                tc.tile_spec(bq, dv, q_index),
                tc.tile_spec(bk, dqk, key_index),
                tc.tile_spec(bk, dv, key_index),
            ] + stat_specs + tc.bias_specs(score, bq, q_index, bk, key_index),
            out_specs=[tc.tile_spec(bk, dqk, key_index), tc.tile_spec(bk, dv, key_index)],
            scratch_shapes=[pltpu.VMEM((bk, dqk), jnp.float32), pltpu.VMEM((bk, dv), jnp.float32)],
        ),
        out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
        compiler_params=pltpu.CompilerParams(dimension_semantics=tc.SEMANTICS),
        interpret=tc.interpret_params(params.interpret),
        name="hstu_attention_dkdv",
    )(lengths, hist, k, v, q, d_out, q, d_out, *stats, *stats, *bias_in)
    return dq, dk, dv_out, d_alibi, d_time

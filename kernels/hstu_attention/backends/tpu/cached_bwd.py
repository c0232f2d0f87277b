"""Backward kernels of the cached-prefix TPU backend (forward: `cached_fwd.py`).

  * dq pass, grid (batch, head, query block, prefix key block): the forward's clamped walk, accumulating
    dS K_prefix in VMEM; at the last step it adds the self term and writes each row's self-term d(k, v);
  * dk_prefix/dv_prefix pass, grid (batch, head, prefix key block, query block): a key block walks the query
    blocks [0, cdiv(num_queries, block_q_bwd)), or none when it holds no valid key (index map clamped alike).
silu recomputes silu'(z); softmax uses the saved row LSE and delta = rowsum(dO * O) (`scores.weights_and_ds`).
With a bias on, the dq pass also writes per-row partial sums of -dS * distance (ALiBi) and -dS * bucket(dt)
(time), [B, H, C, 1], reduced to the slope gradients [H] here.
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
from kernels.hstu_attention.masks import prefix_block_has_key, prefix_key_blocks, prefix_key_valid


def _dq_kernel(plen_ref, nq_ref, q_ref, k_ref, v_ref, do_ref, kp_ref, vp_ref, *refs, p: CachedParams):
    sm, score = p.score.softmax, p.score
    if sm:
        lse_ref, delta_ref, *refs = refs
    br, refs = tc.take_bias_refs(refs, score)
    dq_ref, dk_ref, dv_ref, *refs = refs
    n_slopes = int(score.alibi) + int(score.time)
    g_refs, (acc_ref, *g_accs) = refs[:n_slopes], refs[n_slopes:]
    bq, bk = p.blocks.block_q, p.blocks.block_k
    b, h, rb, kb = pl.program_id(0), pl.program_id(1), pl.program_id(2), pl.program_id(3)
    plen, nq = plen_ref[b], nq_ref[b]
    i0 = rb * bq
    lo, full_hi, hi = prefix_key_blocks(plen, bk, p.mask, i0 < nq)
    lse = lse_ref[...] if sm else None
    delta = delta_ref[...] if sm else None

    @pl.when(kb == 0)
    def _init():
        acc_ref[...] = jnp.zeros_like(acc_ref)
        for g_acc in g_accs:
            g_acc[...] = jnp.zeros_like(g_acc)

    def step(masked: bool):
        q, do, k, v = q_ref[...], do_ref[...], kp_ref[...], vp_ref[...]
        cols = kb * bk + lax.broadcasted_iota(jnp.int32, (bq, bk), 1)
        z = tc.cached_tile_scores(p, q, k, br, h, cols, plen)
        _, ds = scores.weights_and_ds(p.score, z, common.matmul(do, v, trans_b=True), lse, delta)
        if masked:
            ds = jnp.where(prefix_key_valid(cols, plen, p.mask), ds, 0.0)
        acc_ref[...] += common.matmul(ds.astype(k.dtype), k)
        grads = tc.slope_grad_rows(score, br, ds, tc.prefix_distance(p, cols, plen))
        for g_acc, g in zip(g_accs, (g for g in grads if g is not None)):
            g_acc[...] += g

    pl.when((kb >= lo) & (kb < full_hi))(functools.partial(step, False))
    pl.when((kb >= full_hi) & (kb < hi))(functools.partial(step, True))

    @pl.when(kb == pl.num_programs(3) - 1)
    def _finish():
        rows = i0 + lax.broadcasted_iota(jnp.int32, (bq, 1), 0)
        valid = rows < nq
        qf, dof = q_ref[...].astype(jnp.float32), do_ref[...].astype(jnp.float32)
        ks, vs = k_ref[...].astype(jnp.float32), v_ref[...].astype(jnp.float32)
        dq = acc_ref[...]
        if p.self_term:
            dp_s = jnp.sum(dof * vs, axis=1, keepdims=True)
            w_s, ds_s = scores.weights_and_ds(p.score, tc.self_score(p, qf, ks), dp_s, lse, delta)
            dq += ds_s * ks
            dk_s, dv_s = ds_s * qf, w_s * dof
        else:
            dk_s, dv_s = jnp.zeros_like(qf), jnp.zeros_like(dof)
        grad_scale = p.alpha * p.scale
        dq_ref[...] = jnp.where(valid, dq * grad_scale, 0.0).astype(dq_ref.dtype)
        dk_ref[...] = jnp.where(valid, dk_s * grad_scale, 0.0).astype(dk_ref.dtype)
        dv_ref[...] = jnp.where(valid, dv_s * p.scale, 0.0).astype(dv_ref.dtype)
        # The self key carries no bias, so it adds nothing to the slope gradients.
        for g_ref, g_acc in zip(g_refs, g_accs):
            g_ref[...] = jnp.where(valid, g_acc[...], 0.0) * p.scale


def _query_blocks(p: CachedParams, j0, bk: int, bq: int, plen, nq):
    """Query blocks [0, hi) that see prefix key block [j0, j0 + bk)."""
    return jnp.where(prefix_block_has_key(j0, bk, plen, p.mask), lax.div(nq + (bq - 1), jnp.int32(bq)), 0)


def _dkv_kernel(plen_ref, nq_ref, kp_ref, vp_ref, q_ref, do_ref, *refs, p: CachedParams):
    sm = p.score.softmax
    if sm:
        lse_ref, delta_ref, *refs = refs
    br, refs = tc.take_bias_refs(refs, p.score)
    dkp_ref, dvp_ref, dk_acc, dv_acc = refs
    bq, bk = p.blocks.block_q_bwd, p.blocks.block_k_bwd
    b, h, kb, qb = pl.program_id(0), pl.program_id(1), pl.program_id(2), pl.program_id(3)
    plen, nq = plen_ref[b], nq_ref[b]
    j0 = kb * bk
    hi = _query_blocks(p, j0, bk, bq, plen, nq)

    @pl.when(qb == 0)
    def _init():
        dk_acc[...] = jnp.zeros_like(dk_acc)
        dv_acc[...] = jnp.zeros_like(dv_acc)

    @pl.when(qb < hi)
    def _step():
        q, do, k, v = q_ref[...], do_ref[...], kp_ref[...], vp_ref[...]
        lse = lse_ref[...] if sm else None
        delta = delta_ref[...] if sm else None
        rows = qb * bq + lax.broadcasted_iota(jnp.int32, (bq, bk), 0)
        cols = j0 + lax.broadcasted_iota(jnp.int32, (bq, bk), 1)
        z = tc.cached_tile_scores(p, q, k, br, h, cols, plen)
        w, ds = scores.weights_and_ds(p.score, z, common.matmul(do, v, trans_b=True), lse, delta)
        valid = (rows < nq) & prefix_key_valid(cols, plen, p.mask)
        w, ds = jnp.where(valid, w, 0.0), jnp.where(valid, ds, 0.0)
        dv_acc[...] += common.matmul(w.astype(do.dtype).T, do)
        dk_acc[...] += common.matmul(ds.astype(q.dtype).T, q)

    @pl.when(qb == pl.num_programs(3) - 1)
    def _finish():
        dkp_ref[...] = (dk_acc[...] * (p.alpha * p.scale)).astype(dkp_ref.dtype)
        dvp_ref[...] = (dv_acc[...] * p.scale).astype(dvp_ref.dtype)


def backward(p: CachedParams, q, k, v, kp, vp, plen, nq, alibi, ts, pts, tslopes, out, lse, d_out):
    """(dq, dk, dv, dk_prefix, dv_prefix, d_alibi, d_time) on the padded [B, H, rows, D] shapes."""
    batch, heads, rows, dqk = q.shape
    n, dv = kp.shape[2], v.shape[-1]
    d_out = d_out.astype(q.dtype)
    sm = p.score.softmax
    stats = []
    if sm:
        stats = [lse, jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), axis=-1, keepdims=True)]
    compiler = pltpu.CompilerParams(dimension_semantics=tc.SEMANTICS)
    interpret = tc.interpret_params(p.interpret)

    bq, bk = p.blocks.block_q, p.blocks.block_k
    kv = tc.prefix_index(p, bq, bk)
    row = tc.resident
    bias_in = tc.bias_args(p.score, alibi, tslopes, ts, pts)
    g_specs, g_shapes = tc.slope_grad_outputs(p.score, batch, heads, rows, bq, row)
    dq, dk, dv_self, *partials = pl.pallas_call(
        functools.partial(_dq_kernel, p=p),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=2,
            grid=(batch, heads, rows // bq, n // bk),
            in_specs=[tc.tile_spec(bq, dqk, row), tc.tile_spec(bq, dqk, row), tc.tile_spec(bq, dv, row),
                      tc.tile_spec(bq, dv, row), tc.tile_spec(bk, dqk, kv), tc.tile_spec(bk, dv, kv)]
            + [tc.tile_spec(bq, 1, row)] * len(stats) + tc.bias_specs(p.score, bq, row, bk, kv),
            out_specs=[tc.tile_spec(bq, dqk, row), tc.tile_spec(bq, dqk, row), tc.tile_spec(bq, dv, row)] + g_specs,
            scratch_shapes=[pltpu.VMEM((bq, dqk), jnp.float32)] + [pltpu.VMEM((bq, 1), jnp.float32)] * len(g_specs),
        ),
        out_shape=[jax.ShapeDtypeStruct(x.shape, x.dtype) for x in (q, k, v)] + g_shapes,
        compiler_params=compiler,
        interpret=interpret,
        name="hstu_attention_cached_dq",
    )(plen, nq, q, k, v, d_out, kp, vp, *stats, *bias_in)
    d_alibi, d_time = tc.reduce_slope_grads(p.score, partials)

    bq, bk = p.blocks.block_q_bwd, p.blocks.block_k_bwd

    def q_index(b, h, j, i, plen_ref, nq_ref):
        hi = _query_blocks(p, j * bk, bk, bq, plen_ref[b], nq_ref[b])
        return b, h, tc.clamp(i, 0, hi), 0

    dkp, dvp = pl.pallas_call(
        functools.partial(_dkv_kernel, p=p),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=2,
            grid=(batch, heads, n // bk, rows // bq),
            in_specs=[tc.tile_spec(bk, dqk, row), tc.tile_spec(bk, dv, row), tc.tile_spec(bq, dqk, q_index),
                      tc.tile_spec(bq, dv, q_index)] + [tc.tile_spec(bq, 1, q_index)] * len(stats)
            + tc.bias_specs(p.score, bq, q_index, bk, row),
            out_specs=[tc.tile_spec(bk, dqk, row), tc.tile_spec(bk, dv, row)],
            scratch_shapes=[pltpu.VMEM((bk, dqk), jnp.float32), pltpu.VMEM((bk, dv), jnp.float32)],
        ),
        out_shape=[jax.ShapeDtypeStruct(kp.shape, kp.dtype), jax.ShapeDtypeStruct(vp.shape, vp.dtype)],
        compiler_params=compiler,
        interpret=interpret,
        name="hstu_attention_cached_dkv",
    )(plen, nq, kp, vp, q, d_out, *stats, *bias_in)
    return dq, dk, dv_self, dkp, dvp, d_alibi, d_time

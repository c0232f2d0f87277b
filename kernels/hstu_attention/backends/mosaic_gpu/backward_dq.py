"""Backward dq kernel of the Mosaic GPU backend (both modes; forward: `forward.py`, dk/dv: `backward_dkdv.py`).

Rows stay resident (64 per compute warpgroup); K / V (and key timestamps) stream. Each step recomputes
z = alpha q.k (+ bias) and forms dS = dL/dz: silu'(z) (dO . v) for silu, P (dO . v - delta) with P = exp(z - lse)
for softmax; alpha and 1/normalizer scale the accumulator once. With a bias on, it also writes per-row sums of
-dS * distance and -dS * bucket(dt), which the caller reduces to the slope gradients (every pair is in one row).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from kernels.hstu_attention.backends.mosaic_gpu._common import (
    COL,
    COMPUTE_WGS,
    FULL,
    FULL_MODE,
    MAX_CONCURRENT_STEPS,
    ROW,
    WG_TILE,
    bias_tile,
    broadcast,
    pop_ref,
    vec_smem,
    cached_row_schedule,
    carries_bias,
    fori_steps,
    interpret_params,
    interpreting,
    iota,
    load_vector,
    mma_from_registers,
    pair_distance,
    pair_mask,
    producer,
    row_schedule,
    run_steps,
    smem,
    time_bucket,
)
from kernels.hstu_attention.common import KernelParams, silu_and_grad


def dq(q, k, v, d_out, lengths, hist, alibi, ts, tslopes, lse, delta, params: KernelParams, mode=FULL_MODE,
       prefix=None):
    """(dQ, row sums for d alibi or None, row sums for d time or None); rows stay resident, K and V stream.

    Cached mode: as `full_fwd.forward` ((lengths, hist) = (prefix_len, num_queries), prefix = (kp, vp, pts)).
    """
    batch, seq_len, heads, dqk = q.shape
    dv = v.shape[-1]
    dtype = q.dtype
    bq, bk, slots = WG_TILE, params.blocks.block_k, MAX_CONCURRENT_STEPS
    tile_rows = COMPUTE_WGS * bq
    num_tiles = seq_len // tile_rows
    spec, score = params.spec, params.score
    sm, time_on, alibi_on = score.softmax, score.time, score.alibi

    def body(*refs):
        refs = list(refs)
        len_ref, hist_ref, q_ref, do_ref, k_ref, v_ref = (pop_ref(refs) for _ in range(6))
        alibi_ref, tslope_ref, ts_ref, lse_ref, delta_ref = (pop_ref(refs, on) for on in (alibi_on, time_on, time_on, sm, sm))
        kp_ref, vp_ref, pts_ref = pop_ref(refs, mode.cached), pop_ref(refs, mode.cached), pop_ref(refs, mode.cached and time_on)
        dq_ref, ga_ref, gt_ref = pop_ref(refs), pop_ref(refs, alibi_on), pop_ref(refs, time_on)
        q_smem2, do_smem2, staging2, k_ring, v_ring = (pop_ref(refs) for _ in range(5))
        k_ready, v_ready, q_ready, do_ready, k_free, v_free = (pop_ref(refs) for _ in range(6))
        tsr_smem2, ts_ring, tsr_ready, ts_ready, ts_free = (pop_ref(refs, time_on) for _ in range(5))
        lse_smem2, delta_smem2, lse_ready, delta_ready = (pop_ref(refs, sm) for _ in range(4))
        ga_smem2, gt_smem2 = pop_ref(refs, alibi_on), pop_ref(refs, time_on)
        assert not refs
        b, h, wg = lax.axis_index("batch"), lax.axis_index("heads"), lax.axis_index("wg")
        r0 = (num_tiles - 1 - lax.axis_index("q_seq")) * tile_rows
        length, hist_len = len_ref[b], hist_ref[b]
        if mode.cached:
            sched = cached_row_schedule(r0, tile_rows, bk, length, hist_len, spec, mode.self_term)
        else:
            sched = row_schedule(r0, tile_rows, bk, length, hist_len, spec)
        live = hist_len if mode.cached else length

        @pl.when(wg < COMPUTE_WGS)
        def _compute():
            plgpu.set_max_registers(232, action="increase")
            q_smem, do_smem = q_smem2.at[wg], do_smem2.at[wg]
            staging = None if staging2 is None else staging2.at[wg]
            row0 = r0 + wg * bq
            plgpu.copy_gmem_to_smem(q_ref.at[b, pl.ds(row0, bq), h], q_smem, q_ready.at[wg])
            plgpu.copy_gmem_to_smem(do_ref.at[b, pl.ds(row0, bq), h], do_smem, do_ready.at[wg])
            if time_on:
                plgpu.copy_gmem_to_smem(ts_ref.at[b, pl.ds(row0, bq)], tsr_smem2.at[wg], tsr_ready.at[wg])
            if sm:
                plgpu.copy_gmem_to_smem(lse_ref.at[b, h, pl.ds(row0, bq)], lse_smem2.at[wg], lse_ready.at[wg])
                plgpu.copy_gmem_to_smem(delta_ref.at[b, h, pl.ds(row0, bq)], delta_smem2.at[wg], delta_ready.at[wg])
            plgpu.barrier_wait(q_ready.at[wg])
            plgpu.barrier_wait(do_ready.at[wg])
            rows = iota((bq, bk), 0) + row0
            cols0 = iota((bq, bk), 1)
            row_ts = lse_b = delta_b = None
            if time_on:
                plgpu.barrier_wait(tsr_ready.at[wg])
                row_ts = broadcast(load_vector(tsr_smem2.at[wg], ROW), (bq, bk), ROW)
            if sm:
                plgpu.barrier_wait(lse_ready.at[wg])
                plgpu.barrier_wait(delta_ready.at[wg])
                lse_b = broadcast(load_vector(lse_smem2.at[wg], ROW), (bq, bk), ROW)
                delta_b = broadcast(load_vector(delta_smem2.at[wg], ROW), (bq, bk), ROW)
            slopes = (None if alibi_ref is None else alibi_ref[h], None if tslope_ref is None else tslope_ref[h])

            def products(slot):
                def run(scores_ref, dp_ref):
                    plgpu.wgmma(scores_ref, q_smem, k_ring.at[slot].transpose((1, 0)))
                    plgpu.wgmma(dp_ref, do_smem, v_ring.at[slot].transpose((1, 0)))
                    return scores_ref[...], dp_ref[...]

                acc_type = plgpu.ACC((bq, bk), jnp.float32)
                return pl.run_scoped(run, acc_type, acc_type)

            def step(s, acc_ref, kind):
                # The bias-free silu step, kept op for op so its results stay bit-identical.
                slot = lax.rem(s, jnp.int32(slots))
                plgpu.barrier_wait(k_ready.at[slot])
                plgpu.barrier_wait(v_ready.at[slot])
                scores, dp = products(slot)
                plgpu.barrier_arrive(v_free.at[slot])
                _, grad = silu_and_grad(scores * params.alpha)
                ds = dp * grad
                if kind != FULL:
                    cols = cols0 + sched.block(s) * bk
                    ds = jnp.where(pair_mask(mode, kind, rows, cols, length, hist_len, spec), ds, 0.0)
                mma_from_registers(acc_ref, ds.astype(dtype), k_ring.at[slot], staging)
                plgpu.wgmma_wait(0)
                plgpu.barrier_arrive(k_free.at[slot])

            def general_step(s, carry, kind, acc_ref):
                ga, gt = carry
                slot = lax.rem(s, jnp.int32(slots))
                plgpu.barrier_wait(k_ready.at[slot])
                plgpu.barrier_wait(v_ready.at[slot])
                raw, dp = products(slot)
                plgpu.barrier_arrive(v_free.at[slot])
                z = raw * params.alpha
                cols = cols0 + sched.block(s) * bk
                biased = score.has_bias and carries_bias(mode, kind)
                dist = pair_distance(mode, rows, cols, length, hist_len) if alibi_on and biased else None
                dt = None
                if time_on:
                    plgpu.barrier_wait(ts_ready.at[slot])
                    col_ts = load_vector(ts_ring.at[slot], COL)
                    plgpu.barrier_arrive(ts_free.at[slot])
                    dt = (row_ts - broadcast(col_ts, (bq, bk), COL)).astype(jnp.float32)
                if biased:
                    z = z + bias_tile(score, dist, dt, *slopes)
                if sm:
                    ds = jnp.exp(z - lse_b) * (dp - delta_b)
                else:
                    _, grad = silu_and_grad(z)
                    ds = dp * grad
                if kind != FULL:
                    ds = jnp.where(pair_mask(mode, kind, rows, cols, length, hist_len, spec), ds, 0.0)
                mma_from_registers(acc_ref, ds.astype(dtype), k_ring.at[slot], staging)
                if alibi_on and biased:
                    ga = ga - (ds * dist).sum(axis=1)
                if time_on and biased:
                    gt = gt - (ds * time_bucket(dt)).sum(axis=1)
                plgpu.wgmma_wait(0)
                plgpu.barrier_arrive(k_free.at[slot])
                return ga, gt

            general = sm or score.has_bias

            def accumulate(acc_ref):
                if not general:
                    run_steps(step, acc_ref, sched.ranges)
                    return acc_ref[...], None, None
                zero = plgpu.layout_cast(jnp.zeros((bq,), jnp.float32), plgpu.Layout.WGMMA.reduce(1))
                ga, gt = fori_steps(lambda s, c, kind: general_step(s, c, kind, acc_ref), (zero, zero), sched.ranges)
                return acc_ref[...], ga, gt

            acc, ga, gt = pl.run_scoped(accumulate, plgpu.ACC((bq, dqk), jnp.float32))
            out_rows = iota((bq, dqk), 0) + row0
            acc = jnp.where(out_rows < live, acc * (params.alpha * params.acc_scale), 0.0)
            q_smem[...] = acc.astype(dtype)
            for g, g_smem2 in ((ga, ga_smem2), (gt, gt_smem2)):
                if g_smem2 is not None:
                    g_smem2.at[wg][...] = g
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(q_smem, dq_ref.at[b, pl.ds(row0, bq), h])
            for g_smem2, g_ref in ((ga_smem2, ga_ref), (gt_smem2, gt_ref)):
                if g_smem2 is not None:
                    plgpu.copy_smem_to_gmem(g_smem2.at[wg], g_ref.at[b, h, pl.ds(row0, bq)])
            plgpu.wait_smem_to_gmem(0)

        @pl.when(wg == COMPUTE_WGS)
        def _memory():
            kv = lambda ref: lambda start: ref.at[b, pl.ds(start, bk), h]
            tsv = lambda ref: lambda start: ref.at[b, pl.ds(start, bk)]
            # Cached mode: prefix blocks for the main steps, the rows' own blocks for the self-term steps.
            pick = lambda view, own, pre: (view(pre), view(own)) if mode.cached else view(own)
            streams = [(pick(kv, k_ref, kp_ref), k_ring), (pick(kv, v_ref, vp_ref), v_ring)]
            ready, free = [k_ready, v_ready], [k_free, v_free]
            if time_on:
                streams.append((pick(tsv, ts_ref, pts_ref), ts_ring))
                ready.append(ts_ready)
                free.append(ts_free)
            producer(sched, bk, streams, tuple(ready), tuple(free), slots)

    scratch = [
        smem((COMPUTE_WGS, bq, dqk), dtype),
        smem((COMPUTE_WGS, bq, dv), dtype),
        smem((COMPUTE_WGS, bq, bk), dtype) if interpreting(params) else None,
        smem((slots, bk, dqk), dtype),
        smem((slots, bk, dv), dtype),
        plgpu.Barrier(num_barriers=slots),
        plgpu.Barrier(num_barriers=slots),
        plgpu.Barrier(num_barriers=COMPUTE_WGS),
        plgpu.Barrier(num_barriers=COMPUTE_WGS),
        plgpu.Barrier(num_arrivals=COMPUTE_WGS, num_barriers=slots),
        plgpu.Barrier(num_arrivals=COMPUTE_WGS, num_barriers=slots),
    ]
    if time_on:
        scratch += [vec_smem(bq, jnp.int32), plgpu.SMEM((slots, bk), jnp.int32), plgpu.Barrier(num_barriers=COMPUTE_WGS),
                    plgpu.Barrier(num_barriers=slots), plgpu.Barrier(num_arrivals=COMPUTE_WGS, num_barriers=slots)]
    if sm:
        scratch += [vec_smem(bq, jnp.float32), vec_smem(bq, jnp.float32), plgpu.Barrier(num_barriers=COMPUTE_WGS),
                    plgpu.Barrier(num_barriers=COMPUTE_WGS)]
    scratch += [vec_smem(bq, jnp.float32) for on in (alibi_on, time_on) if on]
    row_sums = jax.ShapeDtypeStruct((batch, heads, seq_len), jnp.float32)
    out_type = [jax.ShapeDtypeStruct(q.shape, dtype)] + [row_sums for on in (alibi_on, time_on) if on]
    extra_in = [x for x, on in ((alibi, alibi_on), (tslopes, time_on), (ts, time_on), (lse, sm), (delta, sm)) if on]
    if mode.cached:
        kp, vp, pts = prefix
        extra_in += [kp, vp] + ([pts] if time_on else [])
    outs = plgpu.kernel(
        body,
        out_type=out_type if len(out_type) > 1 else out_type[0],
        scratch_types=scratch,
        grid=(heads, num_tiles, batch),
        grid_names=("heads", "q_seq", "batch"),
        num_threads=COMPUTE_WGS + 1,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(approx_math=True),
        interpret=interpret_params(params),
    )(lengths, hist, q, d_out, k, v, *extra_in)
    if len(out_type) == 1:
        return outs, None, None
    outs = list(outs)
    return outs[0], (outs.pop(1) if alibi_on else None), (outs[1] if time_on else None)

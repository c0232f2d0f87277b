"""Backward dk/dv kernel of the Mosaic GPU backend (both modes; forward: `forward.py`, dq: `backward_dq.py`).

Keys stay resident (64 per compute warpgroup); Q / dO (and, for softmax, the rows' LSE and delta; with the
time bias, the rows' timestamps) stream. Tiles are [keys, rows] (transposed): P^T dO and dS^T Q accumulate.
"""

from __future__ import annotations

import dataclasses

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
    cached_prefix_key_schedule,
    cached_self_key_schedule,
    interpret_params,
    interpreting,
    iota,
    key_schedule,
    load_vector,
    mma_from_registers,
    pair_distance,
    pair_mask,
    producer,
    run_steps,
    smem,
)
from kernels.hstu_attention.common import KernelParams, silu_and_grad


def dkdv(q, k, v, d_out, lengths, hist, alibi, ts, tslopes, lse, delta, params: KernelParams, mode=FULL_MODE,
         key_ts=None, self_keys=False):
    """dK, dV with keys resident (64 per warpgroup) and Q, dO streamed; tiles are [keys, rows] (transposed).

    Cached mode: k, v are the prefix (`self_keys=False`; `key_ts` its timestamps, rows' `ts` streamed) or the
    rows' own keys (`self_keys=True`: diagonal steps only, no bias); (lengths, hist) = (prefix_len, num_queries).
    """
    batch, _, heads, dqk = q.shape
    dv = v.shape[-1]
    dtype = q.dtype
    bkw, bq, slots = WG_TILE, params.blocks.block_q_bwd, MAX_CONCURRENT_STEPS
    tile_keys = COMPUTE_WGS * bkw
    num_tiles = k.shape[1] // tile_keys
    spec, score = params.spec, params.score
    if self_keys:
        score = dataclasses.replace(score, alibi=False, time=False)  # self pairs carry no bias
    sm, time_on, alibi_on = score.softmax, score.time, score.alibi
    general = sm or score.has_bias
    key_ts = ts if key_ts is None else key_ts

    def body(*refs):
        refs = list(refs)
        len_ref, hist_ref, k_ref, v_ref, q_ref, do_ref = (pop_ref(refs) for _ in range(6))
        alibi_ref, tslope_ref, ts_ref, lse_ref, delta_ref = (pop_ref(refs, on) for on in (alibi_on, time_on, time_on, sm, sm))
        key_ts_ref = pop_ref(refs, time_on)
        dk_ref, dv_ref = pop_ref(refs), pop_ref(refs)
        k_smem2, v_smem2, staging2, q_ring, do_ring = (pop_ref(refs) for _ in range(5))
        k_ready, v_ready, q_ready, do_ready, q_free, do_free = (pop_ref(refs) for _ in range(6))
        tsk_smem2, tsk_ready, ts_ring, ts_ready, ts_free = (pop_ref(refs, time_on) for _ in range(5))
        lse_ring, lse_ready, lse_free, delta_ring, delta_ready, delta_free = (pop_ref(refs, sm) for _ in range(6))
        assert not refs
        b, h, wg = lax.axis_index("batch"), lax.axis_index("heads"), lax.axis_index("wg")
        j0 = lax.axis_index("kv_seq") * tile_keys
        length, hist_len = len_ref[b], hist_ref[b]
        if not mode.cached:
            sched = key_schedule(j0, tile_keys, bq, length, hist_len, spec)
        elif self_keys:
            sched = cached_self_key_schedule(j0, tile_keys, bq, hist_len)
        else:
            sched = cached_prefix_key_schedule(j0, tile_keys, bq, length, hist_len, spec)
        key_live = hist_len if self_keys else length

        @pl.when(wg < COMPUTE_WGS)
        def _compute():
            plgpu.set_max_registers(232, action="increase")
            k_smem, v_smem = k_smem2.at[wg], v_smem2.at[wg]
            staging = None if staging2 is None else staging2.at[wg]
            key0 = j0 + wg * bkw
            plgpu.copy_gmem_to_smem(k_ref.at[b, pl.ds(key0, bkw), h], k_smem, k_ready.at[wg])
            plgpu.copy_gmem_to_smem(v_ref.at[b, pl.ds(key0, bkw), h], v_smem, v_ready.at[wg])
            if time_on:
                plgpu.copy_gmem_to_smem(key_ts_ref.at[b, pl.ds(key0, bkw)], tsk_smem2.at[wg], tsk_ready.at[wg])
            plgpu.barrier_wait(k_ready.at[wg])
            plgpu.barrier_wait(v_ready.at[wg])
            keys = iota((bkw, bq), 0) + key0
            rows0 = iota((bkw, bq), 1)
            key_ts = None
            if time_on:
                plgpu.barrier_wait(tsk_ready.at[wg])
                key_ts = broadcast(load_vector(tsk_smem2.at[wg], ROW), (bkw, bq), ROW)
            slopes = (None if alibi_ref is None else alibi_ref[h], None if tslope_ref is None else tslope_ref[h])

            def row_vector(ring, ready, free, slot):
                plgpu.barrier_wait(ready.at[slot])
                vec = load_vector(ring.at[slot], COL)
                plgpu.barrier_arrive(free.at[slot])
                return broadcast(vec, (bkw, bq), COL)

            def step(s, acc_refs, kind):
                dk_acc, dv_acc = acc_refs
                slot = lax.rem(s, jnp.int32(slots))
                plgpu.barrier_wait(q_ready.at[slot])
                plgpu.barrier_wait(do_ready.at[slot])

                def products(scores_ref, dp_ref):
                    plgpu.wgmma(scores_ref, k_smem, q_ring.at[slot].transpose((1, 0)))
                    plgpu.wgmma(dp_ref, v_smem, do_ring.at[slot].transpose((1, 0)))
                    return scores_ref[...], dp_ref[...]

                acc_type = plgpu.ACC((bkw, bq), jnp.float32)
                scores_t, dp_t = pl.run_scoped(products, acc_type, acc_type)
                if not general:
                    # The bias-free silu step, kept op for op so its results stay bit-identical.
                    p_t, grad = silu_and_grad(scores_t * params.alpha)
                    ds_t = dp_t * grad
                else:
                    z_t = scores_t * params.alpha
                    rows = rows0 + sched.block(s) * bq
                    if score.has_bias:
                        dist = pair_distance(mode, rows, keys, length, hist_len) if alibi_on else None
                        dt = None
                        if time_on:
                            dt = (row_vector(ts_ring, ts_ready, ts_free, slot) - key_ts).astype(jnp.float32)
                        z_t = z_t + bias_tile(score, dist, dt, *slopes)
                    if sm:
                        p_t = jnp.exp(z_t - row_vector(lse_ring, lse_ready, lse_free, slot))
                        ds_t = p_t * (dp_t - row_vector(delta_ring, delta_ready, delta_free, slot))
                    else:
                        p_t, grad = silu_and_grad(z_t)
                        ds_t = dp_t * grad
                if kind != FULL:
                    rows = rows0 + sched.block(s) * bq
                    valid = pair_mask(mode, kind, rows, keys, length, hist_len, spec)
                    p_t = jnp.where(valid, p_t, 0.0)
                    ds_t = jnp.where(valid, ds_t, 0.0)
                mma_from_registers(dv_acc, p_t.astype(dtype), do_ring.at[slot], staging)
                mma_from_registers(dk_acc, ds_t.astype(dtype), q_ring.at[slot], staging)
                plgpu.wgmma_wait(0)
                plgpu.barrier_arrive(q_free.at[slot])
                plgpu.barrier_arrive(do_free.at[slot])

            def accumulate(dk_acc, dv_acc):
                run_steps(step, (dk_acc, dv_acc), sched.ranges)
                return dk_acc[...], dv_acc[...]

            dk, dv_val = pl.run_scoped(
                accumulate, plgpu.ACC((bkw, dqk), jnp.float32), plgpu.ACC((bkw, dv), jnp.float32)
            )
            valid_k = (iota((bkw, dqk), 0) + key0) < key_live
            valid_v = (iota((bkw, dv), 0) + key0) < key_live
            k_smem[...] = jnp.where(valid_k, dk * (params.alpha * params.acc_scale), 0.0).astype(dtype)
            v_smem[...] = jnp.where(valid_v, dv_val * params.acc_scale, 0.0).astype(dtype)
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(k_smem, dk_ref.at[b, pl.ds(key0, bkw), h])
            plgpu.copy_smem_to_gmem(v_smem, dv_ref.at[b, pl.ds(key0, bkw), h])
            plgpu.wait_smem_to_gmem(0)

        @pl.when(wg == COMPUTE_WGS)
        def _memory():
            streams = [(lambda s: q_ref.at[b, pl.ds(s, bq), h], q_ring), (lambda s: do_ref.at[b, pl.ds(s, bq), h], do_ring)]
            ready, free = [q_ready, do_ready], [q_free, do_free]
            if time_on:
                streams.append((lambda s: ts_ref.at[b, pl.ds(s, bq)], ts_ring))
                ready.append(ts_ready)
                free.append(ts_free)
            if sm:
                streams += [(lambda s: lse_ref.at[b, h, pl.ds(s, bq)], lse_ring),
                            (lambda s: delta_ref.at[b, h, pl.ds(s, bq)], delta_ring)]
                ready += [lse_ready, delta_ready]
                free += [lse_free, delta_free]
            producer(sched, bq, streams, tuple(ready), tuple(free), slots)

    ring_barriers = lambda: [plgpu.Barrier(num_barriers=slots), plgpu.Barrier(num_arrivals=COMPUTE_WGS, num_barriers=slots)]
    scratch = [
        smem((COMPUTE_WGS, bkw, dqk), dtype),
        smem((COMPUTE_WGS, bkw, dv), dtype),
        smem((COMPUTE_WGS, bkw, bq), dtype) if interpreting(params) else None,
        smem((slots, bq, dqk), dtype),
        smem((slots, bq, dv), dtype),
        plgpu.Barrier(num_barriers=COMPUTE_WGS),
        plgpu.Barrier(num_barriers=COMPUTE_WGS),
        plgpu.Barrier(num_barriers=slots),
        plgpu.Barrier(num_barriers=slots),
        plgpu.Barrier(num_arrivals=COMPUTE_WGS, num_barriers=slots),
        plgpu.Barrier(num_arrivals=COMPUTE_WGS, num_barriers=slots),
    ]
    if time_on:
        scratch += [vec_smem(bkw, jnp.int32), plgpu.Barrier(num_barriers=COMPUTE_WGS),
                    plgpu.SMEM((slots, bq), jnp.int32), *ring_barriers()]
    if sm:
        for _ in range(2):
            scratch += [plgpu.SMEM((slots, bq), jnp.float32), *ring_barriers()]
    extra_in = [x for x, on in ((alibi, alibi_on), (tslopes, time_on), (ts, time_on), (lse, sm), (delta, sm)) if on]
    extra_in += [key_ts] if time_on else []
    return plgpu.kernel(
        body,
        out_type=[jax.ShapeDtypeStruct(k.shape, dtype), jax.ShapeDtypeStruct(v.shape, dtype)],
        scratch_types=scratch,
        grid=(heads, num_tiles, batch),
        grid_names=("heads", "kv_seq", "batch"),
        num_threads=COMPUTE_WGS + 1,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(approx_math=True),
        interpret=interpret_params(params),
    )(lengths, hist, k, v, q, d_out, *extra_in)

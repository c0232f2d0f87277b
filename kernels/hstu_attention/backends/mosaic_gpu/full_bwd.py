"""Mosaic GPU backward kernels of HSTU attention: dq (rows resident, K/V streamed) and dk/dv (keys resident,
Q/dO streamed). No softmax means no LSE or delta residuals: each step recomputes s = q.k and forms
dS = (dO . v) * silu'(alpha s) directly; alpha and 1/normalizer scale the accumulators once at the end.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from kernels.hstu_attention.common import KernelParams, silu_and_grad
from kernels.hstu_attention.backend_pallas_mosaic_gpu_pipeline import (
    COMPUTE_WGS,
    FULL,
    MAX_CONCURRENT_STEPS,
    WG_TILE,
    interpret_params,
    interpreting,
    iota,
    key_schedule,
    mma_from_registers,
    producer,
    row_schedule,
    run_steps,
    smem,
    step_mask,
)


def dq(q, k, v, d_out, lengths, hist, params: KernelParams) -> jax.Array:
    """dQ = alpha / normalizer * sum_j mask * silu'(s) (dO . v_j) k_j; rows stay resident, K and V stream."""
    batch, seq_len, heads, dqk = q.shape
    dv = v.shape[-1]
    dtype = q.dtype
    bq, bk, slots = WG_TILE, params.blocks.block_k, MAX_CONCURRENT_STEPS
    tile_rows = COMPUTE_WGS * bq
    num_tiles = seq_len // tile_rows
    spec = params.spec

    def body(len_ref, hist_ref, q_ref, do_ref, k_ref, v_ref, dq_ref, q_smem2, do_smem2, staging2, k_ring, v_ring,
             k_ready, v_ready, q_ready, do_ready, k_free, v_free):
        b, h, wg = lax.axis_index("batch"), lax.axis_index("heads"), lax.axis_index("wg")
        r0 = (num_tiles - 1 - lax.axis_index("q_seq")) * tile_rows
        length, hist_len = len_ref[b], hist_ref[b]
        sched = row_schedule(r0, tile_rows, bk, length, hist_len, spec)

        @pl.when(wg < COMPUTE_WGS)
        def _compute():
            plgpu.set_max_registers(232, action="increase")
            q_smem, do_smem = q_smem2.at[wg], do_smem2.at[wg]
            staging = None if staging2 is None else staging2.at[wg]
            row0 = r0 + wg * bq
            plgpu.copy_gmem_to_smem(q_ref.at[b, pl.ds(row0, bq), h], q_smem, q_ready.at[wg])
            plgpu.copy_gmem_to_smem(do_ref.at[b, pl.ds(row0, bq), h], do_smem, do_ready.at[wg])
            plgpu.barrier_wait(q_ready.at[wg])
            plgpu.barrier_wait(do_ready.at[wg])
            rows = iota((bq, bk), 0) + row0
            cols0 = iota((bq, bk), 1)

            def step(s, acc_ref, kind):
                slot = lax.rem(s, jnp.int32(slots))
                plgpu.barrier_wait(k_ready.at[slot])
                plgpu.barrier_wait(v_ready.at[slot])

                def products(scores_ref, dp_ref):
                    plgpu.wgmma(scores_ref, q_smem, k_ring.at[slot].transpose((1, 0)))
                    plgpu.wgmma(dp_ref, do_smem, v_ring.at[slot].transpose((1, 0)))
                    return scores_ref[...], dp_ref[...]

                acc_type = plgpu.ACC((bq, bk), jnp.float32)
                scores, dp = pl.run_scoped(products, acc_type, acc_type)
                plgpu.barrier_arrive(v_free.at[slot])
                _, grad = silu_and_grad(scores * params.alpha)
                ds = dp * grad
                if kind != FULL:
                    cols = cols0 + sched.block(s) * bk
                    ds = jnp.where(step_mask(kind, rows, cols, length, hist_len, spec), ds, 0.0)
                mma_from_registers(acc_ref, ds.astype(dtype), k_ring.at[slot], staging)
                plgpu.wgmma_wait(0)
                plgpu.barrier_arrive(k_free.at[slot])

            def accumulate(acc_ref):
                run_steps(step, acc_ref, sched.ranges)
                return acc_ref[...]

            acc = pl.run_scoped(accumulate, plgpu.ACC((bq, dqk), jnp.float32))
            out_rows = iota((bq, dqk), 0) + row0
            acc = jnp.where(out_rows < length, acc * (params.alpha * params.inv_normalizer), 0.0)
            q_smem[...] = acc.astype(dtype)
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(q_smem, dq_ref.at[b, pl.ds(row0, bq), h])
            plgpu.wait_smem_to_gmem(0)

        @pl.when(wg == COMPUTE_WGS)
        def _memory():
            producer(
                sched, bk,
                [(lambda s: k_ref.at[b, pl.ds(s, bk), h], k_ring), (lambda s: v_ref.at[b, pl.ds(s, bk), h], v_ring)],
                (k_ready, v_ready), (k_free, v_free), slots,
            )

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
    return plgpu.kernel(
        body,
        out_type=jax.ShapeDtypeStruct(q.shape, dtype),
        scratch_types=scratch,
        grid=(heads, num_tiles, batch),
        grid_names=("heads", "q_seq", "batch"),
        num_threads=COMPUTE_WGS + 1,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(approx_math=True),
        interpret=interpret_params(params),
    )(lengths, hist, q, d_out, k, v)


def dkdv(q, k, v, d_out, lengths, hist, params: KernelParams) -> tuple[jax.Array, jax.Array]:
    """dK, dV with keys resident (64 per warpgroup) and Q, dO streamed; tiles are [keys, rows] (transposed)."""
    batch, seq_len, heads, dqk = q.shape
    dv = v.shape[-1]
    dtype = q.dtype
    bkw, bq, slots = WG_TILE, params.blocks.block_q_bwd, MAX_CONCURRENT_STEPS
    tile_keys = COMPUTE_WGS * bkw
    num_tiles = seq_len // tile_keys
    spec = params.spec

    def body(len_ref, hist_ref, k_ref, v_ref, q_ref, do_ref, dk_ref, dv_ref, k_smem2, v_smem2, staging2,
             q_ring, do_ring, k_ready, v_ready, q_ready, do_ready, q_free, do_free):
        b, h, wg = lax.axis_index("batch"), lax.axis_index("heads"), lax.axis_index("wg")
        j0 = lax.axis_index("kv_seq") * tile_keys
        length, hist_len = len_ref[b], hist_ref[b]
        sched = key_schedule(j0, tile_keys, bq, length, hist_len, spec)

        @pl.when(wg < COMPUTE_WGS)
        def _compute():
            plgpu.set_max_registers(232, action="increase")
            k_smem, v_smem = k_smem2.at[wg], v_smem2.at[wg]
            staging = None if staging2 is None else staging2.at[wg]
            key0 = j0 + wg * bkw
            plgpu.copy_gmem_to_smem(k_ref.at[b, pl.ds(key0, bkw), h], k_smem, k_ready.at[wg])
            plgpu.copy_gmem_to_smem(v_ref.at[b, pl.ds(key0, bkw), h], v_smem, v_ready.at[wg])
            plgpu.barrier_wait(k_ready.at[wg])
            plgpu.barrier_wait(v_ready.at[wg])
            keys = iota((bkw, bq), 0) + key0
            rows0 = iota((bkw, bq), 1)

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
                p_t, grad = silu_and_grad(scores_t * params.alpha)
                ds_t = dp_t * grad
                if kind != FULL:
                    rows = rows0 + sched.block(s) * bq
                    valid = step_mask(kind, rows, keys, length, hist_len, spec)
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
            valid_k = (iota((bkw, dqk), 0) + key0) < length
            valid_v = (iota((bkw, dv), 0) + key0) < length
            k_smem[...] = jnp.where(valid_k, dk * (params.alpha * params.inv_normalizer), 0.0).astype(dtype)
            v_smem[...] = jnp.where(valid_v, dv_val * params.inv_normalizer, 0.0).astype(dtype)
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(k_smem, dk_ref.at[b, pl.ds(key0, bkw), h])
            plgpu.copy_smem_to_gmem(v_smem, dv_ref.at[b, pl.ds(key0, bkw), h])
            plgpu.wait_smem_to_gmem(0)

        @pl.when(wg == COMPUTE_WGS)
        def _memory():
            producer(
                sched, bq,
                [(lambda s: q_ref.at[b, pl.ds(s, bq), h], q_ring), (lambda s: do_ref.at[b, pl.ds(s, bq), h], do_ring)],
                (q_ready, do_ready), (q_free, do_free), slots,
            )

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
    )(lengths, hist, k, v, q, d_out)

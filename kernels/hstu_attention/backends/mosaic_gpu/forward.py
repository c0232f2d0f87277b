"""Target-aware HSTU attention in Pallas Mosaic GPU for Hopper (sm_90): TMA, mbarriers, wgmma.

Each kernel is warp specialised like jax's FlashAttention-3 (`ops/gpu/attention_mgpu.py`): a CTA runs two
compute warpgroups, each owning a 64-row (or 64-key) tile resident in shared memory, and one memory
warpgroup that streams the other operand pair through a ring of `max_concurrent_steps` shared-memory slots
with TMA, signalling `*_ready` barriers and waiting on `*_free` barriers that both consumers arrive on.

Unlike the softmax kernel the stream is not the whole sequence: from lengths and num_targets each CTA
computes the block range it needs (`masks.key_blocks_for_rows` / `masks.row_blocks_for_keys`), split into
mask-free steps and masked edge steps, followed by at most a couple of "diagonal" steps that add candidate
self pairs the walk did not reach (mask i == j). Producer and consumers derive the same step -> block map, so
skipped blocks are neither loaded nor computed. No softmax means no running max/sum and no LSE residual.

Kernels: forward (stream K, V), dq (stream K, V), dk/dv (resident K, V; stream Q, dO).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from kernels.hstu_attention import common
from kernels.hstu_attention.common import KernelParams, silu
from kernels.hstu_attention.base import Backend
from kernels.hstu_attention.scores import ScoreSpec
from kernels.hstu_attention.config import BlockSizes
from kernels.hstu_attention.masks import MaskSpec
from kernels.hstu_attention.backend_pallas_mosaic_gpu_backward import dkdv, dq
from kernels.hstu_attention.backend_pallas_mosaic_gpu_pipeline import (
    COMPUTE_WGS,
    FULL,
    MAX_CONCURRENT_STEPS,
    SMEM_BUDGET,
    WG_TILE,
    interpret_params,
    interpreting,
    iota,
    mma_from_registers,
    producer,
    row_schedule,
    run_steps,
    smem,
    smem_bytes,
    step_mask,
)

# Its tiles are the warpgroup/wgmma shapes, not free parameters; L is padded to them instead (fit_tiles=False).
DEFAULT_BLOCKS = BlockSizes(block_q=64, block_k=128, block_q_bwd=64, block_k_bwd=64)
TUNING = (
    DEFAULT_BLOCKS,
    BlockSizes(block_q=64, block_k=64, block_q_bwd=64, block_k_bwd=64),
    BlockSizes(block_q=64, block_k=128, block_q_bwd=128, block_k_bwd=64),
    BlockSizes(block_q=64, block_k=64, block_q_bwd=128, block_k_bwd=64),
)



def _forward(q, k, v, lengths, hist, params: KernelParams) -> jax.Array:
    """out = sum_j mask * silu(alpha q.k_j) v_j / normalizer; 128 rows per CTA, K/V streamed in block_k tiles."""
    batch, seq_len, heads, dqk = q.shape
    dv = v.shape[-1]
    dtype = q.dtype
    bq, bk, slots = WG_TILE, params.blocks.block_k, MAX_CONCURRENT_STEPS
    tile_rows = COMPUTE_WGS * bq
    num_tiles = seq_len // tile_rows
    spec = params.spec
    share_qo = dqk == dv

    def body(len_ref, hist_ref, q_ref, k_ref, v_ref, out_ref, q_smem2, o_smem2, p_smem2, k_ring, v_ring,
             k_ready, v_ready, q_ready, k_free, v_free, turn):
        b, h, wg = lax.axis_index("batch"), lax.axis_index("heads"), lax.axis_index("wg")
        # Launch the heaviest (last) row tiles first.
        r0 = (num_tiles - 1 - lax.axis_index("q_seq")) * tile_rows
        length, hist_len = len_ref[b], hist_ref[b]
        sched = row_schedule(r0, tile_rows, bk, length, hist_len, spec)

        def take_turn():
            # Ping-pong: one warpgroup's wgmma overlaps the other's elementwise work.
            plgpu.barrier_arrive(turn)
            plgpu.barrier_wait(turn)

        @pl.when(wg < COMPUTE_WGS)
        def _compute():
            plgpu.set_max_registers(232, action="increase")
            q_smem = q_smem2.at[wg]
            row0 = r0 + wg * bq
            plgpu.copy_gmem_to_smem(q_ref.at[b, pl.ds(row0, bq), h], q_smem, q_ready.at[wg])
            plgpu.barrier_wait(q_ready.at[wg])
            rows = iota((bq, bk), 0) + row0
            cols0 = iota((bq, bk), 1)

            @pl.when(sched.n_steps > 0)
            def _():
                plgpu.barrier_wait(k_ready.at[0])

            pl.when(wg == 1)(take_turn)

            def step(s, acc_ref, kind):
                slot = lax.rem(s, jnp.int32(slots))

                def qk(scores_ref):
                    plgpu.wgmma(scores_ref, q_smem, k_ring.at[slot].transpose((1, 0)))
                    take_turn()
                    return scores_ref[...]

                scores = pl.run_scoped(qk, plgpu.ACC((bq, bk), jnp.float32))
                plgpu.barrier_arrive(k_free.at[slot])
                p = silu(scores * params.alpha)
                if kind != FULL:
                    cols = cols0 + sched.block(s) * bk
                    p = jnp.where(step_mask(kind, rows, cols, length, hist_len, spec), p, 0.0)
                p = p.astype(dtype)
                plgpu.barrier_arrive(turn)
                plgpu.barrier_wait(v_ready.at[slot])
                plgpu.barrier_wait(turn)
                mma_from_registers(acc_ref, p, v_ring.at[slot], None if p_smem2 is None else p_smem2.at[wg])
                nxt = s + 1

                @pl.when(nxt < sched.n_steps)
                def _():
                    plgpu.barrier_wait(k_ready.at[lax.rem(nxt, jnp.int32(slots))])

                # The slot may only be refilled once the asynchronous P @ V has read it.
                plgpu.wgmma_wait(0)
                plgpu.barrier_arrive(v_free.at[slot])

            def accumulate(acc_ref):
                run_steps(step, acc_ref, sched.ranges)
                return acc_ref[...]

            acc = pl.run_scoped(accumulate, plgpu.ACC((bq, dv), jnp.float32))
            pl.when(wg == 0)(take_turn)
            out_rows = iota((bq, dv), 0) + row0
            acc = jnp.where(out_rows < length, acc * params.inv_normalizer, 0.0)
            o_smem = q_smem if share_qo else o_smem2.at[wg]
            o_smem[...] = acc.astype(dtype)
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(o_smem, out_ref.at[b, pl.ds(row0, bq), h])
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
        None if share_qo else smem((COMPUTE_WGS, bq, dv), dtype),
        smem((COMPUTE_WGS, bq, bk), dtype) if interpreting(params) else None,
        smem((slots, bk, dqk), dtype),
        smem((slots, bk, dv), dtype),
        plgpu.Barrier(num_barriers=slots),
        plgpu.Barrier(num_barriers=slots),
        plgpu.Barrier(num_barriers=COMPUTE_WGS),
        plgpu.Barrier(num_arrivals=COMPUTE_WGS, num_barriers=slots),
        plgpu.Barrier(num_arrivals=COMPUTE_WGS, num_barriers=slots),
        plgpu.Barrier(num_arrivals=COMPUTE_WGS),
    ]
    return plgpu.kernel(
        body,
        out_type=jax.ShapeDtypeStruct((batch, seq_len, heads, dv), dtype),
        scratch_types=scratch,
        grid=(heads, num_tiles, batch),
        grid_names=("heads", "q_seq", "batch"),
        num_threads=COMPUTE_WGS + 1,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(approx_math=True),
        interpret=interpret_params(params),
    )(lengths, hist, q, k, v)


def _backward(q, k, v, lengths, hist, d_out, params: KernelParams):
    d_out = d_out.astype(q.dtype)
    d_q = dq(q, k, v, d_out, lengths, hist, params)
    d_k, d_v = dkdv(q, k, v, d_out, lengths, hist, params)
    return d_q, d_k, d_v


_attention = common.make_attention(_forward, _backward)


def _is_hopper(device) -> bool:
    return str(getattr(device, "compute_capability", "")).startswith("9.")


def _check_blocks(blocks: BlockSizes) -> None:
    if blocks.block_q != WG_TILE or blocks.block_k_bwd != WG_TILE:
        raise NotImplementedError(
            f"pallas_mosaic_gpu: block_q and block_k_bwd are the warpgroup tile ({WG_TILE}), got {blocks}"
        )
    if blocks.block_k % 64 or blocks.block_q_bwd % 64:
        raise NotImplementedError(f"pallas_mosaic_gpu: block_k and block_q_bwd must be multiples of 64, got {blocks}")


def fit_shared_memory(blocks: BlockSizes, dqk: int, dv: int, itemsize: int, *, shrink: bool) -> BlockSizes:
    """`blocks`, with the streamed tiles shrunk to 64 when `shrink` and the kernels would overflow shared memory.

    Raises NotImplementedError (so implementation=None falls back) when the tiles still do not fit.
    """
    if shrink and max(smem_bytes(dqk, dv, blocks, itemsize).values()) > SMEM_BUDGET:
        blocks = dataclasses.replace(blocks, block_k=64, block_q_bwd=64)
    needs = smem_bytes(dqk, dv, blocks, itemsize)
    over = {kernel: size for kernel, size in needs.items() if size > SMEM_BUDGET}
    if over:
        raise NotImplementedError(
            f"pallas_mosaic_gpu: head dims (Dqk={dqk}, Dv={dv}, padded to 64) with {blocks} need {over} bytes of "
            f"shared memory, over the {SMEM_BUDGET} a Hopper CTA has"
        )
    return blocks


def attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    lengths: jax.Array,
    num_targets: jax.Array,
    *,
    spec: ScoreSpec,
    normalizer: float | None,
    alpha: float,
    alibi_slopes: jax.Array | None,
    timestamps: jax.Array | None,
    time_slopes: jax.Array | None,
    contextual_len: int,
    max_attn_len: int | None,
    interpret: bool = False,
    block_sizes: BlockSizes | None = None,
) -> jax.Array:
    """Mosaic GPU backend of `kernels.hstu_attention.hstu_attention` (validated, clipped int32 lengths).

    `interpret=True` runs the Mosaic GPU interpreter (`plgpu.InterpretGPUParams()`), which simulates TMA,
    barriers and warpgroups on CPU; there the P/dS tiles go through shared memory (see `mma_from_registers`).
    """
    if spec != ScoreSpec():
        raise NotImplementedError(f"{BACKEND.name} runs silu without biases only")
    blocks = block_sizes if block_sizes is not None else BACKEND.default_block_sizes(q.shape[1])
    _check_blocks(blocks)
    dqk_p, dv_p = common.round_up(q.shape[-1], 64), common.round_up(v.shape[-1], 64)
    blocks = fit_shared_memory(blocks, dqk_p, dv_p, jnp.dtype(q.dtype).itemsize, shrink=block_sizes is None)
    params = KernelParams(normalizer, alpha, MaskSpec(contextual_len, max_attn_len), blocks, interpret)
    multiple = max(COMPUTE_WGS * WG_TILE, blocks.block_k, blocks.block_q_bwd)
    return common.run_padded(
        _attention, q, k, v, lengths, num_targets, params,
        seq_multiple=multiple, head_multiple=lambda d: common.round_up(d, 64),
    )


BACKEND = Backend(
    name="pallas_mosaic_gpu",
    module=__name__,
    platforms=("gpu",),
    dtypes=("bfloat16", "float16"),
    priority=20,
    fit_tiles=False,
    device_ok=_is_hopper,
    score_fns=("silu",),
    biases=frozenset(),
    modes=("full",),
    default_blocks=DEFAULT_BLOCKS,
    tuning=TUNING,
    attention=attention,
)

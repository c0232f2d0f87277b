"""Shared machinery of the Mosaic GPU kernels: tiles, step schedules, the TMA producer, interpret support.

A CTA's work is a list of steps, each streaming one block of the non-resident operands through a ring of
shared-memory slots. `Schedule` maps steps to blocks (mask-free, masked, then candidate-diagonal steps, from
`masks.py`); `producer` is the memory warpgroup's side of the ring; `run_steps` drives the consumers' side.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from kernels.hstu_attention.common import KernelParams
from kernels.hstu_attention.masks import (
    diagonal_blocks,
    diagonal_mask,
    key_blocks_for_rows,
    row_blocks_for_keys,
    tile_mask,
)

COMPUTE_WGS = 2
WG_TILE = 64  # rows (or keys) per compute warpgroup: the wgmma M dimension
MAX_CONCURRENT_STEPS = 2
FULL, MASKED, DIAGONAL = "full", "masked", "diagonal"
# Dynamic shared memory one CTA may opt into on sm_90 (227 KiB), less 1 KiB for barriers and Pallas's own use.
SMEM_BUDGET = 227 * 1024 - 1024


def smem_bytes(dqk: int, dv: int, blocks, itemsize: int) -> dict[str, int]:
    """Shared memory of each kernel's tiles for (padded) head dims and tiles, as its scratch list allocates it.

    forward: resident Q (and O when Dqk != Dv) per compute warpgroup + the K/V ring; dq: resident Q, dO + the
    K/V ring; dk/dv: resident K, V + the Q/dO ring. Tests check this against Mosaic GPU's own limit.
    """
    resident = COMPUTE_WGS * WG_TILE
    return {
        "forward": itemsize * (resident * (dqk + (dv if dqk != dv else 0))
                               + MAX_CONCURRENT_STEPS * blocks.block_k * (dqk + dv)),
        "dq": itemsize * (resident * (dqk + dv) + MAX_CONCURRENT_STEPS * blocks.block_k * (dqk + dv)),
        "dkdv": itemsize * (resident * (dqk + dv) + MAX_CONCURRENT_STEPS * blocks.block_q_bwd * (dqk + dv)),
    }


def transforms(dtype) -> tuple:
    """128-byte swizzled tiling: what TMA and wgmma want for a [rows, head dim] tile of `dtype`."""
    swizzle = 128
    return (plgpu.TilingTransform((8, swizzle // jnp.dtype(dtype).itemsize)), plgpu.SwizzleTransform(swizzle))


def smem(shape, dtype) -> plgpu.SMEM:
    """A swizzled shared-memory scratch buffer."""
    return plgpu.SMEM(shape, dtype, transforms=transforms(dtype))


def interpret_params(params: KernelParams):
    """The `interpret=` value for plgpu.kernel: None when compiling, interpreter parameters otherwise."""
    if params.interpret is not False and params.interpret is not None and jax.local_device_count() < 2:
        # Observed with jax 0.11.2: the interpreter runs each warpgroup as a separate XLA:CPU program that
        # blocks in barrier callbacks; with a single host device those programs serialise and deadlock.
        raise RuntimeError(
            "pallas_mosaic_gpu interpret mode needs >= 2 host devices; set "
            "XLA_FLAGS=--xla_force_host_platform_device_count=2 (or more) before jax is imported"
        )
    return plgpu.InterpretGPUParams(uninitialized_memory="nan") if params.interpret is True else (params.interpret or None)


def interpreting(params: KernelParams) -> bool:
    """Whether the kernels run under the interpreter (and so stage register operands through SMEM)."""
    return interpret_params(params) is not None


def iota(shape, dim):
    """Positions along `dim` of a tile, laid out like a wgmma accumulator so they combine with scores."""
    return plgpu.broadcasted_iota(jnp.int32, shape, dim, layout=plgpu.Layout.WGMMA)


@dataclasses.dataclass(frozen=True)
class Schedule:
    """One CTA's step list. Step s streams block `lo + s` for s < n_main, then `diag_lo + s - n_main`.

    `ranges` holds (kind, start, stop) step ranges in order: mask-free, masked, and trailing diagonal steps.
    """

    lo: jax.Array
    n_main: jax.Array
    n_steps: jax.Array
    diag_lo: jax.Array
    ranges: tuple

    def block(self, step):
        return jnp.where(step < self.n_main, self.lo + step, self.diag_lo + step - self.n_main)


def row_schedule(r0, rows, bk, length, hist, spec) -> Schedule:
    """Key blocks for rows [r0, r0 + rows): forward and dq."""
    lo, full_hi, hi = key_blocks_for_rows(r0, rows, bk, length, hist, spec)
    d_lo, d_hi = diagonal_blocks(r0, rows, bk, hi, length, hist)
    n_main, n_steps = hi - lo, hi - lo + d_hi - d_lo
    ranges = ((FULL, 0, full_hi - lo), (MASKED, full_hi - lo, n_main), (DIAGONAL, n_main, n_steps))
    return Schedule(lo, n_main, n_steps, d_lo, ranges)


def key_schedule(j0, keys, bq, length, hist, spec) -> Schedule:
    """Row blocks for keys [j0, j0 + keys): the dk/dv pass."""
    lo, full_lo, full_hi, hi = row_blocks_for_keys(j0, keys, bq, length, hist, spec)
    d_lo, d_hi = diagonal_blocks(j0, keys, bq, hi, length, hist)
    n_main, n_steps = hi - lo, hi - lo + d_hi - d_lo
    ranges = (
        (MASKED, 0, full_lo - lo),
        (FULL, full_lo - lo, full_hi - lo),
        (MASKED, full_hi - lo, n_main),
        (DIAGONAL, n_main, n_steps),
    )
    return Schedule(lo, n_main, n_steps, d_lo, ranges)


def producer(sched: Schedule, block: int, streams, ready, free, slots: int):
    """Memory warpgroup: TMA every scheduled block of each (gmem_view, smem_ring) stream into its ring slot.

    `gmem_view(start)` is the [block, D] source at row `start`. Slot s % slots is refilled only after both
    consumers arrived on its `free` barrier for step s - slots.
    """
    plgpu.set_max_registers(40, action="decrease")

    def issue(step, slot, wait):
        start = sched.block(step) * block
        for (view, ring), ready_bar, free_bar in zip(streams, ready, free):
            if wait:
                plgpu.barrier_wait(free_bar.at[slot])
            plgpu.copy_gmem_to_smem(view(start), ring.at[slot], ready_bar.at[slot])

    for s in range(slots):
        pl.when(s < sched.n_steps)(functools.partial(issue, s, s, False))

    @pl.loop(0, jnp.maximum(sched.n_steps - slots, 0))
    def _refill(step):
        issue(step + slots, lax.rem(step, jnp.int32(slots)), True)

    # Observe the consumers' release of the last blocks too, so every barrier phase is waited on before the
    # CTA exits (the interpreter checks this; on hardware the memory warpgroup is idle here anyway).
    @pl.loop(jnp.maximum(sched.n_steps - slots, 0), sched.n_steps)
    def _drain(step):
        for free_bar in free:
            plgpu.barrier_wait(free_bar.at[lax.rem(step, jnp.int32(slots))])


def mma_from_registers(acc_ref, lhs, rhs, staging) -> None:
    """acc += lhs @ rhs with `lhs` a register array.

    Compiled kernels feed wgmma straight from registers. The GPU interpreter only models shared-memory
    operands, so under interpretation (`staging` given) the tile is first written to shared memory.
    """
    if staging is None:
        plgpu.wgmma(acc_ref, lhs, rhs)
        return
    staging[...] = lhs
    plgpu.commit_smem()
    plgpu.wgmma(acc_ref, staging, rhs)
    plgpu.wgmma_wait(0)


def step_mask(kind, rows, cols, length, hist, spec):
    """The mask of a MASKED step (full target-aware mask) or a DIAGONAL step (candidate self pairs only)."""
    if kind == MASKED:
        return tile_mask(rows, cols, length, hist, spec)
    return diagonal_mask(rows, cols, length, hist)


def run_steps(step_fn, acc_refs, kinds_bounds) -> None:
    """Run `step_fn(step, acc_refs, kind)` over each (kind, start, stop) range of the schedule in order."""
    for kind, start, stop in kinds_bounds:

        @pl.loop(start, stop)
        def _(step, kind=kind):
            step_fn(step, acc_refs, kind)

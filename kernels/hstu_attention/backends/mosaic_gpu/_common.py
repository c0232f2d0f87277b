"""What the Mosaic GPU kernels share (private to `backends/mosaic_gpu/`): tiles, step schedules, the TMA
producer, the shared-memory budget, score/bias tiles in wgmma layouts, interpret support.

A CTA's work is a list of steps, each streaming one block of the non-resident operands through a ring of
shared-memory slots. `Schedule` maps steps to blocks (mask-free, masked, then candidate-diagonal steps, from
`masks.py`); `producer` is the memory warpgroup's side of the ring; `run_steps` / `fori_steps` drive the
consumers' side (the latter with a register carry: softmax statistics, slope-gradient row sums).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from kernels.hstu_attention import scores
from kernels.hstu_attention.common import KernelParams
from kernels.hstu_attention.config import BlockSizes
from kernels.hstu_attention.masks import (
    diagonal_blocks,
    prefix_block_has_key,
    prefix_key_blocks,
    prefix_key_valid,
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


def smem_bytes(dqk: int, dv: int, blocks, itemsize: int, score=None) -> dict[str, int]:
    """Shared memory of each kernel's tiles for (padded) head dims and tiles, as its scratch list allocates it.

    forward: resident Q (and O when Dqk != Dv) per compute warpgroup + the K/V ring; dq: resident Q, dO + the
    K/V ring; dk/dv: resident K, V + the Q/dO ring. `score` (a `scores.ScoreSpec`; None = silu without bias) adds
    the 4-byte vectors: timestamps (resident and ring), LSE / delta, slope-gradient row sums. Tests check the
    bias-free sizes against Mosaic GPU's own limit.
    """
    resident = COMPUTE_WGS * WG_TILE
    steps = MAX_CONCURRENT_STEPS
    sizes = {
        "forward": itemsize * (resident * (dqk + (dv if dqk != dv else 0)) + steps * blocks.block_k * (dqk + dv)),
        "dq": itemsize * (resident * (dqk + dv) + steps * blocks.block_k * (dqk + dv)),
        "dkdv": itemsize * (resident * (dqk + dv) + steps * blocks.block_q_bwd * (dqk + dv)),
    }
    if score is not None:
        sm, time_on = int(score.softmax), int(score.time)
        sizes["forward"] += 4 * (time_on * (resident + steps * blocks.block_k) + sm * resident)
        sizes["dq"] += 4 * (time_on * (resident + steps * blocks.block_k) + 2 * sm * resident
                            + (int(score.alibi) + time_on) * resident)
        sizes["dkdv"] += 4 * (time_on * (resident + steps * blocks.block_q_bwd) + 2 * sm * steps * blocks.block_q_bwd)
    return sizes


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


# --- cached-prefix mode (`hstu_attention_cached`) -----------------------------------------------------------------
# The same kernels run it with (lengths, hist) = (prefix_len, num_queries): main steps stream prefix blocks, and
# with `self_term` the DIAGONAL steps stream the rows' own key blocks (mask i == j), which adds each row's self
# pair exactly as the full mode adds candidate diagonals. The self pair carries no bias (distance 0, dt 0).
@dataclasses.dataclass(frozen=True)
class Mode:
    """Static: full-sequence (`cached=False`) or cached-prefix mode, and whether a row attends to itself."""

    cached: bool = False
    self_term: bool = True


FULL_MODE = Mode()


def _self_blocks(start, size: int, block: int, nq):
    """Blocks of `block` positions covering the live rows [start, min(start + size, nq))."""
    lo = lax.div(jnp.asarray(start, jnp.int32), jnp.int32(block))
    end = jnp.minimum(start + size, nq)
    hi = jnp.where(end > start, lax.div(end + (block - 1), jnp.int32(block)), lo)
    return lo, hi


def cached_row_schedule(r0, rows, bk, plen, nq, mask, self_term: bool) -> Schedule:
    """Prefix key blocks for query rows [r0, r0 + rows), then (self_term) the blocks of their own keys."""
    lo, full_hi, hi = prefix_key_blocks(plen, bk, mask, r0 < nq)
    d_lo, d_hi = _self_blocks(r0, rows, bk, nq) if self_term else (jnp.int32(0), jnp.int32(0))
    n_main, n_steps = hi - lo, hi - lo + d_hi - d_lo
    ranges = ((FULL, 0, full_hi - lo), (MASKED, full_hi - lo, n_main), (DIAGONAL, n_main, n_steps))
    return Schedule(lo, n_main, n_steps, d_lo, ranges)


def cached_prefix_key_schedule(j0, keys, bq, plen, nq, mask) -> Schedule:
    """Query row blocks seen by prefix keys [j0, j0 + keys): every live row block, if the keys are attended."""
    hi = jnp.where(prefix_block_has_key(j0, keys, plen, mask), lax.div(nq + (bq - 1), jnp.int32(bq)), 0)
    zero = jnp.int32(0)
    return Schedule(zero, hi, hi, zero, ((MASKED, 0, hi),))


def cached_self_key_schedule(j0, keys, bq, nq) -> Schedule:
    """Row blocks holding the rows whose own keys are [j0, j0 + keys) (diagonal steps only)."""
    d_lo, d_hi = _self_blocks(j0, keys, bq, nq)
    zero = jnp.int32(0)
    return Schedule(zero, zero, d_hi - d_lo, d_lo, ((DIAGONAL, 0, d_hi - d_lo),))


def pair_mask(mode: Mode, kind, rows, cols, length, hist, spec):
    """The mask of a MASKED or DIAGONAL step; `length, hist` are (prefix_len, num_queries) in cached mode."""
    if not mode.cached:
        return step_mask(kind, rows, cols, length, hist, spec)
    if kind == DIAGONAL:
        return (rows == cols) & (rows < hist)
    return prefix_key_valid(cols, length, spec) & (rows < hist)


def pair_distance(mode: Mode, rows, cols, length, hist):
    """ALiBi distance of (row, key) pairs: collapsed positions (full mode), prefix_len - j (cached mode)."""
    if mode.cached:
        return (length - cols).astype(jnp.float32)
    return scores.position_distance(rows, cols, hist)


def carries_bias(mode: Mode, kind) -> bool:
    """Whether a step's pairs can carry a bias: not the cached mode's self pairs (distance 0, dt 0)."""
    return not (mode.cached and kind == DIAGONAL)


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
            if isinstance(view, tuple):
                # (main, diagonal) sources: the cached mode streams prefix blocks, then the rows' own keys.
                main, diag = view
                pl.when(step < sched.n_main)(
                    lambda: plgpu.copy_gmem_to_smem(main(start), ring.at[slot], ready_bar.at[slot]))
                pl.when(step >= sched.n_main)(
                    lambda: plgpu.copy_gmem_to_smem(diag(start), ring.at[slot], ready_bar.at[slot]))
            else:
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


def fori_steps(step_fn, carry, kinds_bounds):
    """`run_steps` with a register carry: `carry = step_fn(step, carry, kind)` over each range in order."""
    for kind, start, stop in kinds_bounds:
        carry = lax.fori_loop(start, stop, functools.partial(_carry_step, step_fn, kind), carry)
    return carry


def _carry_step(step_fn, kind, step, carry):
    return step_fn(step, carry, kind)


# --- vectors and bias tiles in wgmma layouts ----------------------------------------------------------------------
ROW = 1  # a per-row vector of a [rows, cols] accumulator tile: the tile reduced over axis 1
COL = 0  # a per-column vector: the tile reduced over axis 0


def pop_ref(refs: list, on: bool = True):
    """The next kernel ref of `refs` when `on` (an operand present only with some score or bias), else None."""
    return refs.pop(0) if on else None


def vec_smem(n: int, dtype) -> plgpu.SMEM:
    """One length-n vector per compute warpgroup (timestamps, LSE, delta, row sums) in shared memory."""
    return plgpu.SMEM((COMPUTE_WGS, n), dtype)


def load_vector(smem_ref, along: int):
    """A 1-D shared-memory vector laid out to broadcast along the rows (ROW) or columns (COL) of a wgmma tile."""
    return plgpu.load(smem_ref, layout=plgpu.Layout.WGMMA.reduce(along))


def broadcast(vec, shape, along: int):
    """Broadcast a ROW (axis-0 indexed) or COL (axis-1 indexed) vector to a tile of `shape`."""
    return lax.broadcast_in_dim(vec, shape, [0 if along == ROW else 1])


def time_bucket(dt_float):
    """`scores.time_bucket` on a float32 time difference: log(1 + |dt|), since Mosaic GPU lowers log, not log1p
    (for integer dt the two agree to float32 rounding)."""
    return jnp.log(1.0 + jnp.abs(dt_float))


def bias_tile(score: scores.ScoreSpec, dist, dt, alibi_slope, time_slope):
    """The additive bias of a tile (`scores.bias`) with the in-kernel time bucket; None when no bias is on."""
    out = None
    if score.alibi:
        out = -alibi_slope * dist
    if score.time:
        term = -time_slope * time_bucket(dt)
        out = term if out is None else out + term
    return out


# --- shared-memory budget and tile checks -------------------------------------------------------------------------
def check_blocks(name: str, blocks: BlockSizes) -> None:
    if blocks.block_q != WG_TILE or blocks.block_k_bwd != WG_TILE:
        raise NotImplementedError(f"{name}: block_q and block_k_bwd are the warpgroup tile ({WG_TILE}), got {blocks}")
    if blocks.block_k % 64 or blocks.block_q_bwd % 64:
        raise NotImplementedError(f"{name}: block_k and block_q_bwd must be multiples of 64, got {blocks}")


def fit_shared_memory(blocks: BlockSizes, dqk: int, dv: int, itemsize: int, *, shrink: bool,
                      score=None) -> BlockSizes:
    """`blocks`, with the streamed tiles shrunk to 64 when `shrink` and the kernels would overflow shared memory.

    Raises NotImplementedError (so implementation=None falls back) when the tiles still do not fit.
    """
    if shrink and max(smem_bytes(dqk, dv, blocks, itemsize, score).values()) > SMEM_BUDGET:
        blocks = dataclasses.replace(blocks, block_k=64, block_q_bwd=64)
    needs = smem_bytes(dqk, dv, blocks, itemsize, score)
    over = {kernel: size for kernel, size in needs.items() if size > SMEM_BUDGET}
    if over:
        raise NotImplementedError(
            f"pallas_mosaic_gpu: head dims (Dqk={dqk}, Dv={dv}, padded to 64) with {blocks} need {over} bytes of "
            f"shared memory, over the {SMEM_BUDGET} a Hopper CTA has"
        )
    return blocks

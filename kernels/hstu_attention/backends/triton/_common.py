"""What the Triton backend's kernels share (private to `backends/triton/`): block specs for grids
(block index, batch, head), named kernel refs, and the score tiles of both modes.

Scores and biases come from `scores.py` and masks from `masks.py`; only the Triton layout lives here: arrays stay
[B, L, H, D], a program owns one (block, batch, head), and slopes / lengths arrive as one scalar per program.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltr

from kernels.hstu_attention import common, scores
from kernels.hstu_attention.common import CachedParams, KernelParams
from kernels.hstu_attention.config import BlockSizes
from kernels.hstu_attention.scores import position_distance


# --- block specs -----------------------------------------------------------------------------------------------
def rows_spec(block: int, dim: int, reverse_blocks: int | None = None) -> pl.BlockSpec:
    """[block, dim] tile of a [B, L, H, D] array, for grid (block index, batch, head)."""
    if reverse_blocks is None:
        return pl.BlockSpec((None, block, None, dim), lambda i, b, h: (b, i, h, 0))
    # Heaviest row blocks (the last ones, which see the most keys) are launched first.
    return pl.BlockSpec((None, block, None, dim), lambda i, b, h: (b, reverse_blocks - 1 - i, h, 0))


def whole_spec(size: int, dim: int) -> pl.BlockSpec:
    """The whole [size, dim] sequence of one (batch, head)."""
    return pl.BlockSpec((None, size, None, dim), lambda i, b, h: (b, 0, h, 0))


def per_batch_spec() -> pl.BlockSpec:
    return pl.BlockSpec((None,), lambda i, b, h: (b,))


def per_head_spec() -> pl.BlockSpec:
    return pl.BlockSpec((None,), lambda i, b, h: (h,))


def row_stat_spec(block: int, reverse_blocks: int | None = None) -> pl.BlockSpec:
    """[block] of a [B, H, L] row statistic (LSE, delta)."""
    if reverse_blocks is None:
        return pl.BlockSpec((None, None, block), lambda i, b, h: (b, h, i))
    return pl.BlockSpec((None, None, block), lambda i, b, h: (b, h, reverse_blocks - 1 - i))


def whole_stat_spec(size: int) -> pl.BlockSpec:
    return pl.BlockSpec((None, None, size), lambda i, b, h: (b, h, 0))


def ts_rows_spec(block: int) -> pl.BlockSpec:
    return pl.BlockSpec((None, block), lambda i, b, h: (b, i))


def ts_whole_spec(size: int) -> pl.BlockSpec:
    return pl.BlockSpec((None, size), lambda i, b, h: (b, 0))


def partial_spec() -> pl.BlockSpec:
    """One float32 per (row block, batch, head): slope-gradient partial sums."""
    return pl.BlockSpec((None, None, None, 1), lambda i, b, h: (i, b, h, 0))


def statics_specs(params) -> list[pl.BlockSpec]:
    """Two int32 scalars per batch row, then the per-head slopes that are on."""
    score = params.score
    return [per_batch_spec(), per_batch_spec()] + [per_head_spec()] * (int(score.alibi) + int(score.time))


def compiler_params(blocks: BlockSizes) -> pltr.CompilerParams:
    return pltr.CompilerParams(num_warps=blocks.num_warps, num_stages=blocks.num_stages)


# --- kernel refs ---------------------------------------------------------------------------------------------------
def take_refs(refs, params, names):
    """Name a kernel's refs: two int32 scalars ("plen", "nq": prefix_len and num_queries in the cached kernels,
    lengths and hist in the full-mode ones), the slopes that are on ("alibi", "tslope"), then `names`, where a
    name ending in '?ts' is present only with the time bias, '?sm' only for softmax and '?alibi' only with ALiBi."""
    score = params.score
    refs = list(refs)
    out = {"plen": refs.pop(0), "nq": refs.pop(0)}
    out["alibi"] = refs.pop(0) if score.alibi else None
    out["tslope"] = refs.pop(0) if score.time else None
    for name in names:
        base, _, cond = name.partition("?")
        on = {"": True, "ts": score.time, "sm": score.softmax, "alibi": score.alibi}[cond]
        out[base] = refs.pop(0) if on else None
    assert not refs, refs
    return out


def read_slopes(r):
    a = r["alibi"][...] if r["alibi"] is not None else None
    t = r["tslope"][...] if r["tslope"] is not None else None
    return a, t


def slope_args(alibi, tslopes):
    return [x for x in (alibi, tslopes) if x is not None]


# --- full mode: score tiles -----------------------------------------------------------------------------------------
def full_bias_terms(params: KernelParams, rows, cols, hist, ts_ref, i0, j0, bq: int, bk: int):
    """(collapsed position distance, raw time difference) of the tile; None for terms that are off."""
    score = params.score
    dist = position_distance(rows, cols, hist) if score.alibi else None
    dt = (ts_ref[pl.ds(i0, bq)][:, None] - ts_ref[pl.ds(j0, bk)][None, :]) if score.time else None
    return dist, dt


def full_tile_scores(params: KernelParams, q, k, rows, cols, hist, r, i0, j0, bq: int, bk: int):
    """alpha q.k (+ the bias when one is on) of one tile, float32."""
    z = params.alpha * common.matmul(q, k, trans_b=True)
    if not params.score.has_bias:
        return z
    dist, dt = full_bias_terms(params, rows, cols, hist, r["ts"], i0, j0, bq, bk)
    a_slope, t_slope = read_slopes(r)
    return scores.add_bias(z, scores.bias(params.score, dist, dt, a_slope, t_slope))


# --- cached mode: score tiles ---------------------------------------------------------------------------------------
def cached_bias_terms(p: CachedParams, cols, plen, row_ts, col_ts):
    """(ALiBi distance prefix_len - j, raw time difference) of a tile; None for terms that are off."""
    dist = (plen - cols).astype(jnp.float32) if p.score.alibi else None
    dt = (row_ts[:, None] - col_ts[None, :]) if p.score.time else None
    return dist, dt


def cached_tile_scores(p: CachedParams, q, k, cols, plen, row_ts, col_ts, a_slope, t_slope):
    """z = alpha q.k + bias of one [rows, keys] tile (float32)."""
    z = p.alpha * common.matmul(q, k, trans_b=True)
    if not p.score.has_bias:
        return z
    dist, dt = cached_bias_terms(p, cols, plen, row_ts, col_ts)
    return scores.add_bias(z, scores.bias(p.score, dist, dt, a_slope, t_slope))


def self_score(p: CachedParams, q, k):
    """alpha q.k of each row with its own key (the cached mode's self term), [rows, 1] float32."""
    return p.alpha * jnp.sum(q.astype(jnp.float32) * k.astype(jnp.float32), axis=1, keepdims=True)

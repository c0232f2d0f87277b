"""What the TPU backend's kernels share (private to `backends/tpu/`): the [B, H, rows, D] tile layout, grids
that end in an "arbitrary" reduction axis, index maps that clamp skipped reduction steps onto a resident tile,
and interpret-mode parameters.

Masks and walks come from `masks.py`, scores and biases from `scores.py`; only the Mosaic TPU layout lives here.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from kernels.hstu_attention import common, scores
from kernels.hstu_attention.common import CachedParams, KernelParams
from kernels.hstu_attention.masks import key_blocks_for_rows, prefix_key_blocks

# (batch, head, resident block, reduction block): the last axis accumulates into VMEM scratch.
SEMANTICS = ("parallel", "parallel", "parallel", "arbitrary")


def interpret_params(interpret):
    """interpret=True runs the TPU interpreter with NaN-poisoned fresh memory (so an unwritten output fails)."""
    return pltpu.InterpretParams(uninitialized_memory="nan") if interpret is True else interpret


def mm(a: jax.Array, b: jax.Array, *, trans_a: bool = False, trans_b: bool = False) -> jax.Array:
    # Mosaic wants a transposed lhs spelled as an explicit transpose.
    if trans_a:
        a = a.T
    return common.matmul(a, b, trans_b=trans_b)


def clamp(idx, lo, hi):
    """Reduction index for an index map: outside [lo, hi) it repeats the nearest live block (no new DMA)."""
    return jnp.maximum(jnp.minimum(idx, hi - 1), jnp.minimum(lo, jnp.maximum(hi - 1, 0)))


def tile_spec(block: int, dim: int, index) -> pl.BlockSpec:
    """[block, dim] tile of a [B, H, rows, dim] array."""
    return pl.BlockSpec((None, None, block, dim), index)


def resident(b, h, i, j, *_):
    """The grid's resident block (axis 2)."""
    return b, h, i, 0


def streamed(b, h, i, j, *_):
    """The grid's reduction block (axis 3), unclamped."""
    return b, h, j, 0


def key_index(params: KernelParams, bq: int, bk: int):
    """Full mode: index map of key blocks for a row block, clamped into the forward / dq walk."""

    def index(b, h, i, j, len_ref, hist_ref):
        lo, _, hi = key_blocks_for_rows(i * bq, bq, bk, len_ref[b], hist_ref[b], params.spec)
        return b, h, clamp(j, lo, hi), 0

    return index


def prefix_index(p: CachedParams, bq: int, bk: int):
    """Cached mode: index map of prefix key blocks for a query block, clamped into the forward / dq walk."""

    def index(b, h, i, j, plen_ref, nq_ref):
        lo, _, hi = prefix_key_blocks(plen_ref[b], bk, p.mask, i * bq < nq_ref[b])
        return b, h, clamp(j, lo, hi), 0

    return index


def self_score(p: CachedParams, q, k):
    """alpha q.k of each row with its own key (the cached mode's self term), [rows, 1] float32."""
    return p.alpha * jnp.sum(q.astype(jnp.float32) * k.astype(jnp.float32), axis=1, keepdims=True)


def prefix_distance(p: CachedParams, cols, plen):
    """The cached mode's ALiBi distance prefix_len - j of prefix key j (None when ALiBi is off)."""
    return (plen - cols).astype(jnp.float32) if p.score.alibi else None


def cached_tile_scores(p: CachedParams, q, k, br=None, head=None, cols=None, plen=None):
    """z = alpha q.k (+ the bias when one is on) of one [rows, keys] tile (float32)."""
    z = p.alpha * common.matmul(q, k, trans_b=True)
    if not p.score.has_bias:
        return z
    return scores.add_bias(z, br.tile_bias(p.score, head, prefix_distance(p, cols, plen)))


# --- biases: slopes in SMEM (one scalar per head), timestamps as a [rows, 1] and a [1, keys] tile ---------------
@dataclasses.dataclass(frozen=True)
class BiasRefs:
    """A kernel's bias inputs (None for terms that are off): per-head slopes and the row / key timestamps."""

    alibi: object = None
    tslope: object = None
    row_ts: object = None
    col_ts: object = None

    def tile_bias(self, score: scores.ScoreSpec, head, dist):
        """The bias of one tile, given its ALiBi distance (None when ALiBi is off); None when no bias is on."""
        if not score.has_bias:
            return None
        a = self.alibi[head] if score.alibi else None
        t = self.tslope[head] if score.time else None
        dt = (self.row_ts[...] - self.col_ts[...]) if score.time else None
        return scores.bias(score, dist, dt, a, t)

    def time_bucket(self):
        return scores.time_bucket(self.row_ts[...] - self.col_ts[...])


def take_bias_refs(refs, score: scores.ScoreSpec) -> tuple[BiasRefs, list]:
    """Split the bias refs (in `bias_args` order) off the front of `refs`."""
    refs = list(refs)
    alibi = refs.pop(0) if score.alibi else None
    tslope = refs.pop(0) if score.time else None
    row_ts = refs.pop(0) if score.time else None
    col_ts = refs.pop(0) if score.time else None
    return BiasRefs(alibi, tslope, row_ts, col_ts), refs


def bias_args(score: scores.ScoreSpec, alibi, tslopes, row_ts, col_ts) -> list:
    """Operands of the bias refs: slopes [H] float32, row timestamps [B, rows, 1], key timestamps [B, 1, keys]."""
    args = [alibi] if score.alibi else []
    if score.time:
        args += [tslopes, row_ts[:, :, None], col_ts[:, None, :]]
    return args


def bias_specs(score: scores.ScoreSpec, bq: int, row_index, bk: int, col_index) -> list[pl.BlockSpec]:
    """Specs of `bias_args`: slopes whole in SMEM; timestamp tiles follow the (4-D) index maps of the row block
    (`row_index`) and the key block (`col_index`) they belong to."""
    smem = pl.BlockSpec(memory_space=pltpu.SMEM)
    specs = [smem] if score.alibi else []
    if score.time:
        def rows3(*args):
            b, _, i, _ = row_index(*args)
            return b, i, 0

        def cols3(*args):
            b, _, j, _ = col_index(*args)
            return b, 0, j

        specs += [smem, pl.BlockSpec((None, bq, 1), rows3), pl.BlockSpec((None, 1, bk), cols3)]
    return specs


def slope_grad_rows(score: scores.ScoreSpec, br: BiasRefs, ds, dist):
    """Row sums [rows, 1] of dS * d(bias)/d(slope) for the terms that are on (None for off terms)."""
    g_a = -jnp.sum(ds * dist, axis=1, keepdims=True) if score.alibi else None
    g_t = -jnp.sum(ds * br.time_bucket(), axis=1, keepdims=True) if score.time else None
    return g_a, g_t


def slope_grad_outputs(score: scores.ScoreSpec, batch: int, heads: int, rows: int, bq: int, index):
    """(specs, shapes) of the per-row slope-gradient partial sums [B, H, rows, 1] a dq kernel writes."""
    n = int(score.alibi) + int(score.time)
    shape = jax.ShapeDtypeStruct((batch, heads, rows, 1), jnp.float32)
    return [tile_spec(bq, 1, index)] * n, [shape] * n


def reduce_slope_grads(score: scores.ScoreSpec, partials):
    """(d_alibi, d_time) [H] from the per-row partial sums (None for off terms)."""
    partials = iter(partials)
    d_alibi = jnp.sum(next(partials), axis=(0, 2, 3)) if score.alibi else None
    d_time = jnp.sum(next(partials), axis=(0, 2, 3)) if score.time else None
    return d_alibi, d_time

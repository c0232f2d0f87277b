"""The target-aware mask on tiles, and which tiles can be skipped: shared by every kernel and the reference.

Everything here is plain `jnp`/`lax` on int32 scalars and small index arrays, so the same code traces inside a
Triton, Mosaic GPU or Mosaic TPU kernel body (and inside TPU index maps). Ranges are in block units and
half-open. Divisions only ever see non-negative operands, so `lax.div` (truncation) is floor division.

Skipping rule (forward and dq pass, row block [i0, i0 + bq)): history rows need keys j <= i < hist, candidate
rows need keys j < hist, so no key at or beyond min(last valid row + 1, hist) is ever needed except each
candidate's own diagonal, which the kernels add as a separate term for rows the loop does not reach. The dk/dv
pass mirrors it: key block [j0, j0 + bk) is seen by rows j0 .. lengths - 1 if it holds history keys, and by no
row but its own candidates otherwise. A block whose every (valid row, key) pair is unmasked runs without the
mask arithmetic; contextual and windowed masks keep the bounds but mask every block (they are rare and small).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax import lax


@dataclasses.dataclass(frozen=True)
class MaskSpec:
    """The static part of the mask: contextual prefix length and sliding window (None = unbounded)."""

    contextual_len: int = 0
    max_attn_len: int | None = None

    @property
    def plain(self) -> bool:
        """True when only the causal/candidate structure applies, so interior blocks need no mask."""
        return self.contextual_len == 0 and self.max_attn_len is None


def tile_mask(i: jax.Array, j: jax.Array, length: jax.Array, hist: jax.Array, spec: MaskSpec) -> jax.Array:
    """Validity of pairs (i, j); `i` and `j` are absolute positions already shaped to broadcast together."""
    ci = jnp.minimum(i, hist)
    cj = jnp.minimum(j, hist)
    valid = (i == j) | (ci > cj)
    if spec.max_attn_len is not None:
        valid &= (ci - cj) <= spec.max_attn_len
    if spec.contextual_len > 0:
        valid |= (j < spec.contextual_len) | ((i < spec.contextual_len) & (j < hist))
    return valid & (i < length) & (j < length)


def _cdiv(a: jax.Array, b: int) -> jax.Array:
    return lax.div(a + (b - 1), jnp.int32(b))


def _fdiv(a: jax.Array, b: int) -> jax.Array:
    return lax.div(a, jnp.int32(b))


def _i32(x) -> jax.Array:
    return jnp.asarray(x, jnp.int32)


def key_blocks_for_rows(
    i0: jax.Array, bq: int, bk: int, length: jax.Array, hist: jax.Array, spec: MaskSpec
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(lo, full_hi, hi): key blocks [lo, hi) are needed by rows [i0, i0 + bq); [lo, full_hi) need no mask.

    Rows at or beyond `length` are ignored (the kernels zero them on output).
    """
    i0 = _i32(i0)
    zero = jnp.int32(0)
    any_row = i0 < length
    last = jnp.minimum(i0 + bq, length) - 1
    hi_col = jnp.minimum(last + 1, hist)
    lo_col = zero
    if spec.max_attn_len is not None and spec.contextual_len == 0:
        lo_col = jnp.maximum(jnp.minimum(i0, hist) - spec.max_attn_len, zero)
    if spec.contextual_len > 0:
        hi_col = jnp.maximum(hi_col, jnp.minimum(jnp.int32(spec.contextual_len), length))
        hi_col = jnp.where(i0 < spec.contextual_len, jnp.maximum(hi_col, hist), hi_col)
    hi_col = jnp.where(any_row, jnp.maximum(hi_col, zero), zero)
    hi = _cdiv(hi_col, bk)
    lo = jnp.minimum(_fdiv(lo_col, bk), hi)
    if spec.plain:
        # Every key j < min(i0 + 1, hist) is valid for every valid row of the block.
        full_hi = jnp.clip(_fdiv(jnp.maximum(jnp.minimum(i0 + 1, hist), zero), bk), lo, hi)
    else:
        full_hi = lo
    return lo, full_hi, hi


def row_blocks_for_keys(
    j0: jax.Array, bk: int, bq: int, length: jax.Array, hist: jax.Array, spec: MaskSpec
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """(lo, full_lo, full_hi, hi): row blocks [lo, hi) see keys [j0, j0 + bk); [full_lo, full_hi) need no mask."""
    j0 = _i32(j0)
    zero = jnp.int32(0)
    j1 = j0 + bk
    has_history_key = j0 < hist
    lo_row = j0
    hi_row = jnp.where(has_history_key, length, zero)
    if spec.max_attn_len is not None:
        w = spec.max_attn_len
        seen_by_candidates = (hist - (j1 - 1)) <= w
        hi_row = jnp.where(seen_by_candidates, hi_row, jnp.minimum(hi_row, jnp.minimum(hist, j1 + w)))
    if spec.contextual_len > 0:
        lo_row = zero
        hi_row = jnp.where(j0 < length, length, zero)
    hi = _cdiv(jnp.maximum(hi_row, zero), bq)
    lo = jnp.minimum(_fdiv(lo_row, bq), hi)
    if spec.plain:
        # Rows in [j1 - 1, length) see every key of a block that lies wholly in the history.
        full_lo = jnp.clip(_cdiv(j1 - 1, bq), lo, hi)
        full_hi = jnp.clip(_fdiv(length, bq), full_lo, hi)
        full_hi = jnp.where(j1 <= hist, full_hi, full_lo)
    else:
        full_lo = full_hi = lo
    return lo, full_lo, full_hi, hi


def uncovered_diagonal(pos: jax.Array, length: jax.Array, hist: jax.Array, lo: jax.Array, hi: jax.Array, block: int):
    """Which positions are candidates whose own (i, i) pair lies outside the blocks [lo, hi) a loop visits."""
    candidate = (pos >= hist) & (pos < length)
    return candidate & ((pos < lo * block) | (pos >= hi * block))


def diagonal_blocks(
    start: jax.Array, size: int, block: int, covered_hi: jax.Array, length: jax.Array, hist: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """Blocks [lo, hi) (of `block` positions) holding the candidates of [start, start + size) not yet covered.

    For kernels that add the missing candidate diagonals as extra masked block steps (mask: i == j, hist <= i
    < length) rather than row-wise: positions below `covered_hi * block` were already visited. The result
    never overlaps the covered blocks.
    """
    start = _i32(start)
    first = jnp.maximum(jnp.maximum(start, covered_hi * block), hist)
    end = jnp.minimum(start + size, length)
    lo = _fdiv(jnp.maximum(first, jnp.int32(0)), block)
    hi = jnp.where(end > first, _cdiv(jnp.maximum(end, jnp.int32(0)), block), lo)
    return lo, hi


def diagonal_mask(i: jax.Array, j: jax.Array, length: jax.Array, hist: jax.Array) -> jax.Array:
    """The candidate self pairs: i == j for hist <= i < length."""
    return (i == j) & (i >= hist) & (i < length)


# --- cached-prefix mode (`hstu_attention_cached`): the mask is separable (valid row x valid prefix key) -------------
def prefix_key_valid(cols, plen, mask: MaskSpec):
    """Prefix keys j < prefix_len, and within the window prefix_len - j <= w unless j < contextual_len."""
    valid = cols < plen
    if mask.max_attn_len is not None:
        near = (plen - cols) <= mask.max_attn_len
        if mask.contextual_len > 0:
            near |= cols < mask.contextual_len
        valid &= near
    return valid


def prefix_key_blocks(plen, bk: int, mask: MaskSpec, active):
    """(lo, full_hi, hi): a query block needs prefix key blocks [lo, hi); [lo, full_hi) need no mask.

    `active` False (a block past num_queries) gives an empty range."""
    zero = jnp.int32(0)
    hi = lax.div(plen + (bk - 1), jnp.int32(bk))
    lo = zero
    if mask.max_attn_len is not None and mask.contextual_len == 0:
        lo = jnp.minimum(lax.div(jnp.maximum(plen - mask.max_attn_len, zero), jnp.int32(bk)), hi)
    full_hi = lax.div(plen, jnp.int32(bk)) if mask.max_attn_len is None else lo
    hi = jnp.where(active, hi, lo)
    return lo, jnp.minimum(full_hi, hi), hi


def prefix_block_has_key(j0, bk: int, plen, mask: MaskSpec):
    """Whether prefix key block [j0, j0 + bk) holds a key some query row attends to."""
    last = j0 + (bk - 1)
    has = j0 < plen
    if mask.max_attn_len is not None:
        near = last >= plen - mask.max_attn_len
        if mask.contextual_len > 0:
            near |= j0 < mask.contextual_len
        has &= near
    return has

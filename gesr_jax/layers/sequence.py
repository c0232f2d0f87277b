"""The [history ; candidates] sequence shared by GESR's HSTU stack and GenRank's decoder.

Both models run a stack of blocks under the kernels' target-aware mask (history causal, each candidate sees the
whole history and itself, never another candidate) in two equal forms:

* one pass over the packed sequence (:func:`pack`, :func:`run_packed`, :func:`unpack_candidates`);
* the cached-prefix form: :func:`encode_prefix` runs the history alone once per request and keeps every
  block's history (k, v); :func:`score_against_prefix` runs each candidate chunk against them, O(C N).

A block takes part by implementing :class:`CachedPrefixBlock` (``layers/hstu.py``'s ``HSTULayer`` and
``models/genrank/block.py``'s ``DecoderBlock`` do). ``bias`` keyword arguments (ALiBi slopes, timestamps) go
through to the attention kernel unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import jax
import jax.numpy as jnp

from gesr_jax.data.batch import lengths_mask
from gesr_jax.layers.core import fold

HistoryKV = tuple[jax.Array, jax.Array]  # (k [B, N, H, Dk], v [B, N, H, Dv]) of one block


class CachedPrefixBlock(Protocol):
    """A block of a target-aware stack; the three cached-prefix methods give the candidate rows of ``full``."""

    def full(
        self, x: jax.Array, lengths: jax.Array, num_targets: jax.Array, *, key: jax.Array | None = None, **bias: Any
    ) -> jax.Array:
        """The block over a packed [history ; candidates] sequence [B, L, D]."""
        ...

    def history(
        self, x: jax.Array, lengths: jax.Array, *, key: jax.Array | None = None, **bias: Any
    ) -> tuple[jax.Array, HistoryKV]:
        """Causal attention over history tokens alone: (next tokens, this block's (k, v) for the candidates)."""
        ...

    def history_kv(self, x: jax.Array) -> HistoryKV:
        """Only the (k, v) of history tokens (the last block: its history outputs are never read)."""
        ...

    def candidates(
        self, x: jax.Array, kv: HistoryKV, history_len: jax.Array, num_candidates: jax.Array, *,
        key: jax.Array | None = None, **bias: Any,
    ) -> jax.Array:  # fmt: skip
        """Candidate tokens [B, C, D] through the block: each sees the cached history (k, v) and itself."""
        ...


def pack(history: jax.Array, candidates: jax.Array, history_len: jax.Array, num_candidates: jax.Array) -> jax.Array:
    """[B, N, ...] and [B, C, ...] -> [B, N + C, ...] rows [hist[:len] ; cand[:nc] ; zeros], dtype kept."""
    n, c = history.shape[1], candidates.shape[1]
    p = jnp.arange(n + c)[None, :]
    hlen, nc = history_len[:, None], num_candidates[:, None]
    idx = jnp.clip(jnp.where(p < hlen, p, n + p - hlen), 0, n + c - 1)
    valid = lengths_mask(history_len + num_candidates, n + c)
    both = jnp.concatenate([history, candidates], axis=1)
    extra = (1,) * (both.ndim - 2)
    out = jnp.take_along_axis(both, idx.reshape(*idx.shape, *extra), axis=1)
    return jnp.where(valid.reshape(*valid.shape, *extra), out, jnp.zeros((), out.dtype))


def unpack_candidates(seq: jax.Array, history_len: jax.Array, num_candidates: jax.Array, c: int) -> jax.Array:
    """The candidate rows of a packed sequence [B, L, D], back in slot order [B, C, D]; padding zero."""
    slot = jnp.arange(c)[None, :]
    idx = jnp.clip(history_len[:, None] + slot, 0, seq.shape[1] - 1)
    out = jnp.take_along_axis(seq, idx[..., None], axis=1)
    return jnp.where(lengths_mask(num_candidates, c)[..., None], out, 0.0)


def last_history(seq: jax.Array, history_len: jax.Array) -> jax.Array:
    """Output at the most recent history position, [B, D] (zero for an empty history)."""
    idx = jnp.clip(history_len - 1, 0, seq.shape[1] - 1)
    out = jnp.take_along_axis(seq, idx[:, None, None], axis=1)[:, 0]
    return jnp.where((history_len > 0)[:, None], out, 0.0)


def run_packed(
    blocks: Sequence[CachedPrefixBlock],
    x: jax.Array,
    lengths: jax.Array,
    num_targets: jax.Array,
    *,
    dtype: Any,
    key: jax.Array | None = None,
    probes: Sequence[jax.Array] | None = None,
    **bias: Any,
) -> jax.Array:
    """The blocks over a packed sequence [B, L, D] in one pass; rows at or beyond ``lengths`` are zero.

    ``probes`` (one [B, L, D] array per block) are added to each block's output (gradient tests).
    """
    valid = lengths_mask(lengths, x.shape[1])[..., None]
    x = x.astype(dtype)
    for i, block in enumerate(blocks):
        # Re-zero padding rows: they never reach valid rows (the kernel masks them), but zeros keep the
        # residual stream free of whatever the projections make of padding.
        x = jnp.where(valid, block.full(x, lengths, num_targets, key=fold(key, i), **bias), 0.0).astype(dtype)
        if probes is not None:
            x = x + probes[i].astype(dtype)
    return x


def encode_prefix(
    blocks: Sequence[CachedPrefixBlock],
    history: jax.Array,
    history_len: jax.Array,
    *,
    dtype: Any,
    need_outputs: bool,
    key: jax.Array | None = None,
    **bias: Any,
) -> tuple[jax.Array | None, list[HistoryKV]]:
    """(history outputs [B, N, D] of the last block or None, per-block history (k, v)). Once per request.

    Without ``need_outputs`` the last block computes only its (k, v), the part candidates read.
    """
    valid = lengths_mask(history_len, history.shape[1])[..., None]
    x = history.astype(dtype)
    cache: list[HistoryKV] = []
    for i, block in enumerate(blocks):
        if not need_outputs and i == len(blocks) - 1:
            cache.append(block.history_kv(x))
            return None, cache
        x, kv = block.history(x, history_len, key=fold(key, i), **bias)
        x = jnp.where(valid, x, 0.0).astype(dtype)
        cache.append(kv)
    return x, cache


def score_against_prefix(
    blocks: Sequence[CachedPrefixBlock],
    cache: Sequence[HistoryKV],
    candidates: jax.Array,
    history_len: jax.Array,
    num_candidates: jax.Array,
    *,
    dtype: Any,
    key: jax.Array | None = None,
    **bias: Any,
) -> jax.Array:
    """Candidate rows [B, C, D] of the blocks from every block's cached history (k, v); padding rows zero."""
    valid = lengths_mask(num_candidates, candidates.shape[1])[..., None]
    x = candidates.astype(dtype)
    for i, (block, kv) in enumerate(zip(blocks, cache, strict=True)):
        x = block.candidates(x, kv, history_len, num_candidates, key=fold(key, i), **bias)
        x = jnp.where(valid, x, 0.0).astype(dtype)
    return x

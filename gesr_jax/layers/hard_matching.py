"""Hard Matching Attention (HMA, spec §1.5): explicit match counts between history and candidate ids.

For each (history field, candidate field) pair p, the count
``c = min(#{valid history positions t : history[t] == candidate}, M)`` is embedded in one
shared table with a per-pair offset, ``E[c + p * (M + 1)]`` (stride M+1 so that c = M of
pair p cannot collide with c = 0 of pair p+1: the paper's figure shows stride M, which
is ambiguous; UNCONFIRMED), and the P embeddings are flattened into an MLP.

Counting never materialises the [B, C, P, N] comparison: each request's history is sorted
once per pair (padding and id 0 replaced by a sentinel that no candidate id can equal),
and each candidate's count is the difference of two binary searches, O((N + C) log N).
The counts are integer functions of the ids, so gradients reach only E and the MLP.

Stages: :meth:`HardMatching.encode` sorts the history once per request (RO work); :meth:`HardMatching.score`
counts and embeds any chunk of candidates against it.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from gesr_jax.data.batch import lengths_mask
from gesr_jax.layers.core import MLP, Embed

Batch = Mapping[str, jax.Array]

SENTINEL = jnp.iinfo(jnp.int32).max  # ids are < vocab sizes far below int32 max, so it never matches


def sorted_history(ids: jax.Array, valid: jax.Array) -> jax.Array:
    """[..., N] history ids sorted ascending, padding and id 0 (padding/OOV) replaced by ``SENTINEL``.

    An RO computation: done once per request, shared by all its candidates.
    """
    ids = jnp.where(valid & (ids != 0), ids.astype(jnp.int32), SENTINEL)
    return jnp.sort(ids, axis=-1)


def match_counts(sorted_ids: jax.Array, candidates: jax.Array) -> jax.Array:
    """How often each candidate id occurs in its request's sorted history.

    ``sorted_ids`` [B, N] from :func:`sorted_history`, ``candidates`` [B, C] -> int32 [B, C].
    Candidate id 0 (padding/OOV) counts 0: the sentinel replaced every history 0.
    """

    def one_request(row: jax.Array, cands: jax.Array) -> jax.Array:
        cands = cands.astype(jnp.int32)
        hi = jnp.searchsorted(row, cands, side="right")
        lo = jnp.searchsorted(row, cands, side="left")
        return (hi - lo).astype(jnp.int32)

    counts = jax.vmap(one_request)(sorted_ids, candidates)
    return jnp.where(candidates == 0, 0, counts)


def brute_force_counts(history: jax.Array, valid: jax.Array, candidates: jax.Array) -> jax.Array:
    """The [B, C, N] comparison HMA avoids; kept as the oracle the tests compare against."""
    hit = (history[:, None, :] == candidates[:, :, None]) & valid[:, None, :] & (history[:, None, :] != 0)
    return hit.sum(-1).astype(jnp.int32)


class HardMatching(nnx.Module):
    """T_match = MLP(flatten_p E[min(count_p, M) + p (M + 1)]) -> [B, C, mlp_widths[-1]]."""

    def __init__(
        self,
        pairs: tuple[tuple[str, str], ...],
        *,
        max_count: int,
        dim: int,
        mlp_widths: tuple[int, ...],
        dropout_rate: float,
        rngs: nnx.Rngs,
    ):
        self.pairs = tuple(tuple(p) for p in pairs)
        self.max_count = max_count
        num_pairs = len(self.pairs)
        self.table = Embed(num_pairs * (self.max_count + 1), dim, rngs=rngs)
        self.mlp = MLP(num_pairs * dim, mlp_widths, rngs=rngs, dropout_rate=dropout_rate)
        self.out_dim = mlp_widths[-1]

    def encode(self, request: Batch) -> dict[str, jax.Array]:
        """Each distinct history field of the pairs, sorted once per request: {field: [B, N]}."""
        n = request["history_item"].shape[1]
        valid = lengths_mask(request["history_len"], n)
        fields = dict.fromkeys(h for h, _ in self.pairs)
        return {f: sorted_history(request[f"history_{f}"], valid) for f in fields}

    def counts_from(self, sorted_by_field: Mapping[str, jax.Array], candidates: Batch) -> jax.Array:
        """Capped match counts, int32 [B, C, P]."""
        counts = [match_counts(sorted_by_field[h], candidates[f"cand_{c}"]) for h, c in self.pairs]
        return jnp.minimum(jnp.stack(counts, axis=-1), self.max_count)

    def counts(self, batch: Batch) -> jax.Array:
        """Capped match counts of a whole batch, int32 [B, C, P]."""
        return self.counts_from(self.encode(batch), batch)

    def table_rows(self, counts: jax.Array) -> jax.Array:
        """Row of the shared table for each capped count [..., P]: ``count + p * (M + 1)``."""
        offsets = jnp.arange(len(self.pairs), dtype=jnp.int32) * (self.max_count + 1)
        return counts + offsets

    def score(
        self, sorted_by_field: Mapping[str, jax.Array], candidates: Batch, *, key: jax.Array | None = None
    ) -> jax.Array:
        counts = self.counts_from(sorted_by_field, candidates)
        e = self.table(self.table_rows(counts))  # [B, C, P, D]
        flat = e.reshape(*e.shape[:-2], -1)
        return self.mlp(flat, key=key)

    def __call__(self, batch: Batch, *, key: jax.Array | None = None) -> jax.Array:
        return self.score(self.encode(batch), batch, key=key)

    def needed_keys(self) -> tuple[str, ...]:
        keys = [f"history_{h}" for h, _ in self.pairs] + [f"cand_{c}" for _, c in self.pairs]
        return tuple(dict.fromkeys(keys))

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
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from gesr_jax.models.config import ModelConfig
from gesr_jax.models.features import Batch
from gesr_jax.models.layers import MLP, Embed

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
    """T_match = MLP(flatten_p E[min(count_p, M) + p (M + 1)]) -> [B, C, hma_mlp[-1]]."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        self.pairs = tuple(tuple(p) for p in config.hma_pairs)
        self.max_count = config.hma_max_count
        num_pairs = len(self.pairs)
        self.table = Embed(num_pairs * (self.max_count + 1), config.hma_dim, rngs=rngs)
        self.mlp = MLP(num_pairs * config.hma_dim, config.hma_mlp, rngs=rngs, dropout_rate=config.dropout)
        self.out_dim = config.hma_mlp[-1]

    def counts(self, batch: Batch) -> jax.Array:
        """Capped match counts, int32 [B, C, P]."""
        n = batch["history_item"].shape[1]
        valid = jnp.arange(n)[None, :] < batch["history_len"][:, None]
        # Sort each distinct history field once, even when several pairs share it.
        fields = dict.fromkeys(h for h, _ in self.pairs)
        sorted_by_field = {f: sorted_history(batch[f"history_{f}"], valid) for f in fields}
        counts = [match_counts(sorted_by_field[h], batch[f"cand_{c}"]) for h, c in self.pairs]
        return jnp.minimum(jnp.stack(counts, axis=-1), self.max_count)

    def __call__(self, batch: Batch, *, key: jax.Array | None = None) -> jax.Array:
        counts = self.counts(batch)
        offsets = jnp.arange(len(self.pairs), dtype=jnp.int32) * (self.max_count + 1)
        e = self.table(counts + offsets)  # [B, C, P, D]
        flat = e.reshape(*e.shape[:-2], -1)
        return self.mlp(flat, key=key)

    def needed_keys(self) -> tuple[str, ...]:
        keys = [f"history_{h}" for h, _ in self.pairs] + [f"cand_{c}" for _, c in self.pairs]
        return tuple(dict.fromkeys(keys))

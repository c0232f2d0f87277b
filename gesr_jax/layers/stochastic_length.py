"""Stochastic length (SL, HSTU §2.9): per-example history subsampling during training.

With N the history capacity (the batch's padded history length), alpha in (1, 2] and a
request with n valid events, let ``L = floor(N ** (alpha / 2))``:

* n <= L: keep the full history;
* otherwise, with probability ``N ** alpha / n ** 2`` keep the full history;
* otherwise keep a subsequence of L events, in chronological order.

Expected attention cost becomes O(N^alpha d). Which L events survive is
``model.stochastic_length.sampling``: "recency" (sampling without replacement with weight 1/r for the
r-th most recent event: our reading of the paper's recency-weighted sampling, whose
exact weights are UNCONFIRMED), "uniform", or "recent" (the L most recent). Kept events
are compacted to the left and the rest zeroed, so the result obeys the batch layout.

This runs inside the jitted step on the key passed to ``apply``; shapes stay static
(the kernels skip the padded tail), so it needs no host round trip.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import jax
import jax.numpy as jnp

from gesr_jax.data.batch import lengths_mask


def kept_length(history_capacity: int, alpha: float) -> int:
    """L = floor(N^(alpha/2)), at least 1."""
    return max(1, int(math.floor(history_capacity ** (alpha / 2.0) + 1e-9)))


def stochastic_length(
    batch: Mapping[str, jax.Array], key: jax.Array, *, alpha: float, sampling: str = "recency"
) -> dict[str, jax.Array]:
    """A copy of a request (or batch) whose history arrays and history_len are subsampled per request.

    ``batch`` is the request part of a batch (``data.batch.split_batch``): its [B, N] arrays are exactly
    the history arrays, which move together; per-request arrays are kept.
    """
    if sampling not in ("recency", "uniform", "recent"):
        raise ValueError(f"model.stochastic_length.sampling must be 'recency', 'uniform' or 'recent', got {sampling!r}")
    out = dict(batch)
    b, n_cap = batch["history_item"].shape
    keep = kept_length(n_cap, alpha)
    if keep >= n_cap:
        return out
    n = batch["history_len"].astype(jnp.int32)
    k_full, k_pick = jax.random.split(key)
    p_full = (n_cap**alpha) / jnp.maximum(n, 1).astype(jnp.float32) ** 2
    subsample = (n > keep) & (jax.random.uniform(k_full, (b,)) >= p_full)

    pos = jnp.arange(n_cap)[None, :]
    valid = lengths_mask(n, n_cap)
    recency_rank = n[:, None] - pos  # 1 = most recent
    if sampling == "recent":
        scores = -recency_rank.astype(jnp.float32)
    else:
        scores = jax.random.gumbel(k_pick, (b, n_cap))
        if sampling == "recency":
            scores = scores - jnp.log(jnp.maximum(recency_rank, 1).astype(jnp.float32))
    scores = jnp.where(valid, scores, -jnp.inf)
    # Top-L by score (Gumbel top-k = weighted sampling without replacement).
    rank = jnp.argsort(jnp.argsort(-scores, axis=1), axis=1)
    kept = jnp.where(subsample[:, None], valid & (rank < keep), valid)

    # Stable compaction: kept slots first, in their original (chronological) order.
    order = jnp.argsort(jnp.where(kept, pos, n_cap + pos), axis=1)
    new_len = jnp.where(subsample, keep, n).astype(batch["history_len"].dtype)
    new_valid = lengths_mask(new_len, n_cap)
    for name, value in batch.items():
        if jnp.ndim(value) == 2:
            moved = jnp.take_along_axis(value, order, axis=1)
            out[name] = jnp.where(new_valid, moved, jnp.zeros_like(moved))
    out["history_len"] = new_len
    return out

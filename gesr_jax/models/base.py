"""The request/candidate boundary every model implements.

A ranking request is scored in two stages:

* ``encode_request(request) -> state``: everything that depends on the request alone (user features and
  history), run once per request. ``state`` is a pytree of arrays with leading dim B (a
  :class:`RequestState`), e.g. the user-tower output, cached attention keys/values of the history.
* ``score(state, candidates) -> {task: logits [B, C]}``: the per-candidate work, run on any chunk of the
  request's candidates; chunks are independent, so scoring C candidates in chunks of any size gives the
  same logits as one call.

``__call__(batch)`` is their composition, by construction: training, evaluation and serving run the same
code. The request and candidate parts of a flat batch are the groups ``gesr_jax.data.batch.batch_groups``
declares; a model never picks keys by prefix.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
from flax import nnx

from gesr_jax.data.batch import BatchSchema, split_batch

Batch = Mapping[str, jax.Array]
RequestState = Any  # a pytree of [B, ...] arrays; each model documents its own


class RankingModel(nnx.Module):
    """Base class: subclasses set ``self.schema`` and implement :meth:`encode_request` and :meth:`score`."""

    schema: BatchSchema

    def encode_request(self, request: Batch, *, key: jax.Array | None = None, train: bool = False) -> RequestState:
        """Once-per-request work on the request part of a batch (user and history keys)."""
        raise NotImplementedError(f"{type(self).__name__} does not implement encode_request")

    def score(
        self,
        state: RequestState,
        candidates: Batch,
        *,
        key: jax.Array | None = None,
        train: bool = False,
        item_cache: jax.Array | None = None,
    ) -> dict[str, jax.Array]:
        """Logits ``{task: [B, C]}`` for a chunk of candidates (0 at padded candidate slots)."""
        raise NotImplementedError(f"{type(self).__name__} does not implement score")

    def item_cache_fields(self) -> tuple[str, ...]:
        """Item fields (``item`` and item features) that :meth:`item_cache` reads (optional)."""
        raise NotImplementedError(f"{type(self).__name__} has no item cache")

    def item_cache(self, item_fields: Mapping[str, jax.Array]) -> jax.Array:
        """Per-item table that :meth:`score` can look candidates up in instead of recomputing (optional)."""
        raise NotImplementedError(f"{type(self).__name__} has no item cache")

    def user_embedding(self, state: RequestState) -> jax.Array:
        """User vector [B, Dt] whose dot product with item-cache rows ranks the catalogue (optional)."""
        raise NotImplementedError(f"{type(self).__name__} has no user embedding for retrieval")

    def item_embedding_for_retrieval(self, item_cache: jax.Array) -> jax.Array:
        """Item-cache rows as they enter the retrieval dot product (default: unchanged)."""
        return item_cache

    def __call__(
        self,
        batch: Batch,
        *,
        key: jax.Array | None = None,
        train: bool = False,
        item_cache: jax.Array | None = None,
    ) -> dict[str, jax.Array]:
        """``score(encode_request(request part), candidate part)``: logits per task, [B, C] each."""
        request, candidates = split_batch(batch, self.schema)
        state = self.encode_request(request, key=key, train=train)
        return self.score(state, candidates, key=key, train=train, item_cache=item_cache)

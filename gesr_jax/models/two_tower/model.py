"""The two-tower model (``model.kind = "two_tower"``): user tower once per request, item tower per item.

``encode_request`` runs the user tower (RO); ``score`` runs the item tower, or looks candidates up in a
cached item-tower table, and the interaction. It builds exactly the modules GESR builds with every MoA
switch off, in the same order, so the two produce identical logits from one seed (tested).
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from gesr_jax.data.batch import BatchSchema, lengths_mask
from gesr_jax.layers.core import fold, named_rngs
from gesr_jax.models.base import Batch, RankingModel
from gesr_jax.models.two_tower.config import TwoTowerConfig
from gesr_jax.models.two_tower.towers import TwoTower

class TwoTowerModel(RankingModel):
    """u = UserTower(request), i = ItemTower(candidate), logits = Interaction(u, i)."""

    def __init__(self, config: TwoTowerConfig, schema: BatchSchema, *, rngs: nnx.Rngs):
        config.validate_for_build()
        self.config, self.schema = config, schema
        # Named like GESR's towers, so both models start from the same values and draw the same dropout.
        self.towers = TwoTower(config, schema, 0, len(schema.tasks), rngs=named_rngs(rngs.params(), "towers"))

    def encode_request(self, request: Batch, *, key: jax.Array | None = None, train: bool = False) -> dict:
        """{"user": [B, Dt]} the user-tower output."""
        key = key if train else None
        return {"user": self.towers.user_embedding(request, key=fold(key, "towers/user"))}

    def score(self, state, candidates: Batch, *, key=None, train=False, item_cache=None) -> dict[str, jax.Array]:
        key = key if train else None
        i = self.towers.candidate_embedding(candidates, item_cache=item_cache, key=fold(key, "towers/item"))
        logits = self.towers.interaction(state["user"], i, [], key=fold(key, "towers/interaction"))
        c = candidates["cand_item"].shape[1]
        valid = lengths_mask(candidates["num_candidates"], c)
        logits = jnp.where(valid[..., None], logits, 0.0)
        return {task: logits[..., t] for t, task in enumerate(self.schema.tasks)}

    def item_cache_fields(self) -> tuple[str, ...]:
        return self.towers.item.fields

    def item_cache(self, item_fields: Mapping[str, jax.Array]) -> jax.Array:
        return self.towers.item_cache(item_fields)

    def user_embedding(self, state) -> jax.Array:
        """The (normalised) user vector a retrieval stage dots with the item cache, [B, Dt]."""
        return self.towers.interaction.normalised(state["user"])

    def item_embedding_for_retrieval(self, item_cache: jax.Array) -> jax.Array:
        hashed = self.schema.hash_buckets  # the cache's last rows; retrieval ranks the items, not those rows
        return self.towers.interaction.normalised(item_cache[: item_cache.shape[0] - hashed])

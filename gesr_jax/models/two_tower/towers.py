"""The two-tower baseline: GESR's primary path and the paper's "Vanilla Two Tower Model".

User tower (RO, once per request): user id, user features and the mean of the user's
history token embeddings -> MLP -> u [B, Dt]. Item tower (NRO, a function of the item
alone, so it can be computed once per item and cached): item id and item features ->
MLP -> i [..., Dt]. The towers meet only in :class:`Interaction`.

The interaction form is UNCONFIRMED (spec §1.3); we use
``main_t = a_t * <u, i> + b_t + MLP_t([u * i, hma, unified_item])`` with u and i L2-normalised and
rescaled to ``model.tower_norm_scale`` (0 keeps the raw outputs): the scaled dot
product of classic two-tower models plus a small MLP on the element-wise product, into
which the MoA's main-path outputs (HMA and the unified item embedding, spec §1.9) are
concatenated when those modules are on.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from gesr_jax.config import ConfigError
from gesr_jax.data.batch import BatchSchema, lengths_mask
from gesr_jax.layers.core import MLP, Embed, FieldTables, make_param, masked_mean, named_rngs
from gesr_jax.models.two_tower.config import TwoTowerConfig

Batch = Mapping[str, jax.Array]


def item_field_names(schema: BatchSchema) -> tuple[str, ...]:
    """Fields a history or candidate slot can carry: the item id and every item feature."""
    return ("item", *schema.item_feature_names)


class UserTower(nnx.Module):
    """u = MLP([E(user_id), E(user features)..., mean of history tokens]) -> [B, Dt]."""

    def __init__(self, config: TwoTowerConfig, schema: BatchSchema, tables: FieldTables, *, rngs: nnx.Rngs):
        d = config.embed_dim
        self.user_id = Embed(schema.num_users + 1, d, rngs=rngs) if config.use_user_id else None
        self.features = nnx.Dict({name: Embed(vocab, d, rngs=rngs) for name, vocab in schema.user_features})
        self.history_fields = tables.fields if config.tower_history_pool else ()
        parts = (self.user_id is not None) + len(self.features) + bool(self.history_fields)
        if parts == 0:
            raise ConfigError(
                "the user tower has no input: this dataset has no user features and both model.use_user_id and "
                "model.tower_history_pool are false"
            )
        self.mlp = MLP(parts * d, config.tower_mlp, rngs=rngs, out_name="embed", dropout_rate=config.dropout)

    def __call__(self, batch: Batch, tables: FieldTables, *, key: jax.Array | None = None) -> jax.Array:
        parts = []
        if self.user_id is not None:
            parts.append(self.user_id(batch["user_id"]))
        parts += [self.features[name](batch[f"user_{name}"]) for name in self.feature_names()]
        if self.history_fields:
            tokens = tables.sum(batch, self.history_fields, "history_")
            n = tokens.shape[1]
            valid = lengths_mask(batch["history_len"], n)
            parts.append(masked_mean(tokens, valid, axis=1))
        return self.mlp(jnp.concatenate(parts, axis=-1), key=key)

    def feature_names(self) -> list[str]:
        """User feature names in sorted order: the order of ``self.features`` after ``nnx.split`` / ``nnx.merge``
        (which sort dict keys), so a freshly built tower and a restored one concatenate the same way."""
        return sorted(self.features)

    def profile_fields(self) -> tuple[str, ...]:
        """Batch keys of the user profile embeddings (user id and user features)."""
        keys = ("user_id",) if self.user_id is not None else ()
        return keys + tuple(f"user_{name}" for name in self.feature_names())

    def profile(self, batch: Batch) -> jax.Array:
        """Sum-pooled user profile embeddings [B, D]: the RO cross attention's profile query."""
        parts = [self.user_id(batch["user_id"])] if self.user_id is not None else []
        parts += [self.features[name](batch[f"user_{name}"]) for name in self.feature_names()]
        return sum(parts)

    def needed_keys(self) -> tuple[str, ...]:
        keys = ["user_id"] if self.user_id is not None else []
        keys += [f"user_{name}" for name in self.feature_names()]
        keys += [f"history_{f}" for f in self.history_fields]
        return tuple(keys)


class ItemTower(nnx.Module):
    """i = MLP([E(item), E(item features)...]): depends on the item alone, hence cacheable per item id."""

    def __init__(self, config: TwoTowerConfig, schema: BatchSchema, *, rngs: nnx.Rngs):
        self.fields = item_field_names(schema)
        self.mlp = MLP(
            len(self.fields) * config.embed_dim, config.tower_mlp, rngs=rngs, out_name="embed",
            dropout_rate=config.dropout,
        )

    def __call__(
        self, fields: Mapping[str, jax.Array], tables: FieldTables, *, key: jax.Array | None = None
    ) -> jax.Array:
        """``fields[name]`` are id arrays of one shape (e.g. [B, C] or [num_items + 1]); returns [..., Dt]."""
        missing = [f for f in self.fields if f not in fields]
        if missing:
            raise ValueError(f"item tower needs fields {list(self.fields)}; missing {missing}")
        x = jnp.concatenate([tables.tables[f](fields[f]) for f in self.fields], axis=-1)
        return self.mlp(x, key=key)


class Interaction(nnx.Module):
    """Main logits [B, C, T] from u [B, Dt], i [B, C, Dt] and optional main-path MoA outputs [B, C, *]."""

    def __init__(self, config: TwoTowerConfig, extra_dim: int, num_tasks: int, *, rngs: nnx.Rngs):
        dt = config.tower_mlp[-1]
        self.dot_scale = make_param(rngs, nnx.initializers.ones, (num_tasks,), (None,))
        self.dot_bias = make_param(rngs, nnx.initializers.zeros, (num_tasks,), (None,))
        self.mlp = MLP(dt + extra_dim, (*config.interaction_mlp, num_tasks), rngs=rngs, dropout_rate=config.dropout)
        self.norm_scale = config.tower_norm_scale

    def normalised(self, x: jax.Array) -> jax.Array:
        """A tower output as it enters the dot product (rescaled to ``norm_scale`` when that is > 0)."""
        return _rescaled_unit(x, self.norm_scale) if self.norm_scale > 0 else x

    def __call__(
        self, u: jax.Array, i: jax.Array, extras: list[jax.Array], *, key: jax.Array | None = None
    ) -> jax.Array:
        u, i = self.normalised(u), self.normalised(i)
        u = u[:, None, :]  # broadcast the RO user embedding over candidates, never copied
        dot = jnp.sum(u * i, axis=-1, keepdims=True)
        x = jnp.concatenate([u * i, *extras], axis=-1)
        return dot * self.dot_scale[...] + self.dot_bias[...] + self.mlp(x, key=key)


def _rescaled_unit(x: jax.Array, scale: float) -> jax.Array:
    # The epsilon keeps the gradient finite for an all-zero tower output (e.g. an empty padding row).
    return x * (scale * jax.lax.rsqrt(jnp.sum(jnp.square(x), axis=-1, keepdims=True) + 1e-12))


class TwoTower(nnx.Module):
    """Towers, their item-field tables (shared between the item tower and the user's history pool) and interaction."""

    def __init__(
        self, config: TwoTowerConfig, schema: BatchSchema, extra_dim: int, num_tasks: int, *, rngs: nnx.Rngs
    ):
        fields = item_field_names(schema) + (("action",) if config.tower_history_pool else ())
        base = rngs.params()  # each part's initial values come from its name (layers/core.named_rngs)
        vocabs = {f: schema.item_vocab(f) for f in fields}
        hashed = {f: schema.item_hash_buckets(f) for f in fields}
        self.tables = FieldTables(vocabs, config.embed_dim, rngs=named_rngs(base, "tables"), hash_buckets=hashed)
        self.user = UserTower(config, schema, self.tables, rngs=named_rngs(base, "user"))
        self.item = ItemTower(config, schema, rngs=named_rngs(base, "item"))
        self.interaction = Interaction(config, extra_dim, num_tasks, rngs=named_rngs(base, "interaction"))

    def user_embedding(self, batch: Batch, *, key: jax.Array | None = None) -> jax.Array:
        return self.user(batch, self.tables, key=key)

    def item_embedding(self, fields: Mapping[str, jax.Array], *, key: jax.Array | None = None) -> jax.Array:
        return self.item(fields, self.tables, key=key)

    def item_cache(self, item_fields: Mapping[str, jax.Array]) -> jax.Array:
        """Item-tower outputs [V, Dt] for ``item_fields`` ([V] ids per field, row r = item r), plus one row per
        hashed row of the item table (``data.hash_buckets``): an item past the vocabulary has no item
        features, so those rows are computed with features 0, as the uncached path sees such an item."""
        item = self.tables.tables["item"]
        if item.hash_buckets == 0:
            return self.item_embedding(item_fields)
        if "item" in item_fields and len(item_fields["item"]) != item.vocab:
            raise ValueError(f"item_cache: with hashed rows, item_fields['item'] must be the {item.vocab} ids "
                             f"of the vocabulary, got {len(item_fields['item'])}")  # fmt: skip
        extra = {f: jnp.zeros((item.hash_buckets,), jnp.int32) for f in item_fields}
        extra["item"] = jnp.arange(item.vocab, item.vocab + item.hash_buckets, dtype=jnp.int32)
        fields = {f: jnp.concatenate([jnp.asarray(item_fields[f], jnp.int32), extra[f]]) for f in item_fields}
        return self.item_embedding(fields)

    def candidate_fields(self, batch: Batch) -> dict[str, jax.Array]:
        """The item tower's inputs for the batch's candidates, keyed by field name."""
        return {f: batch[f"cand_{f}"] for f in self.item.fields}

    def candidate_embedding(
        self, candidates: Batch, *, item_cache: jax.Array | None = None, key: jax.Array | None = None
    ) -> jax.Array:
        """Item-tower outputs of the candidates [B, C, Dt], looked up in ``item_cache`` when given."""
        if item_cache is not None:
            rows = self.tables.tables["item"].rows(candidates["cand_item"])  # ids past the vocabulary hashed
            return jnp.take(item_cache, rows, axis=0, mode="clip")
        return self.item_embedding(self.candidate_fields(candidates), key=key)

    def needed_keys(self) -> tuple[str, ...]:
        return (*self.user.needed_keys(), *(f"cand_{f}" for f in self.item.fields))

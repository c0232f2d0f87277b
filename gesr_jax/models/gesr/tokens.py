"""Batch reading and the MoA token embeddings (the paper's "RO/NRO Shared Embedding Table").

A history token is the sum of its fields' embeddings (``model.history_fields``), plus a
position embedding (counted back from the most recent event, so padding never shifts it)
and a time embedding (bucketised log of request_time - event_time). A candidate token
sums ``model.candidate_fields`` embeddings from the same tables, a learnable "mask
action" embedding when history tokens carry the action (GenRank's candidate token), one
shared candidate position and time bucket 0. Field fusion by summation is the spec's
proposal (§1.4, UNCONFIRMED).
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from gesr_jax.config import ConfigError
from gesr_jax.data.batch import BatchSchema, lengths_mask
from gesr_jax.layers.core import Embed, FieldTables, embed_init, make_param
from gesr_jax.models.gesr.config import GESRConfig
from gesr_jax.models.two_tower.towers import item_field_names

Batch = Mapping[str, jax.Array]


def check_fields(config: GESRConfig, schema: BatchSchema) -> None:
    """Raise ``ConfigError`` naming the config key when it names a field this dataset does not have."""
    items = item_field_names(schema)
    available_hist = (*items, "action")

    def check(key: str, names: tuple[str, ...], available: tuple[str, ...]) -> None:
        for name in names:
            if name not in available:
                raise ConfigError(
                    f"model.{key} names {name!r}, which this dataset does not have; available: {list(available)}"
                )

    if config.uses_tokens:
        check("history_fields", config.history_fields, available_hist)
        check("candidate_fields", config.candidate_fields, items)
    if config.cross.nro:
        check("cross.nro_query_fields" if config.cross.nro_query_fields else "candidate_fields", config.query_fields, items)
    if config.hma.enabled:
        for hist, cand in config.hma.pairs:
            check("hma.pairs", (hist,), items)
            check("hma.pairs", (cand,), items)


def history_key(field: str) -> str:
    return f"history_{field}"


def candidate_key(field: str) -> str:
    return f"cand_{field}"


class TokenEmbedder(nnx.Module):
    """History and candidate tokens for HSTU and cross attention (all parameters are MoA parameters)."""

    def __init__(self, config: GESRConfig, schema: BatchSchema, *, rngs: nnx.Rngs):
        d = config.embed_dim
        self.history_fields = tuple(config.history_fields)
        self.candidate_fields = tuple(config.candidate_fields)
        self.query_fields = tuple(config.query_fields) if config.cross.nro else ()
        fields = dict.fromkeys((*self.history_fields, *self.candidate_fields, *self.query_fields))
        self.tables = FieldTables({f: schema.item_vocab(f) for f in fields}, d, rngs=rngs,
                                  hash_buckets={f: schema.item_hash_buckets(f) for f in fields})  # fmt: skip
        uses_action = "action" in self.history_fields
        self.mask_action = make_param(rngs, embed_init, (d,), ("embed",)) if uses_action else None
        # Position 0 is the shared candidate position; history positions are 1..N (1 = most recent).
        self.max_position = schema.history_len
        context = config.context
        self.position = Embed(schema.history_len + 1, d, rngs=rngs) if context.position else None
        self.time = Embed(context.num_time_buckets, d, rngs=rngs) if context.time else None
        self.num_time_buckets = context.num_time_buckets
        self.time_bucket_width = context.time_bucket_width

    def history(self, batch: Batch) -> jax.Array:
        """History tokens [B, N, D]; padded slots are zero."""
        x = self.tables.sum(batch, self.history_fields, "history_")
        n = x.shape[1]
        valid = lengths_mask(batch["history_len"], n)
        if self.position is not None:
            # Most recent event = 1; a position beyond the table (longer than the schema's N) shares the last row.
            pos = batch["history_len"][:, None] - jnp.arange(n)[None, :]
            x = x + self.position(jnp.clip(pos, 1, self.max_position))
        if self.time is not None:
            dt = (batch["request_time"][:, None] - batch["history_time"]).astype(jnp.float32)
            x = x + self.time(self._time_bucket(dt))
        return jnp.where(valid[..., None], x, 0.0)

    def _time_bucket(self, dt: jax.Array) -> jax.Array:
        raw = jnp.floor(jnp.log(jnp.maximum(dt, 1.0)) / self.time_bucket_width).astype(jnp.int32)
        return jnp.clip(1 + raw, 1, self.num_time_buckets - 1)

    def candidates(self, batch: Batch, unified: jax.Array | None = None) -> jax.Array:
        """Candidate tokens [B, C, D] (mask action, shared candidate position, time bucket 0); padding is zero.

        ``unified`` is :meth:`unified_item`'s output when the caller already has it.
        """
        x = self.unified_item(batch) if unified is None else unified
        if self.mask_action is not None:
            x = x + self.mask_action[...]
        if self.position is not None:
            x = x + self.position.table[...][0]
        if self.time is not None:
            x = x + self.time.table[...][0]
        valid = lengths_mask(batch["num_candidates"], x.shape[1])
        return jnp.where(valid[..., None], x, 0.0)

    def unified_item(self, batch: Batch) -> jax.Array:
        """The "Unified Learned Item Embeddings" [B, C, D]: candidate fields summed from the shared tables."""
        return self.tables.sum(batch, self.candidate_fields, "cand_")

    def query(self, batch: Batch, unified: jax.Array | None = None) -> jax.Array:
        """Sum-pooled NRO query features [B, C, D] ("Query Sum Pooling" of the NRO query selector).

        With the default query fields (the candidate fields) this is :meth:`unified_item`, reused when given.
        """
        if unified is not None and self.query_fields == self.candidate_fields:
            return unified
        return self.tables.sum(batch, self.query_fields, "cand_")

    def needed_keys(self) -> tuple[str, ...]:
        keys = [history_key(f) for f in self.history_fields]
        keys += [candidate_key(f) for f in (*self.candidate_fields, *self.query_fields)]
        if self.time is not None:
            keys += ["history_time", "request_time"]
        return tuple(dict.fromkeys(keys))

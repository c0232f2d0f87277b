"""Test fixtures for the trainer: a tiny linear scorer with the model-API contract, and synthetic splits.

The scorer is only a fixture (fast to compile); the real model is ``gesr_jax.api``.
"""

from __future__ import annotations

import dataclasses
import types
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gesr_jax.config import Config
from gesr_jax.data import batch as batch_lib
from gesr_jax.data.config import DataConfig
from gesr_jax.train.config import TrainConfig

SCHEMA = batch_lib.BatchSchema(
    num_users=400, num_items=60, user_features=(("segment", 4),), item_features=(("category", 6),), num_actions=3,
    history_len=4, num_candidates=5, has_true_probs=True,
)


def _param(init: Any, key: jax.Array, shape: tuple[int, ...], names: tuple[str, ...]) -> nnx.Param:
    return nnx.Param(init(key, shape, jnp.float32), out_sharding=names, eager_sharding=False)


class LinearScorer(nnx.Module):
    """logit[b, c, t] = <user_emb * item_emb + item_emb, w_t> + b_t; rows with user_id >= poison_user give NaN."""

    def __init__(self, schema: batch_lib.BatchSchema, dim: int, seed: int, poison_user: int | None):
        k = jax.random.split(jax.random.key(seed), 3)
        normal = jax.nn.initializers.normal(0.3)
        self.user = _param(normal, k[0], (schema.num_users + 1, dim), ("vocab", "embed"))
        self.item = _param(normal, k[1], (schema.num_items + 1, dim), ("vocab", "embed"))
        self.w = _param(normal, k[2], (dim, len(schema.tasks)), ("embed", "heads"))
        self.b = _param(jax.nn.initializers.zeros, k[2], (len(schema.tasks),), ("heads",))
        self.tasks = schema.tasks
        self.poison_user = poison_user

    def __call__(self, batch: dict[str, jax.Array], key: jax.Array | None, train: bool) -> dict[str, jax.Array]:
        u = self.user[...][batch["user_id"]]
        i = self.item[...][batch["cand_item"]]
        h = u[:, None, :] * i + i
        if train and key is not None:  # exercise the key argument the way dropout would
            h = h * (1.0 + 0.0 * jax.random.uniform(key, h.shape))
        logits = h @ self.w[...] + self.b[...]
        if self.poison_user is not None:
            bad = (batch["user_id"] >= self.poison_user)[:, None, None]
            logits = jnp.where(bad, jnp.nan, logits)
        return {t: logits[..., j] for j, t in enumerate(self.tasks)}


def linear_api(schema: batch_lib.BatchSchema = SCHEMA, dim: int = 8, poison_user: int | None = None):
    """A model API (``init``/``apply``/``item_cache``/``retrieval_scores``) around :class:`LinearScorer`.

    ``init`` builds the scorer for the schema it is given (the trainer passes the data's), else ``schema``.
    ``retrieval_scores`` is exactly the first task's logit of every catalogue item.
    """

    default_schema = schema

    def init(config: Config, seed: int, schema: batch_lib.BatchSchema | None = None) -> tuple[Any, Any]:
        return nnx.split(LinearScorer(schema or default_schema, dim, seed, poison_user))

    def apply(graphdef: Any, params: Any, batch: Any, *, key: jax.Array | None = None, train: bool = False):
        return nnx.merge(graphdef, params)(batch, key, train)

    def item_cache(graphdef: Any, params: Any, item_fields: Any) -> jax.Array:
        return nnx.merge(graphdef, params).item[...]  # [V, dim]

    def retrieval_scores(graphdef: Any, params: Any, request: Any, cache: jax.Array) -> jax.Array:
        model = nnx.merge(graphdef, params)
        u = model.user[...][request["user_id"]]  # logit_0 = <(u + 1) * item, w_0> + b_0
        return ((u + 1.0) * model.w[...][:, 0]) @ cache.T + model.b[...][0]

    return types.SimpleNamespace(
        init=init, apply=apply, item_cache=item_cache, retrieval_scores=retrieval_scores,
        api_name="train_fixtures:linear_api",
    )  # fmt: skip


@dataclasses.dataclass(frozen=True)
class FakeSplits:
    train: dict[str, np.ndarray]
    valid: dict[str, np.ndarray]
    test: dict[str, np.ndarray]
    schema: batch_lib.BatchSchema
    stats: dict[str, Any]
    item_table: dict[str, np.ndarray] | None = None


def make_splits(n_train: int = 96, n_eval: int = 37, schema: batch_lib.BatchSchema = SCHEMA) -> FakeSplits:
    """Random valid splits; labels follow a fixed item effect so a model can learn something."""
    parts = []
    for n, seed in ((n_train, 0), (n_eval, 1), (n_eval, 2)):
        arrays = batch_lib.random_batch(schema, n, seed=seed)
        arrays["user_id"] = (np.arange(n) % (schema.num_users // 2) + 1).astype(np.int32)
        valid = arrays["cand_item"] > 0
        rng = np.random.default_rng(seed + 10)
        for t, task in enumerate(schema.tasks):
            p = 1.0 / (1.0 + np.exp(-(np.sin(arrays["cand_item"] * (t + 1.0)) * 2.0)))
            arrays[f"prob_{task}"] = np.where(valid, p, 0).astype(np.float32)
            arrays[f"label_{task}"] = np.where(valid, rng.uniform(size=p.shape) < p, 0).astype(np.float32)
        parts.append(arrays)
    table = {name: (np.arange(schema.num_items + 1) % vocab).astype(np.int32) for name, vocab in schema.item_features}
    return FakeSplits(*parts, schema=schema, stats={"requests": n_train}, item_table=table)


def tiny_config(**train: Any) -> Config:
    """The fixture run: 12 steps of batch 16, log every 3, valid every 6, checkpoint every 4."""
    defaults = dict(batch_size=16, eval_batch_size=16, num_steps=12, learning_rate=0.05, warmup_steps=2,
                    log_every=3, eval_every=6, checkpoint_every=4, max_checkpoints=10)
    return Config(name="fixture", data=DataConfig(history_len=4, num_positives=2, num_negatives=3),
                  train=TrainConfig(**{**defaults, **train}))

"""Tiny models, item tables and batches consistent with them, shared by the serving tests."""

from __future__ import annotations

import dataclasses

import numpy as np
from flax import nnx

from gesr_jax.data.batch import BatchSchema, random_batch
from gesr_jax.models.config_sections import CrossSection, HMASection, HSTUSection, MLPGSection
from gesr_jax.models.gesr.config import GESRConfig
from gesr_jax.models.gesr.model import GESR
from gesr_jax.models.two_tower.config import TwoTowerConfig
from gesr_jax.models.two_tower.model import TwoTowerModel

SCHEMA = BatchSchema(
    num_users=20, num_items=30, user_features=(("segment", 4),), item_features=(("category", 5), ("creator", 6)),
    num_actions=3, history_len=6, num_candidates=40,
)  # fmt: skip

TINY = GESRConfig(
    embed_dim=8, use_user_id=True, tower_mlp=(16, 8), interaction_mlp=(8,),
    hma=HMASection(max_count=3, dim=4, mlp=(8,)), hstu=HSTUSection(layers=2, heads=2, qk_dim=4, v_dim=4, normalizer=8.0),
    cross=CrossSection(num_seeds=2, heads=2, head_dim=4), mlpg=MLPGSection(hidden=8),
)  # fmt: skip


def item_table(schema: BatchSchema = SCHEMA, seed: int = 0) -> dict[str, np.ndarray]:
    """Each item feature's id per item ([num_items + 1], row 0 = padding)."""
    rng = np.random.default_rng(seed)
    table = {n: rng.integers(1, v, size=schema.num_items + 1).astype(np.int32) for n, v in schema.item_features}
    return {n: np.where(np.arange(schema.num_items + 1) == 0, 0, t).astype(np.int32) for n, t in table.items()}


def consistent_batch(schema: BatchSchema, table: dict, batch_size: int, seed: int) -> dict[str, np.ndarray]:
    """A random batch whose history/candidate item features are the table's (what a real log holds)."""
    batch = random_batch(schema, batch_size, seed)
    for name in schema.item_feature_names:
        batch[f"history_{name}"] = table[name][batch["history_item"]]
        batch[f"cand_{name}"] = table[name][batch["cand_item"]]
    return batch


def gesr(schema: BatchSchema = SCHEMA, seed: int = 0, **overrides) -> tuple:
    return nnx.split(GESR(dataclasses.replace(TINY, **overrides), schema, rngs=nnx.Rngs(params=seed)))


def two_tower(schema: BatchSchema = SCHEMA, seed: int = 0) -> tuple:
    fields = {f: getattr(TINY, f) for f in TwoTowerConfig.__dataclass_fields__ if f != "kind"}
    return nnx.split(TwoTowerModel(TwoTowerConfig(**fields), schema, rngs=nnx.Rngs(params=seed)))

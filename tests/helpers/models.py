"""Tiny shapes shared by the model and layer tests: embed 8, N 6, C 4, B 3."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from flax import nnx

from gesr_jax import config as config_lib
from gesr_jax.data.batch import BatchSchema, random_batch
from gesr_jax.models.config_sections import CrossSection, HMASection, HSTUSection, MLPGSection
from gesr_jax.models.gesr.config import GESRConfig as ModelConfig
from gesr_jax.models.gesr.model import GESR

SCHEMA = BatchSchema(
    num_users=20,
    num_items=30,
    user_features=(("segment", 4),),
    item_features=(("category", 5), ("creator", 6)),
    num_actions=3,
    history_len=6,
    num_candidates=4,
)

TINY = ModelConfig(
    embed_dim=8,
    use_user_id=True,  # the default is off; the tests cover the id table too
    tower_mlp=(16, 8),
    interaction_mlp=(8,),
    hma=HMASection(max_count=3, dim=4, mlp=(8,)),
    hstu=HSTUSection(layers=2, heads=2, qk_dim=4, v_dim=4, normalizer=8.0),
    cross=CrossSection(num_seeds=2, heads=2, head_dim=4),
    mlpg=MLPGSection(hidden=8),
)


def tiny_config(**overrides) -> ModelConfig:
    """TINY with ``overrides``; a dict updates a section, e.g. ``tiny_config(hma={"enabled": False})``."""
    return config_lib.replace(TINY, **overrides)


def make_model(config: ModelConfig = TINY, schema: BatchSchema = SCHEMA, seed: int = 0) -> GESR:
    return GESR(config, schema, rngs=nnx.Rngs(params=seed))


def batch_for(schema: BatchSchema = SCHEMA, batch_size: int = 3, seed: int = 0) -> dict[str, np.ndarray]:
    return random_batch(schema, batch_size, seed)


def jitted(model: GESR):
    """(params, batch) -> logits under jit, for a fixed graph."""
    graphdef, params = nnx.split(model)

    @jax.jit
    def run(p, b):
        return nnx.merge(graphdef, p)(b)

    return run, params


@pytest.fixture(scope="module")
def full_model() -> GESR:
    """Every component on."""
    return make_model()


def candidate_chunks(candidates: dict, size: int):
    """(start, chunk) pairs: the candidate part cut into chunks of ``size`` slots, each with its own num_candidates."""
    c = candidates["cand_item"].shape[1]
    for start in range(0, c, size):
        part = {k: v[:, start : start + size] for k, v in candidates.items() if v.ndim == 2}
        part["num_candidates"] = np.clip(candidates["num_candidates"] - start, 0, size).astype(np.int32)
        yield start, part

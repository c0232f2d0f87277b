"""gesr_jax.api: init / apply / example_batch / item_cache on the default schema, jit and overrides."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest
from flax import nnx

from gesr_jax import api
from gesr_jax.config import Config, apply_overrides
from gesr_jax.data.batch import validate_batch
from gesr_jax.data.config import DataConfig
from gesr_jax.models.config_sections import CrossSection, HMASection, HSTUSection, MLPGSection
from gesr_jax.models.gesr.config import GESRConfig as ModelConfig

SMALL_MODEL = ModelConfig(
    embed_dim=8, tower_mlp=(16, 8), interaction_mlp=(8,), hma=HMASection(dim=4, mlp=(8,)),
    hstu=HSTUSection(qk_dim=4, v_dim=4, normalizer=16.0), cross=CrossSection(num_seeds=2, head_dim=4),
    mlpg=MLPGSection(hidden=8),
)


@pytest.fixture(scope="module")
def config() -> Config:
    data = DataConfig(history_len=6, num_positives=2, num_negatives=2)
    return Config(name="api_test", data=data, model=SMALL_MODEL)


@pytest.fixture(scope="module")
def initialised(config):
    return api.init(config, seed=0)


def test_example_batch_is_valid_for_the_default_schema(config):
    from gesr_jax.data.datasets import schema_for

    schema = schema_for(config.data)
    batch = api.example_batch(config, seed=1, batch_size=3)
    validate_batch(batch, schema)
    assert batch["history_item"].shape == (3, 6) and batch["cand_item"].shape == (3, 4)


def test_init_apply_under_jit(config, initialised):
    graphdef, params = initialised
    batch = api.example_batch(config, seed=2, batch_size=3)
    run = jax.jit(api.apply, static_argnums=0)
    out = run(graphdef, params, batch)
    assert set(out) == set(api._schema(config, None).tasks)
    for logits in out.values():
        assert logits.shape == (3, 4) and np.all(np.isfinite(np.asarray(logits)))
    assert api.num_params(params) > 0
    # Same seed, same parameters; a different seed, different ones.
    again = api.init(config, seed=0)[1]
    other = api.init(config, seed=1)[1]
    leaves = jax.tree.leaves(params)
    assert all(np.array_equal(a, b) for a, b in zip(leaves, jax.tree.leaves(again)))
    assert not all(np.array_equal(a, b) for a, b in zip(leaves, jax.tree.leaves(other)))


def test_abstract_init_matches_init(config, initialised):
    _, params = initialised
    _, abstract = api.abstract_init(config)
    assert jax.tree.map(np.shape, abstract) == jax.tree.map(np.shape, params)
    assert jax.tree.structure(nnx.get_partition_spec(abstract)) == jax.tree.structure(nnx.get_partition_spec(params))


def test_item_cache_through_the_api(config, initialised):
    graphdef, params = initialised
    schema = api._schema(config, None)
    rng = np.random.default_rng(0)
    features = {
        name: rng.integers(1, vocab, schema.num_items + 1).astype(np.int32) for name, vocab in schema.item_features
    }
    batch = api.example_batch(config, seed=3, batch_size=3)
    valid = np.arange(4)[None] < batch["num_candidates"][:, None]
    for name in features:
        batch[f"cand_{name}"] = np.where(valid, features[name][batch["cand_item"]], 0).astype(np.int32)
    cache = api.item_cache(graphdef, params, features)
    assert cache.shape == (schema.num_items + 1, SMALL_MODEL.tower_mlp[-1])
    run = jax.jit(api.apply, static_argnums=0)
    with_cache = run(graphdef, params, batch, item_cache=cache)
    without = run(graphdef, params, batch)
    for task in without:
        np.testing.assert_allclose(with_cache[task], without[task], atol=1e-5)
    with pytest.raises(ValueError, match="item_fields lacks"):
        api.item_cache(graphdef, params, {})


def test_cli_ablation_switches_reach_the_model(config):
    two_tower = apply_overrides(
        config, ["model.hma.enabled=false", "model.hstu.enabled=false", "model.cross.ro=false",
                 "model.cross.nro=false", "model.mlpg.enabled=false"]
    )
    _, params = api.init(two_tower, seed=0)
    assert set(params.keys()) == {"towers"}
    assert two_tower.model == dataclasses.replace(config.model.moa_off())


def test_schema_mismatch_is_reported(config):
    ml = dataclasses.replace(config, model=dataclasses.replace(SMALL_MODEL, candidate_fields=("item", "genre")))
    with pytest.raises(ValueError, match=r"model.candidate_fields names 'genre'.*'category'"):
        api.init(ml, seed=0)

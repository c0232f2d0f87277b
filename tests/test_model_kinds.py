"""The model section as a tagged union (issue 9) and api.apply's input validation (issue 16)."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from gesr_jax import api
from gesr_jax import config as config_lib
from gesr_jax.config import ConfigError
from gesr_jax.models import registry
from gesr_jax.models.gesr.config import GESRConfig
from gesr_jax.models.two_tower.config import TwoTowerConfig


def test_builtin_kinds_are_registered_without_importing_jax_models():
    assert {"gesr", "two_tower"} <= set(registry.kinds())
    assert registry.config_class("gesr") is GESRConfig
    with pytest.raises(registry.UnknownModelKindError, match="known kinds"):
        registry.get("no_such_model")


def test_two_tower_presets_are_of_kind_two_tower():
    config = config_lib.load_config("synthetic_tiny_two_tower")
    assert type(config.model) is TwoTowerConfig and config.model.kind == "two_tower"
    gesr = config_lib.load_config("synthetic_tiny")
    shared = [f.name for f in dataclasses.fields(TwoTowerConfig) if f.name != "kind"]
    assert all(getattr(config.model, f) == getattr(gesr.model, f) for f in shared)


def test_set_kind_converts_the_section_and_from_dict_rebuilds_it():
    config = config_lib.load_config("synthetic_tiny", ["model.kind=two_tower", "model.embed_dim=12"])
    assert type(config.model) is TwoTowerConfig and config.model.embed_dim == 12
    back = config_lib.from_dict(config_lib.Config, json.loads(json.dumps(config_lib.to_dict(config))))
    assert back == config
    with pytest.raises(ConfigError, match="model.kind"):
        config_lib.load_config("synthetic_tiny", ["model.kind=nope"])
    with pytest.raises(ConfigError, match="use_hma"):  # a GESR field on a two-tower section is unknown
        config_lib.load_config("synthetic_tiny_two_tower", ["model.use_hma=false"])


def test_old_workdir_configs_without_kind_are_gesr():
    data = config_lib.to_dict(config_lib.load_config("synthetic_tiny"))
    del data["model"]["kind"]
    assert type(config_lib.from_dict(config_lib.Config, data).model) is GESRConfig


def test_overrides_are_validated_once_after_all_of_them():
    # Each order passes through a state that alone would be invalid (min_history > history_len).
    a = config_lib.load_config("synthetic_tiny", ["data.history_len=3", "data.min_history=2"])
    b = config_lib.load_config("synthetic_tiny", ["data.min_history=2", "data.history_len=3"])
    assert a == b
    with pytest.raises(ConfigError, match="data.min_history"):
        config_lib.load_config("synthetic_tiny", ["data.history_len=3", "data.min_history=5"])
    with pytest.raises(ConfigError, match="train.learning_rate.*finite"):
        config_lib.load_config("synthetic_tiny", ["train.learning_rate=inf"])


@pytest.fixture(scope="module")
def tiny():
    config = config_lib.load_config("synthetic_tiny_two_tower")
    graphdef, params = api.init(config, seed=0)
    return config, graphdef, params


@pytest.mark.parametrize(
    ("key", "row", "value", "message"),
    [
        ("cand_item", 1, 10_000, r"batch\['cand_item'\] row 1 holds 10000"),
        ("history_item", 2, -3, r"batch\['history_item'\] row 2 holds -3"),
        ("history_len", 0, 99, r"batch\['history_len'\] row 0 holds 99.*\[0, 16\]"),
        ("num_candidates", 3, 17, r"batch\['num_candidates'\] row 3 holds 17"),
    ],
)
def test_apply_rejects_bad_inputs_naming_key_and_row(tiny, key, row, value, message):
    config, graphdef, params = tiny
    batch = api.example_batch(config, seed=0, batch_size=4)
    batch[key] = batch[key].copy()
    batch[key].reshape(4, -1)[row, 0] = value
    with pytest.raises(ValueError, match=message):
        api.apply(graphdef, params, batch)


def test_apply_rejects_an_empty_batch_and_float_ids(tiny):
    config, graphdef, params = tiny
    batch = api.example_batch(config, seed=0, batch_size=2)
    with pytest.raises(ValueError, match="B >= 1"):
        api.apply(graphdef, params, {k: v[:0] for k, v in batch.items()})
    with pytest.raises(ValueError, match="cand_item.*integer"):
        api.apply(graphdef, params, {**batch, "cand_item": batch["cand_item"].astype(np.float32)})
    # validate=False skips the host check (what the jitted training step uses).
    api.apply(graphdef, params, {**batch, "cand_item": np.full_like(batch["cand_item"], 10_000)}, validate=False)


def test_a_model_without_towers_has_no_two_tower_preset():
    assert config_lib.load_config("synthetic_genrank").model.kind == "genrank"
    with pytest.raises(ConfigError, match="no _two_tower variant"):
        config_lib.load_config("synthetic_genrank_two_tower")


def test_a_kernel_backend_for_another_platform_is_an_error_naming_the_field():
    config = config_lib.load_config("synthetic_tiny", ["model.attention_impl=pallas_tpu"])
    with pytest.raises(ValueError, match=r"model.attention_impl='pallas_tpu' runs on \['tpu'\].*this process runs on cpu"):
        api.init(config, seed=0)

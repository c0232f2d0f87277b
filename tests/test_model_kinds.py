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
    with pytest.raises(ConfigError, match="'model.hma.enabled'"):  # a GESR section on a two-tower config is unknown
        config_lib.load_config("synthetic_tiny_two_tower", ["model.hma.enabled=false"])


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
    config = config_lib.load_config("synthetic_tiny", ["model.hstu.attention_impl=pallas_tpu"])
    with pytest.raises(ValueError, match=r"model.hstu.attention_impl='pallas_tpu' runs on \['tpu'\].*this process runs on cpu"):
        api.init(config, seed=0)


# The flat GESR model section that workdirs written before the typed sections hold (config.json).
FLAT_GESR = {
    "use_hma": True, "use_hstu": False, "target_aware": True, "use_ro_cross": True, "use_nro_cross": False,
    "use_mlpg": True, "nro_query_fields": [], "hma_pairs": [["item", "item"], ["creator", "creator"]],
    "hma_max_count": 5, "hma_dim": 8, "hma_mlp": [32], "hstu_layers": 1, "hstu_heads": 2, "hstu_qk_dim": 8,
    "hstu_v_dim": 8, "hstu_normalizer": 32.0, "hstu_alpha": None, "hstu_scoring": "cached", "attention_impl": None,
    "use_position_emb": True, "use_time_emb": False, "num_time_buckets": 64, "time_bucket_width": 0.301,
    "ro_num_seeds": 4, "ro_profile_query": True, "cross_heads": 2, "cross_head_dim": 16, "cross_attention": "silu",
    "mlpg_branches": ["gated", "mlp"], "mlpg_hidden": 32, "mlpg_gate": "lhuc", "stochastic_length": True,
    "sl_alpha": 1.5, "sl_sampling": "uniform", "compute_dtype": "float32",
}  # fmt: skip


def test_an_old_flat_config_json_still_loads_with_every_field_in_its_section():
    config = config_lib.load_config("synthetic_tiny")
    data = config_lib.to_dict(config)
    sections = ("hma", "hstu", "cross", "mlpg", "context", "stochastic_length")
    model = {k: v for k, v in data["model"].items() if k not in sections} | FLAT_GESR
    old = config_lib.from_dict(config_lib.Config, {**data, "model": model})
    m = old.model
    assert (m.hma.pairs, m.hma.max_count, m.hstu.enabled, m.hstu.layers, m.cross.kind, m.cross.nro) == (
        (("item", "item"), ("creator", "creator")), 5, False, 1, "silu", False)
    assert (m.mlpg.gate, m.context.time, m.stochastic_length.enabled, m.stochastic_length.alpha) == (
        "lhuc", False, True, 1.5)
    # The old target_aware=true with HSTU off meant "target-aware whenever HSTU is on": today's unset.
    assert m.hstu.target_aware is None
    config_lib.validate_config(old)
    # The same settings through today's paths give an equal config.
    new = config_lib.load_config("synthetic_tiny", [
        "model.hma.pairs=item:item,creator:creator", "model.hma.max_count=5", "model.hstu.enabled=false",
        "model.cross.kind=silu", "model.cross.nro=false", "model.mlpg.gate=lhuc", "model.context.time=false",
        "model.stochastic_length.enabled=true", "model.stochastic_length.alpha=1.5",
        "model.stochastic_length.sampling=uniform",
    ])  # fmt: skip
    assert new == old


def test_an_old_key_on_the_command_line_names_its_new_path():
    with pytest.raises(ConfigError, match="'model.hma_dim' moved to 'model.hma.dim'"):
        config_lib.load_config("synthetic_tiny", ["model.hma_dim=4"])
    with pytest.raises(ConfigError, match="'model.use_nro_cross' moved to 'model.cross.nro'"):
        config_lib.load_config("synthetic_tiny", ["model.use_nro_cross=false"])


def test_string_choices_are_checked_from_their_literal_type():
    with pytest.raises(ConfigError, match=r"model.hstu.scoring.*'sometimes' is not one of \['cached', 'full'\]"):
        config_lib.load_config("synthetic_tiny", ["model.hstu.scoring=sometimes"])
    bad = config_lib.replace(GESRConfig(), stochastic_length={"sampling": "oldest"})  # built in Python, not parsed
    with pytest.raises(ValueError, match="model.stochastic_length.sampling must be one of"):
        bad.validate()


def test_target_aware_without_hstu_is_a_config_error_naming_both_fields():
    """Issue 24: model.use_hstu=false with model.target_aware=true used to train without a word."""
    with pytest.raises(ConfigError, match=r"model.hstu.target_aware=true needs model.hstu.enabled=true"):
        config_lib.load_config("synthetic_tiny", ["model.hstu.enabled=false", "model.hstu.target_aware=true"])
    off = config_lib.load_config("synthetic_tiny", ["model.hstu.enabled=false"])  # unset: follows the switch
    assert off.model.hstu.target_aware is None and not off.model.hstu.is_target_aware
    assert config_lib.load_config("synthetic_tiny").model.hstu.is_target_aware

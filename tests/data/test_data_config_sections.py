"""Dataset settings as sections: data.movielens.* for MovieLens, moved fields of old config.json files, --set paths."""

from __future__ import annotations

import dataclasses

import pytest

from gesr_jax import config as config_lib
from gesr_jax.config import ConfigError
from gesr_jax.data import datasets
from gesr_jax.data.config import DataConfig, MovieLensConfig


def test_movielens_settings_are_a_section_set_with_their_new_paths():
    config = config_lib.load_config("ml100k_base", [
        "data.movielens.path=/data/ml-100k", "data.movielens.split=per_user_last",
        "data.movielens.split_quantiles=0.7,0.85", "data.movielens.cache=false",
    ])  # fmt: skip
    ml = config.data.movielens
    assert (ml.path, ml.split, ml.split_quantiles, ml.cache) == ("/data/ml-100k", "per_user_last", (0.7, 0.85), False)
    with pytest.raises(ConfigError, match=r"'data.movielens.split': 'random' is not one of \['global_time'"):
        config_lib.load_config("ml100k_base", ["data.movielens.split=random"])
    with pytest.raises(ConfigError, match="data.movielens.director_vocab must be >= 0"):
        config_lib.load_config("ml100k_base", ["data.movielens.director_vocab=-1"])


def test_an_old_data_key_on_the_command_line_names_its_new_path():
    for old in ("path", "split", "split_quantiles", "engage_threshold", "director_vocab", "cache"):
        with pytest.raises(ConfigError, match=f"'data.{old}' moved to 'data.movielens.{old}'"):
            config_lib.load_config("ml100k_base", [f"data.{old}=1"])


def test_an_old_flat_data_section_in_config_json_still_loads():
    config = config_lib.load_config("ml100k_base")
    data = config_lib.to_dict(config)
    flat = {k: v for k, v in data["data"].items() if k != "movielens"}
    flat |= {"path": "/old/ml-100k", "split": "per_user_last", "split_quantiles": [0.7, 0.9], "engage_threshold": 3.5,
             "director_vocab": 10, "cache": False}  # fmt: skip
    old = config_lib.from_dict(config_lib.Config, {**data, "data": flat})
    want = MovieLensConfig(path="/old/ml-100k", split="per_user_last", split_quantiles=(0.7, 0.9),
                           engage_threshold=3.5, director_vocab=10, cache=False)  # fmt: skip
    assert old.data.movielens == want
    assert old == config_lib.replace(config, data={"movielens": want})
    both = {**flat, "movielens": {"path": "/new"}}
    with pytest.raises(ConfigError, match="old field 'path' and its new place 'movielens.path' are both set"):
        config_lib.from_dict(config_lib.Config, {**data, "data": both})


def test_config_json_round_trip_keeps_the_movielens_section(tmp_path):
    config = config_lib.load_config("ml1m_base", ["data.movielens.engage_threshold=4.5"])
    config_lib.save_json(config, tmp_path / "config.json")
    assert config_lib.load_json(tmp_path / "config.json") == config
    assert "sections" not in config_lib.to_dict(config)["data"]  # registered sections are saved by their names
    assert DataConfig().movielens == MovieLensConfig()


def test_a_section_no_registered_dataset_brought_is_refused_naming_it():
    data = config_lib.to_dict(config_lib.load_config("synthetic_tiny"))
    data["data"]["nowhere_log"] = {"rows": 1}
    with pytest.raises(ConfigError, match=r"no fields \['nowhere_log'\].*module registering that dataset"):
        config_lib.from_dict(config_lib.Config, data)
    with pytest.raises(ConfigError, match="unknown config key 'data.nowhere_log.rows'"):
        config_lib.load_config("synthetic_tiny", ["data.nowhere_log.rows=1"])


def test_settings_must_be_a_dataclass_and_not_shadow_a_data_field():
    class Plain:
        rows: int = 1

    with pytest.raises(TypeError, match="settings of dataset 'plain_log' must be a dataclass"):
        datasets.register_dataset("plain_log", _NoData(), settings=Plain)
    with pytest.raises(TypeError, match="must be a frozen dataclass"):
        datasets.register_dataset("plain_log", _NoData(), settings=dataclasses.make_dataclass("Open", [("rows", int, 1)]))
    with pytest.raises(ValueError, match="data.history_len is already a field"):
        datasets.register_dataset("history_len", _NoData(), settings=MovieLensConfig)
    assert "plain_log" not in datasets.sources() and "history_len" not in datasets.sources()


class _NoData:
    def schema(self, data_config): ...

    def load_splits(self, data_config): ...

    def item_table(self, data_config): ...

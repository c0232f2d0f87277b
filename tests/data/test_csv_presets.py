"""The CSV-family presets fit CSV MovieLens folders; ml1m_base on such a folder is one clean error line."""

from __future__ import annotations

import json

import pytest

from gesr_jax.config import load_config
from gesr_jax.data import commands
from gesr_jax.data.datasets import schema_for
from gesr_jax.models.gesr.tokens import check_fields
from movielens_fixtures import random_log, write_csv

CSV_PRESETS = ("ml_latest_small_base", "ml20m_base", "ml25m_base", "ml32m_base")


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("GESR_CACHE_DIR", str(tmp_path / "cache"))


@pytest.mark.parametrize("name", CSV_PRESETS)
def test_csv_presets_name_only_fields_a_csv_folder_has(tmp_path, name):
    root = write_csv(tmp_path / "ml", random_log(num_users=20, seed=6, half_stars=True))
    config = load_config(name, [f"data.movielens.path={root}"])
    schema = schema_for(config.data)
    assert schema.item_feature_names == ("genre", "year") and schema.user_feature_names == ()
    check_fields(config.model, schema)  # raises on a field the data lacks (what `gesr train` checks)


def test_the_csv_model_builds_on_csv_data(tmp_path):
    from gesr_jax import api

    root = write_csv(tmp_path / "ml", random_log(num_users=20, seed=6, half_stars=True))
    config = load_config("ml32m_base", [f"data.movielens.path={root}"])
    api.abstract_init(config, schema=schema_for(config.data))  # a model that needs data the folder lacks raises


def test_inspect_a_csv_preset_reports_health(tmp_path, capsys):
    root = write_csv(tmp_path / "ml", random_log(num_users=20, seed=6, half_stars=True))
    assert commands.main(["inspect", "--config", "ml20m_base", "--path", str(root)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert set(report["health"]["splits"]["test"]["hma_nonzero_rate"]) == {"genre:genre", "year:year"}


def test_ml1m_base_on_a_csv_folder_is_one_clean_error(tmp_path, capsys):
    # Issue 24: this ended in a KeyError traceback; now it is the same one line `gesr train` gives, exit code 2.
    root = write_csv(tmp_path / "ml", random_log(num_users=20, seed=6, half_stars=True))
    assert commands.main(["inspect", "--config", "ml1m_base", "--set", f"data.movielens.path={root}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: model.hma.pairs names 'director', which this dataset")

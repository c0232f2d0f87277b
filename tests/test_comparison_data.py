"""Table headers name the data the loader saw (issue 22 item 1) and run folders default to a persistent place."""

import pathlib

import numpy as np
import pytest

from gesr_jax import comparison, config as config_lib
from gesr_jax.data import movielens

ML1M = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data" / "ml-1m"


def _inter_with_users(users):
    fields = {f: None for f in movielens.Interactions.__dataclass_fields__}
    fields |= {"user": np.asarray(users, np.int32)}
    return movielens.Interactions(**fields)


def test_seen_counts_distinct_users_ratings_and_the_user_id_range():
    seen = _inter_with_users([7, 3, 3, 9, 7, 7]).seen()
    assert seen == {"users": 3, "ratings": 6, "user_id_min": 3, "user_id_max": 9}


def test_a_partial_copy_is_named_with_its_user_range_and_a_full_one_is_not():
    seen = {"users": 2999, "ratings": 487650, "user_id_min": 1, "user_id_max": 2999}
    assert comparison.describe_interactions(seen, 6040, "ml-1m") == "ML-1M (users 1–2999): 2,999 users, 487,650 ratings"
    full = {"users": 6040, "ratings": 1000209, "user_id_min": 1, "user_id_max": 6040}
    assert comparison.describe_interactions(full, 6040, "ml-1m") == "ML-1M: 6,040 users, 1,000,209 ratings"


def test_synthetic_data_is_named_by_source_and_config():
    config = config_lib.load_config("synthetic_tiny", ())
    assert comparison.data_description(config) == "synthetic data (config synthetic_tiny)"


@pytest.mark.skipif(not ML1M.is_dir(), reason="../shared/data/ml-1m is absent")
def test_the_shared_ml1m_copy_is_the_first_2999_users():
    config = config_lib.load_config("ml1m_base", ())
    assert comparison.data_description(config) == (
        f"ML-1M (users 1–2999): 2,999 users, 487,650 ratings; split {config.data.movielens.split}"
    )


def test_runs_default_to_the_cache_folder_not_tmp(monkeypatch, tmp_path):
    monkeypatch.setenv("GESR_CACHE_DIR", str(tmp_path))
    assert comparison.default_runs_root() == tmp_path / "runs"
    monkeypatch.delenv("GESR_CACHE_DIR")
    assert comparison.default_runs_root() == pathlib.Path.home() / ".cache" / "gesr_jax" / "runs"


def _fake_train(config, run_dir):
    run_dir.mkdir(parents=True, exist_ok=True)
    ne = {"two_tower": 0.8}.get(config.model.kind, 0.7) * (1 + 0.013 * config.train.seed ** 2)
    test = {"consume/ne": ne, "consume/auc": 0.7 + 0.01 * config.train.seed}
    return {"step": 9, "best_step": 3 + config.train.seed, "valid": dict(test), "test": {**test, "num_examples": 7}}


def test_the_sidecar_rebuilds_the_table_with_per_seed_records(tmp_path):
    variants = [comparison.Variant("two-tower", "synthetic_tiny_two_tower"), comparison.Variant("GESR", "synthetic_tiny")]
    results = comparison.run_variants(variants, tmp_path / "runs", seeds=(0, 1, 2), train_fn=_fake_train, log=lambda m: None)
    report = comparison.write_report(tmp_path / "t.md", [comparison.comparison_table(results, ("consume",))], results)
    rebuilt = comparison.read_sidecar(report.with_suffix(".json"))
    assert comparison.comparison_table(rebuilt, ("consume",)) == report.read_text()
    import json

    runs = json.loads(report.with_suffix(".json").read_text())["rows"][1]["runs"]
    assert [r["seed"] for r in runs] == [0, 1, 2] and [r["best_step"] for r in runs] == [3, 4, 5]
    hashes = {r["config_hash"] for r in runs}
    assert len(hashes) == 3  # the seed is part of the config
    assert all("consume/ne" in r["valid"] and "consume/ne" in r["test"] for r in runs)

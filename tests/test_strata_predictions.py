"""Tenure strata, prediction metrics of a run, and the calibration columns of the comparison table (issue 22)."""

import math

import numpy as np
import pytest

from gesr_jax import api, cascade, comparison, config as config_lib, run_predictions, strata
from gesr_jax.data import datasets


def test_tenure_and_strata_edges():
    first = strata.first_event_times(np.array([1, 1, 2]), np.array([500, 100, 0]))
    assert first[1] == 100 and first[2] == 0 and first[0] == np.iinfo(np.int64).max
    days = strata.tenure_days(np.array([1, 2, 2, 2, 2]), np.array([100, 86_399, 86_400, 60 * 86_400, 400 * 86_400]), first)
    np.testing.assert_array_equal(strata.stratum(days), [0, 0, 1, 2, 3])  # an edge belongs to the later stratum
    with pytest.raises(ValueError, match="no event at or before"):
        strata.tenure_days(np.array([1]), np.array([99]), first)
    with pytest.raises(ValueError, match="outside the event log"):
        strata.tenure_days(np.array([7]), np.array([99]), first)


def test_stratified_metrics_name_every_stratum_and_nan_the_empty_ones():
    rng = np.random.default_rng(0)
    y = (rng.random((40, 4)) < 0.3).astype(float)
    z = rng.normal(size=(40, 4)) + 2 * y
    groups = np.repeat([0, 1], 20)  # strata 2 and 3 empty
    out = strata.stratified_metrics(y, z, np.ones_like(y, bool), groups, "consume")
    assert out["num_requests@<1d"] == 20 and out["num_requests@>=365d"] == 0
    assert math.isnan(out["consume/ne@60-365d"]) and 0 < out["consume/auc@1-60d"] <= 1 and out["consume/ne@<1d"] > 0


def test_prediction_metrics_of_a_restored_model_on_synthetic_data():
    config = config_lib.load_config("synthetic_tiny")
    schema = datasets.schema_for(config.data)
    graphdef, params = api.init(config, 0, schema)
    run = cascade.Run(graphdef, params, schema, config, step=0)
    splits = datasets.load_splits(config.data)
    got = run_predictions.compute(run, splits, tuple(schema.tasks))
    for task in schema.tasks:
        assert math.isfinite(got["test"][f"{task}/ne_recal"])
    assert not any("@" in k for k in got["test"])  # synthetic: no rating log, no strata


def _fake_train(config, run_dir):
    run_dir.mkdir(parents=True, exist_ok=True)
    seed = config.train.seed
    ne = {"two_tower": 0.8}.get(config.model.kind, 0.7) * (1 + 0.01 * seed)
    auc = {"two_tower": 0.80}.get(config.model.kind, 0.78) + 0.001 * seed  # the variant loses AUC
    test = {"consume/ne": ne, "consume/auc": auc, "consume/gauc": auc, "consume/ne_recal": 0.75 + 0.01 * seed}
    return {"step": 9, "best_step": 4, "valid": dict(test), "test": {**test, "num_examples": 7}}


def test_table_has_delta_auc_recalibrated_ne_and_a_verdict(tmp_path):
    variants = [comparison.Variant("two-tower", "synthetic_tiny_two_tower"), comparison.Variant("GESR", "synthetic_tiny")]
    messages = []
    results = comparison.run_variants(variants, tmp_path, seeds=(0, 1, 2), train_fn=_fake_train,
                                      log=messages.append, prediction_metrics=True)  # fmt: skip
    assert any("no recalibrated NE / strata" in m for m in messages)  # no checkpoint: said, not hidden
    table = comparison.comparison_table(results, ("consume",))
    assert "ΔAUC consume (points, paired)" in table and "recal. ΔNE consume" in table and "ΔgAUC" in table
    gesr = next(line for line in table.splitlines() if line.startswith("| GESR"))
    assert "-2.00 ± 0.00" in gesr  # ΔAUC in points
    assert "disagree (NE better, AUC worse, recal. NE n.s.)" in gesr


def test_table_shows_the_user_bootstrap_when_runs_keep_test_user_stats(tmp_path):
    variants = [comparison.Variant("two-tower", "synthetic_tiny_two_tower"), comparison.Variant("GESR", "synthetic_tiny")]
    results = comparison.run_variants(variants, tmp_path, seeds=(0, 1), train_fn=_fake_train, log=lambda m: None)
    for res, scale in zip(results, (1.0, 0.8)):
        for run in res.runs:
            run["test_users"] = {"consume": {"user": [1, 2, 3], "count": [4.0, 4.0, 4.0], "positives": [1.0, 2.0, 1.0],
                                             "loss": [10 * scale, 11 * scale, 9 * scale]}}  # fmt: skip
    table = comparison.comparison_table(results, ("consume",))
    assert "bootstrap over test users" in table
    gesr = next(line for line in table.splitlines() if line.startswith("| GESR"))
    assert "-20.00 [-20.00, -20.00]" in gesr  # every user's loss 20 % lower: -20 % in every resample
    rebuilt = comparison.read_sidecar(comparison.write_sidecar(tmp_path / "t.json", results))
    assert comparison.comparison_table(rebuilt, ("consume",)) == table
    assert '"loss": [10.0,11.0,9.0]' in (tmp_path / "t.json").read_text()  # number lists on one line each

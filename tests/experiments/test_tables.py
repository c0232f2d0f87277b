"""The paired-seed table scripts: shared run folders between tables, and the report they write (no training)."""

import dataclasses
import functools
import pathlib
import sys

import pytest

from gesr_jax import comparison, config as config_lib

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2] / "experiments"))
import ablations  # noqa: E402
import history_length  # noqa: E402
import model_comparison  # noqa: E402


def _key(variant):
    return variant.label, config_lib.load_config(variant.config, variant.overrides)


@pytest.mark.parametrize("dataset", sorted(ablations.DATASETS))
def test_model_comparison_shares_the_ablation_runs_it_repeats(dataset):
    preset, overrides = ablations.DATASETS[dataset]
    ablation = dict(_key(v) for v in ablations.variants(preset, overrides))
    models = dict(_key(v) for v in model_comparison.variants(preset, overrides))
    assert ablation["two-tower"] == models["two-tower"] and ablation["GESR (all on)"] == models["GESR (all on)"]
    genrank = models["GenRank (action-oriented)"]
    # Same requests, seeds and step budget: only the model differs.
    assert genrank.data == models["GESR (all on)"].data and genrank.train == models["GESR (all on)"].train
    assert models["GenRank (interleaved)"].model.interleaved and not genrank.model.interleaved


def test_history_length_rows_at_the_default_length_are_the_ablation_rows():
    rows = history_length.variants([25, 50, 200], ())
    ablation = dict(_key(v) for v in ablations.variants("ml1m_base", ()))
    assert _key(rows["GESR", 50]) == ("GESR (all on)", ablation["GESR (all on)"])
    assert _key(rows["two-tower", 50]) == ("two-tower", ablation["two-tower"])
    label, config = _key(rows["GESR", 200])
    assert label == "GESR N=200" and config.data.history_len == 200
    assert dataclasses.replace(config.data, history_len=50) == ablation["GESR (all on)"].data  # only N differs


def _fake_train(config, run_dir):
    run_dir.mkdir(parents=True, exist_ok=True)
    ne = {"two_tower": 0.8}.get(config.model.kind, 0.7) * (1 + 0.01 * config.train.seed)  # -12.5 % at every seed
    test = {f"{t}/{m}": v for t in ("consume", "engage") for m, v in (("ne", ne), ("auc", 0.8))}
    return {"step": 9, "best_step": 4, "valid": dict(test), "test": {**test, "num_examples": 7}}


def test_model_comparison_report_pairs_every_row_with_the_two_tower(tmp_path, monkeypatch):
    monkeypatch.setattr(comparison, "run_variants", functools.partial(comparison.run_variants, train_fn=_fake_train))
    monkeypatch.setattr(comparison, "dataset_references", lambda config: {})
    out = tmp_path / "models.md"
    assert model_comparison.main(["--dataset", "ml1m", "--seeds", "3", "--workdir", str(tmp_path), "--out", str(out)]) == 0
    text = out.read_text()
    assert "python experiments/model_comparison.py --dataset ml1m --seeds 3" in text
    assert "valid every 100 steps, the best valid mean_ne checkpoint is tested, early stop after 4 passes" in text
    rows = {line.split(" | ")[0].strip("| "): line for line in text.splitlines() if line.startswith("| ")}
    assert set(rows) >= {"two-tower", "GESR (all on)", "GenRank (action-oriented)", "GenRank (interleaved)"}
    assert "-12.50 ± 0.00" in rows["GenRank (interleaved)"] and "0 (baseline)" in rows["two-tower"]
    assert "0 (reference)" in rows["GenRank (action-oriented)"] and "0.00 ± 0.00 (n.s.)" in rows["GenRank (interleaved)"]
    assert "4, 4, 4" in rows["GESR (all on)"]


def test_valid_checks_flip_one_default_against_the_shared_default_run(tmp_path, monkeypatch):
    import valid_checks

    rows = valid_checks.variants("ml1m_base", "two-tower")
    ablation = dict(_key(v) for v in ablations.variants("ml1m_base", ()))
    assert _key(rows[0]) == ("two-tower", ablation["two-tower"])
    flipped = _key(rows[1])[1]
    assert flipped.model.use_user_id and not ablation["two-tower"].model.use_user_id
    assert dataclasses.replace(flipped.model, use_user_id=False) == ablation["two-tower"].model
    monkeypatch.setattr(comparison, "run_variants", functools.partial(comparison.run_variants, train_fn=_fake_train))
    out = tmp_path / "checks.md"
    assert valid_checks.main(["--dataset", "ml1m", "--models", "two-tower", "--seeds", "2", "--workdir", str(tmp_path),
                              "--out", str(out)]) == 0  # fmt: skip
    assert "## two-tower" in out.read_text() and "**Valid** split" in out.read_text()


def test_cascade_per_target_stats_split_by_user_and_stratum_and_feed_the_tables():
    import numpy as np

    import cascade as cascade_table
    from gesr_jax import strata

    day = strata.DAY
    test = {"user_id": np.array([1, 2, 1, 3]), "request_time": np.array([0, 2 * day, 400 * day, 100 * day])}
    first = np.array([0, 0, 0, 0])  # every user's first event at t=0
    rows = np.array([0, 0, 1, 2, 3])  # request row of each positive; ranks below: hit, miss, hit, miss, hit
    got = cascade_table.per_target(np.array([1, 50, 3, np.inf, 10]), rows, test, first)
    assert got["users"]["user"] == [1, 2, 3] and got["users"]["targets"] == [3.0, 1.0, 1.0]
    assert got["users"]["hr@10"] == [1.0, 1.0, 1.0]  # user 1: hit, miss, miss(inf)
    assert got["strata"]["targets"] == [2, 1, 1, 1] and got["strata"]["hr@10"] == [1.0, 1.0, 1.0, 0.0]
    seed = {"retrieval": got, "GESR": got}
    text = cascade_table.strata_table([seed, seed])
    assert "| retrieval | 50.00 | 100.00 | 100.00 | 0.00 |" in text
    assert cascade_table._bootstrap_cell([seed, seed], "retrieval", "GESR", "hr@10").startswith("0.00 [0.00, 0.00]")


def test_rows_selects_rows_by_label_keeps_the_reference_and_names_an_unknown_one():
    rows = model_comparison.variants("synthetic_base", ())
    picked = ablations.select_rows(rows, ["GESR (all on)"])
    assert [v.label for v in picked] == ["two-tower", "GESR (all on)"]
    assert ablations.select_rows(rows, []) == rows
    with pytest.raises(SystemExit, match="'GESR' is not a row"):
        ablations.select_rows(rows, ["GESR"])

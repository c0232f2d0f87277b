"""The synthetic log separates decoupled from coupled models: decoupled ceiling vs oracle, knob by knob."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from gesr_jax.data import synthetic
from gesr_jax.data.config import DataConfig

KNOBS = ("capped_count_weight", "last_engaged_weight", "target_aware_weight")
# Seed-to-seed spread of the default consume gap (generator seeds 0, 1, 2: 0.070, 0.067, 0.076) is
# ~0.004; a knob must move the gap by well over that.
MIN_KNOB_EFFECT = 0.01


def _gap(stats, task="consume"):
    return stats[f"decoupled_ceiling_ne_{task}_test"] - stats[f"oracle_ne_{task}_test"]


def _with(dc: DataConfig, **synthetic_fields) -> DataConfig:
    return dataclasses.replace(dc, synthetic=dataclasses.replace(dc.synthetic, **synthetic_fields))


@pytest.fixture(scope="module")
def default_log():
    return synthetic.generate(DataConfig())


def test_decoupled_ceiling_is_clearly_above_the_oracle(default_log):
    from gesr_jax.configs import synthetic_base

    _, stats, _ = default_log
    _, base_stats, _ = synthetic.generate(synthetic_base.get_config().data)
    for s in (stats, base_stats):
        assert _gap(s, "consume") >= 0.03, s
        assert _gap(s, "engage") > 0.0
        # The ceiling is a fitted model of the decoupled parts: better than the base part alone.
        assert s["oracle_ne_consume_test"] < s["decoupled_ceiling_ne_consume_test"] < 0.9


def test_each_knob_moves_the_gap_and_no_signal_means_no_gap(default_log):
    _, stats, _ = default_log
    for knob in KNOBS:
        _, off, _ = synthetic.generate(_with(DataConfig(), **{knob: 0.0}))
        assert _gap(off) < _gap(stats) - MIN_KNOB_EFFECT, (knob, _gap(off), _gap(stats))
    # Nothing planted: the decoupled scorer is the true model, so it reaches the oracle.
    _, none, _ = synthetic.generate(_with(DataConfig(), cross_weight=0.0, target_aware_weight=0.0))
    assert abs(_gap(none)) < 0.002
    assert abs(_gap(none, "engage")) < 0.002


def test_each_planted_part_is_needed_by_the_oracle(default_log):
    splits, stats, comps = default_log
    test, c = splits["test"], comps["test"]
    mask = np.ones(test["cand_item"].shape, bool)
    full = c["consume_base"] + c["consume_cross"] + c["consume_target"]
    np.testing.assert_allclose(c["consume_cross"], c["consume_capped"] + c["consume_last"], rtol=1e-6)
    oracle = stats["oracle_ne_consume_test"]
    assert synthetic.calibrated_ne(test["label_consume"], full, mask) == pytest.approx(oracle, abs=0.002)
    for part in ("capped", "last", "target"):
        restricted = synthetic.calibrated_ne(test["label_consume"], full - c[f"consume_{part}"], mask)
        assert restricted > oracle + MIN_KNOB_EFFECT, part


def test_pooled_shares_match_a_direct_count(default_log):
    splits, _, _ = default_log
    test = splits["test"]
    shares = synthetic.pooled_match_shares(test)
    for r in (0, 7, 1999):
        n = int(test["history_len"][r])
        hist_creator, hist_cat = test["history_creator"][r, :n], test["history_category"][r, :n]
        engaged = test["history_action"][r, :n] == 2
        for j in range(test["cand_item"].shape[1]):
            same = hist_creator == test["cand_creator"][r, j]
            expect = [same.mean(), (hist_cat == test["cand_category"][r, j]).mean(), (same & engaged).mean()]
            np.testing.assert_allclose(shares[r, j], expect)


def test_the_log_and_its_references_are_deterministic(default_log):
    splits, stats, _ = default_log
    again_splits, again, _ = synthetic.generate(DataConfig())
    assert again == stats
    assert np.array_equal(again_splits["train"]["label_consume"], splits["train"]["label_consume"])

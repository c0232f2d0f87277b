"""The synthetic ESR log: determinism, layout, self-consistent histories and planted signal."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from gesr_jax.data import synthetic
from gesr_jax.data.batch import validate_batch
from gesr_jax.data.config import DataConfig, SyntheticConfig
from gesr_jax.data.datasets import load_splits, schema_for

SMALL = DataConfig(synthetic=SyntheticConfig(num_users=300, num_items=800, num_creators=60, num_categories=12))


@pytest.fixture(scope="module")
def small():
    return synthetic.generate(SMALL)


def test_layout_schema_and_determinism(small):
    splits, stats, _ = small
    schema = schema_for(SMALL)
    assert schema.item_feature_names == ("category", "creator") and schema.has_true_probs
    for split in splits.values():
        validate_batch(split, schema)
    assert stats["requests_test"] == stats["requests_valid"] == 300
    assert stats["requests_train"] == 300 * (SMALL.synthetic.requests_per_user - 2)
    again = load_splits(SMALL)
    assert again.schema == schema
    assert all(np.array_equal(splits["test"][k], again.test[k]) for k in splits["test"])
    other = synthetic.generate(dataclasses.replace(SMALL, synthetic=dataclasses.replace(SMALL.synthetic, seed=1)))[0]
    assert not np.array_equal(splits["test"]["cand_item"], other["test"]["cand_item"])


def test_base_rates_and_true_probabilities(small):
    splits, stats, _ = small
    assert 0.2 < stats["consume_rate"] < 0.45
    assert 0.08 < stats["engage_rate"] < stats["consume_rate"]
    train = splits["train"]
    assert np.all(train["label_engage"] <= train["label_consume"])  # engaging implies consuming
    assert np.all(train["prob_engage"] <= train["prob_consume"] + 1e-6)
    # Labels are Bernoulli(prob): calibrated in bins of the true probability.
    p, y = train["prob_consume"].ravel(), train["label_consume"].ravel()
    for lo, hi in ((0.0, 0.2), (0.2, 0.5), (0.5, 1.0)):
        sel = (p >= lo) & (p < hi)
        assert abs(y[sel].mean() - p[sel].mean()) < 0.03


def test_histories_are_the_users_own_earlier_consumption(small):
    splits, _, _ = small
    rows = {}
    for name in ("train", "valid", "test"):
        split = splits[name]
        for r in range(split["user_id"].size):
            rows.setdefault(int(split["user_id"][r]), []).append({k: v[r] for k, v in split.items()})
    for user in (1, 2, 150, 300):
        requests = sorted(rows[user], key=lambda row: int(row["request_time"]))
        assert [int(r["request_time"]) for r in requests] == sorted({int(r["request_time"]) for r in requests})
        for prev, nxt in zip(requests, requests[1:]):
            consumed = prev["cand_item"][prev["label_consume"] == 1]
            n = int(nxt["history_len"])
            hist = nxt["history_item"][:n]
            tail = hist[n - len(consumed) :] if len(consumed) else hist[:0]
            # The next history ends with exactly the items consumed at this request, stamped after it.
            assert sorted(tail.tolist()) == sorted(consumed.tolist())
            assert np.all(nxt["history_time"][n - len(consumed) : n] > prev["request_time"])
            engaged = set(prev["cand_item"][prev["label_engage"] == 1].tolist())
            actions = nxt["history_action"][n - len(consumed) : n]
            assert all((a == 2) == (i in engaged) for i, a in zip(tail.tolist(), actions))
            assert np.all(np.diff(nxt["history_time"][:n]) >= 0)


def test_planted_cross_terms_carry_information(small):
    splits, _, comps = small
    test, c = splits["test"], comps["test"]
    mask = np.ones(test["cand_item"].shape, bool)
    for task in ("consume", "engage"):
        oracle = synthetic.oracle_ne(test, task)
        base_only = synthetic.calibrated_ne(test[f"label_{task}"], c[f"{task}_base"], mask)
        full = c[f"{task}_base"] + c[f"{task}_cross"] + c[f"{task}_target"]
        # The true logits, refitted, match the oracle; dropping the planted terms costs >= 10% relative NE.
        if task == "consume":
            assert synthetic.calibrated_ne(test["label_consume"], full, mask) == pytest.approx(oracle, abs=0.01)
        assert base_only > oracle * 1.10, (task, oracle, base_only)
        # Each planted family on its own is informative too.
        for part in ("cross", "target"):
            with_part = synthetic.calibrated_ne(test[f"label_{task}"], c[f"{task}_base"] + c[f"{task}_{part}"], mask)
            assert with_part < base_only - 0.01, (task, part)


def test_weights_switch_the_planted_terms_off():
    sc = dataclasses.replace(SMALL.synthetic, num_users=100, cross_weight=0.0, target_aware_weight=0.0)
    splits, _, comps = synthetic.generate(dataclasses.replace(SMALL, synthetic=sc))
    for name in ("train", "test"):
        for part in ("consume_cross", "consume_target", "engage_cross", "engage_target"):
            assert not np.any(comps[name][part])
        p = 1 / (1 + np.exp(-comps[name]["consume_base"]))
        np.testing.assert_allclose(splits[name]["prob_consume"], p, rtol=1e-5)


def test_bad_sizes_fail_clearly():
    with pytest.raises(ValueError, match="num_items .* at least twice"):
        synthetic.generate(DataConfig(synthetic=SyntheticConfig(num_items=20, num_creators=5, num_categories=3)))
    with pytest.raises(ValueError, match="data.synthetic.num_users must be >= 1"):
        schema_for(DataConfig(synthetic=SyntheticConfig(num_users=0)))
    with pytest.raises(ValueError, match="num_creators and num_categories must not exceed num_items"):
        schema_for(DataConfig(synthetic=SyntheticConfig(num_items=50, num_creators=60)))


def test_default_size_signal_is_strong():
    # (How long generation takes is a benchmark question, never a unit-test assertion.)
    splits, stats, comps = synthetic.generate(DataConfig())
    test = splits["test"]
    base_only = synthetic.calibrated_ne(
        test["label_consume"], comps["test"]["consume_base"], np.ones(test["cand_item"].shape, bool)
    )
    assert base_only > 1.15 * stats["oracle_ne_consume_test"]


def test_item_table_matches_the_batches(small):
    from gesr_jax.data.datasets import item_table

    table = item_table(SMALL)
    test = small[0]["test"]
    assert set(table) == {"category", "creator"} and table["creator"].shape == (SMALL.synthetic.num_items + 1,)
    for name in ("category", "creator"):
        assert np.array_equal(table[name][test["cand_item"]], test[f"cand_{name}"])
        assert np.array_equal(table[name][test["history_item"]], test[f"history_{name}"])

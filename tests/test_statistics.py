"""Comparison statistics: Student-t quantiles, paired ΔNE CI, "n.s." marking, request bootstrap."""

from __future__ import annotations

import math

import numpy as np
import pytest

from gesr_jax import statistics
from gesr_jax.metrics import normalized_entropy

# Two-sided 95% critical values from published t tables.
T_TABLE_975 = {1: 12.7062, 2: 4.3027, 3: 3.1824, 4: 2.7764, 5: 2.5706, 9: 2.2622, 29: 2.0452, 120: 1.9799}


@pytest.mark.parametrize("df,expected", sorted(T_TABLE_975.items()))
def test_t_quantile_matches_tables(df, expected):
    assert statistics.t_quantile(0.975, df) == pytest.approx(expected, abs=1e-4)
    assert statistics.t_quantile(0.025, df) == pytest.approx(-expected, abs=1e-4)
    assert statistics.t_cdf(expected, df) == pytest.approx(0.975, abs=2e-5)


def test_mean_ci_matches_a_hand_computation():
    values = [-2.0, -3.0, -1.0, -2.5, -1.5]
    # mean -2.0; sample std sqrt(0.625); sem = sqrt(0.625 / 5) = 0.353553; t(0.975, 4) = 2.776445.
    mean, half = statistics.mean_ci(values)
    assert mean == pytest.approx(-2.0)
    assert half == pytest.approx(2.776445 * math.sqrt(0.625 / 5), rel=1e-5)
    assert math.isnan(statistics.mean_ci([1.0])[1])


def test_paired_relative_delta_is_per_seed():
    base, variant = np.array([0.80, 0.70]), np.array([0.76, 0.70])
    np.testing.assert_allclose(statistics.paired_relative_delta(base, variant), [-5.0, 0.0])
    with pytest.raises(ValueError, match="same seeds"):
        statistics.paired_relative_delta(base, variant[:1])


def test_not_significant_exactly_when_the_ci_holds_zero():
    for values in ([-2.0, -3.0, -1.0, -2.5, -1.5], [1.0, -1.0, 0.5, -0.2, 0.1], [0.1, 0.3, 0.2, 0.25, 0.15]):
        mean, half = statistics.mean_ci(values)
        text = statistics.format_delta(mean, half)
        holds_zero = mean - half <= 0 <= mean + half
        assert ("n.s." in text) == holds_zero == statistics.ci_contains_zero(mean, half)
    assert statistics.format_delta(-2.0, 2.0).endswith("(n.s.)")  # CI touching 0 holds it
    assert "n.s." not in statistics.format_delta(-2.0, 1.999)
    assert statistics.format_delta(-1.23456, math.nan) == "-1.23"  # one seed: no CI, no claim


def _eval_set(seed=0, requests=400, cands=16):
    rng = np.random.default_rng(seed)
    logit = rng.normal(size=(requests, cands)) * 1.5 - 0.7
    p_true = 1 / (1 + np.exp(-logit))
    labels = (rng.random(p_true.shape) < p_true).astype(np.float32)
    mask = np.arange(cands)[None, :] < rng.integers(cands // 2, cands + 1, size=requests)[:, None]
    return labels, mask, p_true


def test_bootstrap_of_identical_predictors_is_exactly_zero():
    labels, mask, p = _eval_set()
    delta, lo, hi = statistics.paired_bootstrap_ne(labels, mask, p, p.copy(), np.arange(labels.shape[0]))
    assert (delta, lo, hi) == (0.0, 0.0, 0.0)


def test_bootstrap_ci_covers_a_known_effect_and_is_reproducible():
    labels, mask, p_true = _eval_set(seed=1)
    rng = np.random.default_rng(5)
    noisy = 1 / (1 + np.exp(-(np.log(p_true / (1 - p_true)) + rng.normal(0, 0.8, p_true.shape))))
    full = (normalized_entropy(labels, noisy, mask) - normalized_entropy(labels, p_true, mask))
    full = full / normalized_entropy(labels, p_true, mask) * 100
    ids = np.arange(labels.shape[0]) + 1000
    delta, lo, hi = statistics.paired_bootstrap_ne(labels, mask, p_true, noisy, ids, num_resamples=2000, seed=3)
    assert lo < full < hi and lo > 0  # noise added to the truth is worse, and clearly so
    assert delta == pytest.approx(full, abs=0.1 * (hi - lo))
    # Swapping the roles flips the sign of the effect.
    swapped = statistics.paired_bootstrap_ne(labels, mask, noisy, p_true, ids, num_resamples=2000, seed=3)
    assert swapped[1] < 0 and swapped[2] < 0
    again = statistics.paired_bootstrap_ne(labels, mask, p_true, noisy, ids, num_resamples=2000, seed=3)
    assert again == (delta, lo, hi)
    # Flat inputs with per-candidate request ids give the same answer as [R, C] with per-row ids.
    flat_ids = np.broadcast_to(ids[:, None], labels.shape)[mask]
    flat = statistics.paired_bootstrap_ne(
        labels[mask], None, p_true[mask], noisy[mask], flat_ids, num_resamples=2000, seed=3
    )
    np.testing.assert_allclose(flat, (delta, lo, hi), rtol=1e-9)


def test_bootstrap_rejects_mismatched_ids():
    labels, mask, p = _eval_set(requests=10)
    with pytest.raises(ValueError, match="request_ids"):
        statistics.paired_bootstrap_ne(labels, mask, p, p, np.arange(3))


def _fake_train(ne_by_label):
    """A train_fn for comparison.run_variants: NE from the config's seeds, no training."""

    def train(config, run_dir):
        run_dir.mkdir(parents=True, exist_ok=True)
        seed = config.train.seed
        assert config.data.seed == seed  # one comparison seed sets both
        base, slope = ne_by_label[config.name]
        ne = base + slope * (seed % 3)
        test = {"consume/ne": ne, "consume/auc": 0.8, "consume/oracle_ne": 0.6, "num_examples": 10}
        return {"step": 5, "best_step": 3 + seed, "valid": dict(test), "test": test}

    return train


def test_comparison_table_is_paired_and_marks_non_significant_rows(tmp_path):
    from gesr_jax import comparison

    variants = [
        comparison.Variant("two-tower", "synthetic_tiny_two_tower"),
        comparison.Variant("GESR", "synthetic_tiny"),
    ]
    # The GESR run is 10% better at every seed, though both NE vary a lot across seeds: a paired
    # comparison sees a tight effect.
    train = _fake_train({"synthetic_tiny_two_tower": (0.8, 0.1), "synthetic_tiny": (0.72, 0.09)})
    results = comparison.run_variants(variants, tmp_path, train_fn=train, log=lambda _: None)
    assert results[0].seeds == list(comparison.DEFAULT_SEEDS) and len(results[1].runs) == 5
    np.testing.assert_allclose(comparison.paired_delta(results[0], results[1], "consume/ne"), -10.0)
    table = comparison.comparison_table(results, ["consume"], references={"ceiling": {"consume": 0.7}})
    lines = table.splitlines()
    assert "best valid step" in lines[0] and "3, 4, 5, 6, 7" in lines[3]
    cells = lines[3].split(" | ")
    assert cells[2] == "-10.00 ± 0.00"  # the ΔNE cell: significant
    # Equal AUC in both rows: ΔAUC n.s., so the verdict does not call GESR better (and says recal. NE is missing).
    assert cells[4] == "0.00 ± 0.00 (n.s.)" and cells[5] == "incomplete (NE better, AUC n.s.; recal. NE missing)"
    assert lines[4].startswith("| oracle (true probabilities) | 0.6000") and lines[5].startswith("| ceiling | 0.7000")
    # Identical variants: the paired CI is [0, 0] and holds 0.
    same = comparison.run_variants(variants[:1] * 2, tmp_path / "same", train_fn=train, log=lambda _: None)
    assert "0.00 ± 0.00 (n.s.)" in comparison.comparison_table(same, ["consume"]).splitlines()[3]
    # Gap closed per seed: (NE_tt - NE_gesr) / (NE_tt - oracle).
    mean, half = comparison.gap_closed(results[0], results[1], "consume")
    ne_tt = 0.8 + 0.1 * (np.arange(5) % 3)
    expect = statistics.mean_ci((ne_tt - 0.9 * ne_tt) / (ne_tt - 0.6))
    assert (mean, half) == pytest.approx(expect)
    with pytest.raises(ValueError, match="not paired"):
        other_seeds = comparison.VariantResult(variants[1], results[1].runs, [], [9] * 5)
        comparison.paired_delta(results[0], other_seeds, "consume/ne")


def test_run_variants_reads_back_finished_runs_of_the_same_config_only(tmp_path):
    import json

    from gesr_jax import comparison, config as config_lib

    calls = []
    inner = _fake_train({"synthetic_tiny": (0.7, 0.0)})

    def train(config, run_dir):  # writes what the trainer leaves behind: config.json and results.json
        calls.append((config.train.seed, config.train.num_steps))
        results = inner(config, run_dir)
        config_lib.save_json(config, run_dir / "config.json")
        (run_dir / "results.json").write_text(json.dumps(results))
        return results

    variant = [comparison.Variant("GESR", "synthetic_tiny")]
    first = comparison.run_variants(variant, tmp_path, seeds=(0, 1), train_fn=train, log=lambda _: None)
    again = comparison.run_variants(variant, tmp_path, seeds=(0, 1), train_fn=train, log=lambda _: None)
    assert calls == [(0, 60), (1, 60)] and again[0].runs == first[0].runs  # read back, not trained again
    longer = [comparison.Variant("GESR", "synthetic_tiny", ("train.num_steps=70",))]
    comparison.run_variants(longer, tmp_path, seeds=(0,), train_fn=train, log=lambda _: None)
    assert calls[-1] == (0, 70)  # another config in the same folder goes to the trainer (which resumes or refuses)
    comparison.run_variants(variant, tmp_path / "x", seeds=(0,), train_fn=train, log=lambda _: None, reuse_results=False)
    comparison.run_variants(variant, tmp_path / "x", seeds=(0,), train_fn=train, log=lambda _: None, reuse_results=False)
    assert calls[-2:] == [(0, 60), (0, 60)]


def test_comparison_table_also_pairs_each_row_with_a_second_reference(tmp_path):
    from gesr_jax import comparison

    variants = [comparison.Variant("two-tower", "synthetic_tiny_two_tower"), comparison.Variant("GESR", "synthetic_tiny"),
                comparison.Variant("GESR without X", "synthetic_tiny", ("model.hma.enabled=false",))]  # fmt: skip
    ne = {("synthetic_tiny_two_tower", True): 0.8, ("synthetic_tiny", True): 0.72, ("synthetic_tiny", False): 0.756}

    def train(config, run_dir):
        value = ne[config.name, config.model.hma.enabled if config.model.kind != "two_tower" else True]
        value *= 1 + 0.05 * config.train.seed  # seeds move every row alike: paired, the changes are exact
        auc = {0.8: 0.70, 0.72: 0.80, 0.756: 0.78}[ne[config.name, config.model.hma.enabled if config.model.kind != "two_tower" else True]]
        test = {"consume/ne": value, "consume/auc": auc, "num_examples": 10}
        return {"step": 5, "valid": dict(test), "test": test}

    results = comparison.run_variants(variants, tmp_path, train_fn=train, log=lambda _: None)
    lines = comparison.comparison_table(results, ["consume"], also_vs="GESR").splitlines()
    assert "ΔNE consume vs two-tower (%, paired) | ΔNE consume vs GESR (%, paired)" in lines[0]
    assert "| 0 (baseline) | 11.11 ± 0.00 |" in lines[2] and "| -10.00 ± 0.00 | 0 (reference) |" in lines[3]
    assert "| -5.50 ± 0.00 | 5.00 ± 0.00 |" in lines[4]  # removing X costs 5 % against full GESR
    # ... with its paired ΔAUC and verdict against full GESR beside it (no recalibration kept: incomplete)
    assert "| 5.00 ± 0.00 | -2.00 ± 0.00 | incomplete (NE worse, AUC worse; recal. NE missing) |" in lines[4]
    assert "| 0 (reference) | 0 (reference) | — |" in lines[3]
    with pytest.raises(ValueError, match="also_vs='nope' is not a row"):
        comparison.comparison_table(results, ["consume"], also_vs="nope")


def _rate_stats(users, targets, hits):
    return {"user": list(users), "targets": list(map(float, targets)), "sum": list(map(float, hits))}


def test_user_bootstrap_rate_delta_is_paired_and_narrows_with_more_users():
    rng = np.random.default_rng(0)

    def interval(n_users):
        users = np.arange(n_users)
        targets = rng.integers(1, 8, n_users)
        base = rng.binomial(targets, 0.2)
        better = np.minimum(targets, base + rng.binomial(targets, 0.1))  # about +10 points, user by user
        seeds = 3
        b = [_rate_stats(users, targets, base)] * seeds
        v = [_rate_stats(users, targets, better)] * seeds
        return statistics.user_bootstrap_rate_delta(b, v, num_resamples=400)

    same = [_rate_stats(range(5), [2] * 5, [1, 0, 2, 1, 0])]
    assert statistics.user_bootstrap_rate_delta(same, same) == (0.0, 0.0, 0.0)
    mean, lo, hi = interval(100)
    mean_big, lo_big, hi_big = interval(1600)
    assert lo < mean < hi and lo_big < mean_big < hi_big
    assert 5.0 < mean_big < 12.0
    assert (hi_big - lo_big) < 0.5 * (hi - lo)  # 16x the users: about a quarter of the width
    with pytest.raises(ValueError, match="not paired"):
        statistics.user_bootstrap_rate_delta(same, [_rate_stats(range(1, 6), [2] * 5, [0] * 5)])


def test_ranking_values_average_to_ranking_metrics():
    from gesr_jax import metrics

    ranks = np.array([1, 3, 12, np.inf, 2])
    values = metrics.ranking_values(ranks, 10)
    got = metrics.ranking_metrics(ranks, ks=(10,))
    assert got["hr@10"] == pytest.approx(values["hr@10"].mean()) == pytest.approx(0.6)
    assert got["mrr"] == pytest.approx(np.mean([1, 1 / 3, 1 / 12, 0, 1 / 2]))
    assert values["ndcg@10"][2] == 0.0 and values["ndcg@10"][0] == 1.0

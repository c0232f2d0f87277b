"""Calibration-aware comparisons and the user bootstrap (issue 22 items 3, 4), on synthetic predictions."""

import numpy as np
import pytest

from gesr_jax import calibration, metrics


def _logit(p):
    return np.log(p / (1 - p))


def test_fit_intercept_recovers_a_constant_shift_and_recalibration_removes_it():
    rng = np.random.default_rng(0)
    z = rng.normal(size=20000)
    y = (rng.random(z.size) < 1 / (1 + np.exp(-z))).astype(np.float64)
    assert calibration.fit_intercept(y, z - 0.7) == pytest.approx(0.7, abs=0.05)
    shifted = metrics.normalized_entropy(y[10000:], z[10000:] - 0.7, logits=True)
    fixed = calibration.recalibrated_ne((y[:10000], z[:10000] - 0.7, None), (y[10000:], z[10000:] - 0.7, None))
    truth = metrics.normalized_entropy(y[10000:], z[10000:], logits=True)
    assert fixed < shifted and fixed == pytest.approx(truth, abs=0.005)


def test_fit_intercept_refuses_one_class():
    with pytest.raises(ValueError, match="both labels"):
        calibration.fit_intercept(np.ones(5), np.zeros(5))


def test_verdict_needs_all_three_measures():
    better_ne, better_auc, worse_ne = (-3.0, 1.0), (0.5, 0.2), (2.0, 1.0)
    assert calibration.verdict(better_ne, better_auc, better_ne) == "better"
    assert calibration.verdict(worse_ne, (-0.5, 0.2), worse_ne) == "worse"
    assert calibration.verdict((0.1, 1.0), (0.0, 0.3), (0.1, 1.0)) == "n.s."
    # The GenRank-vs-GESR pattern of issue 22: NE better, AUC not, the recalibrated NE gap gone.
    assert calibration.verdict(better_ne, (-0.13, 0.9), (-0.2, 1.0)) == "disagree (NE better, AUC n.s., recal. NE n.s.)"
    assert calibration.verdict(better_ne, better_auc, None).startswith("incomplete")


def test_on_the_valid_split_ne_and_auc_decide():
    # The intercept is fitted on valid, so a valid-split comparison has no recalibrated NE to wait for.
    better_ne, better_auc = (-3.0, 1.0), (0.5, 0.2)
    assert calibration.verdict(better_ne, better_auc, None, recal_applies=False) == "better"
    assert calibration.verdict(better_ne, (0.0, 0.3), None, recal_applies=False) == "disagree (NE better, AUC n.s.)"
    assert calibration.verdict(better_ne, better_auc, (2.0, 1.0), recal_applies=False) == "better"  # ignored


def test_paired_deltas_are_paired_per_seed():
    base = {"t/ne": np.array([1.0, 0.8]), "t/auc": np.array([0.7, 0.72])}
    var = {"t/ne": np.array([0.9, 0.72]), "t/auc": np.array([0.71, 0.73])}
    got = calibration.paired_deltas(base, var, "t")
    assert got["ΔNE"][0] == pytest.approx(-10.0) and got["ΔNE"][1] == pytest.approx(0.0, abs=1e-9)
    assert got["ΔAUC"][0] == pytest.approx(1.0) and "recal. ΔNE" not in got


def _population(num_users, spread, rng, requests=4, cands=8, seeds=3):
    """Per user, the variant moves the base logits toward the truth by a user-specific weight.

    ``spread`` 0: every user gains alike; larger: the gain varies from user to user (same mean).
    """
    n = num_users * requests
    z = rng.normal(size=(n, cands))
    y = (rng.random(z.shape) < 1 / (1 + np.exp(-z))).astype(np.float64)
    users = np.repeat(np.arange(num_users), requests)
    weight = 0.5 + spread * rng.choice([-1.0, 1.0], num_users)
    noise = [rng.normal(scale=1.0, size=z.shape) for _ in range(seeds)]
    base = [1 / (1 + np.exp(-(z + e))) for e in noise]
    var = [1 / (1 + np.exp(-(z + e * (1 - weight[users])[:, None]))) for e in noise]
    return y, base, var, users


def _width(num_users, spread, seed=0):
    y, base, var, users = _population(num_users, spread, np.random.default_rng(seed))
    _, lo, hi = calibration.paired_user_bootstrap_ne(y, None, base, var, users, num_resamples=400, seed=1)
    return hi - lo


def test_user_bootstrap_widens_with_a_more_heterogeneous_population():
    assert _width(300, spread=1.0) > 1.5 * _width(300, spread=0.0)


def test_user_bootstrap_shrinks_with_more_users():
    assert _width(1600, spread=0.5) < 0.6 * _width(100, spread=0.5)


def test_seed_average_is_the_mean_probability():
    np.testing.assert_allclose(calibration.seed_average([np.array([0.2, 0.4]), np.array([0.4, 0.8])]), [0.3, 0.6])


def _seed_stats(num_users, spread, seed, seeds=3):
    rng = np.random.default_rng(seed)
    y, base, var, users = _population(num_users, spread, rng, seeds=seeds)
    mask = np.ones(y.shape, bool)
    to_logit = lambda p: np.log(p / (1 - p))  # noqa: E731
    return ([calibration.user_stats(y, to_logit(p), mask, users) for p in base],
            [calibration.user_stats(y, to_logit(p), mask, users) for p in var])  # fmt: skip


def _seed_width(num_users, spread):
    base, var = _seed_stats(num_users, spread, seed=0)
    _, lo, hi = calibration.user_bootstrap_over_seeds(base, var, num_resamples=400, seed=1)
    return hi - lo


def test_seed_averaged_user_bootstrap_widens_with_heterogeneity_and_shrinks_with_users():
    assert _seed_width(300, spread=1.0) > 1.5 * _seed_width(300, spread=0.0)
    assert _seed_width(1600, spread=0.5) < 0.6 * _seed_width(100, spread=0.5)


def test_user_bootstrap_of_identical_models_is_zero_and_unpaired_users_are_refused():
    base, _ = _seed_stats(50, 0.5, seed=2)
    assert calibration.user_bootstrap_over_seeds(base, base, num_resamples=50) == (0.0, 0.0, 0.0)
    other, _ = _seed_stats(51, 0.5, seed=2)
    with pytest.raises(ValueError, match="not paired"):
        calibration.user_bootstrap_over_seeds(base, other, num_resamples=10)

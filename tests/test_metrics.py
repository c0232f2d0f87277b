"""Metrics against hand-computed values and brute-force definitions."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gesr_jax import metrics


def brute_auc(y: np.ndarray, s: np.ndarray) -> float:
    pos, neg = s[y == 1], s[y == 0]
    if pos.size == 0 or neg.size == 0:
        return math.nan
    wins = sum((p > n) + 0.5 * (p == n) for p in pos for n in neg)
    return wins / (pos.size * neg.size)


def brute_gauc(y: np.ndarray, s: np.ndarray, g: np.ndarray) -> float:
    num = den = 0.0
    for user in np.unique(g):
        sel = g == user
        a = brute_auc(y[sel], s[sel])
        if not math.isnan(a):
            num += a * sel.sum()
            den += sel.sum()
    return num / den if den else math.nan


def test_ne_and_logloss_hand_computed():
    y = np.array([1, 0, 0, 1])
    p = np.array([0.8, 0.2, 0.4, 0.6])
    expected_ll = -(2 * math.log(0.8) + 2 * math.log(0.6)) / 4
    assert metrics.log_loss(y, p) == pytest.approx(expected_ll, rel=1e-12)
    assert metrics.normalized_entropy(y, p) == pytest.approx(expected_ll / math.log(2), rel=1e-12)
    # The same predictions given as logits.
    logit = np.log(p / (1 - p))
    assert metrics.normalized_entropy(y, logit, logits=True) == pytest.approx(expected_ll / math.log(2), rel=1e-12)


def test_ne_of_base_rate_predictor_is_one_and_mask_drops_padding():
    y = np.array([[1, 0, 0, 0, 1], [0, 1, 0, 0, 0]], dtype=np.float32)
    mask = np.array([[1, 1, 1, 1, 0], [1, 1, 1, 1, 0]], dtype=bool)  # last slot padding (label 1 ignored)
    rate = 2 / 8
    p = np.where(mask, rate, 0.999)
    assert metrics.normalized_entropy(y, p, mask) == pytest.approx(1.0, rel=1e-12)
    assert metrics.base_rate_entropy(y, mask) == pytest.approx(-(0.25 * math.log(0.25) + 0.75 * math.log(0.75)))


def test_ne_undefined_cases_are_nan_and_bad_input_raises():
    assert math.isnan(metrics.normalized_entropy(np.ones(3), np.full(3, 0.5)))
    assert math.isnan(metrics.log_loss(np.zeros(0), np.zeros(0)))
    with pytest.raises(ValueError, match="labels must be 0 or 1"):
        metrics.log_loss(np.array([0.5, 1.0]), np.array([0.5, 0.5]))
    with pytest.raises(ValueError, match="NaN"):
        metrics.auc(np.array([0, 1]), np.array([np.nan, 0.5]))
    with pytest.raises(ValueError, match="shape"):
        metrics.auc(np.array([0, 1]), np.array([0.5]))


def test_logit_bce_is_stable_for_huge_logits():
    bce = metrics.binary_cross_entropy(np.array([1.0, 0.0, 1.0]), np.array([1000.0, 1000.0, -1000.0]), logits=True)
    np.testing.assert_allclose(bce, [0.0, 1000.0, 1000.0])


def test_auc_hand_computed_with_ties():
    y = np.array([1, 0, 1, 0])
    s = np.array([0.9, 0.5, 0.5, 0.1])
    # Pairs (pos, neg): (.9,.5)=1 (.9,.1)=1 (.5,.5)=0.5 (.5,.1)=1 -> 3.5 / 4
    assert metrics.auc(y, s) == pytest.approx(0.875)
    assert math.isnan(metrics.auc(np.ones(4), s))


@settings(max_examples=60, deadline=None)
@given(
    data=st.lists(st.tuples(st.integers(0, 1), st.integers(0, 4), st.integers(0, 3), st.booleans()), min_size=1,
                  max_size=40)
)
def test_auc_and_gauc_match_brute_force(data):
    y = np.array([d[0] for d in data])
    s = np.array([d[1] for d in data], dtype=np.float64) / 4  # few distinct values: many ties
    g = np.array([d[2] for d in data])
    m = np.array([d[3] for d in data])
    for got, want in [
        (metrics.auc(y, s, m), brute_auc(y[m], s[m])),
        (metrics.group_auc(y, s, g, m), brute_gauc(y[m], s[m], g[m])),
    ]:
        if math.isnan(want):
            assert math.isnan(got)
        else:
            assert got == pytest.approx(want, abs=1e-12)


def test_gauc_hand_computed_weights_by_impressions():
    # user 1: 3 impressions, AUC 1; user 2: 2 impressions, AUC 0; user 3: one class only, skipped.
    y = np.array([1, 0, 0, 1, 0, 1, 1])
    s = np.array([0.9, 0.1, 0.2, 0.1, 0.8, 0.5, 0.4])
    g = np.array([1, 1, 1, 2, 2, 3, 3])
    assert metrics.group_auc(y, s, g) == pytest.approx((3 * 1.0 + 2 * 0.0) / 5)


def test_ranking_metrics_hand_computed():
    scores = np.array([[0.1, 0.5, 0.3, 0.9], [0.7, 0.7, 0.2, 0.1]])
    targets = np.array([2, 0])
    ranks = metrics.target_ranks(scores, targets)
    # Row 0: .5 and .9 beat .3 -> rank 3. Row 1: item 1 ties the target and counts against it -> rank 2.
    np.testing.assert_array_equal(ranks, [3, 2])
    exclude = np.array([[False, False, False, True], [False, True, False, False]])
    np.testing.assert_array_equal(metrics.target_ranks(scores, targets, exclude), [2, 1])
    out = metrics.ranking_metrics(np.array([3, 2]), ks=(1, 2, 3))
    assert out["hr@1"] == 0.0 and out["hr@2"] == 0.5 and out["hr@3"] == 1.0
    assert out["ndcg@3"] == pytest.approx((1 / math.log2(4) + 1 / math.log2(3)) / 2)
    assert out["ndcg@2"] == pytest.approx((1 / math.log2(3)) / 2)
    assert out["mrr"] == pytest.approx((1 / 3 + 1 / 2) / 2)
    with pytest.raises(ValueError, match="excludes its own target"):
        metrics.target_ranks(scores, targets, exclude=np.ones_like(exclude))


def test_target_ranks_match_sorting_brute_force():
    rng = np.random.default_rng(0)
    scores = rng.integers(0, 6, size=(20, 15)).astype(np.float64)
    targets = rng.integers(0, 15, size=20)
    exclude = rng.uniform(size=(20, 15)) < 0.3
    exclude[np.arange(20), targets] = False
    ranks = metrics.target_ranks(scores, targets, exclude)
    for u in range(20):
        items = [i for i in range(15) if not exclude[u, i]]
        # Sort best first; on equal scores the target goes last (pessimistic ties).
        order = sorted(items, key=lambda i: (-scores[u, i], i == targets[u]))
        assert ranks[u] == order.index(targets[u]) + 1


def test_candidate_metrics_streams_batches_like_one_pass():
    rng = np.random.default_rng(1)
    b, c = 6, 5
    num = np.array([5, 1, 3, 0, 4, 2])
    mask = np.arange(c)[None] < num[:, None]
    labels = np.where(mask, rng.integers(0, 2, size=(b, c)), 0).astype(np.float32)
    logits = rng.normal(size=(b, c)).astype(np.float32)
    probs = np.where(mask, rng.uniform(0.1, 0.9, size=(b, c)), 0).astype(np.float32)
    users = np.array([1, 2, 1, 0, 3, 2])
    acc = metrics.CandidateMetrics(["consume"])
    for lo, hi in [(0, 2), (2, 6)]:
        acc.update({"user_id": users[lo:hi], "num_candidates": num[lo:hi], "logit_consume": logits[lo:hi],
                    "label_consume": labels[lo:hi], "prob_consume": probs[lo:hi]})
    out = acc.compute()
    assert out["num_examples"] == mask.sum()
    assert out["consume/ne"] == pytest.approx(metrics.normalized_entropy(labels, logits, mask, logits=True))
    assert out["consume/auc"] == pytest.approx(metrics.auc(labels, logits, mask))
    assert out["consume/gauc"] == pytest.approx(
        metrics.group_auc(labels, logits, np.broadcast_to(users[:, None], (b, c)), mask))
    assert out["consume/oracle_ne"] == pytest.approx(metrics.normalized_entropy(labels, probs, mask))
    assert out["loss"] == pytest.approx(out["consume/logloss"])

"""Calibration-aware model comparisons and a user-level bootstrap (issue 22 items 3 and 4).

On a test split whose population differs from valid's (gesr_jax/data/requests.py, ``global_time``), every
model can be mis-calibrated by a different constant, and NE, which charges mis-calibration, can then rank
two models differently from AUC, which ignores it. So a claim "A beats B" here needs three paired
measures to agree:

* ΔNE (relative, %, negative = A better),
* ΔAUC (points, positive = A better; gAUC too when recorded),
* ΔNE after each model's intercept is refitted on **valid** (:func:`fit_intercept`,
  :func:`recalibrated_ne`): the NE gap left once a constant shift of the logits, chosen without test,
  is taken out.

:func:`verdict` turns the three intervals into one word. :func:`paired_user_bootstrap_ne` resamples **test
users** (all requests of a drawn user) on seed-averaged predictions: unlike the per-seed t-interval, which
covers only init and negative sampling on one fixed set of users, it covers which users were tested.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

from gesr_jax import metrics as metrics_lib, statistics


def fit_intercept(labels: np.ndarray, logits: np.ndarray, mask: np.ndarray | None = None, iters: int = 50) -> float:
    """The constant ``b`` minimising the mean BCE of ``sigmoid(logits + b)`` (Newton's method; convex in b).

    Fitted on valid, applied to test by :func:`recalibrated_ne`. All-positive or all-negative labels have
    no finite optimum: ValueError.
    """
    y = np.asarray(labels, np.float64)
    z = np.asarray(logits, np.float64)
    if mask is not None:
        keep = np.asarray(mask, bool)
        y, z = y[keep], z[keep]
    y, z = y.ravel(), z.ravel()
    if y.size == 0 or y.min() == y.max():
        raise ValueError("fit_intercept needs both labels among the valid entries")
    b = 0.0
    for _ in range(iters):
        p = 1.0 / (1.0 + np.exp(-(z + b)))
        grad, hess = float(np.sum(p - y)), float(np.sum(p * (1.0 - p)))
        if hess <= 0.0:
            break
        step = grad / hess
        b -= float(np.clip(step, -5.0, 5.0))
        if abs(step) < 1e-12:
            break
    return b


def recalibrated_ne(
    valid: tuple[np.ndarray, np.ndarray, np.ndarray | None], test: tuple[np.ndarray, np.ndarray, np.ndarray | None]
) -> float:
    """Test NE after the intercept fitted on valid: each of ``valid`` / ``test`` is (labels, logits, mask)."""
    b = fit_intercept(*valid)
    labels, logits, mask = test
    return metrics_lib.normalized_entropy(labels, np.asarray(logits, np.float64) + b, mask, logits=True)


def verdict(
    delta_ne: tuple[float, float],
    delta_auc: tuple[float, float],
    delta_ne_recal: tuple[float, float] | None,
    *,
    recal_applies: bool = True,
) -> str:
    """One word per comparison from (mean, CI half-width) pairs of variant-minus-base measures.

    Each measure says "better" (NE down / AUC up, CI clear of 0), "worse" or "n.s.". All available
    measures better: ``"better"``; all worse: ``"worse"``; all n.s.: ``"n.s."``; otherwise
    ``"disagree (NE better, AUC n.s., recal. NE worse)"`` naming each. A missing recalibrated ΔNE
    (predictions not kept) is named ``"recal. NE missing"`` and the verdict cannot be "better"/"worse".
    ``recal_applies=False`` (a comparison on the valid split, where the intercept is fitted): NE and AUC decide.
    """
    def word(mean: float, half: float, lower_is_better: bool) -> str:
        if not math.isfinite(mean) or statistics.ci_contains_zero(mean, half):
            return "n.s."
        return "better" if (mean < 0) == lower_is_better else "worse"

    words = {"NE": word(*delta_ne, True), "AUC": word(*delta_auc, False)}
    if recal_applies and delta_ne_recal is not None:
        words["recal. NE"] = word(*delta_ne_recal, True)
    complete = delta_ne_recal is not None or not recal_applies
    values = set(words.values())
    if len(values) == 1 and complete:
        return values.pop()
    detail = ", ".join(f"{name} {w}" for name, w in words.items())
    return f"disagree ({detail})" if complete else f"incomplete ({detail}; recal. NE missing)"


def seed_average(per_seed: Sequence[np.ndarray]) -> np.ndarray:
    """Mean probability over seeds (the same requests and candidates in every seed's array)."""
    stacked = np.stack([np.asarray(p, np.float64) for p in per_seed])
    return stacked.mean(axis=0)


def paired_user_bootstrap_ne(
    labels: np.ndarray,
    mask: np.ndarray | None,
    p_base_per_seed: Sequence[np.ndarray],
    p_variant_per_seed: Sequence[np.ndarray],
    user_ids: np.ndarray,
    num_resamples: int = 1000,
    seed: int = 0,
) -> tuple[float, float, float]:
    """Relative ΔNE (%) of seed-averaged predictions with a bootstrap over **users**: (mean, lo, hi) at 95 %.

    Predictions of each seed must be on the same requests (the candidates and labels of one data seed, or
    a split the data seed does not change); ``user_ids`` gives each row's (or entry's) user. Each resample
    draws as many users as there are, with replacement, keeping all their requests
    (:func:`gesr_jax.statistics.paired_bootstrap_ne` grouped by user).
    """
    return statistics.paired_bootstrap_ne(
        labels, mask, seed_average(p_base_per_seed), seed_average(p_variant_per_seed), user_ids,
        num_resamples=num_resamples, seed=seed,
    )  # fmt: skip


def paired_deltas(
    base: Mapping[str, np.ndarray], variant: Mapping[str, np.ndarray], task: str
) -> dict[str, tuple[float, float]]:
    """Per-seed paired deltas of the three measures from per-seed metric arrays, each as (mean, CI half-width).

    ``base`` / ``variant`` map metric key (``<task>/ne``, ``<task>/auc``, ``<task>/gauc``,
    ``<task>/ne_recal``) to the per-seed values, same seed order. ΔNE and recal. ΔNE in % (relative),
    ΔAUC / ΔgAUC in points (x100). Keys missing on either side are left out.
    """
    out: dict[str, tuple[float, float]] = {}
    for key, name in (("ne", "ΔNE"), ("ne_recal", "recal. ΔNE")):
        k = f"{task}/{key}"
        if k in base and k in variant:
            out[name] = statistics.mean_ci(statistics.paired_relative_delta(base[k], variant[k]))
    for key, name in (("auc", "ΔAUC"), ("gauc", "ΔgAUC")):
        k = f"{task}/{key}"
        if k in base and k in variant:
            b, v = np.asarray(base[k], np.float64), np.asarray(variant[k], np.float64)
            if b.shape != v.shape:
                raise ValueError(f"paired values need the same seeds: {k} has {b.shape} vs {v.shape}")
            out[name] = statistics.mean_ci((v - b) * 100.0)
    return out


def user_stats(labels: np.ndarray, logits: np.ndarray, mask: np.ndarray, user_ids: np.ndarray) -> dict[str, list]:
    """Per test user: candidates, positives and summed BCE (``{"user", "count", "positives", "loss"}``, JSON-able).

    The sufficient statistics of NE on any set of users: what :func:`user_bootstrap_over_seeds` resamples.
    ``labels``/``logits``/``mask`` are [R, C], ``user_ids`` [R].
    """
    m = np.asarray(mask, bool)
    users = np.broadcast_to(np.asarray(user_ids)[:, None], m.shape)[m]
    y = np.asarray(labels, np.float64)[m]
    loss = metrics_lib.binary_cross_entropy(y, np.asarray(logits, np.float64)[m], logits=True)
    ids, group = np.unique(users, return_inverse=True)
    return {
        "user": ids.tolist(),
        "count": np.bincount(group).astype(float).tolist(),
        "positives": np.bincount(group, weights=y).tolist(),
        "loss": np.bincount(group, weights=loss).tolist(),
    }


def user_bootstrap_over_seeds(
    base: Sequence[Mapping[str, Sequence[float]]],
    variant: Sequence[Mapping[str, Sequence[float]]],
    num_resamples: int = 1000,
    seed: int = 0,
    confidence: float = 0.95,
) -> tuple[float, float, float]:
    """Relative ΔNE (%) with a paired bootstrap over test users, averaged over seeds: (mean, lo, hi).

    ``base[s]`` / ``variant[s]``: :func:`user_stats` of seed s (same users in every seed and both models; the
    candidates may differ by seed, e.g. data.seed redraws negatives, which is why seeds are averaged per
    resample rather than their predictions). Each resample draws the users once, with replacement, and
    applies the draw to every seed and both models; the seed-mean ΔNE of the resamples gives the interval.
    """
    weights = statistics.user_resample_weights(base, variant, num_resamples, seed)
    deltas = np.zeros(num_resamples)
    for b, v in zip(base, variant):
        n, pos = weights @ np.asarray(b["count"]), weights @ np.asarray(b["positives"])
        rate = np.clip(pos / n, metrics_lib.PROB_EPS, 1 - metrics_lib.PROB_EPS)
        entropy = -(rate * np.log(rate) + (1 - rate) * np.log1p(-rate))
        ne_b = weights @ np.asarray(b["loss"]) / n / entropy
        ne_v = weights @ np.asarray(v["loss"]) / (weights @ np.asarray(v["count"])) / entropy
        deltas += (ne_v - ne_b) / ne_b * 100.0 / len(base)
    return statistics.percentile_interval(deltas, confidence)


def bootstrap_cell(base_runs: Sequence[Mapping], runs: Sequence[Mapping], task: str) -> str | None:
    """The table cell "mean [lo, hi]" of :func:`user_bootstrap_over_seeds` for two rows' per-seed records
    (``record["test_users"][task]``), or None when a record lacks them."""
    try:
        base = [r["test_users"][task] for r in base_runs]
        variant = [r["test_users"][task] for r in runs]
    except (KeyError, TypeError):
        return None
    mean, lo, hi = user_bootstrap_over_seeds(base, variant)
    return f"{mean:.2f} [{lo:.2f}, {hi:.2f}]" + (" (n.s.)" if lo <= 0.0 <= hi else "")

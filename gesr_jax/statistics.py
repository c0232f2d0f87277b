"""Statistics for model comparisons: paired ΔNE over seeds with a Student-t CI, and a request bootstrap.

Everything is numpy (scipy is not a dependency). The Student-t quantile is computed exactly, not
from a table: the t density is integrated with composite Simpson's rule and the CDF is inverted by
bisection (:func:`t_quantile`); it matches published tables to 1e-4 for every ``df >= 1``.

Conventions: ΔNE is *relative*, in percent, the GESR paper's unit: ``(NE_variant - NE_base) /
NE_base * 100``; negative means the variant is better. "Paired" means the baseline and the variant
share each seed (same init seed, same data seed), so the per-seed differences cancel the part of
the noise both runs share.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

from gesr_jax.metrics import PROB_EPS

_SIMPSON_INTERVALS = 4000  # even; the t density is smooth, so this is exact far below table precision


def t_cdf(x: float, df: float) -> float:
    """CDF of Student's t with ``df`` degrees of freedom at ``x`` (numerical integration of the density)."""
    if df <= 0:
        raise ValueError(f"df must be > 0, got {df}")
    if x == 0:
        return 0.5
    a = abs(float(x))
    # Substitution t = a * s, s in [0, 1]: integral_0^a pdf(t) dt = a * integral_0^1 pdf(a s) ds.
    s = np.linspace(0.0, 1.0, _SIMPSON_INTERVALS + 1)
    log_norm = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)
    pdf = np.exp(log_norm - (df + 1) / 2 * np.log1p((a * s) ** 2 / df))
    weights = np.ones_like(s)
    weights[1:-1:2], weights[2:-1:2] = 4.0, 2.0
    half = a * float(weights @ pdf) / (3 * _SIMPSON_INTERVALS)
    return 0.5 + half if x > 0 else 0.5 - half


def t_quantile(p: float, df: float) -> float:
    """Inverse of :func:`t_cdf`: the ``p`` quantile of Student's t (bisection to 1e-10)."""
    if not 0.0 < p < 1.0:
        raise ValueError(f"p must lie in (0, 1), got {p}")
    if p == 0.5:
        return 0.0
    if p < 0.5:
        return -t_quantile(1.0 - p, df)
    lo, hi = 0.0, 1.0
    while t_cdf(hi, df) < p:  # the quantile grows fast for df = 1 (12.7 at 0.975, 63.7 at 0.995)
        lo, hi = hi, hi * 2.0
    while hi - lo > 1e-10 * max(1.0, hi):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if t_cdf(mid, df) < p else (lo, mid)
    return 0.5 * (lo + hi)


def mean_ci(values: Sequence[float] | np.ndarray, confidence: float = 0.95) -> tuple[float, float]:
    """``(mean, half-width)`` of the two-sided Student-t CI over ``values`` (n - 1 dof); half-width nan for n < 2."""
    x = np.asarray(values, dtype=np.float64).ravel()
    if x.size == 0:
        return math.nan, math.nan
    mean = float(x.mean())
    if x.size < 2:
        return mean, math.nan
    sem = float(x.std(ddof=1)) / math.sqrt(x.size)
    return mean, t_quantile(0.5 + confidence / 2, x.size - 1) * sem


def paired_relative_delta(base: Sequence[float] | np.ndarray, variant: Sequence[float] | np.ndarray) -> np.ndarray:
    """Per-seed relative change in percent, ``(variant_s - base_s) / base_s * 100`` (same seed order)."""
    b, v = np.asarray(base, dtype=np.float64), np.asarray(variant, dtype=np.float64)
    if b.shape != v.shape:
        raise ValueError(f"paired values need the same seeds: base has {b.shape}, variant {v.shape}")
    return (v - b) / b * 100.0


def ci_contains_zero(mean: float, half_width: float) -> bool:
    """True when ``mean ± half_width`` holds 0 (also when the CI is undefined: nothing is significant then)."""
    if not math.isfinite(half_width):
        return True
    return mean - half_width <= 0.0 <= mean + half_width


def format_delta(mean: float, half_width: float, digits: int = 2) -> str:
    """``"-2.53 ± 0.44"``, with `` (n.s.)`` when the CI holds 0; just the mean for a single seed."""
    if not math.isfinite(half_width):
        return f"{mean:.{digits}f}"
    text = f"{mean:.{digits}f} ± {half_width:.{digits}f}"
    return text + " (n.s.)" if ci_contains_zero(mean, half_width) else text


def paired_bootstrap_ne(
    labels: np.ndarray,
    mask: np.ndarray | None,
    p_base: np.ndarray,
    p_variant: np.ndarray,
    request_ids: np.ndarray,
    num_resamples: int = 1000,
    seed: int = 0,
    confidence: float = 0.95,
) -> tuple[float, float, float]:
    """Request-level paired bootstrap of the relative ΔNE (%) between two predictors on one eval set.

    ``labels``, ``mask`` (None = all valid), ``p_base`` and ``p_variant`` share a shape (e.g.
    ``[R, C]`` candidates, or flat); ``request_ids`` gives each entry's request, either with the
    same shape or one id per row of a 2-D input. Each resample draws as many requests as there are,
    with replacement, and keeps every candidate of a drawn request (both predictors see the same
    draw: that is the pairing); NE is computed on the resampled set with its own base rate.

    Returns ``(delta, lo, hi)``: ``delta`` is the mean ΔNE over the resamples, ``[lo, hi]`` the
    percentile interval at ``confidence``. Identical predictors give exactly ``(0, 0, 0)``.
    """
    y = np.asarray(labels, dtype=np.float64)
    m = np.ones(y.shape, bool) if mask is None else np.asarray(mask, dtype=bool)
    ids = np.asarray(request_ids)
    if ids.shape != y.shape:
        if y.ndim == 2 and ids.shape == (y.shape[0],):
            ids = np.broadcast_to(ids[:, None], y.shape)
        else:
            raise ValueError(f"request_ids has shape {ids.shape}; expected {y.shape} or ({y.shape[0]},)")
    _, group = np.unique(ids[m], return_inverse=True)
    y = y[m]
    n_req = int(group.max()) + 1 if group.size else 0
    if n_req == 0:
        return math.nan, math.nan, math.nan
    # Per-request sufficient statistics: a resample's NE only needs these, weighted by draw counts.
    stats = np.stack(
        [
            np.bincount(group, minlength=n_req).astype(np.float64),
            np.bincount(group, weights=y, minlength=n_req),
            np.bincount(group, weights=_bce(y, np.asarray(p_base)[m]), minlength=n_req),
            np.bincount(group, weights=_bce(y, np.asarray(p_variant)[m]), minlength=n_req),
        ],
        axis=1,
    )
    rng = np.random.default_rng(seed)
    chunk = max(1, 20_000_000 // n_req)  # bounds the [resamples, requests] count matrix to ~160 MB
    deltas = []
    for start in range(0, num_resamples, chunk):
        size = min(chunk, num_resamples - start)
        counts = rng.multinomial(n_req, np.full(n_req, 1.0 / n_req), size=size).astype(np.float64)
        n, pos, loss_b, loss_v = (counts @ stats).T
        entropy = _entropy(pos / n)
        ne_b, ne_v = loss_b / n / entropy, loss_v / n / entropy
        deltas.append((ne_v - ne_b) / ne_b * 100.0)
    d = np.concatenate(deltas)
    tail = (1.0 - confidence) / 2 * 100.0
    lo, hi = np.percentile(d, [tail, 100.0 - tail])
    return float(d.mean()), float(lo), float(hi)


def _bce(y: np.ndarray, p: np.ndarray) -> np.ndarray:
    q = np.clip(np.asarray(p, dtype=np.float64), PROB_EPS, 1.0 - PROB_EPS)  # the clipping metrics.py uses
    return -(y * np.log(q) + (1.0 - y) * np.log1p(-q))


def _entropy(rate: np.ndarray) -> np.ndarray:
    r = np.clip(rate, PROB_EPS, 1.0 - PROB_EPS)
    return -(r * np.log(r) + (1.0 - r) * np.log1p(-r))


def user_bootstrap_rate_delta(
    base: Sequence[Mapping[str, Sequence[float]]],
    variant: Sequence[Mapping[str, Sequence[float]]],
    num_resamples: int = 1000,
    seed: int = 0,
    confidence: float = 0.95,
) -> tuple[float, float, float]:
    """Δ of a per-target mean (e.g. HR@10, in points x100) with a paired bootstrap over users, seed-averaged.

    ``base[s]`` / ``variant[s]`` of seed s: ``{"user": ids, "targets": per-user target counts, "sum": per-user sums
    of the per-target value}``, the same users in every seed and both rows. Each resample draws the users once,
    with replacement, for every seed and both rows (the pairing); the metric of a row is its weighted sum over
    its weighted targets. Returns ``(mean, lo, hi)`` of the seed-mean Δ over resamples. Identical rows give 0.
    """
    weights = user_resample_weights(base, variant, num_resamples, seed)
    deltas = np.zeros(num_resamples)
    for b, v in zip(base, variant):
        rate_b = weights @ np.asarray(b["sum"], float) / (weights @ np.asarray(b["targets"], float))
        rate_v = weights @ np.asarray(v["sum"], float) / (weights @ np.asarray(v["targets"], float))
        deltas += (rate_v - rate_b) * 100.0 / len(base)
    return percentile_interval(deltas, confidence)


def user_resample_weights(
    base: Sequence[Mapping[str, Sequence[float]]], variant: Sequence[Mapping[str, Sequence[float]]],
    num_resamples: int, seed: int,
) -> np.ndarray:  # fmt: skip
    """``[num_resamples, users]`` draw counts of a paired user bootstrap, after checking that every per-seed
    record of both rows (``{"user": ids, ...}``) holds the same users in the same order."""
    if len(base) != len(variant) or not base:
        raise ValueError(f"need the same seeds for both rows, got {len(base)} and {len(variant)}")
    users = np.asarray(base[0]["user"])
    for stats in (*base, *variant):
        if not np.array_equal(np.asarray(stats["user"]), users):
            raise ValueError("the per-seed user stats hold different test users: not paired")
    rng = np.random.default_rng(seed)
    return rng.multinomial(users.size, np.full(users.size, 1.0 / users.size), size=num_resamples).astype(float)


def percentile_interval(deltas: np.ndarray, confidence: float) -> tuple[float, float, float]:
    """(mean, lo, hi) of bootstrap replicates, ``[lo, hi]`` the central ``confidence`` percentile interval."""
    tail = (1.0 - confidence) / 2 * 100.0
    lo, hi = np.percentile(deltas, [tail, 100.0 - tail])
    return float(np.mean(deltas)), float(lo), float(hi)

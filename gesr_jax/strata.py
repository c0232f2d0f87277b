"""Test metrics by user tenure: how long after the user's first event a request comes (issue 22 item 2).

Under ``global_time`` (gesr_jax/data/requests.py) train is mostly sign-up sessions, valid a mix, and test
mostly returning users long after sign-up, so one pooled test NE mixes populations that valid barely
holds. Reporting NE per tenure stratum shows whether two splits agree within one population.

Strata (days from the user's first event, of any split, to ``request_time``): ``< 1``, ``1–60``,
``60–365``, ``>= 365``; edges belong to the later stratum. The first event comes from the full event log
(:func:`first_event_times`), not from the history window, which holds at most N events.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from gesr_jax import metrics as metrics_lib

DAY = 86_400
EDGES_DAYS = (1.0, 60.0, 365.0)
NAMES = ("<1d", "1-60d", "60-365d", ">=365d")


def first_event_times(user: Any, time: Any) -> np.ndarray:
    """``[max_user + 1]`` int64: each user's earliest event time; int64 max for ids with no event."""
    user, time = np.asarray(user, np.int64), np.asarray(time, np.int64)
    first = np.full(int(user.max()) + 1 if user.size else 1, np.iinfo(np.int64).max, np.int64)
    np.minimum.at(first, user, time)
    return first


def tenure_days(user_ids: Any, request_times: Any, first_time: np.ndarray) -> np.ndarray:
    """Days from each request's user's first event to its ``request_time`` (float; a user with no event: ValueError)."""
    user = np.asarray(user_ids, np.int64)
    t = np.asarray(request_times, np.int64)
    if user.size and (user.min() < 0 or user.max() >= first_time.size):
        raise ValueError(f"user_id {user.max()} is outside the event log's users (0..{first_time.size - 1})")
    first = first_time[user]
    if np.any(first > t):
        row = int(np.flatnonzero(first > t)[0])
        raise ValueError(f"request row {row}: user {user[row]} has no event at or before its request_time {t[row]}")
    return (t - first) / DAY


def stratum(days: np.ndarray) -> np.ndarray:
    """Stratum index 0..3 (:data:`NAMES` order) of each tenure in days."""
    return np.searchsorted(np.asarray(EDGES_DAYS), np.asarray(days, np.float64), side="right")


def stratified_metrics(
    labels: np.ndarray, logits: np.ndarray, mask: np.ndarray, strata: np.ndarray, task: str
) -> dict[str, float]:
    """``<task>/ne@<stratum>``, ``<task>/auc@<stratum>`` and ``num_requests@<stratum>`` per stratum.

    ``labels``, ``logits``, ``mask`` are [R, C] (one row per request), ``strata`` [R]. A stratum with no
    request, or one class only, gets nan (never left out: the table shows it).
    """
    out: dict[str, float] = {}
    for index, name in enumerate(NAMES):
        rows = np.asarray(strata) == index
        out[f"num_requests@{name}"] = float(rows.sum())
        if not rows.any():
            out[f"{task}/ne@{name}"] = out[f"{task}/auc@{name}"] = math.nan
            continue
        y, z, m = labels[rows], logits[rows], mask[rows]
        out[f"{task}/ne@{name}"] = metrics_lib.normalized_entropy(y, z, m, logits=True)
        out[f"{task}/auc@{name}"] = metrics_lib.auc(y, z, m)
    return out


def request_strata(arrays: Mapping[str, np.ndarray], first_time: np.ndarray) -> np.ndarray:
    """Stratum of every request of one split (``user_id``, ``request_time`` keys)."""
    return stratum(tenure_days(arrays["user_id"], arrays["request_time"], first_time))


def strata_table(results: Any, tasks: tuple[str, ...], split: str = "test") -> str | None:
    """Markdown: per row, NE per tenure stratum (mean over seeds) and the stratum's request count; None when
    the runs hold no strata (synthetic data, or no prediction metrics)."""
    if not all(f"{t}/ne@{n}" in run[split] for res in results for run in res.runs for t in tasks for n in NAMES):
        return None
    header = ["model", *(f"NE {t} {n}" for t in tasks for n in NAMES)]
    counts = results[0].runs[0][split]
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    lines.append("| requests (seed 0) | " + " | ".join(f"{int(counts[f'num_requests@{n}'])}" for _ in tasks for n in NAMES) + " |")
    for res in results:
        cells = [f"{np.nanmean(res.metric(split, f'{t}/ne@{n}')):.4f}" for t in tasks for n in NAMES]
        lines.append("| " + " | ".join([res.variant.label, *cells]) + " |")
    return "\n".join(lines)

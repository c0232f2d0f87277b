"""Offline evaluation metrics: NE, logloss, AUC, gAUC and full-catalogue HR@K / NDCG@K / MRR.

Everything here is host-side numpy in float64. The eval loop streams model outputs into a
:class:`CandidateMetrics` accumulator batch by batch and computes the metrics once over the
whole eval set, because NE's denominator and AUC's ranks are properties of the full set, not
of a batch.

Conventions:

* ``mask`` marks the valid entries (padding candidates and empty rows are ``False``).
* Labels are 0/1; anything else is an error.
* A metric that is undefined on the given data (AUC with a single class, NE with a base rate of
  0 or 1) is ``nan`` rather than an exception: an eval split may legitimately lack positives.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

from gesr_jax.data.batch import lengths_mask

PROB_EPS = 1e-7  # probabilities are clipped to [PROB_EPS, 1 - PROB_EPS] before taking logs


def _valid(
    labels: np.ndarray, predictions: np.ndarray, mask: np.ndarray | None, name: str
) -> tuple[np.ndarray, np.ndarray]:
    """Flatten labels and predictions to their valid entries, checking shapes and values."""
    y = np.asarray(labels)
    p = np.asarray(predictions)
    if y.shape != p.shape:
        raise ValueError(f"{name}: labels have shape {y.shape} but predictions have shape {p.shape}")
    if mask is not None:
        m = np.asarray(mask, dtype=bool)
        if m.shape != y.shape:
            raise ValueError(f"{name}: mask has shape {m.shape}, expected {y.shape}")
        y, p = y[m], p[m]
    y = y.astype(np.float64).ravel()
    p = p.astype(np.float64).ravel()
    if y.size and not np.all((y == 0) | (y == 1)):
        raise ValueError(f"{name}: labels must be 0 or 1, got values such as {y[(y != 0) & (y != 1)][:3]}")
    if not np.all(np.isfinite(p)):
        raise ValueError(f"{name}: predictions contain NaN or Inf ({int(np.sum(~np.isfinite(p)))} entries)")
    return y, p


def binary_cross_entropy(labels: np.ndarray, predictions: np.ndarray, *, logits: bool = False) -> np.ndarray:
    """Elementwise BCE in nats; ``predictions`` are probabilities, or logits when ``logits=True``."""
    y = np.asarray(labels, dtype=np.float64)
    x = np.asarray(predictions, dtype=np.float64)
    if logits:
        # max(x, 0) - x*y + log(1 + e^-|x|): exact for any logit magnitude, no clipping needed.
        return np.maximum(x, 0.0) - x * y + np.log1p(np.exp(-np.abs(x)))
    if np.any((x < 0) | (x > 1)):
        raise ValueError("binary_cross_entropy: probabilities must lie in [0, 1]")
    p = np.clip(x, PROB_EPS, 1.0 - PROB_EPS)
    return -(y * np.log(p) + (1.0 - y) * np.log1p(-p))


def log_loss(
    labels: np.ndarray, predictions: np.ndarray, mask: np.ndarray | None = None, *, logits: bool = False
) -> float:
    """Mean BCE over the valid entries (nats); ``nan`` when there are none."""
    y, p = _valid(labels, predictions, mask, "log_loss")
    if y.size == 0:
        return math.nan
    return float(np.mean(binary_cross_entropy(y, p, logits=logits)))


def base_rate_entropy(labels: np.ndarray, mask: np.ndarray | None = None) -> float:
    """Entropy (nats) of a constant predictor that outputs the positive rate of ``labels``."""
    y, _ = _valid(labels, np.zeros(np.shape(labels)), mask, "base_rate_entropy")
    if y.size == 0:
        return math.nan
    rate = float(np.mean(y))
    if rate in (0.0, 1.0):
        return 0.0
    return -(rate * math.log(rate) + (1.0 - rate) * math.log(1.0 - rate))


def normalized_entropy(
    labels: np.ndarray, predictions: np.ndarray, mask: np.ndarray | None = None, *, logits: bool = False
) -> float:
    """NE (He et al. 2014): mean BCE divided by the entropy of the eval set's base rate.

    1.0 is the constant base-rate predictor; lower is better. ``nan`` when the base rate is 0 or 1
    (the denominator vanishes) or there are no valid entries.
    """
    entropy = base_rate_entropy(labels, mask)
    if not entropy > 0.0:
        return math.nan
    return log_loss(labels, predictions, mask, logits=logits) / entropy


def average_ranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks of a 1-D array in ascending order; tied values share the mean of their ranks."""
    x = np.asarray(values).ravel()
    order = np.argsort(x, kind="stable")
    sorted_x = x[order]
    starts_tie = np.r_[True, sorted_x[1:] != sorted_x[:-1]] if x.size else np.zeros(0, bool)
    tie_id = np.cumsum(starts_tie) - 1
    first = np.flatnonzero(starts_tie)
    last = np.r_[first[1:], x.size]
    # A tie group occupying sorted positions first..last-1 holds ranks first+1..last; their mean:
    mean_rank = (first + 1 + last) / 2.0
    ranks = np.empty(x.size, np.float64)
    ranks[order] = mean_rank[tie_id]
    return ranks


def auc(labels: np.ndarray, scores: np.ndarray, mask: np.ndarray | None = None) -> float:
    """ROC AUC = P(score of a random positive > score of a random negative), ties counting 1/2.

    Computed exactly through the Mann-Whitney U statistic on average ranks; ``nan`` when the
    valid entries hold only one class.
    """
    y, s = _valid(labels, scores, mask, "auc")
    n_pos = float(np.sum(y))
    n_neg = float(y.size - n_pos)
    if n_pos == 0 or n_neg == 0:
        return math.nan
    ranks = average_ranks(s)
    return float((np.sum(ranks[y == 1]) - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def group_auc(
    labels: np.ndarray, scores: np.ndarray, groups: np.ndarray, mask: np.ndarray | None = None
) -> float:
    """gAUC: per-group AUC averaged with each group weighted by its number of impressions.

    Groups (users) whose valid entries hold a single class have no AUC and are skipped; ``nan``
    when no group has both classes. Vectorised: one lexsort over (group, score), no Python loop.
    """
    y, s = _valid(labels, scores, mask, "group_auc")
    g = np.asarray(groups)
    if g.shape != np.shape(labels):
        raise ValueError(f"group_auc: groups have shape {g.shape}, expected {np.shape(labels)}")
    g = (g[np.asarray(mask, dtype=bool)] if mask is not None else g).ravel()
    if y.size == 0:
        return math.nan
    _, gid = np.unique(g, return_inverse=True)
    order = np.lexsort((s, gid))
    gs, ss, ys = gid[order], s[order], y[order]
    n = ys.size
    new_group = np.r_[True, gs[1:] != gs[:-1]]
    new_tie = new_group | np.r_[True, ss[1:] != ss[:-1]]
    group_start = np.flatnonzero(new_group)[np.cumsum(new_group) - 1]
    tie_first = np.flatnonzero(new_tie)
    tie_last = np.r_[tie_first[1:], n]
    tie_id = np.cumsum(new_tie) - 1
    # Rank within the group: position relative to the group's first row, averaged over ties.
    rank = (tie_first + 1 + tie_last)[tie_id] / 2.0 - group_start
    num_groups = int(gid.max()) + 1
    count = np.bincount(gs, minlength=num_groups).astype(np.float64)
    n_pos = np.bincount(gs, weights=ys, minlength=num_groups)
    n_neg = count - n_pos
    rank_sum = np.bincount(gs, weights=rank * ys, minlength=num_groups)
    ok = (n_pos > 0) & (n_neg > 0)
    if not np.any(ok):
        return math.nan
    per_group = (rank_sum[ok] - n_pos[ok] * (n_pos[ok] + 1) / 2.0) / (n_pos[ok] * n_neg[ok])
    return float(np.sum(per_group * count[ok]) / np.sum(count[ok]))


def target_ranks(scores: np.ndarray, targets: np.ndarray, exclude: np.ndarray | None = None) -> np.ndarray:
    """1-based rank of each row's target item among the row's non-excluded items, best score first.

    ``scores`` is [U, I] over the whole catalogue, ``targets`` [U] column indices, ``exclude`` an
    optional [U, I] bool mask of items that are not ranked (e.g. already seen). Ties count against
    the target (an item scoring exactly the target's score ranks above it), so a constant scorer
    gets the worst rank, not the best.
    """
    s = np.asarray(scores, dtype=np.float64)
    t = np.asarray(targets)
    if s.ndim != 2:
        raise ValueError(f"target_ranks: scores must be [users, items], got shape {s.shape}")
    if t.shape != (s.shape[0],):
        raise ValueError(f"target_ranks: targets must have shape ({s.shape[0]},), got {t.shape}")
    if t.size and (t.min() < 0 or t.max() >= s.shape[1]):
        raise ValueError(f"target_ranks: targets must lie in [0, {s.shape[1]}), got [{t.min()}, {t.max()}]")
    if not np.all(np.isfinite(s)):
        raise ValueError("target_ranks: scores contain NaN or Inf")
    rows = np.arange(s.shape[0])
    target_score = s[rows, t]
    beats = s >= target_score[:, None]
    beats[rows, t] = False
    if exclude is not None:
        ex = np.asarray(exclude, dtype=bool)
        if ex.shape != s.shape:
            raise ValueError(f"target_ranks: exclude has shape {ex.shape}, expected {s.shape}")
        if np.any(ex[rows, t]):
            row = int(np.flatnonzero(ex[rows, t])[0])
            raise ValueError(f"target_ranks: row {row} excludes its own target item {int(t[row])}")
        beats &= ~ex
    return 1 + beats.sum(axis=1)


def ranking_values(ranks: np.ndarray, k: int) -> dict[str, np.ndarray]:
    """Per target: ``hr@k`` (0/1), ``ndcg@k`` and ``rr`` (1 / rank) from 1-based ranks (inf = missed: all 0)."""
    r = np.asarray(ranks, dtype=np.float64).ravel()
    if np.any(r < 1):
        raise ValueError("ranking_metrics: ranks are 1-based and must be >= 1")
    if k < 1:
        raise ValueError(f"ranking_metrics: K must be >= 1, got {k}")
    hit = r <= k
    return {f"hr@{k}": hit.astype(np.float64), f"ndcg@{k}": np.where(hit, 1.0 / np.log2(r + 1.0), 0.0), "rr": 1.0 / r}


def ranking_metrics(ranks: np.ndarray, ks: Sequence[int] = (1, 10, 50)) -> dict[str, float]:
    """HR@K, NDCG@K (one relevant item) and MRR, averaged over rows, from :func:`target_ranks` output."""
    r = np.asarray(ranks, dtype=np.float64).ravel()
    if r.size == 0:
        raise ValueError("ranking_metrics: no ranks given")
    out: dict[str, float] = {}
    for k in ks:
        values = ranking_values(r, k)
        out[f"hr@{k}"] = float(np.mean(values[f"hr@{k}"]))
        out[f"ndcg@{k}"] = float(np.mean(values[f"ndcg@{k}"]))
    out["mrr"] = float(np.mean(ranking_values(r, 1)["rr"]))
    return out


class CandidateMetrics:
    """Streams per-candidate eval outputs and computes per-task NE, AUC, gAUC, logloss (+ oracle NE).

    Each :meth:`update` takes one batch: ``user_id`` [B], ``num_candidates`` [B], and per task
    ``logit_<task>`` and ``label_<task>`` [B, C], plus ``prob_<task>`` (true probabilities) when
    the data has them. Only the valid candidates are kept, flattened, on host.
    """

    def __init__(self, tasks: Sequence[str], task_weights: Sequence[float] | None = None):
        self.tasks = tuple(tasks)
        weights = tuple(task_weights) if task_weights else (1.0,) * len(self.tasks)
        if len(weights) != len(self.tasks):
            raise ValueError(f"{len(weights)} task weights for {len(self.tasks)} tasks {self.tasks}")
        self.task_weights = weights
        self._parts: dict[str, list[np.ndarray]] = {}

    def update(self, outputs: Mapping[str, np.ndarray]) -> None:
        num = np.asarray(outputs["num_candidates"])
        logits0 = np.asarray(outputs[f"logit_{self.tasks[0]}"])
        if logits0.ndim != 2 or num.shape != logits0.shape[:1]:
            raise ValueError(
                f"CandidateMetrics.update: logits must be [B, C] with num_candidates [B], got "
                f"{logits0.shape} and {num.shape}"
            )
        mask = lengths_mask(num, logits0.shape[1])
        users = np.broadcast_to(np.asarray(outputs["user_id"])[:, None], mask.shape)
        self._parts.setdefault("user_id", []).append(users[mask])
        for task in self.tasks:
            for prefix in ("logit", "label", "prob"):
                key = f"{prefix}_{task}"
                if key in outputs:
                    self._parts.setdefault(key, []).append(np.asarray(outputs[key])[mask])

    @property
    def num_examples(self) -> int:
        return int(sum(p.size for p in self._parts.get("user_id", [])))

    def compute(self) -> dict[str, float]:
        """``{"loss", "num_examples", "<task>/{ne,auc,gauc,logloss,base_rate[,oracle_ne]}"}``."""
        cat = {k: np.concatenate(v) for k, v in self._parts.items()}
        out: dict[str, float] = {"num_examples": float(self.num_examples)}
        loss = 0.0
        for task, weight in zip(self.tasks, self.task_weights, strict=True):
            logits = cat.get(f"logit_{task}", np.zeros(0))
            labels = cat.get(f"label_{task}", np.zeros(0))
            out[f"{task}/logloss"] = log_loss(labels, logits, logits=True)
            out[f"{task}/ne"] = normalized_entropy(labels, logits, logits=True)
            out[f"{task}/auc"] = auc(labels, logits)
            out[f"{task}/gauc"] = group_auc(labels, logits, cat.get("user_id", np.zeros(0)))
            out[f"{task}/base_rate"] = float(np.mean(labels)) if labels.size else math.nan
            if f"prob_{task}" in cat:
                out[f"{task}/oracle_ne"] = normalized_entropy(labels, cat[f"prob_{task}"])
            loss += weight * out[f"{task}/logloss"]
        out["loss"] = loss
        return out

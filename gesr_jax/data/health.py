"""Feature health of built splits: HMA match rates, OOV rates, distinct values, request counts and times.

A feature that never varies, or a Hard Matching pair that never matches, costs parameters and
compute and teaches nothing; :func:`feature_health` makes both visible before any training. For
example the ``("item", "item")`` HMA pair is always 0 on MovieLens: a user rates an item once, so a
positive is never in its own history, and negatives exclude every item the user rated.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from gesr_jax.data.batch import lengths_mask

OOV_ID = 1  # item features: "unknown / other" in MovieLens encodings (0 = padding); an ordinary id in the synthetic log
USER_UNKNOWN_ID = 0  # user features: "unknown" (a user feature has no padding; 1 is a real value, e.g. gender M)
_CHUNK = 2048  # requests per chunk of the [R, C, N] comparison, bounding its memory to ~100 MB


def _parts(splits: Any) -> dict[str, Mapping[str, np.ndarray]]:
    if isinstance(splits, Mapping):
        return dict(splits)
    return {name: getattr(splits, name) for name in ("train", "valid", "test")}


def _masks(split: Mapping[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    hist = lengths_mask(split["history_len"], split["history_item"].shape[1])
    cand = lengths_mask(split["num_candidates"], split["cand_item"].shape[1])
    return hist, cand


def hma_nonzero_rate(split: Mapping[str, np.ndarray], history_field: str, candidate_field: str) -> float:
    """Share of valid candidates whose raw match count (history ``h`` == candidate ``c``, id 0 never matches) is > 0.

    The numpy counterpart of ``gesr_jax.layers.hard_matching.brute_force_counts`` (count > 0 only).
    """
    hist_key, cand_key = f"history_{history_field}", f"cand_{candidate_field}"
    for key in (hist_key, cand_key):
        if key not in split:
            raise KeyError(f"HMA pair ({history_field!r}, {candidate_field!r}): the split has no {key!r}")
    hist_valid, cand_valid = _masks(split)
    hits = total = 0
    for lo in range(0, hist_valid.shape[0], _CHUNK):
        h = np.where(hist_valid[lo : lo + _CHUNK], split[hist_key][lo : lo + _CHUNK], 0)
        c = split[cand_key][lo : lo + _CHUNK]
        any_match = ((h[:, None, :] == c[:, :, None]) & (h[:, None, :] != 0)).any(-1)
        valid = cand_valid[lo : lo + _CHUNK]
        hits += int(np.count_nonzero(any_match & valid))
        total += int(np.count_nonzero(valid))
    return hits / total if total else float("nan")


def _id_fields(split: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Every categorical feature of a split (user, history and candidate side), valid entries only.

    User and item ids and ``history_action`` are left out: there id 1 is a real user, movie or rating.
    """
    hist_valid, cand_valid = _masks(split)
    skip = {"user_id", "history_item", "history_action", "history_time", "history_len", "cand_item"}
    out = {}
    for key, value in split.items():
        if key in skip or not np.issubdtype(value.dtype, np.integer):
            continue
        if key.startswith("user_"):
            out[key] = value
        elif key.startswith("history_"):
            out[key] = value[hist_valid]
        elif key.startswith("cand_"):
            out[key] = value[cand_valid]
    return out


def feature_health(splits: Any, hma_pairs: Sequence[tuple[str, str]]) -> dict[str, Any]:
    """Health report of ``splits`` (a ``Splits`` object or a mapping name -> batch).

    Returns ``{"splits": {name: {...}}, "never_matching_hma_pairs": [...], "constant_features": [...]}``;
    per split: ``requests``, ``min_request_time``, ``max_request_time``, ``hma_nonzero_rate``
    (``"h:c"`` -> share of valid candidates with a raw match, see :func:`hma_nonzero_rate`),
    ``oov_rate`` (item feature -> share of non-padding entries equal to :data:`OOV_ID`; user feature
    -> share equal to :data:`USER_UNKNOWN_ID`) and ``distinct_values`` (field -> number of distinct
    non-padding ids, the unknown id included). The two lists name HMA pairs
    with no match in any split and fields with at most one distinct id in every split.
    """
    report: dict[str, Any] = {"splits": {}}
    for name, split in _parts(splits).items():
        times = split["request_time"]
        entry: dict[str, Any] = {
            "requests": int(times.size),
            "min_request_time": int(times.min()) if times.size else None,
            "max_request_time": int(times.max()) if times.size else None,
            "hma_nonzero_rate": {f"{h}:{c}": hma_nonzero_rate(split, h, c) for h, c in hma_pairs},
            "oov_rate": {},
            "distinct_values": {},
        }
        for field, values in _id_fields(split).items():
            if field.startswith("user_"):
                real, oov = values, values == USER_UNKNOWN_ID
            else:
                real = values[values != 0]
                oov = real == OOV_ID
            entry["oov_rate"][field] = float(np.mean(oov)) if real.size else float("nan")
            entry["distinct_values"][field] = int(np.unique(real).size)
        report["splits"][name] = entry
    per_split = [e for e in report["splits"].values() if e["requests"] > 0]
    pairs = [f"{h}:{c}" for h, c in hma_pairs]
    never = [p for p in pairs if per_split and all(e["hma_nonzero_rate"][p] == 0 for e in per_split)]
    report["never_matching_hma_pairs"] = never
    fields = per_split[0]["distinct_values"] if per_split else {}
    report["constant_features"] = [f for f in fields if all(e["distinct_values"].get(f, 0) <= 1 for e in per_split)]
    return report

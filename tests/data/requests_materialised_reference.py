"""Frozen copy of the materialising ``build_requests`` (every history as a ``[num_requests, N]`` array).

The by-reference requests of gesr_jax/data/requests.py must give bit-identical batches; this module is
what they are compared with (tests/data/test_requests_by_reference.py). It is not used by the package.
"""


from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from gesr_jax.data.batch import BatchSchema, empty_batch, validate_batch
from gesr_jax.data.config import DataConfig
from gesr_jax.data.movielens import Interactions

_MAX_REJECTION_ROUNDS = 12  # after this, the few rows still short of negatives are filled exactly, row by row


@dataclasses.dataclass(frozen=True)
class BuiltRequests:
    """Output of :func:`build_requests`: one batch per split plus counts."""

    train: dict[str, np.ndarray]
    valid: dict[str, np.ndarray]
    test: dict[str, np.ndarray]
    stats: dict[str, Any]


def build_requests(
    inter: Interactions, item_table: dict[str, np.ndarray], schema: BatchSchema, data_config: DataConfig
) -> BuiltRequests:
    """Turn a rating log into train/valid/test requests following the module's protocol.

    ``item_table`` maps each item feature of ``schema`` to its encoded value per item id.
    """
    dc = data_config
    n_hist, n_pos = dc.history_len, dc.num_positives
    order = np.lexsort((np.arange(inter.user.size), inter.timestamp, inter.user))
    user, item = inter.user[order].astype(np.int64), inter.item[order].astype(np.int64)
    rating, ts = inter.rating[order], inter.timestamp[order]

    first = np.flatnonzero(np.r_[True, user[1:] != user[:-1]])  # first event of each user
    count = np.diff(np.r_[first, user.size])
    users = user[first]
    too_few = count < dc.min_history + n_pos
    blocks = np.where(too_few, 0, (count - dc.min_history) // n_pos)
    # One row per candidate block, the most recent block first within each user.
    owner = np.repeat(np.arange(users.size), blocks)
    back = _ranks_within(owner)  # 0 = most recent block
    start = first[owner] + count[owner] - n_pos * (back + 1)  # index of the block's first event
    # Events strictly before request_time: those of the same user with a smaller timestamp.
    key = user * (np.int64(1) << 32) + ts
    hist_end = np.searchsorted(key, key[start], side="left")
    hist_avail = hist_end - first[owner]
    keep = hist_avail >= dc.min_history
    dropped_ties = int(np.count_nonzero(~keep))
    owner, start, hist_end, hist_avail = owner[keep], start[keep], hist_end[keep], hist_avail[keep]
    if dc.movielens.split == "per_user_last":
        cuts = None
        back = _ranks_within(owner)
        keep = back < dc.max_requests_per_user if dc.max_requests_per_user > 0 else np.ones(owner.size, bool)
    else:
        cuts = global_time_cuts(ts[start], dc.movielens.split_quantiles)
        split_of = np.searchsorted(cuts, ts[start], side="right")  # t < cut1 -> 0, cut1 <= t < cut2 -> 1, else 2
        # Rows run most recent first within a user and split_of never increases along them, so each
        # (user, split) is one contiguous run: rank 0 = the user's most recent request in that split.
        back = _ranks_within(owner * 3 + split_of)
        keep = back < dc.max_requests_per_user if dc.max_requests_per_user > 0 else np.ones(owner.size, bool)
        split_of = split_of[keep]
    owner, start, hist_end, hist_avail = owner[keep], start[keep], hist_end[keep], hist_avail[keep]
    # Chronological row order within a user (oldest request first).
    chrono = np.lexsort((start, owner))
    owner, start, hist_end, hist_avail = (a[chrono] for a in (owner, start, hist_end, hist_avail))
    num_requests = owner.size

    batch = empty_batch(schema, num_requests)
    batch["user_id"] = users[owner].astype(np.int32)
    for name, _ in schema.user_features:
        batch[f"user_{name}"] = inter.user_features[name][users[owner]].astype(np.int32)

    length = np.minimum(hist_avail, n_hist)
    slots = np.arange(n_hist)
    hist_valid = slots[None, :] < length[:, None]
    hist_idx = np.where(hist_valid, hist_end[:, None] - length[:, None] + slots[None, :], 0)
    hist_item = np.where(hist_valid, item[hist_idx], 0)
    batch["history_item"] = hist_item.astype(np.int32)
    batch["history_action"] = np.where(hist_valid, np.ceil(rating[hist_idx]), 0).astype(np.int32)
    batch["history_time"] = np.where(hist_valid, ts[hist_idx], 0).astype(np.int32)
    batch["history_len"] = length.astype(np.int32)
    batch["request_time"] = ts[start].astype(np.int32)

    if cuts is None:
        rank = _ranks_within(owner[::-1])[::-1]  # 0 = the user's last request after all filtering
        split_of = np.where(rank == 0, 2, np.where(rank == 1, 1, 0))
        popularity = np.bincount(item, minlength=inter.num_items + 1)
    else:
        split_of = split_of[chrono]
    pos_idx = start[:, None] + np.arange(n_pos)[None, :]
    negatives = np.zeros((num_requests, dc.num_negatives), np.int64)
    shuffle_keys = np.zeros((num_requests, n_pos + dc.num_negatives))
    for code in range(3):
        # One stream per split: test/valid negatives do not move when the train part changes size.
        rng = np.random.default_rng([dc.seed, code])
        rows = np.flatnonzero(split_of == code)
        if cuts is None:
            negatives[rows] = sample_negatives(
                rng, users[owner[rows]], user, item, inter.num_items, dc.num_negatives, popularity
            )
        else:
            negatives[rows] = sample_negatives(
                rng, users[owner[rows]], user, item, inter.num_items, dc.num_negatives,
                request_time=ts[start[rows]], log_time=ts,
            )  # fmt: skip
        shuffle_keys[rows] = rng.random((rows.size, shuffle_keys.shape[1]))
    cand = np.concatenate([item[pos_idx], negatives], axis=1)
    consume = np.concatenate([np.ones_like(pos_idx), np.zeros_like(negatives)], axis=1)
    engage = np.concatenate([rating[pos_idx] >= dc.movielens.engage_threshold, np.zeros(negatives.shape, bool)], axis=1)
    valid = cand > 0
    # Padding (no negative found) sorts last so it stays on the right.
    perm = np.argsort(shuffle_keys + (~valid) * 2.0, axis=1, kind="stable")
    cand, consume, engage, valid = (np.take_along_axis(a, perm, axis=1) for a in (cand, consume, engage, valid))
    batch["cand_item"] = cand.astype(np.int32)
    batch["num_candidates"] = valid.sum(axis=1).astype(np.int32)
    batch["label_consume"] = consume.astype(np.float32)
    batch["label_engage"] = engage.astype(np.float32)
    for name, _ in schema.item_features:
        batch[f"history_{name}"] = np.where(hist_valid, item_table[name][hist_item], 0).astype(np.int32)
        batch[f"cand_{name}"] = np.where(valid, item_table[name][cand], 0).astype(np.int32)

    parts = {
        name: {k: v[split_of == code] for k, v in batch.items()} for code, name in enumerate(("train", "valid", "test"))
    }
    for part in parts.values():
        validate_batch(part, schema)
    users_with_requests = int(np.unique(owner).size)
    stats = {
        "events": int(user.size),
        "users": int(users.size),
        "items_rated": int(np.unique(item).size),
        "users_with_requests": users_with_requests,
        "skipped_users": int(users.size - users_with_requests),
        "skipped_users_too_few_events": int(np.count_nonzero(too_few)),
        "requests_dropped_same_second_history": dropped_ties,
        "requests_short_of_negatives": int(np.count_nonzero(valid.sum(axis=1) < n_pos + dc.num_negatives)),
        "split": dc.movielens.split,
        **({"split_cut_times": [int(c) for c in cuts]} if cuts is not None else {}),
        **{
            f"requests_{name}": int(np.count_nonzero(split_of == code))
            for code, name in enumerate(("train", "valid", "test"))
        },
    }
    return BuiltRequests(parts["train"], parts["valid"], parts["test"], stats)


def global_time_cuts(request_time: np.ndarray, quantiles: tuple[float, float]) -> np.ndarray:
    """The two cut times of the ``global_time`` split: quantiles of ``request_time``, rounded up to whole seconds.

    Rounding up keeps the assignment of integer times unchanged (``t < q`` iff ``t < ceil(q)``).
    """
    if request_time.size == 0:
        return np.zeros(2, np.int64)
    return np.ceil(np.quantile(request_time.astype(np.float64), quantiles)).astype(np.int64)


def _ranks_within(group: np.ndarray) -> np.ndarray:
    """Position of each element within its run of equal consecutive values of ``group`` (0-based)."""
    if group.size == 0:
        return np.zeros(0, np.int64)
    run_start = np.flatnonzero(np.r_[True, group[1:] != group[:-1]])
    run_len = np.diff(np.r_[run_start, group.size])
    return np.arange(group.size) - np.repeat(run_start, run_len)


def sample_negatives(
    rng: np.random.Generator,
    request_user: np.ndarray,
    log_user: np.ndarray,
    log_item: np.ndarray,
    num_items: int,
    q: int,
    popularity: np.ndarray | None = None,
    *,
    request_time: np.ndarray | None = None,
    log_time: np.ndarray | None = None,
) -> np.ndarray:
    """``[R, q]`` distinct items per request, drawn by popularity among items its user never rated.

    Popularity is either ``popularity`` (one count per item id, the same for every request) or, with
    ``request_time`` and ``log_time``, each item's number of log events strictly before that
    request's time: a draw then picks a uniformly random earlier event and takes its item, which
    is exactly count-proportional and never yields an item with no earlier event.
    Rows with fewer than ``q`` eligible items are right-padded with 0.
    """
    r = request_user.size
    out = np.zeros((r, q), np.int64)
    if q == 0 or r == 0:
        return out
    stride = np.int64(num_items + 1)
    rated = np.unique(log_user.astype(np.int64) * stride + log_item)
    if request_time is None:
        weights = popularity.astype(np.float64).copy()
        weights[0] = 0.0
        cdf = np.cumsum(weights)
        cdf /= cdf[-1]
    else:
        by_time = np.argsort(log_time, kind="stable")
        items_by_time = log_item[by_time].astype(np.int64)
        n_before = np.searchsorted(log_time[by_time], request_time, side="left")
    pending = np.arange(r)
    for _ in range(_MAX_REJECTION_ROUNDS):
        u = rng.random((pending.size, 2 * q + 8))
        if request_time is None:
            draws = np.minimum(np.searchsorted(cdf, u, side="right"), num_items)
        else:  # a uniformly random event strictly before the request; 0 (rejected) when there is none
            n = n_before[pending, None]
            draws = np.where(n > 0, items_by_time[np.minimum((u * n).astype(np.int64), np.maximum(n - 1, 0))], 0)
        pool = np.concatenate([out[pending], draws], axis=1)  # earlier picks first so they are kept
        ok = (pool > 0) & ~_is_member(request_user[pending, None] * stride + pool, rated)
        ok &= _first_occurrence(pool)
        rank = np.cumsum(ok, axis=1) - 1
        chosen = ok & (rank < q)
        filled = np.zeros((pending.size, q), np.int64)
        rows, cols = np.nonzero(chosen)
        filled[rows, rank[rows, cols]] = pool[rows, cols]
        out[pending] = filled
        pending = pending[(filled > 0).sum(axis=1) < q]
        if pending.size == 0:
            return out
    for row in pending:  # heavy raters: exact draw among what is left
        lo, hi = np.searchsorted(rated, [request_user[row] * stride, (request_user[row] + 1) * stride])
        user_rated = rated[lo:hi] % stride
        have = out[row][out[row] > 0]
        if request_time is not None:
            weights = np.bincount(items_by_time[: n_before[row]], minlength=num_items + 1).astype(np.float64)
            weights[0] = 0.0
        left = np.setdiff1d(np.flatnonzero(weights > 0), np.concatenate([user_rated, have]))
        need = min(q - have.size, left.size)
        if need > 0:
            p = weights[left] / weights[left].sum()
            extra = rng.choice(left, size=need, replace=False, p=p)
            out[row, have.size : have.size + need] = extra
    return out


def _is_member(values: np.ndarray, sorted_set: np.ndarray) -> np.ndarray:
    if sorted_set.size == 0:
        return np.zeros(values.shape, bool)
    pos = np.minimum(np.searchsorted(sorted_set, values), sorted_set.size - 1)
    return sorted_set[pos] == values


def _first_occurrence(rows: np.ndarray) -> np.ndarray:
    """Mask of entries that are the first occurrence of their value within their row."""
    order = np.argsort(rows, axis=1, kind="stable")
    srt = np.take_along_axis(rows, order, axis=1)
    first = np.ones(rows.shape, bool)
    first[:, 1:] = srt[:, 1:] != srt[:, :-1]
    out = np.empty(rows.shape, bool)
    np.put_along_axis(out, order, first, axis=1)
    return out

"""The global_time split: time-ordered splits, no future in histories, negatives or their popularity."""

from __future__ import annotations


import numpy as np
import pytest

from gesr_jax.data import movielens, requests
from gesr_jax.data.batch import BatchSchema, validate_batch
from gesr_jax.data.config import DataConfig, MovieLensConfig

SPLITS = ("train", "valid", "test")


def _interactions(user, item, timestamp, num_items, rating=None) -> movielens.Interactions:
    """An in-memory rating log with no side features (build_requests reads only the log and sizes)."""
    user, item, timestamp = (np.asarray(a) for a in (user, item, timestamp))
    rating = np.full(user.size, 4.0, np.float32) if rating is None else np.asarray(rating, np.float32)
    n = num_items + 1
    return movielens.Interactions(
        files=None, user=user.astype(np.int32), item=item.astype(np.int32), rating=rating,
        timestamp=timestamp.astype(np.int64), num_users=int(user.max()), num_items=num_items,
        item_known=np.ones(n, bool), item_genres=np.zeros((n, 1), bool), item_primary_genre=np.zeros(n, np.int32),
        item_year=np.zeros(n, np.int32), item_director=None, director_names=(), user_features={}, num_tags=0,
    )  # fmt: skip


def _build(inter: movielens.Interactions, **kw) -> requests.BuiltRequests:
    settings = MovieLensConfig(cache=False, **{k: kw.pop(k) for k in list(kw) if k in DataConfig.moved_fields})
    dc = DataConfig(
        **(dict(source="movielens", history_len=6, num_positives=2, num_negatives=4, min_history=2) | kw),
        movielens=settings,
    )
    dc.validate()
    schema = BatchSchema(
        num_users=inter.num_users, num_items=inter.num_items, user_features=(), item_features=(), num_actions=6,
        history_len=dc.history_len, num_candidates=dc.num_candidates,
    )  # fmt: skip
    built = requests.build_requests(inter, {}, schema, dc)
    for name in SPLITS:
        validate_batch(getattr(built, name), schema)
    return built


def _random_log(seed=0, users=40, items=80, events=(10, 30)):
    rng = np.random.default_rng(seed)
    u, i, t = [], [], []
    for user in range(1, users + 1):
        n = int(rng.integers(*events))
        start = rng.integers(0, 50_000)
        times = start + np.sort(rng.integers(0, 100_000, size=n))
        times[n // 2 : n // 2 + 3] = times[n // 2]  # a same-second burst in every timeline
        u += [user] * n
        i += list(rng.choice(np.arange(1, items + 1), size=n, replace=False))
        t += list(times)
    return _interactions(u, i, t, items)


def _rows(split):
    for r in range(split["user_id"].size):
        yield {k: v[r] for k, v in split.items()}


def test_splits_are_ordered_in_time_and_follow_the_cuts():
    inter = _random_log()
    built = _build(inter)
    cut1, cut2 = built.stats["split_cut_times"]
    times = {s: getattr(built, s)["request_time"].astype(np.int64) for s in SPLITS}
    assert all(times[s].size > 0 for s in SPLITS)
    assert times["train"].max() < times["valid"].min() and times["valid"].max() < times["test"].min()
    assert times["train"].max() < cut1 <= times["valid"].min() and times["valid"].max() < cut2 <= times["test"].min()
    every = np.concatenate([times[s] for s in SPLITS])
    np.testing.assert_array_equal([cut1, cut2], np.ceil(np.quantile(every, (0.8, 0.9))))
    assert sum(built.stats[f"requests_{s}"] for s in SPLITS) == every.size
    assert built.stats["split"] == "global_time"


def test_a_request_exactly_at_a_cut_goes_to_the_later_split():
    # 10 users, each with 4 history events then one request (P=2) at times 1..10 (seconds from 1000).
    u, i, t = [], [], []
    for user in range(1, 11):
        u += [user] * 6
        i += [1, 2, 3, 4, 10 + user, 30 + user]
        t += [1, 2, 3, 4, 1000 + user, 1000 + user]
    built = _build(_interactions(u, i, t, 50), split_quantiles=(0.5, 0.8), min_history=4)  # one request per user
    cut1, cut2 = built.stats["split_cut_times"]
    # quantile(1001..1010, 0.5) = 1005.5 -> cut 1006; 0.8 -> 1008.2 -> cut 1009.
    assert (cut1, cut2) == (1006, 1009)
    assert built.valid["request_time"].min() == 1006 and built.test["request_time"].min() == 1009
    # With an 11th user at 1000 the quantiles land exactly on request times: those go to the later split.
    u2, i2, t2 = u + [11] * 6, i + [1, 2, 3, 4, 21, 41], t + [1, 2, 3, 4, 1000, 1000]
    built = _build(_interactions(u2, i2, t2, 50), split_quantiles=(0.5, 0.8), min_history=4)
    assert built.stats["split_cut_times"] == [1005, 1008]
    assert set(built.valid["request_time"]) == {1005, 1006, 1007}
    assert set(built.test["request_time"]) == {1008, 1009, 1010}


def test_histories_and_negatives_hold_nothing_from_the_future():
    inter = _random_log(seed=1)
    built = _build(inter, num_negatives=6)
    first_event = np.full(inter.num_items + 1, np.iinfo(np.int64).max)
    np.minimum.at(first_event, inter.item, inter.timestamp)
    rated = {}
    for uu, ii in zip(inter.user, inter.item):
        rated.setdefault(int(uu), set()).add(int(ii))
    checked = 0
    for name in SPLITS:
        for row in _rows(getattr(built, name)):
            t_req, user, n = int(row["request_time"]), int(row["user_id"]), int(row["history_len"])
            mine = (inter.user == user) & (inter.timestamp < t_req)
            order = np.lexsort((np.flatnonzero(mine), inter.timestamp[mine]))
            expect = inter.item[mine][order][-6:]
            assert row["history_item"][:n].tolist() == expect.tolist()  # the last N strictly earlier events
            assert np.all(row["history_time"][:n] < t_req)
            c = int(row["num_candidates"])
            negatives = row["cand_item"][:c][row["label_consume"][:c] == 0]
            assert np.all(first_event[negatives] < t_req)  # every negative existed before the request
            assert not set(negatives.tolist()) & rated[user]  # and the user never rated it
            checked += negatives.size
    assert checked > 0


def test_negative_popularity_counts_only_earlier_events():
    # 60 users rate 6 of items 1..10 early (t < 1000, in rounds of 100 s) and make requests then; item 11
    # has one early rating, then it and items 12..15 get a burst of 300 ratings each at t > 10_000.
    # Counting the future would make these the most popular negatives of the early requests.
    rng = np.random.default_rng(0)
    u, i, t = [], [], []
    for user in range(1, 61):
        chosen = rng.choice(np.arange(1, 11), size=6, replace=False)
        u += [user] * 6
        i += list(chosen)
        t += list(100 + 100 * np.arange(6) + user)
    u += [61]
    i += [11]
    t += [50]
    for user in range(100, 400):
        u += [user] * 5
        i += [11, 12, 13, 14, 15]
        t += [10_000 + user] * 5
    inter = _interactions(u, i, t, 20)
    early_negs = {}
    for split in ("global_time", "per_user_last"):
        built = _build(inter, split=split, num_positives=2, num_negatives=2, min_history=2)
        rows = np.concatenate([getattr(built, s)["request_time"] for s in SPLITS]) < 5_000
        cand = np.concatenate([getattr(built, s)["cand_item"] for s in SPLITS])[rows]
        label = np.concatenate([getattr(built, s)["label_consume"] for s in SPLITS])[rows]
        early_negs[split] = cand[label == 0]
    future_share = float(np.isin(early_negs["per_user_last"], [11, 12, 13, 14, 15]).mean())
    assert future_share > 0.5  # the construction bites: whole-log popularity picks the burst items
    # Before any request item 11 has 1 event against >= 120 for items 1..10: well under 5% of the draws.
    assert float(np.mean(early_negs["global_time"] == 11)) < 0.05
    assert not np.isin(early_negs["global_time"], [12, 13, 14, 15]).any()  # no event before: never drawn


def test_max_requests_per_user_keeps_the_latest_within_each_split():
    inter = _random_log(seed=2, events=(20, 40))
    full = _build(inter)
    capped = _build(inter, max_requests_per_user=2)
    assert capped.stats["split_cut_times"] == full.stats["split_cut_times"]  # cuts come before the cap
    for name in SPLITS:
        f, c = getattr(full, name), getattr(capped, name)
        assert np.bincount(c["user_id"]).max() <= 2
        for user in np.unique(f["user_id"]):
            expect = sorted(f["request_time"][f["user_id"] == user].tolist())[-2:]
            assert sorted(c["request_time"][c["user_id"] == user].tolist()) == expect


def test_per_user_last_is_still_available_and_seeds_fix_negatives():
    inter = _random_log(seed=3)
    per_user = _build(inter, split="per_user_last")
    assert "split_cut_times" not in per_user.stats
    users, counts = np.unique(per_user.test["user_id"], return_counts=True)
    assert np.all(counts == 1) and users.size == per_user.stats["users_with_requests"]
    a, b, c = _build(inter), _build(inter), _build(inter, seed=1)
    assert all(np.array_equal(a.test[k], b.test[k]) for k in a.test)
    assert not np.array_equal(a.train["cand_item"], c.train["cand_item"])
    with pytest.raises(ValueError, match="data.movielens.split must be"):
        DataConfig(movielens=MovieLensConfig(split="random")).validate()
    with pytest.raises(ValueError, match="split_quantiles"):
        DataConfig(movielens=MovieLensConfig(split_quantiles=(0.9, 0.8))).validate()


@pytest.mark.movielens
@pytest.mark.parametrize("name", ["ml-100k", "ml-1m"])
def test_shared_movielens_global_time(shared_data, name):
    if not (shared_data / name).is_dir():
        pytest.skip(f"{shared_data / name} is absent")
    inter = movielens.load_interactions(shared_data / name)
    built = _build(inter, history_len=50, num_positives=4, num_negatives=12, min_history=5, max_requests_per_user=16)
    times = [getattr(built, s)["request_time"].astype(np.int64) for s in SPLITS]
    assert times[0].max() < times[1].min() and times[1].max() < times[2].min()
    order = np.argsort(inter.timestamp, kind="stable")
    first_event = np.full(inter.num_items + 1, np.iinfo(np.int64).max)
    np.minimum.at(first_event, inter.item, inter.timestamp)
    for s in SPLITS:
        part = getattr(built, s)
        t_req = part["request_time"].astype(np.int64)[:, None]
        valid = np.arange(part["history_item"].shape[1])[None, :] < part["history_len"][:, None]
        assert np.all(np.where(valid, part["history_time"] < t_req, True))
        negative = (part["label_consume"] == 0) & (part["cand_item"] > 0)
        assert np.all(np.where(negative, first_event[part["cand_item"]] < t_req, True))
    assert order.size == built.stats["events"]

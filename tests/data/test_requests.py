"""ESR request construction: temporal splits, no leakage, negatives, ties, skipped users, caching."""

from __future__ import annotations

import dataclasses
import os

import numpy as np
import pytest

from gesr_jax import config as config_lib
from gesr_jax.data import movielens
from gesr_jax.data.batch import validate_batch
from gesr_jax.data.config import DataConfig, MovieLensConfig
from gesr_jax.data.datasets import DataError, load_splits, schema_for
from movielens_fixtures import Log, random_log, write_100k, write_csv, write_dat


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("GESR_CACHE_DIR", str(tmp_path / "cache"))


def _config(path, **kw) -> DataConfig:
    # These tests pin the per-user protocol; tests/data/test_global_time_split.py covers the default split.
    moved = {k: kw.pop(k) for k in list(kw) if k in DataConfig.moved_fields}
    settings = {"path": str(path), "split": "per_user_last"} | moved
    base = dict(source="movielens", history_len=5, num_positives=2, num_negatives=3, min_history=2)
    return DataConfig(**(base | kw), movielens=MovieLensConfig(**settings))


def _timelines(log: Log) -> dict[int, list[tuple[int, int, float]]]:
    """Per user: (timestamp, item, rating) in the protocol's order (time, then file row)."""
    order = np.lexsort((np.arange(log.user.size), log.timestamp, log.user))
    out: dict[int, list] = {}
    for i in order:
        out.setdefault(int(log.user[i]), []).append((int(log.timestamp[i]), int(log.item[i]), float(log.rating[i])))
    return out


def _rows(split):
    for r in range(split["user_id"].size):
        yield {k: v[r] for k, v in split.items()}


def test_protocol_against_a_direct_reimplementation(tmp_path):
    log = random_log(seed=3)
    cfg = _config(write_dat(tmp_path / "ml", log))
    splits = load_splits(cfg)
    timelines = _timelines(log)
    seen_users = {}
    for name in ("train", "valid", "test"):
        split = getattr(splits, name)
        validate_batch(split, splits.schema)
        for row in _rows(split):
            user, t_req = int(row["user_id"]), int(row["request_time"])
            events = timelines[user]
            # History = the most recent N events with a strictly earlier timestamp, oldest first.
            before = [e for e in events if e[0] < t_req][-cfg.history_len :]
            n = int(row["history_len"])
            assert [(int(t), int(i)) for t, i in zip(row["history_time"][:n], row["history_item"][:n])] == [
                (t, i) for t, i, _ in before
            ]
            assert np.array_equal(row["history_action"][:n], np.ceil([r for *_, r in before]))
            # Nothing at or after the request can be in the history: no candidate, no later event.
            assert not set(row["cand_item"][row["label_consume"] == 1]) & set(row["history_item"][:n])
            positives = row["cand_item"][row["label_consume"] == 1]
            assert len(positives) == cfg.num_positives
            rated = {i for _, i, _ in events}
            negatives = row["cand_item"][: row["num_candidates"]][row["label_consume"][: row["num_candidates"]] == 0]
            assert len(set(negatives)) == len(negatives) == cfg.num_negatives
            assert not set(negatives.tolist()) & rated  # negatives are items the user never rated
            rating_of = {i: r for _, i, r in events}
            for item, engage in zip(row["cand_item"], row["label_engage"]):
                if item in positives:
                    assert engage == (rating_of[int(item)] >= cfg.movielens.engage_threshold)
            seen_users.setdefault(user, []).append((t_req, name))
    for user, reqs in seen_users.items():
        reqs.sort()
        names = [n for _, n in reqs]
        assert names[-1] == "test"
        assert names[:-2] == ["train"] * (len(names) - 2)
        if len(names) >= 2:
            assert names[-2] == "valid"
        # Blocks of P from the end; the last block's first event is the test request time.
        events = timelines[user]
        assert reqs[-1][0] == events[-cfg.num_positives][0]


def test_same_second_events_never_see_each_other(tmp_path):
    # user 1: six events, the 3rd..5th in the same second; P=2 blocks from the end: [4,5] and [2,3].
    times = [100, 200, 300, 300, 300, 400]
    log = Log(np.ones(6, int), np.arange(1, 7), np.full(6, 4.0), np.array(times), num_items=12, num_users=1)
    splits = load_splits(_config(write_dat(tmp_path / "ml", log, users=False), min_history=2))
    test = splits.test
    assert int(test["request_time"][0]) == 300
    # Events at t=300 before the block in file order are still not history: strictly earlier only.
    assert test["history_item"][0, : test["history_len"][0]].tolist() == [1, 2]
    assert splits.valid["user_id"].size == 1 and int(splits.valid["history_len"][0]) == 2
    # Block [2,3]: request_time 200, one earlier event < min_history 2 -> it is not a request.
    assert splits.stats["requests_valid"] == 1 and splits.stats["requests_train"] == 0


def test_skipped_users_are_counted(tmp_path):
    log = random_log(seed=1)
    cfg = _config(write_dat(tmp_path / "ml", log), min_history=5, num_positives=8)
    counts = np.bincount(log.user)[1:]
    stats = load_splits(cfg).stats
    assert stats["skipped_users_too_few_events"] == int(np.count_nonzero(counts < 13)) > 0
    assert stats["skipped_users"] >= stats["skipped_users_too_few_events"]
    assert stats["users_with_requests"] + stats["skipped_users"] == stats["users"] == log.num_users


def test_negatives_follow_popularity_and_seed(tmp_path):
    rng = np.random.default_rng(0)
    # 200 users each rate 8 of items 1..10 (users 1..60 swap one for item 11); items 12..20 are never rated.
    users, items, times = [], [], []
    for u in range(1, 201):
        chosen = list(rng.choice(np.arange(1, 11), size=8, replace=False))
        if u <= 60:
            chosen[0] = 11
        users += [u] * 8
        items += chosen
        times += list(1_000_000_000 + np.arange(8) * 60)
    log = Log(np.array(users), np.array(items), np.full(len(users), 3.0), np.array(times), num_items=20, num_users=200)
    root = write_dat(tmp_path / "ml", log, users=False)
    cfg = _config(root, num_positives=2, num_negatives=2, min_history=2)
    a = load_splits(cfg)
    negs = a.test["cand_item"][a.test["label_consume"] == 0]
    # Users 61..200 never rated item 11 (rated by 60 users), items 12..20 have no ratings: never drawn.
    assert negs.max() <= 11
    assert np.count_nonzero(negs == 11) > 0
    b = load_splits(config_lib.replace(cfg, movielens={"cache": False}))
    assert all(np.array_equal(a.test[k], b.test[k]) for k in a.test)
    c = load_splits(config_lib.replace(cfg, seed=1, movielens={"cache": False}))
    assert not np.array_equal(a.test["cand_item"], c.test["cand_item"])


def test_candidates_are_shuffled(tmp_path):
    splits = load_splits(_config(write_100k(tmp_path / "ml", random_log(num_users=30, seed=2))))
    labels = splits.train["label_consume"]
    # Positives land in every slot, so the slot carries no label.
    assert (labels.sum(axis=0) > 0).all() and (labels.sum(axis=0) < labels.shape[0]).all()


def test_max_requests_per_user_keeps_the_latest(tmp_path):
    root = write_csv(tmp_path / "ml", random_log(half_stars=True))
    full = load_splits(_config(root))
    capped = load_splits(_config(root, max_requests_per_user=2))
    assert capped.train["user_id"].size == 0
    assert all(np.array_equal(full.test[k], capped.test[k]) for k in full.test)
    # Half stars are rounded up in history_action; engage uses the raw rating.
    assert set(np.unique(full.train["history_action"])) <= {0, 1, 2, 3, 4, 5}


def test_schema_matches_batches_for_every_format(tmp_path):
    for fmt, writer in (("dat", write_dat), ("100k", write_100k), ("csv", write_csv)):
        log = random_log(half_stars=fmt == "csv")
        cfg = _config(writer(tmp_path / fmt, log))
        schema = schema_for(cfg)
        assert load_splits(cfg).schema == schema
        assert schema.num_items == log.num_items and schema.num_actions == 6 and not schema.has_true_probs
        assert schema.item_feature_names == ("genre", "year")
        assert schema.user_feature_names == (() if fmt == "csv" else ("gender", "age", "occupation"))
    cfg = _config(write_dat(tmp_path / "dir", random_log(), directors=True), director_vocab=1)
    schema = schema_for(cfg)
    assert dict(schema.item_features)["director"] == 3
    test = load_splits(cfg).test
    # director_vocab=1 keeps "Ann Lee" (id 2); everyone else is "other" (id 1).
    assert set(np.unique(test["cand_director"])) <= {0, 1, 2}


def test_cache_is_reused_and_invalidated(tmp_path):
    root = write_dat(tmp_path / "ml", random_log())
    cfg = _config(root)
    first = load_splits(cfg)
    cached = sorted((tmp_path / "cache").glob("movielens-splits-*.npz"))
    assert len(cached) == 1
    second = load_splits(cfg)
    assert all(np.array_equal(first.test[k], second.test[k]) for k in first.test) and first.stats == second.stats
    load_splits(dataclasses.replace(cfg, num_negatives=4))  # another config -> another entry
    assert len(list((tmp_path / "cache").glob("movielens-splits-*.npz"))) == 2
    ratings = root / "ratings.dat"
    lines = ratings.read_text().splitlines()
    ratings.write_text("\n".join(lines[:-3]) + "\n")
    os.utime(ratings, ns=(1, 1))
    changed = load_splits(cfg)
    assert changed.stats["events"] == first.stats["events"] - 3
    cached[0].write_bytes(b"not a zip")  # a damaged cache entry is rebuilt, not trusted
    assert load_splits(cfg).stats["events"] == first.stats["events"] - 3


def test_bad_config_fails_clearly(tmp_path):
    with pytest.raises(movielens.DataFormatError, match="data.movielens.path is empty"):
        schema_for(DataConfig(source="movielens"))
    with pytest.raises(DataError, match=r"data.source 'kuairand' is not a registered dataset; known sources: .*'movielens'"):
        schema_for(DataConfig(source="kuairand"))
    with pytest.raises(ValueError, match="data.min_history"):
        schema_for(DataConfig(history_len=2, min_history=3))


@pytest.mark.movielens
def test_shared_ml1m_builds_and_is_read_back_from_the_cache(shared_data, tmp_path, monkeypatch):
    # Timing lives in benchmarks: here the second load must come from the cache, not from a rebuild.
    from gesr_jax.data import requests as requests_lib

    settings = MovieLensConfig(path=str(shared_data / "ml-1m"), split="per_user_last")
    cfg = DataConfig(source="movielens", movielens=settings)
    splits = load_splits(cfg)
    for name in ("train", "valid", "test"):
        validate_batch(getattr(splits, name), splits.schema)
    assert splits.stats["users"] == splits.stats["requests_test"] == 2999 and splits.stats["skipped_users"] == 0
    assert splits.schema.item_feature_names == ("genre", "year", "director")
    assert (splits.schema.num_items, splits.schema.num_users) == (3952, 6040)

    def no_rebuild(*args, **kwargs):
        raise AssertionError("the cached splits were rebuilt")

    monkeypatch.setattr(requests_lib, "build_requests", no_rebuild)
    again = load_splits(cfg)
    assert np.array_equal(again.train["cand_item"], splits.train["cand_item"])


def test_item_table_matches_the_batches(tmp_path):
    from gesr_jax.data.datasets import item_table

    cfg = _config(write_dat(tmp_path / "ml", random_log(), directors=True))
    table, test = item_table(cfg), load_splits(cfg).test
    assert set(table) == {"genre", "year", "director"}
    for name, column in table.items():
        assert column[0] == 0 and np.array_equal(column[test["cand_item"]], test[f"cand_{name}"])


def test_unwritable_cache_only_warns(tmp_path, monkeypatch):
    blocker = tmp_path / "file-not-folder"
    blocker.write_text("")
    monkeypatch.setenv("GESR_CACHE_DIR", str(blocker / "cache"))
    cfg = _config(write_dat(tmp_path / "ml", random_log()))
    with pytest.warns(UserWarning, match="could not write the dataset cache"):
        splits = load_splits(cfg)
    assert splits.stats["requests_test"] > 0

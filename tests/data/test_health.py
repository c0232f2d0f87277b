"""Feature health: HMA match rates, OOV rates, constant features, request counts and times."""

from __future__ import annotations


import numpy as np
import pytest

from gesr_jax import config as config_lib
from gesr_jax.data import health


def _split():
    # 2 requests, history 3 slots, 3 candidate slots. Request 0: history genres [2, 3, pad], candidates
    # genres [3, 4, 1]; request 1: history [1, 1, 5], candidates [5, pad, pad] (num_candidates = 1).
    return {
        "user_id": np.array([1, 2], np.int32),
        "user_gender": np.array([0, 2], np.int32),
        "history_item": np.array([[10, 11, 0], [12, 13, 14]], np.int32),
        "history_genre": np.array([[2, 3, 0], [1, 1, 5]], np.int32),
        "history_action": np.array([[1, 1, 0], [1, 1, 1]], np.int32),
        "history_time": np.array([[1, 2, 0], [1, 2, 3]], np.int32),
        "history_len": np.array([2, 3], np.int32),
        "request_time": np.array([50, 70], np.int32),
        "cand_item": np.array([[20, 21, 22], [14, 0, 0]], np.int32),
        "cand_genre": np.array([[3, 4, 1], [5, 0, 0]], np.int32),
        "num_candidates": np.array([3, 1], np.int32),
    }


def test_rates_match_a_hand_count():
    report = health.feature_health({"train": _split()}, [("genre", "genre"), ("item", "item"), ("item", "genre")])
    train = report["splits"]["train"]
    assert (train["requests"], train["min_request_time"], train["max_request_time"]) == (2, 50, 70)
    # Valid candidates: 3 + 1. Matches: request 0 genre 3 (yes), 4 (no), 1 (no: history has no 1);
    # request 1 genre 5 (yes). Items: candidate 14 is history item 14 -> 1 of 4.
    assert train["hma_nonzero_rate"] == {"genre:genre": 0.5, "item:item": 0.25, "item:genre": 0.0}
    # cand_genre: one 1 among 4 real entries; history_genre: two 1s among 5; user_gender: one unknown (0) of 2.
    assert train["oov_rate"] == {"user_gender": 0.5, "history_genre": 0.4, "cand_genre": 0.25}
    assert train["distinct_values"] == {"user_gender": 2, "history_genre": 4, "cand_genre": 4}
    assert report["never_matching_hma_pairs"] == ["item:genre"]
    assert report["constant_features"] == []


def test_constant_features_and_padding_are_seen_through():
    split = _split()
    split["cand_genre"] = np.where(split["cand_item"] > 0, 7, 99)  # 99 sits in padding slots only
    split["history_genre"] = np.where(np.arange(3)[None, :] < split["history_len"][:, None], 7, 99)
    report = health.feature_health({"train": split, "test": split}, [("genre", "genre")])
    assert set(report["constant_features"]) == {"history_genre", "cand_genre"}
    assert report["splits"]["test"]["hma_nonzero_rate"]["genre:genre"] == 1.0
    with pytest.raises(KeyError, match="history_director"):
        health.feature_health({"train": split}, [("director", "director")])


def test_agrees_with_the_hma_layer_reference():
    jnp = pytest.importorskip("jax.numpy")
    from gesr_jax.layers.hard_matching import brute_force_counts

    rng = np.random.default_rng(0)
    r, n, c = 64, 12, 8
    split = {
        "history_item": rng.integers(0, 6, size=(r, n)).astype(np.int32),
        "history_len": rng.integers(0, n + 1, size=r).astype(np.int32),
        "cand_item": rng.integers(0, 6, size=(r, c)).astype(np.int32),
        "num_candidates": rng.integers(1, c + 1, size=r).astype(np.int32),
        "request_time": np.zeros(r, np.int32),
    }
    hist_valid = np.arange(n)[None, :] < split["history_len"][:, None]
    cand_valid = np.arange(c)[None, :] < split["num_candidates"][:, None]
    counts = np.asarray(
        brute_force_counts(jnp.asarray(split["history_item"]), jnp.asarray(hist_valid), jnp.asarray(split["cand_item"]))
    )
    expect = np.count_nonzero((counts > 0) & cand_valid) / np.count_nonzero(cand_valid)
    assert health.hma_nonzero_rate(split, "item", "item") == pytest.approx(expect)


@pytest.mark.movielens
def test_item_item_never_matches_on_movielens(shared_data):
    from gesr_jax.configs import ml100k_base
    from gesr_jax.data import movielens, requests
    from gesr_jax.data.batch import BatchSchema

    root = shared_data / "ml-100k"
    if not root.is_dir():
        pytest.skip(f"{root} is absent")
    dc = config_lib.replace(ml100k_base.get_config().data, movielens={"path": str(root), "cache": False})
    inter = movielens.load_interactions(root)
    table = {"genre": np.where(inter.item_primary_genre > 0, inter.item_primary_genre + 1, 1).astype(np.int32)}
    table["genre"][0] = 0
    schema = BatchSchema(
        num_users=inter.num_users, num_items=inter.num_items, user_features=(), item_features=(("genre", 22),),
        num_actions=6, history_len=dc.history_len, num_candidates=dc.num_candidates,
    )  # fmt: skip
    built = requests.build_requests(inter, table, schema, dc)
    report = health.feature_health(built, [("item", "item"), ("genre", "genre")])
    assert report["never_matching_hma_pairs"] == ["item:item"]
    assert all(0.5 < s["hma_nonzero_rate"]["genre:genre"] < 1.0 for s in report["splits"].values())
    times = [report["splits"][s] for s in ("train", "valid", "test")]
    assert times[0]["max_request_time"] < times[1]["min_request_time"] <= times[1]["max_request_time"]
    assert times[1]["max_request_time"] < times[2]["min_request_time"]

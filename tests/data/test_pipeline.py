"""grain input pipeline: per-epoch reshuffles, exact eval coverage, host sharding, resumable iterators."""

from __future__ import annotations

import numpy as np
import pytest

from gesr_jax.data import batch as batch_lib
from gesr_jax.data import pipeline

SCHEMA = batch_lib.BatchSchema(
    num_users=1000, num_items=50, user_features=(("age", 5),), item_features=(("category", 7),), num_actions=6,
    history_len=4, num_candidates=3, has_true_probs=True,
)


def make_split(n: int, seed: int = 0) -> dict[str, np.ndarray]:
    """A valid split whose user_id is 1..n, so every row names its request."""
    arrays = batch_lib.random_batch(SCHEMA, n, seed=seed)
    arrays["user_id"] = np.arange(1, n + 1, dtype=np.int32)
    return arrays


def request_ids(batch: dict[str, np.ndarray]) -> np.ndarray:
    return batch["user_id"][batch["user_id"] > 0]


def test_train_batches_reshuffle_requests_each_epoch_deterministically():
    arrays = make_split(24)
    ds = pipeline.train_dataset(arrays, 6, seed=3, process_index=0, process_count=1)
    epochs = [np.concatenate([ds[e * 4 + j]["user_id"] for j in range(4)]) for e in range(3)]
    for ids in epochs:  # every request exactly once per epoch
        np.testing.assert_array_equal(np.sort(ids), np.arange(1, 25))
    assert not np.array_equal(epochs[0], epochs[1]) and not np.array_equal(epochs[1], epochs[2])
    # Batches of an epoch are not just a reordering of the previous epoch's batches.
    first = {tuple(sorted(ds[j]["user_id"])) for j in range(4)}
    second = {tuple(sorted(ds[4 + j]["user_id"])) for j in range(4)}
    assert first != second
    again = pipeline.train_dataset(arrays, 6, seed=3, process_index=0, process_count=1)
    np.testing.assert_array_equal(again[5]["user_id"], ds[5]["user_id"])
    other_seed = pipeline.train_dataset(arrays, 6, seed=4, process_index=0, process_count=1)
    assert not np.array_equal(other_seed[0]["user_id"], ds[0]["user_id"])


def test_train_batches_keep_rows_together_and_valid():
    arrays = make_split(20)
    ds = pipeline.train_dataset(arrays, 8, seed=0, process_index=0, process_count=1)
    batch = ds[3]
    batch_lib.validate_batch(batch, SCHEMA)
    rows = batch["user_id"] - 1
    for key, value in arrays.items():
        np.testing.assert_array_equal(batch[key], value[rows], err_msg=key)


def test_host_shards_are_disjoint_and_together_cover_the_epoch():
    arrays = make_split(32)
    hosts = [pipeline.train_dataset(arrays, 8, seed=1, process_index=p, process_count=2) for p in range(2)]
    assert hosts[0][0]["user_id"].shape == (4,)
    # Steps 0..3 of both hosts = one epoch of 32 requests.
    seen = np.concatenate([hosts[p][s]["user_id"] for s in range(4) for p in range(2)])
    np.testing.assert_array_equal(np.sort(seen), np.arange(1, 33))


def test_eval_covers_every_request_once_and_pads_with_empty_rows():
    arrays = make_split(23)
    for count in (1, 3):
        shards = [pipeline.eval_dataset(arrays, 6, process_index=p, process_count=count) for p in range(count)]
        lengths = {len(ds) for ds in shards}
        assert len(lengths) == 1, "every host must run the same number of eval steps"
        batches = [b for ds in shards for b in pipeline.make_iterator(ds)]
        ids = np.concatenate([request_ids(b) for b in batches])
        np.testing.assert_array_equal(np.sort(ids), np.arange(1, 24))
        for b in batches:
            assert b["user_id"].shape == (6 // count,)
            batch_lib.validate_batch(b, SCHEMA)
            pad = b["user_id"] == 0
            assert np.all(b["num_candidates"][pad] == 0) and np.all(b["history_len"][pad] == 0)


def test_iterator_state_resumes_the_same_stream():
    arrays = make_split(30)
    ds = pipeline.train_dataset(arrays, 4, seed=7, process_index=0, process_count=1)
    it = pipeline.make_iterator(ds)
    for _ in range(9):
        next(it)
    state = it.get_state()
    expected = [next(it)["user_id"] for _ in range(5)]
    resumed = pipeline.make_iterator(ds)
    resumed.set_state(state)
    for want in expected:
        np.testing.assert_array_equal(next(resumed)["user_id"], want)


def test_bad_inputs_name_the_problem():
    arrays = make_split(10)
    arrays["cand_item"] = arrays["cand_item"][:9]
    with pytest.raises(ValueError, match=r"train split\['cand_item'\]"):
        pipeline.train_dataset(arrays, 4, seed=0, process_index=0, process_count=1)
    with pytest.raises(ValueError, match="fewer than one batch"):
        pipeline.train_dataset(make_split(3), 4, seed=0, process_index=0, process_count=1)
    with pytest.raises(ValueError, match="train.batch_size=6"):
        pipeline.train_dataset(make_split(12), 6, seed=0, process_index=0, process_count=4)
    with pytest.raises(ValueError, match="train.eval_batch_size=6"):
        pipeline.eval_dataset(make_split(12), 6, process_index=0, process_count=4)

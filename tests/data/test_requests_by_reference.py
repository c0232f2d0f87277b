"""Requests by reference give batches bit-identical to the materialised ones, at fixed seeds, for both splits."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

import requests_materialised_reference as reference
from gesr_jax.data import movielens, movielens_dataset, pipeline, requests
from gesr_jax.data.config import DataConfig, MovieLensConfig
from gesr_jax.data.event_log import RequestSplit
from movielens_fixtures import random_log, write_100k, write_csv, write_dat

SPLITS = ("train", "valid", "test")


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("GESR_CACHE_DIR", str(tmp_path / "cache"))


def _both(inter: movielens.Interactions, dc: DataConfig):
    schema = movielens_dataset.schema(dc)
    table = movielens_dataset.movielens_item_table(inter, dc)
    return (
        reference.build_requests(inter, table, schema, dc),
        requests.build_requests(inter, table, schema, dc),
        schema,
    )


def _assert_identical(a: dict[str, np.ndarray], b: dict[str, np.ndarray], where: str) -> None:
    assert list(a) == list(b), where
    for key in a:
        assert a[key].dtype == b[key].dtype and a[key].shape == b[key].shape, f"{where}: {key}"
        assert a[key].tobytes() == b[key].tobytes(), f"{where}: {key} differs"


def check_bit_identical(inter: movielens.Interactions, dc: DataConfig, batch_size: int = 16, batches: int = 6) -> None:
    old, new, _ = _both(inter, dc)
    assert old.stats == new.stats
    for name in SPLITS:
        mat, ref = getattr(old, name), getattr(new, name)
        assert isinstance(ref, RequestSplit) and ref.num_requests == mat["user_id"].shape[0]
        _assert_identical(mat, ref.materialise(), f"{name} split")
        if mat["user_id"].shape[0] == 0:
            continue
        # The grain sources: shuffled train batches across epoch boundaries, the padded eval pass.
        size = min(batch_size, mat["user_id"].shape[0])
        pairs = [
            (pipeline.train_dataset(mat, size, seed=dc.seed + 7, process_index=0, process_count=1),
             pipeline.train_dataset(ref, size, seed=dc.seed + 7, process_index=0, process_count=1)),
            (pipeline.eval_dataset(mat, size, process_index=0, process_count=1),
             pipeline.eval_dataset(ref, size, process_index=0, process_count=1)),
        ]  # fmt: skip
        for mat_ds, ref_ds in pairs:
            per_epoch = max(mat["user_id"].shape[0] // size, 1)
            wanted = {0, 1, per_epoch - 1, per_epoch, 2 * per_epoch + 1, batches}
            indices = sorted(i for i in wanted if i < len(mat_ds))
            for i in indices:
                _assert_identical(mat_ds[i], ref_ds[i], f"{name} batch {i}")


@pytest.mark.parametrize("split", ["global_time", "per_user_last"])
@pytest.mark.parametrize("fmt", ["dat", "100k", "csv"])
def test_synthetic_logs_are_bit_identical(tmp_path, fmt, split):
    writer = {"dat": write_dat, "100k": write_100k, "csv": write_csv}[fmt]
    kw = {"directors": True} if fmt == "dat" else {}
    root = writer(tmp_path / fmt, random_log(num_users=40, num_items=60, seed=5, half_stars=fmt == "csv"), **kw)
    dc = DataConfig(source="movielens", movielens=MovieLensConfig(path=str(root), split=split, cache=False),
                    history_len=7, num_positives=2, num_negatives=5, min_history=2, seed=3)  # fmt: skip
    check_bit_identical(movielens.load_interactions(root), dc, batch_size=8)
    # A cap on requests per user and a larger Q (some rows short of negatives) take other code paths.
    capped = dataclasses.replace(dc, max_requests_per_user=2, num_negatives=40)
    check_bit_identical(movielens.load_interactions(root), capped, batch_size=8)


def test_the_cache_holds_the_log_once_and_reads_back_identically(tmp_path):
    root = write_dat(tmp_path / "ml", random_log(num_users=30, seed=2))
    settings = MovieLensConfig(path=str(root))
    dc = DataConfig(source="movielens", movielens=settings, history_len=6, num_positives=2, num_negatives=3,
                    min_history=2)
    first = movielens_dataset.load_splits(dc)
    second = movielens_dataset.load_splits(dc)  # from the .npz cache
    for name in SPLITS:
        a, b = getattr(first, name), getattr(second, name)
        assert isinstance(b, RequestSplit)
        _assert_identical(a.materialise(), b.materialise(), name)
    cached = next((tmp_path / "cache").glob("movielens-splits-*.npz"))
    with np.load(cached) as data:
        assert not any(k.endswith("/history_item") for k in data.files)  # no [R, N] arrays stored
        assert data["log/item"].shape[0] == first.stats["events"]


def test_gather_of_a_subset_equals_the_rows_of_the_whole(tmp_path):
    root = write_100k(tmp_path / "ml", random_log(num_users=25, seed=4))
    settings = MovieLensConfig(path=str(root))
    dc = DataConfig(source="movielens", movielens=settings, history_len=9, num_positives=2, num_negatives=3,
                    min_history=2)
    train = movielens_dataset.load_splits(dc).train
    whole = train.materialise()
    rows = np.array([5, 0, 5, train.num_requests - 1])
    part = train.gather(rows)
    for key in whole:
        assert np.array_equal(part[key], whole[key][rows])
    assert np.array_equal(train["history_item"], whole["history_item"])
    assert pipeline.check_split(train) == train.num_requests


def _shared_cases(shared, name):
    root = shared / name
    if not root.is_dir():
        pytest.skip(f"{root} is absent")
    return movielens.load_interactions(root), root


@pytest.mark.movielens
@pytest.mark.parametrize("split", ["global_time", "per_user_last"])
def test_ml100k_is_bit_identical(shared_data, split):
    inter, root = _shared_cases(shared_data, "ml-100k")
    settings = MovieLensConfig(path=str(root), split=split, cache=False)
    dc = DataConfig(source="movielens", movielens=settings, history_len=50)
    check_bit_identical(inter, dc, batch_size=64)


@pytest.mark.movielens
@pytest.mark.slow
@pytest.mark.parametrize("split", ["global_time", "per_user_last"])
def test_ml1m_is_bit_identical(shared_data, split):
    inter, root = _shared_cases(shared_data, "ml-1m")
    settings = MovieLensConfig(path=str(root), split=split, cache=False)
    dc = DataConfig(source="movielens", movielens=settings, history_len=200)
    check_bit_identical(inter, dc, batch_size=128)

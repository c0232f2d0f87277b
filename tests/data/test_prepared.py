"""Prepared folders: the same batches as in memory, refusals that name file and field, exact iterator resume."""

from __future__ import annotations

import dataclasses
import json
import pathlib

import numpy as np
import pytest

from gesr_jax import config as config_lib
from gesr_jax.data import commands, datasets, pipeline, prepared
from gesr_jax.data.config import DataConfig, MovieLensConfig, SyntheticConfig
from gesr_jax.data.event_log import RequestSplit
from movielens_fixtures import random_log, write_dat

SPLITS = ("train", "valid", "test")


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("GESR_CACHE_DIR", str(tmp_path / "cache"))


@pytest.fixture
def folder(tmp_path):
    root = write_dat(tmp_path / "ml", random_log(num_users=30, seed=8), directors=True)
    settings = MovieLensConfig(path=str(root))
    dc = DataConfig(source="movielens", movielens=settings, history_len=6, num_positives=2, num_negatives=3,
                    min_history=2)
    out = tmp_path / "prepared"
    prepared.prepare(dc, out, log=lambda m: None)
    return dc, out


def _same(a, b):
    assert list(a) == list(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and np.array_equal(a[k], b[k]), k


def test_prepared_batches_equal_the_in_memory_ones(folder):
    dc, out = folder
    memory = datasets.load_splits(dc)
    # data.prepared goes through the registry: the movielens dataset reads the folder, not data.movielens.path.
    disk = datasets.load_splits(config_lib.replace(dc, prepared=str(out), movielens={"path": "/nonexistent"}))
    assert disk.schema == memory.schema and disk.stats == memory.stats
    assert isinstance(disk.train, RequestSplit) and isinstance(disk.train.log.item, np.memmap)
    for name in SPLITS:
        _same(getattr(memory, name).materialise(), getattr(disk, name).materialise())
    for count in (1, 2):  # each process's share of the batches, as in memory
        for index in range(count):
            kw = dict(process_index=index, process_count=count)
            a = pipeline.train_dataset(memory.train, 8, seed=1, **kw)
            b = pipeline.train_dataset(disk.train, 8, seed=1, **kw)
            for i in range(5):
                _same(a[i], b[i])
            _same(pipeline.eval_dataset(memory.test, 8, **kw)[0], pipeline.eval_dataset(disk.test, 8, **kw)[0])


def test_the_iterator_resumes_exactly(folder):
    dc, out = folder
    train = prepared.open_prepared(dataclasses.replace(dc, prepared=str(out))).train
    it = pipeline.make_iterator(pipeline.train_dataset(train, 4, seed=3, process_index=0, process_count=1))
    for _ in range(7):  # past an epoch boundary
        next(it)
    state = it.get_state()
    expected = [next(it) for _ in range(3)]
    again = prepared.open_prepared(dataclasses.replace(dc, prepared=str(out))).train  # as after a kill
    resumed = pipeline.make_iterator(pipeline.train_dataset(again, 4, seed=3, process_index=0, process_count=1))
    resumed.set_state(state)
    for batch in expected:
        _same(batch, next(resumed))


def test_a_mismatching_config_is_refused_naming_file_and_field(folder):
    dc, out = folder
    with pytest.raises(prepared.PreparedError, match=r"manifest.json: field 'data.num_negatives' is 3 .* but 4"):
        prepared.open_prepared(dataclasses.replace(dc, prepared=str(out), num_negatives=4))
    with pytest.raises(prepared.PreparedError, match=r"manifest.json: field 'data.movielens.split'"):
        prepared.open_prepared(config_lib.replace(dc, prepared=str(out), movielens={"split": "per_user_last"}))
    # Where the source was read from is not part of what was built.
    prepared.open_prepared(config_lib.replace(dc, prepared=str(out), movielens={"path": "/elsewhere", "cache": False}))


def test_a_folder_prepared_before_the_movielens_section_still_opens(folder):
    dc, out = folder
    manifest = json.loads((out / prepared.MANIFEST).read_text())
    old = {f"data.movielens.{name}" for name in DataConfig.moved_fields}  # what such a folder named flat
    flat = {(k.replace("data.movielens.", "data.") if k in old else k): v for k, v in manifest["config"].items()}
    assert "data.split" in flat and "data.movielens.split" not in flat
    (out / prepared.MANIFEST).write_text(json.dumps({**manifest, "config": flat}))
    prepared.open_prepared(dataclasses.replace(dc, prepared=str(out)))
    with pytest.raises(prepared.PreparedError, match=r"field 'data.movielens.engage_threshold' is 4.0 .* but 3.0"):
        prepared.open_prepared(config_lib.replace(dc, prepared=str(out), movielens={"engage_threshold": 3.0}))


def test_damage_is_refused_naming_the_file(folder):
    dc, out = folder
    cfg = dataclasses.replace(dc, prepared=str(out))
    target = out / "train" / "cand_item.npy"
    data = bytearray(target.read_bytes())
    data[-1] ^= 1
    target.write_bytes(bytes(data))
    with pytest.raises(prepared.PreparedError, match=r"train/cand_item.npy: field 'sha256' does not match"):
        prepared.open_prepared(cfg)
    target.write_bytes(bytes(data[:-4]))
    with pytest.raises(prepared.PreparedError, match=r"train/cand_item.npy: field 'bytes' is"):
        prepared.open_prepared(cfg)
    # Two processes share the hashing: the damage is found by the one whose share holds the file.
    target.write_bytes(bytes(data))
    found = []
    for index in range(2):
        try:
            prepared.open_prepared(cfg, process_index=index, process_count=2)
        except prepared.PreparedError as err:
            found.append(str(err))
    assert len(found) == 1 and "train/cand_item.npy: field 'sha256'" in found[0]
    (out / "log" / "item.npy").unlink()
    with pytest.raises(prepared.PreparedError, match=r"log/item.npy is missing"):
        prepared.open_prepared(cfg)
    (out / "manifest.json").unlink()
    with pytest.raises(prepared.PreparedError, match=r"manifest.json is missing"):
        prepared.open_prepared(cfg)


def test_a_schema_that_does_not_fit_the_config_is_refused(folder):
    dc, out = folder
    schema_path, manifest_path = out / "schema.json", out / "manifest.json"
    schema = json.loads(schema_path.read_text())
    schema["history_len"] = 7
    schema_path.write_text(json.dumps(schema))
    manifest = json.loads(manifest_path.read_text())
    manifest["files"]["schema.json"] |= {"sha256": prepared.sha256_of(schema_path),
                                         "bytes": schema_path.stat().st_size}  # fmt: skip
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(prepared.PreparedError, match=r"schema.json: field 'history_len' is 7 but the config gives 6"):
        prepared.open_prepared(dataclasses.replace(dc, prepared=str(out)))
    manifest["version"] = 99
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(prepared.PreparedError, match=r"manifest.json: field 'version' is 99, expected 1"):
        prepared.open_prepared(dataclasses.replace(dc, prepared=str(out)))


def test_materialised_layout_for_a_dataset_without_a_log(tmp_path):
    dc = DataConfig(history_len=8, num_positives=2, num_negatives=4, min_history=2,
                    synthetic=SyntheticConfig(num_users=40, num_items=60, num_creators=6, num_categories=4,
                                              requests_per_user=3))  # fmt: skip
    manifest = prepared.prepare(dc, tmp_path / "p", log=lambda m: None)
    assert manifest["layout"] == prepared.MATERIALISED
    memory = datasets.load_splits(dc)
    disk = prepared.open_prepared(dataclasses.replace(dc, prepared=str(tmp_path / "p")))
    for name in SPLITS:
        _same(getattr(memory, name), getattr(disk, name))
    _same(datasets.item_table(dc), disk.item_table)


def test_cli_prepare_reports_phases_and_refuses_an_existing_folder(tmp_path, capsys):
    root = write_dat(tmp_path / "ml", random_log(num_users=12, seed=9))
    config = tmp_path / "my_config.py"
    config.write_text(
        "from gesr_jax.config import Config\nfrom gesr_jax.data.config import DataConfig, MovieLensConfig\n"
        "def get_config():\n    return Config(data=DataConfig(source='movielens', history_len=5,"
        f" movielens=MovieLensConfig(path={str(root)!r}),"
        " num_positives=2, num_negatives=3, min_history=2))\n"
    )
    out = tmp_path / "out"
    assert commands.main(["prepare", "--config", str(config), "--out", str(out)]) == 0
    captured = capsys.readouterr()
    summary = json.loads(captured.out)
    assert summary["layout"] == "by_reference" and set(summary["phases"]) == {"read_and_build_s", "write_s"}
    assert "prepare: wrote" in captured.err and (out / "manifest.json").is_file()
    assert commands.main(["prepare", "--config", str(config), "--out", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert not list(tmp_path.glob("out.tmp-*"))  # nothing half-written left beside it


def _mapped_kib(path) -> int:
    """KiB of ``path`` this process has mapped in RAM now (Rss of its mappings in /proc/self/smaps)."""
    total, inside = 0, False
    for line in open("/proc/self/smaps"):
        if "-" in line.split(" ", 1)[0]:  # a mapping's header line
            inside = line.rstrip().endswith(str(path))
        elif inside and line.startswith("Rss:"):
            total += int(line.split()[1])
    return total


@pytest.mark.skipif(not pathlib.Path("/proc/self/smaps").exists(), reason="needs Linux /proc")
def test_a_gather_leaves_no_pages_of_the_files_mapped(folder):
    dc, out = folder
    train = datasets.load_splits(dataclasses.replace(dc, prepared=str(out))).train
    n, path = train.num_requests, (out / "train" / "cand_item.npy").resolve()
    mapped = np.load(path, mmap_mode="r")
    arrays = np.array(mapped)  # a plain read maps the file's pages ...
    assert _mapped_kib(path) > 0
    del mapped
    by_index = train.gather(np.random.default_rng(0).permutation(n))  # ... a batch leaves none mapped (RSS)
    assert _mapped_kib(path) == 0
    by_slice = train.gather(slice(0, n))  # nor does a sequential pass (the fingerprint, eval)
    assert _mapped_kib(path) == 0
    np.testing.assert_array_equal(by_slice["cand_item"], arrays)
    _same(train.gather(slice(0, n)), by_slice)  # read back after the release: same values
    assert set(by_index) == set(by_slice)

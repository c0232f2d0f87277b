"""Prepared datasets on disk: ``gesr data prepare`` writes one; ``--set data.prepared=DIR`` trains from it.

A prepared folder holds the requests of one data config, by reference (gesr_jax/data/event_log.py)::

    manifest.json            format, version, the data config it was built from, the files with
                             sha256/bytes/dtype/shape, the request stats and the prepare phase
                             durations (written last)
    schema.json              the BatchSchema
    log/{item,action,time}.npy               the event log, sorted by (user, time)
    item_table/<feature>.npy                 one row per item id
    {train,valid,test}/<column>.npy          the request index of each split (user_id, history_end, cand_item, ...)

A dataset with no event log (the synthetic generator's impressions) is stored materialised instead:
``{split}/<batch key>.npy`` (``"layout": "materialised"`` in the manifest).

Why ``.npy`` files read as memory maps, rather than ArrayRecord or Parquet row groups: the input pipeline
gathers a batch with numpy fancy indexing over columns (a request's row, then its history window of N
events), and a memmapped ``.npy`` gives exactly that -- O(1) random access to any row of any column, no
decoding, no per-record framing, nothing but the pages a batch touches read into the page cache (so peak
RSS does not grow with the log) -- with only numpy. ArrayRecord stores serialised records: a window of N
events would be N record reads and N decodes, and it would add a dependency. Parquet compresses by row
group, so one random row costs decompressing its whole group, which defeats a global shuffle. The price
of ``.npy``: no compression (bytes on disk = bytes in memory) and one file per column.

Grain shuffles globally because the request index is random access, and its iterator state (a batch
index) is independent of where the arrays live, so it resumes exactly. Several processes open the same
files; each gathers only the rows of its own batches (``pipeline.train_dataset``'s ``[index::count]``),
so it reads only those pages, and each hashes only its share of the files (:func:`open_prepared`).

Opening checks everything before training starts and refuses a mismatch with one line naming the file
and the field: the manifest's format, version and data config against the run's config (every
``data.*`` setting except ``path``, ``cache`` and ``prepared``), ``schema.json`` against the config's
history length and candidate count, and every file's size, sha256, dtype and shape against the manifest.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pathlib
import shutil
import sys
import time
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from gesr_jax.data import datasets, event_log
from gesr_jax.data.batch import BatchSchema
from gesr_jax.data.config import DataConfig

FORMAT, VERSION = "gesr-prepared", 1
MANIFEST, SCHEMA = "manifest.json", "schema.json"
BY_REFERENCE, MATERIALISED = "by_reference", "materialised"
# Where the source was read from, and how models map ids to rows (hash_buckets): not what was built.
_IGNORED_FIELDS = ("path", "cache", "prepared", "hash_buckets")
_HASH_CHUNK = 4 << 20


class PreparedError(datasets.DataError):
    """A prepared folder is missing, damaged or does not match the config; the message names file and field."""


def config_fields(data_config: DataConfig) -> dict[str, Any]:
    """The data settings a prepared folder is built from: ``data.*`` (dotted), without where it was read from."""
    out: dict[str, Any] = {}

    def walk(prefix: str, value: Any) -> None:
        if dataclasses.is_dataclass(value):
            for f in dataclasses.fields(value):
                if f.name != "sections":  # DataConfig's registered-dataset sections, walked by name below
                    walk(f"{prefix}.{f.name}", getattr(value, f.name))
            for name, section in getattr(value, "extra_sections", dict)().items():
                walk(f"{prefix}.{name}", section)
        elif prefix.rsplit(".", 1)[-1] not in _IGNORED_FIELDS:
            out[prefix] = list(value) if isinstance(value, tuple) else value

    walk("data", data_config)
    return out


def sha256_of(path: pathlib.Path) -> str:
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_HASH_CHUNK), b""):
            sha.update(chunk)
    return sha.hexdigest()


def file_entry(path: pathlib.Path, array: np.ndarray) -> dict[str, Any]:
    return {"sha256": sha256_of(path), "bytes": path.stat().st_size, "dtype": array.dtype.str,
            "shape": list(array.shape)}  # fmt: skip


def _progress(message: str) -> None:
    print(f"prepare: {message}", file=sys.stderr, flush=True)


def prepare(data_config: DataConfig, out: str | os.PathLike[str], *,
            log: Callable[[str], None] = _progress) -> dict[str, Any]:  # fmt: skip
    """Build the requests of ``data_config`` and write them to the folder ``out``; returns the manifest.

    The folder is written under a temporary name and renamed when complete, so a killed prepare
    leaves no folder that looks prepared. An existing ``out`` is refused.
    """
    out = pathlib.Path(out)
    if out.exists():
        raise PreparedError(f"{out} already exists; prepare writes a new folder (remove it or pick another --out)")
    data_config = dataclasses.replace(data_config, prepared=None)
    phases: dict[str, float] = {}
    start = time.perf_counter()
    log(f"building the requests of data.source={data_config.source!r} ...")
    splits = datasets.load_splits(data_config)
    table = splits.item_table if splits.item_table is not None else datasets.item_table(data_config)
    phases["read_and_build_s"] = time.perf_counter() - start
    log(f"built {sum(event_log.num_requests(getattr(splits, s)) for s in event_log.SPLIT_NAMES)} requests "
        f"in {phases['read_and_build_s']:.1f} s")  # fmt: skip
    parts = {s: getattr(splits, s) for s in event_log.SPLIT_NAMES}
    if all(isinstance(p, event_log.RequestSplit) for p in parts.values()):
        layout, flat = BY_REFERENCE, event_log.flatten_splits(parts)
    else:
        layout = MATERIALISED
        flat = {f"{s}/{k}": np.asarray(v) for s, p in parts.items() for k, v in p.items()}
        flat |= {f"item_table/{k}": np.asarray(v) for k, v in table.items()}
    return write_folder(out, flat, splits.schema, data_config, layout, splits.stats, phases, log)


def write_folder(
    out: pathlib.Path, flat: Mapping[str, np.ndarray], schema: BatchSchema, data_config: DataConfig, layout: str,
    stats: Mapping[str, Any], phases: dict[str, float], log: Callable[[str], None] = _progress,
    written: Mapping[str, dict[str, Any]] | None = None,
) -> dict[str, Any]:  # fmt: skip
    """Write ``flat`` (name -> array) as ``.npy`` files plus schema and manifest; ``written`` = files already there.

    ``gesr data prepare`` passes every array; a generator that wrote its columns chunk by chunk
    (experiments/bench_scale.py) passes their entries in ``written`` and an empty ``flat``.
    """
    tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}") if written is None else out
    start = time.perf_counter()
    files: dict[str, dict[str, Any]] = dict(written or {})
    try:
        total = sum(a.nbytes for a in flat.values())
        done, shown = 0, time.perf_counter()
        for i, (name, array) in enumerate(flat.items(), start=1):
            path = tmp / f"{name}.npy"
            path.parent.mkdir(parents=True, exist_ok=True)
            np.save(path, np.ascontiguousarray(array), allow_pickle=False)
            files[f"{name}.npy"] = file_entry(path, array)
            done += array.nbytes
            if i == len(flat) or time.perf_counter() - shown > 2.0:  # progress every 2 s at most
                shown = time.perf_counter()
                log(f"wrote {i}/{len(flat)} files, {done / 2**20:.1f} / {total / 2**20:.1f} MiB ({name}.npy)")
        schema_path = tmp / SCHEMA
        schema_path.write_text(json.dumps(dataclasses.asdict(schema), indent=1))
        files[SCHEMA] = {"sha256": sha256_of(schema_path), "bytes": schema_path.stat().st_size}
        phases["write_s"] = time.perf_counter() - start
        manifest = {
            "format": FORMAT, "version": VERSION, "layout": layout, "config": config_fields(data_config),
            "files": files, "stats": json.loads(json.dumps(stats, default=_json_default)), "phases": phases,
        }  # fmt: skip
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))  # last: a folder without it is not prepared
        if tmp != out:
            os.replace(tmp, out)
    except BaseException:
        if tmp != out:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    log(" ".join(f"{k}={v:.1f}" for k, v in phases.items()) + f"; {out}")
    return manifest


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"cannot write {type(value).__name__} to the manifest")


def read_manifest(root: pathlib.Path, data_config: DataConfig) -> dict[str, Any]:
    """The manifest of ``root``, checked against ``data_config``; a mismatch names the file and the field."""
    path = root / MANIFEST
    if not root.is_dir():
        raise PreparedError(f"data.prepared={str(root)!r} is not a folder (write one with `gesr data prepare`)")
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise PreparedError(f"{path} is missing: {root} is not a complete prepared folder") from None
    except (OSError, ValueError) as err:
        raise PreparedError(f"{path} cannot be read: {err}") from None
    for key, want in (("format", FORMAT), ("version", VERSION)):
        if not isinstance(manifest, dict) or manifest.get(key) != want:
            got = manifest.get(key) if isinstance(manifest, dict) else None
            raise PreparedError(f"{path}: field {key!r} is {got!r}, expected {want!r}")
    for key in ("layout", "config", "files", "stats"):
        if key not in manifest:
            raise PreparedError(f"{path}: field {key!r} is missing")
    # A folder prepared before the data.movielens section names its fields flat (data.split, ...).
    moved = {f"data.{old}": f"data.{new}" for old, new in DataConfig.moved_fields.items()}
    built = {moved.get(key, key): value for key, value in manifest["config"].items()}
    for field, want in config_fields(data_config).items():
        if field not in built:
            raise PreparedError(f"{path}: field {field!r} is missing (the folder was prepared by another version)")
        if built[field] != want:
            raise PreparedError(
                f"{path}: field {field!r} is {built[field]!r} in the prepared folder but {want!r} in the config "
                "(prepare again with this config, or set it back)"
            )
    return manifest


def _check_file(root: pathlib.Path, name: str, entry: Mapping[str, Any], verify: bool) -> pathlib.Path:
    path = root / name
    if not path.is_file():
        raise PreparedError(f"{path} is missing (listed in {root / MANIFEST})")
    size = path.stat().st_size
    if size != entry.get("bytes"):
        raise PreparedError(f"{path}: field 'bytes' is {size} on disk but {entry.get('bytes')} in {MANIFEST}")
    if verify and sha256_of(path) != entry.get("sha256"):
        raise PreparedError(f"{path}: field 'sha256' does not match {MANIFEST} (the file is damaged)")
    return path


def open_prepared(
    data_config: DataConfig, *, verify: bool = True, process_index: int | None = None, process_count: int | None = None
) -> datasets.Splits:
    """The splits of the prepared folder ``data_config.prepared``, as memory maps (nothing is read eagerly).

    Sizes, dtypes and shapes of every file are always checked; with ``verify`` the sha256 too, each
    process hashing every ``process_count``-th file (by default ``jax.process_index()`` of
    ``jax.process_count()``), so the processes of a run read each file once between them, not once each.
    """
    if verify and process_count is None:
        import jax

        process_index, process_count = jax.process_index(), jax.process_count()
    index, count = (process_index or 0), (process_count or 1)
    root = pathlib.Path(str(data_config.prepared)).expanduser()
    manifest = read_manifest(root, data_config)
    files = manifest["files"]
    if SCHEMA not in files:
        raise PreparedError(f"{root / MANIFEST}: field 'files' does not list {SCHEMA}")
    schema_path = _check_file(root, SCHEMA, files[SCHEMA], verify)
    try:
        schema_dict = json.loads(schema_path.read_text())
        schema = BatchSchema(**{k: _tuples(v) for k, v in schema_dict.items()})
    except (ValueError, TypeError) as err:
        raise PreparedError(f"{schema_path} is not a batch schema: {err}") from None
    for field, want in (("history_len", data_config.history_len), ("num_candidates", data_config.num_candidates)):
        if getattr(schema, field) != want:
            got = getattr(schema, field)
            raise PreparedError(f"{schema_path}: field {field!r} is {got} but the config gives {want}")
    arrays: dict[str, np.ndarray] = {}
    mine = {name for number, name in enumerate(sorted(files)) if number % count == index}
    for name, entry in files.items():
        if name == SCHEMA:
            continue
        path = _check_file(root, name, entry, verify and name in mine)
        try:
            array = np.load(path, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError) as err:
            raise PreparedError(f"{path} is not a readable .npy file: {err}") from None
        for field, got in (("dtype", array.dtype.str), ("shape", list(array.shape))):
            if got != entry.get(field):
                raise PreparedError(f"{path}: field {field!r} is {got} but {entry.get(field)} in {MANIFEST}")
        arrays[name.removesuffix(".npy")] = array
    table = {k.split("/", 1)[1]: v for k, v in arrays.items() if k.startswith("item_table/")}
    try:
        if manifest["layout"] == BY_REFERENCE:
            parts: dict[str, Any] = event_log.unflatten_splits(arrays, schema)
        else:
            parts = {s: {k.split("/", 1)[1]: v for k, v in arrays.items() if k.startswith(s + "/")}
                     for s in event_log.SPLIT_NAMES}  # fmt: skip
    except ValueError as err:
        raise PreparedError(f"{root / MANIFEST}: field 'files' does not fit the schema: {err}") from None
    splits = datasets.Splits(**parts, schema=schema, stats=manifest["stats"], item_table=table)
    datasets.check_splits(splits, f"data.prepared {str(root)!r}")
    return splits


def _tuples(value: Any) -> Any:
    return tuple(_tuples(v) for v in value) if isinstance(value, list) else value


class PreparedDataset:
    """The dataset interface over a prepared folder (used whenever ``data.prepared`` is set)."""

    def schema(self, data_config: DataConfig) -> BatchSchema:
        return open_prepared(data_config, verify=False).schema

    def load_splits(self, data_config: DataConfig) -> datasets.Splits:
        return open_prepared(data_config)

    def item_table(self, data_config: DataConfig) -> dict[str, np.ndarray]:
        table = open_prepared(data_config, verify=False).item_table
        assert table is not None
        return {k: np.asarray(v) for k, v in table.items()}

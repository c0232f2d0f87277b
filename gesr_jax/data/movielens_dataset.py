"""The MovieLens dataset: its schema, ESR request splits and item table, with an on-disk cache.

Registered as ``data.source = "movielens"``; reads the folder ``data.movielens.path`` (any format
:mod:`gesr_jax.data.movielens` detects). :func:`schema` is cheap when the folder has a users file (no
rating log is read). :func:`load_splits` builds every request once (gesr_jax/data/requests.py), by
reference into one event log (gesr_jax/data/event_log.py), and caches the parsed log and the built
splits as ``.npz`` under
``$GESR_CACHE_DIR`` (default ``~/.cache/gesr_jax``), keyed by the data config and the size and mtime
of every input file.

Feature encodings (id 0 is padding everywhere, id 1 is "unknown / other"): item ``genre`` (primary =
first listed genre), ``year`` (release year bucketed by :data:`YEAR_EDGES`), ``director`` (only with
``extra/movies_extrainfos.dat``: the ``data.movielens.director_vocab`` directors with most movies, the rest
"other"); user ``gender``, ``age``, ``occupation`` when the folder has ``users.dat`` / ``u.user``.
Actions are the star rating rounded up (csv half stars 0.5 -> 1, 3.5 -> 4), so ``num_actions`` is 6
for every format; ``engage`` compares the unrounded rating with ``data.movielens.engage_threshold``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import pathlib
import warnings

import numpy as np

from gesr_jax.data import event_log, movielens, prepared, requests
from gesr_jax.data.batch import BatchSchema
from gesr_jax.data.config import DataConfig
from gesr_jax.data.datasets import Splits, register_dataset

YEAR_EDGES: tuple[int, ...] = (1930, 1940, 1950, 1960, 1970, 1980, 1985, 1990, 1995, 2000, 2005, 2010, 2015, 2020)
TASKS = ("consume", "engage")  # consume = rated; engage = rating >= data.movielens.engage_threshold (requests.py)
MOVIELENS_NUM_ACTIONS = 6  # 0 pad, ratings 1..5
MOVIELENS_USER_FEATURES: tuple[tuple[str, int], ...] = (
    ("gender", 3),
    ("age", len(movielens.AGE_CODES_1M) + 1),
    ("occupation", len(movielens.OCCUPATIONS_100K) + 1),
)
_CACHE_VERSION = 3  # bump when parsing or request construction changes, so stale caches are not reused


def movielens_item_features(data_config: DataConfig, has_directors: bool) -> tuple[tuple[str, int], ...]:
    features = [("genre", len(movielens.GENRES) + 2), ("year", len(YEAR_EDGES) + 3)]
    if has_directors:
        features.append(("director", data_config.movielens.director_vocab + 2))
    return tuple(features)


def movielens_item_table(inter: movielens.Interactions, data_config: DataConfig) -> dict[str, np.ndarray]:
    """Encoded item feature per movie id: name -> [num_items+1] int32, row 0 = padding (all zeros)."""
    genre = np.where(inter.item_primary_genre > 0, inter.item_primary_genre + 1, 1)
    year = np.where(inter.item_year > 0, np.searchsorted(YEAR_EDGES, inter.item_year, side="right") + 2, 1)
    table = {"genre": genre, "year": year}
    if inter.item_director is not None:
        rank = inter.item_director
        table["director"] = np.where((rank >= 1) & (rank <= data_config.movielens.director_vocab), rank + 1, 1)
    for name in table:
        table[name] = table[name].astype(np.int32)
        table[name][0] = 0
    return table


def schema(data_config: DataConfig) -> BatchSchema:
    """The batch schema of a MovieLens folder; reads only the users and movies files when there is a users file."""
    files = movielens.detect_format(data_config.movielens.path)
    if files.users is not None:
        num_users = movielens.read_max_user_id(files)
    else:
        num_users = load_interactions_cached(data_config).num_users  # only the ratings know the users
    return BatchSchema(
        num_users=num_users,
        num_items=movielens.read_max_movie_id(files),
        user_features=MOVIELENS_USER_FEATURES if files.users is not None else (),
        item_features=movielens_item_features(data_config, files.directors is not None),
        num_actions=MOVIELENS_NUM_ACTIONS,
        history_len=data_config.history_len,
        num_candidates=data_config.num_candidates,
        tasks=TASKS,
        has_true_probs=False,
    )


def item_table(data_config: DataConfig) -> dict[str, np.ndarray]:
    """Encoded item features per movie id of ``data_config``'s folder (see :func:`movielens_item_table`)."""
    return movielens_item_table(load_interactions_cached(data_config), data_config)


def load_splits(data_config: DataConfig) -> Splits:
    """Build (or read from cache) the train/valid/test requests of ``data_config``."""
    batch_schema = schema(data_config)
    settings = data_config.movielens
    path = _cache_path("splits", data_config, movielens.detect_format(settings.path)) if settings.cache else None
    if path is not None and path.is_file():
        cached = _read_npz(path)
        if cached is not None:
            arrays, stats = cached
            with contextlib.suppress(ValueError):  # a cache of another layout is rebuilt
                parts = event_log.unflatten_splits(arrays, batch_schema)
                return Splits(**parts, schema=batch_schema, stats=stats)
    inter = load_interactions_cached(data_config)
    built = requests.build_requests(inter, movielens_item_table(inter, data_config), batch_schema, data_config)
    splits = Splits(built.train, built.valid, built.test, batch_schema, built.stats)
    if path is not None:  # requests by reference: the log once plus per-request columns, not [R, N] histories
        flat = event_log.flatten_splits({s: getattr(splits, s) for s in _SPLITS})
        _write_npz(path, flat, splits.stats)
    return splits


class MovieLensDataset:
    """``data.source = "movielens"`` in the dataset registry (gesr_jax/data/datasets.py); reads ``data.movielens.path``.

    With ``data.prepared`` set, everything comes from that prepared folder (gesr_jax/data/prepared.py) instead.
    """

    def schema(self, data_config: DataConfig) -> BatchSchema:
        if data_config.prepared:
            return prepared.PreparedDataset().schema(data_config)
        return schema(data_config)

    def load_splits(self, data_config: DataConfig) -> Splits:
        if data_config.prepared:
            return prepared.PreparedDataset().load_splits(data_config)
        return load_splits(data_config)

    def item_table(self, data_config: DataConfig) -> dict[str, np.ndarray]:
        if data_config.prepared:
            return prepared.PreparedDataset().item_table(data_config)
        return item_table(data_config)


register_dataset("movielens", MovieLensDataset())


_SPLITS = ("train", "valid", "test")


def load_interactions_cached(data_config: DataConfig) -> movielens.Interactions:
    """:func:`movielens.load_interactions`, with the parsed log cached like the splits."""
    files = movielens.detect_format(data_config.movielens.path)
    path = _cache_path("log", None, files) if data_config.movielens.cache else None
    if path is not None and path.is_file():
        cached = _read_npz(path)
        if cached is not None:
            arrays, meta = cached
            return _interactions_from_arrays(files, arrays, meta)
    inter = movielens.load_interactions(files.root)
    if path is not None:
        arrays = {
            f.name: getattr(inter, f.name)
            for f in dataclasses.fields(inter)
            if isinstance(getattr(inter, f.name), np.ndarray)
        }
        arrays |= {f"user_feature/{k}": v for k, v in inter.user_features.items()}
        meta = {
            "num_users": inter.num_users,
            "num_items": inter.num_items,
            "num_tags": inter.num_tags,
            "director_names": list(inter.director_names),
        }
        _write_npz(path, arrays, meta)
    return inter


def _interactions_from_arrays(
    files: movielens.MovieLensFiles, arrays: dict[str, np.ndarray], meta: dict
) -> movielens.Interactions:
    users = {k.split("/", 1)[1]: v for k, v in arrays.items() if k.startswith("user_feature/")}
    return movielens.Interactions(
        files=files,
        user=arrays["user"],
        item=arrays["item"],
        rating=arrays["rating"],
        timestamp=arrays["timestamp"],
        num_users=meta["num_users"],
        num_items=meta["num_items"],
        item_known=arrays["item_known"],
        item_genres=arrays["item_genres"],
        item_primary_genre=arrays["item_primary_genre"],
        item_year=arrays["item_year"],
        item_director=arrays.get("item_director"),
        director_names=tuple(meta["director_names"]),
        user_features=users,
        num_tags=meta["num_tags"],
    )


# ---------------------------------------------------------------------------------------------- cache


def cache_dir() -> pathlib.Path:
    """Where built datasets are cached: ``$GESR_CACHE_DIR`` or ``~/.cache/gesr_jax``."""
    return pathlib.Path(os.environ.get("GESR_CACHE_DIR") or pathlib.Path.home() / ".cache" / "gesr_jax")


def _cache_path(kind: str, data_config: DataConfig | None, files: movielens.MovieLensFiles) -> pathlib.Path:
    stamp = [(str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns) for p in files.all_files()]
    key = {"version": _CACHE_VERSION, "kind": kind, "files": stamp}
    if data_config is not None:
        key["config"] = dataclasses.asdict(
            dataclasses.replace(data_config, movielens=dataclasses.replace(data_config.movielens, cache=True))
        )
    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:20]
    return cache_dir() / f"movielens-{kind}-{files.root.name}-{digest}.npz"


def _write_npz(path: pathlib.Path, arrays: dict[str, np.ndarray], meta: dict) -> None:
    """Write a cache file atomically; a cache that cannot be written only costs a rebuild next time."""
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    payload = dict(arrays)
    payload["__meta__"] = np.frombuffer(json.dumps(meta).encode(), np.uint8)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            np.savez(f, **payload)
        os.replace(tmp, path)  # a concurrent reader sees the old file or the whole new one
    except OSError as err:
        warnings.warn(f"could not write the dataset cache {path}: {err}", stacklevel=3)
        with contextlib.suppress(OSError):
            tmp.unlink()


def _read_npz(path: pathlib.Path) -> tuple[dict[str, np.ndarray], dict] | None:
    """The arrays and meta of a cache file, or None when it is unreadable (then it is rebuilt)."""
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files if k != "__meta__"}
            meta = json.loads(bytes(data["__meta__"]).decode())
    except (OSError, ValueError, KeyError):
        return None
    return arrays, meta

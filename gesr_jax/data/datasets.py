"""The dataset registry: ``data.source`` -> the dataset that owns its schema, splits and item table.

A dataset is any object with three methods (the :class:`Dataset` protocol):

* ``schema(data_config) -> BatchSchema``: cheap, so models can be built before any data is loaded;
  its ``tasks`` are the tasks the dataset's splits carry ``label_<task>`` for,
* ``load_splits(data_config) -> Splits``: every request of the dataset, as three big batches,
* ``item_table(data_config) -> {feature: [num_items + 1] int32}``: each item feature's id per item id
  (row 0 = padding), e.g. for an item cache or full-catalogue ranking.

A new dataset is one module that calls :func:`register_dataset` at import time::

    register_dataset("my_log", MyLogDataset(), settings=MyLogSettings)

``settings`` (optional) is a frozen dataclass with a default for every field (and an optional ``validate()``):
the dataset's own section ``data.my_log.*``, read as ``data_config.my_log``, set with ``--set
data.my_log.<field>=...``, validated with the rest of the config, shown by ``gesr config show`` and saved in
``config.json``, with no edit of ``gesr_jax/data/config.py``.

The built-in datasets (``synthetic``, ``movielens``) live in their own modules, which import this one;
this module imports them only when their source is first looked up, so there is no import cycle and
reading a config never loads a file reader.
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Any, Protocol

import numpy as np

from gesr_jax.data import config as data_config_lib
from gesr_jax.data.batch import BatchSchema
from gesr_jax.data.config import DataConfig

# Modules that register the built-in sources when imported.
_PREPARED_MODULE = "gesr_jax.data.prepared"  # reads a `gesr data prepare` folder, whatever the source
_BUILTIN_MODULES = {
    "synthetic": "gesr_jax.data.synthetic",
    "movielens": "gesr_jax.data.movielens_dataset",
}


class DataError(ValueError):
    """The data a config asks for cannot be read or built: unknown ``data.source``, missing or malformed files."""


@dataclasses.dataclass(frozen=True)
class Splits:
    """Every request of a dataset as three batches in the batch.py layout (leading dim = requests)."""

    train: dict[str, np.ndarray]
    valid: dict[str, np.ndarray]
    test: dict[str, np.ndarray]
    schema: BatchSchema
    stats: dict[str, Any]  # counts: users, requests per split, skipped users, events, ...
    item_table: dict[str, np.ndarray] | None = None  # feature -> [num_items + 1] ids; None = ask the dataset


class Dataset(Protocol):
    """What a registered dataset provides; every method takes the run's ``DataConfig``."""

    def schema(self, data_config: DataConfig) -> BatchSchema: ...

    def load_splits(self, data_config: DataConfig) -> Splits: ...

    def item_table(self, data_config: DataConfig) -> dict[str, np.ndarray]: ...


_REGISTRY: dict[str, Dataset] = {}


def register_dataset(source: str, dataset: Dataset, *, settings: type | None = None, replace: bool = False) -> Dataset:
    """Register ``dataset`` under ``data.source == source``; a second registration raises unless ``replace``.

    ``settings``: the dataclass of the dataset's own config section ``data.<source>`` (see the module docstring).
    """
    if not isinstance(source, str) or not source:
        raise ValueError(f"dataset source must be a non-empty string, got {source!r}")
    missing = [m for m in ("schema", "load_splits", "item_table") if not callable(getattr(dataset, m, None))]
    if missing:
        raise TypeError(f"dataset {source!r} ({type(dataset).__name__}) lacks the methods {missing}")
    if source in _REGISTRY and not replace and _REGISTRY[source] is not dataset:
        raise ValueError(f"dataset source {source!r} is already registered (pass replace=True to override it)")
    if settings is not None:
        data_config_lib.register_settings(source, settings)
    elif source in _REGISTRY:
        data_config_lib.unregister_settings(source)  # a replacement without settings has no section
    _REGISTRY[source] = dataset
    return dataset


def unregister_dataset(source: str) -> None:
    """Remove a registration (tests and notebooks); unknown sources are ignored."""
    _REGISTRY.pop(source, None)
    data_config_lib.unregister_settings(source)


def get_dataset(source: str) -> Dataset:
    """The dataset registered under ``source``, importing a built-in source's module on first use."""
    if source not in _REGISTRY and source in _BUILTIN_MODULES:
        importlib.import_module(_BUILTIN_MODULES[source])  # a built-in registers on import (it imports this module)
    if source not in _REGISTRY:
        raise DataError(f"data.source {source!r} is not a registered dataset; known sources: {sources()}")
    return _REGISTRY[source]


def sources() -> list[str]:
    """Every known source: the built-ins and whatever has been registered."""
    return sorted(set(_REGISTRY) | set(_BUILTIN_MODULES))


def _dataset(data_config: DataConfig) -> Dataset:
    data_config.validate()
    if data_config.prepared:
        # By name, like the built-in sources: gesr_jax.data.prepared imports this module (same Splits, errors).
        return importlib.import_module(_PREPARED_MODULE).PreparedDataset()
    return get_dataset(data_config.source)


def schema_for(data_config: DataConfig) -> BatchSchema:
    """The :class:`BatchSchema` of ``data_config`` without building any request."""
    return _with_hashing(_dataset(data_config).schema(data_config), data_config)


def _with_hashing(schema: BatchSchema, data_config: DataConfig) -> BatchSchema:
    # data.hash_buckets is how the models map ids to table rows, not what a dataset builds: set here, once.
    return dataclasses.replace(schema, hash_buckets=data_config.hash_buckets)


def load_splits(data_config: DataConfig) -> Splits:
    """Build (or read from the dataset's cache) the train/valid/test requests of ``data_config``."""
    splits = _dataset(data_config).load_splits(data_config)
    check_splits(splits, f"data.source {data_config.source!r}")
    return dataclasses.replace(splits, schema=_with_hashing(splits.schema, data_config))


def item_table(data_config: DataConfig) -> dict[str, np.ndarray]:
    """Each item feature's id per item id (name -> [num_items + 1] int32, row 0 = padding)."""
    return _dataset(data_config).item_table(data_config)


def check_splits(splits: Any, origin: str = "splits") -> None:
    """Raise :class:`DataError` unless every split carries ``label_<task>`` for exactly the schema's tasks."""
    want = {f"label_{t}" for t in splits.schema.tasks}
    for name in ("train", "valid", "test"):
        have = {k for k in getattr(splits, name) if k.startswith("label_")}
        if have != want:
            raise DataError(
                f"{origin}: the {name} split has labels {sorted(have)} but its schema declares tasks "
                f"{list(splits.schema.tasks)} (expected {sorted(want)})"
            )

"""Serve exported artifacts (``serving/export.py``) with jax.export + numpy alone: no model code is imported.

::

    scorer = gesr_jax.serving.load("exports/synth")    # manifest.json, *.jaxexp, params.npz, item_table.npz
    results = scorer.score([request, ...])            # as Scorer.score: {task: probs [C]} | RequestError

This module and everything it imports (engine, buckets, requests, user_cache, data.batch) must never import
``gesr_jax.models``, ``gesr_jax.api`` or flax (tested in a subprocess that forbids them).
"""

from __future__ import annotations

import json
import pathlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from gesr_jax.data.batch import BatchSchema
from gesr_jax.serving import artifact
from gesr_jax.serving.buckets import Buckets
from gesr_jax.serving.engine import Engine
from gesr_jax.serving.user_cache import UserStateCache

FORMAT, VERSION = "gesr_jax.serving", 1  # = export.FORMAT / VERSION (not imported: export needs the models)


class ExportError(ValueError):
    """An export directory is missing a file or was written by an incompatible version."""


def _array(raw: np.ndarray, record: dict[str, Any]) -> jax.Array:
    dtype = jnp.dtype(record["dtype"])
    return jnp.asarray(np.asarray(raw).view(dtype).reshape(record["shape"]))


def _schema(data: dict[str, Any]) -> BatchSchema:
    data = dict(data)
    for key in ("user_features", "item_features"):
        data[key] = tuple((str(n), int(v)) for n, v in data[key])
    data["tasks"] = tuple(data["tasks"])
    return BatchSchema(**data)


class ExportedScorer(Engine):
    """An :class:`~gesr_jax.serving.engine.Engine` over deserialized ``jax.export`` functions.

    ``manifest`` is the export's manifest.json; ``user_cache`` enables user-state reuse as in the Scorer.
    """

    def __init__(self, directory: str | pathlib.Path, *, user_cache: UserStateCache | None = None):
        self.directory = directory = pathlib.Path(directory)
        path = directory / "manifest.json"
        if not path.exists():
            raise ExportError(f"{directory} has no manifest.json; is it a `gesr export` directory?")
        self.manifest = manifest = json.loads(path.read_text())
        if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
            raise ExportError(
                f"{path} is format {manifest.get('format')!r} version {manifest.get('version')!r}; "
                f"this loader reads {FORMAT!r} version {VERSION}"
            )
        self.kind, self.fp8 = manifest["model_kind"], manifest["fp8"]
        with np.load(directory / "params.npz") as raw:
            consts = [_array(raw[f"p{i}"], rec) for i, rec in enumerate(manifest["params"])]
        with np.load(directory / "item_table.npz") as raw:
            table = {k[len("feature_") :]: np.asarray(raw[k]) for k in raw.files if k.startswith("feature_")}
            if manifest["item_cache"] is not None:
                consts.append(_array(raw["item_cache"], manifest["item_cache"]))
        read = lambda name: artifact.deserialize((directory / name).read_bytes())  # noqa: E731
        self._encoders = {int(r): read(f) for r, f in manifest["files"]["encode"].items()}
        self._scorers = {tuple(int(x) for x in k.split("x")): read(f) for k, f in manifest["files"]["score"].items()}

        def encode(flat: list, request: dict) -> list:
            return self._encoders[request["user_id"].shape[0]].call(flat, request)

        def score(flat: list, state: list, candidates: dict) -> jax.Array:
            return self._scorers[candidates["cand_item"].shape].call(flat, state, candidates)

        super().__init__(
            _schema(manifest["schema"]), consts, encode, score, buckets=Buckets.from_dict(manifest["buckets"]),
            item_table=table, user_cache=user_cache, max_candidates=manifest.get("max_candidates"),
        )  # fmt: skip


def load(directory: str | pathlib.Path, *, user_cache: UserStateCache | None = None) -> ExportedScorer:
    """The :class:`ExportedScorer` of an export directory (``gesr export --out DIR``)."""
    return ExportedScorer(directory, user_cache=user_cache)

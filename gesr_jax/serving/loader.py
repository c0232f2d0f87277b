"""Serve exported artifacts (``serving/export.py``) with jax.export + numpy alone: no model code is imported.

::

    scorer = gesr_jax.serving.loader.load("exports/synth")  # manifest.json, *.jaxexp, params.npz, item_table.npz
    results = scorer.score([request, ...])            # as Scorer.score: {task: probs [C]} | RequestError

The manifest holds the sha256 of every other file (``artifact.py``). ``verify="eager"`` (the default) checks
and deserializes every file at load and refuses a damaged export with an :class:`ExportError` naming each
damaged file. ``verify="lazy"`` checks ``params.npz`` / ``item_table.npz`` at load (every request needs them)
and each bucket's ``*.jaxexp`` on its first use: a damaged bucket then fails only the requests that run
through it (an :class:`~gesr_jax.serving.artifact.ArtifactUnavailable` in their result slots, naming the
file); every other bucket serves as usual. Exports of manifest version 1 (no checksums) still load,
unverified, with a warning.

This module and everything it imports (engine, buckets, requests, user_cache, data.batch) must never import
``gesr_jax.models``, ``gesr_jax.api`` or flax (tested in a subprocess that forbids them).
"""

from __future__ import annotations

import io
import json
import pathlib
import warnings
from collections.abc import Callable
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np

from gesr_jax.data.batch import BatchSchema
from gesr_jax.serving import artifact
from gesr_jax.serving.artifact import ExportError
from gesr_jax.serving.buckets import Buckets
from gesr_jax.serving.engine import Engine
from gesr_jax.serving.user_cache import UserStateCache

# = export.FORMAT / VERSION (not imported: export needs the models). Version 1 had no checksums.
FORMAT, VERSION, READABLE_VERSIONS = "gesr_jax.serving", 2, (1, 2)
Verify = Literal["eager", "lazy"]

__all__ = ["ExportError", "ExportedScorer", "load"]


def _array(raw: np.ndarray, record: dict[str, Any]) -> jax.Array:
    dtype = jnp.dtype(record["dtype"])
    return jnp.asarray(np.asarray(raw).view(dtype).reshape(record["shape"]))


def _schema(data: dict[str, Any]) -> BatchSchema:
    data = dict(data)
    for key in ("user_features", "item_features"):
        data[key] = tuple((str(n), int(v)) for n, v in data[key])
    data["tasks"] = tuple(data["tasks"])
    return BatchSchema(**data)


def read_manifest(directory: pathlib.Path) -> dict[str, Any]:
    """manifest.json of an export, checked for format, version and the keys the loader reads."""
    path = directory / "manifest.json"
    if not path.exists():
        raise ExportError("is missing; is the directory a `gesr export` output?", path=path)
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ExportError(f"is not valid JSON (truncated or damaged?): {err}", path=path) from None
    if not isinstance(manifest, dict):
        raise ExportError(f"must hold a JSON object, got {type(manifest).__name__}", path=path)
    if manifest.get("format") != FORMAT or manifest.get("version") not in READABLE_VERSIONS:
        raise ExportError(
            f"is format {manifest.get('format')!r} version {manifest.get('version')!r}; "
            f"this loader reads {FORMAT!r} versions {list(READABLE_VERSIONS)}",
            path=path,
        )
    needed = ["model_kind", "fp8", "schema", "buckets", "params", "item_cache", "files"]
    needed += ["sha256"] if manifest["version"] >= 2 else []
    missing = [k for k in needed if k not in manifest]
    if missing:
        raise ExportError(f"lacks {missing} (truncated or edited?)", path=path)
    files = manifest["files"]
    if not isinstance(files, dict) or not all(isinstance(files.get(k), dict) for k in ("encode", "score")):
        raise ExportError("field 'files' must hold 'encode' and 'score' tables", path=path)
    if manifest["version"] >= 2:
        listed = {"params.npz", "item_table.npz", *files["encode"].values(), *files["score"].values()}
        unsummed = sorted(listed - set(manifest["sha256"]))
        if unsummed:
            raise ExportError(f"field 'sha256' has no checksum for {unsummed}", path=path)
    return manifest


class _Artifacts:
    """Deserialized ``*.jaxexp`` files by bucket key, each read and verified on its first lookup.

    A file that fails keeps failing with the same error (it is not re-read on every request).
    """

    def __init__(self, directory: pathlib.Path, names: dict[Any, str], sums: dict[str, str] | None):
        self._directory, self._names, self._sums = directory, names, sums
        self._loaded: dict[Any, jax.export.Exported] = {}
        self._failed: dict[Any, ExportError] = {}

    def keys(self) -> list[Any]:
        return list(self._names)

    def _load(self, key: Any) -> jax.export.Exported:
        if key in self._failed:
            raise self._failed[key]
        if key not in self._loaded:
            path = self._directory / self._names[key]
            try:
                data = artifact.read_verified(path, None if self._sums is None else self._sums[path.name])
                self._loaded[key] = artifact.deserialize(data, path=path)
            except ExportError as err:
                self._failed[key] = err
                raise
        return self._loaded[key]

    def __getitem__(self, key: Any) -> jax.export.Exported:
        if key not in self._names:
            raise KeyError(f"no exported artifact for bucket {key!r}")
        return self._load(key)

    def damaged(self) -> list[ExportError]:
        """The errors of the files found damaged so far."""
        return list(self._failed.values())


def _eager(loaders: list[Callable[[], Any]]) -> None:
    """Run every loader; one ExportError naming all damaged files (each on its own line) if any failed."""
    errors = []
    for run in loaders:
        try:
            run()
        except ExportError as err:
            errors.append(err)
    if len(errors) == 1:
        raise errors[0]
    if errors:
        paths = [e.path for e in errors]
        listing = "\n  ".join(map(str, errors))
        raise ExportError(f"{len(errors)} damaged export files:\n  {listing}", path=paths[0].parent)


class ExportedScorer(Engine):
    """An :class:`~gesr_jax.serving.engine.Engine` over deserialized ``jax.export`` functions.

    ``manifest`` is the export's manifest.json; ``user_cache`` enables user-state reuse as in the Scorer;
    ``verify`` is ``"eager"`` or ``"lazy"`` (module docstring).
    """

    def __init__(
        self, directory: str | pathlib.Path, *, user_cache: UserStateCache | None = None, verify: Verify = "eager"
    ):
        if verify not in ("eager", "lazy"):
            raise ValueError(f"verify must be 'eager' or 'lazy', got {verify!r}")
        self.directory = directory = pathlib.Path(directory)
        self.manifest = manifest = read_manifest(directory)
        sums = manifest.get("sha256")
        if sums is None:
            warnings.warn(f"{directory}: manifest version 1 has no checksums; loaded unverified", stacklevel=3)
        self.kind, self.fp8 = manifest["model_kind"], manifest["fp8"]
        files = manifest["files"]
        self._encoders = _Artifacts(directory, {int(r): f for r, f in files["encode"].items()}, sums)
        score_names = {tuple(int(x) for x in k.split("x")): f for k, f in files["score"].items()}
        self._scorers = _Artifacts(directory, score_names, sums)
        params: list[jax.Array] = []
        cache: list[jax.Array] = []
        table: dict[str, np.ndarray] = {}

        def npz(name: str) -> Any:
            path = directory / name
            data = artifact.read_verified(path, None if sums is None else sums[name])
            try:
                return np.load(io.BytesIO(data))
            except Exception as err:  # a zip/npy decoder error: name the file, not the member
                raise ExportError(f"is not a readable .npz ({type(err).__name__}: {err})", path=path) from None

        def load_params() -> None:
            with npz("params.npz") as raw:
                params[:] = [_array(raw[f"p{i}"], rec) for i, rec in enumerate(manifest["params"])]

        def load_table() -> None:
            with npz("item_table.npz") as raw:
                table.update({k[len("feature_") :]: np.asarray(raw[k]) for k in raw.files if k.startswith("feature_")})
                if manifest["item_cache"] is not None:
                    cache[:] = [_array(raw["item_cache"], manifest["item_cache"])]

        loaders: list[Callable[[], Any]] = [load_params, load_table]
        if verify == "eager":
            loaders += [lambda k=k: self._encoders[k] for k in self._encoders.keys()]
            loaders += [lambda k=k: self._scorers[k] for k in self._scorers.keys()]
            _eager(loaders)
        else:
            for run in loaders:  # every request needs both: checked now whichever mode
                run()

        def encode(flat: list, request: dict) -> list:
            return self._encoders[request["user_id"].shape[0]].call(flat, request)

        def score(flat: list, state: list, candidates: dict) -> jax.Array:
            return self._scorers[candidates["cand_item"].shape].call(flat, state, candidates)

        super().__init__(
            _schema(manifest["schema"]), params + cache, encode, score, buckets=Buckets.from_dict(manifest["buckets"]),
            item_table=table, user_cache=user_cache, max_candidates=manifest.get("max_candidates"),
        )  # fmt: skip

    def damaged_files(self) -> list[ExportError]:
        """The bucket artifacts found damaged so far (lazy verification finds them on first use)."""
        return self._encoders.damaged() + self._scorers.damaged()


def load(
    directory: str | pathlib.Path, *, user_cache: UserStateCache | None = None, verify: Verify = "eager"
) -> ExportedScorer:
    """The :class:`ExportedScorer` of an export directory (``gesr export --out DIR``); see the module docstring."""
    return ExportedScorer(directory, user_cache=user_cache, verify=verify)

"""Export a scorer as ``jax.export`` artifacts that serve without the model's Python code.

``export_workdir(workdir, out_dir)`` (or ``export_scorer(scorer, out_dir)``) writes::

    manifest.json          format/version, model kind, tasks, schema, buckets, platforms, inputs, files, and
                           the sha256 of every other file (``loader.load`` verifies them; ``artifact.py``)
    encode_r{R}.jaxexp     serialized encode_request per request-batch size R: (consts, request) -> state leaves
                           (``jax.export.serialize`` bytes)
    score_r{R}_c{C}.jaxexp serialized score per (R, chunk size C): (consts, state leaves, chunk) -> probs [T, R, C]
    params.npz             the parameter leaves (raw bytes; shape and dtype in the manifest: fp8 survives)
    item_table.npz         the item-tower table ``item_cache`` [V, Dt] (when the model has one) and the
                           item features ``feature_<f>`` [V] that fill features a request leaves out

Parameters are arguments of the exported functions, not constants, so each artifact stays small and the
weights are stored once. ``gesr_jax.serving.loader.load(out_dir)`` serves them. ``register_cli`` adds
``gesr export --workdir W --out DIR`` to the ``gesr`` command line.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import io
import json
import pathlib
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from gesr_jax import api
from gesr_jax.config import ConfigError
from gesr_jax.serving import artifact
from gesr_jax.serving.buckets import Buckets
from gesr_jax.serving.engine import sigmoid_stack
from gesr_jax.serving.requests import pack_candidates, pack_requests
from gesr_jax.serving.scorer import Scorer
from gesr_jax.workdir import StepChoice, parse_step

FORMAT, VERSION = "gesr_jax.serving", 2  # version 2: manifest["sha256"] (loader.py reads 1 and 2)
DEFAULT_PLATFORMS: tuple[str, ...] = ("cpu", "cuda")


def _spec(x: Any) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(np.shape(x), x.dtype)


def _raw(x: Any) -> np.ndarray:
    """The bytes of an array as a flat uint8 array (npz cannot hold float8 / bfloat16 dtypes)."""
    return np.ascontiguousarray(np.asarray(x)).reshape(-1).view(np.uint8)


def _npz(arrays: dict[str, np.ndarray]) -> bytes:
    """The bytes of ``np.savez(arrays)`` (hashed and written in one go)."""
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


def _leaf_record(name: str, x: Any) -> dict[str, Any]:
    return {"name": name, "shape": list(np.shape(x)), "dtype": str(np.dtype(x.dtype))}


def export_scorer(
    scorer: Any,
    out_dir: str | pathlib.Path,
    *,
    platforms: Sequence[str] = ("cpu",),
    source: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write the artifacts of a live :class:`~gesr_jax.serving.scorer.Scorer` to ``out_dir``; the manifest.

    ``platforms`` are lowered together (``jax.export`` multi-platform); when that fails for a platform
    other than the first, the export falls back to the first alone and records why in the manifest.
    """
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    graphdef, schema, buckets, tasks = scorer.graphdef, scorer.schema, scorer.buckets, tuple(scorer.schema.tasks)
    named, treedef = jax.tree_util.tree_flatten_with_path(scorer.params)
    names = [jax.tree_util.keystr(path) for path, _ in named]
    leaves = [leaf for _, leaf in named]
    has_cache = scorer.item_cache is not None
    consts = leaves + ([scorer.item_cache] if has_cache else [])
    const_specs = [_spec(x) for x in consts]

    def unpack(flat: list) -> tuple[Any, Any]:
        params = jax.tree.unflatten(treedef, flat[: len(leaves)])
        return params, (flat[len(leaves)] if has_cache else None)

    def encode(flat: list, request: dict) -> list:
        params, _ = unpack(flat)
        return jax.tree.leaves(api.encode_request(graphdef, params, request))

    state_tree = {}

    def score(flat: list, state_leaves: list, candidates: dict) -> jax.Array:
        params, cache = unpack(flat)
        state = jax.tree.unflatten(state_tree["treedef"], state_leaves)
        return sigmoid_stack(api.score(graphdef, params, state, candidates, item_cache=cache), tasks)

    def request_specs(rows: int) -> dict[str, jax.ShapeDtypeStruct]:
        return {k: _spec(v) for k, v in pack_requests([], schema, rows).items()}

    def chunk_specs(rows: int, width: int) -> dict[str, jax.ShapeDtypeStruct]:
        cands, counts = pack_candidates([], schema, rows, width)
        return {k: _spec(v) for k, v in (cands | {"num_candidates": counts}).items()}

    state_shape = jax.eval_shape(
        lambda f, r: api.encode_request(graphdef, unpack(f)[0], r), const_specs, request_specs(1)
    )
    state_tree["treedef"] = jax.tree.structure(state_shape)
    state_leaves_1 = jax.tree.leaves(state_shape)

    wanted = tuple(platforms)
    notes: list[str] = []

    def export(fn: Any, *args: Any) -> bytes:
        nonlocal wanted
        try:
            return artifact.serialize(jax.export.export(jax.jit(fn), platforms=wanted)(*args))
        except Exception as err:  # a platform whose lowering is unavailable here (e.g. cuda-only kernels)
            if len(wanted) == 1:
                raise
            notes.append(f"lowering for {wanted} failed ({type(err).__name__}: {str(err)[:300]}); "
                         f"exported for {wanted[:1]} only")  # fmt: skip
            wanted = wanted[:1]
            return artifact.serialize(jax.export.export(jax.jit(fn), platforms=wanted)(*args))

    sums: dict[str, str] = {}

    def write(name: str, data: bytes) -> None:
        (out / name).write_bytes(data)
        sums[name] = artifact.sha256(data)

    files: dict[str, dict[str, str]] = {"encode": {}, "score": {}}
    for rows in buckets.request_sizes:
        name = f"encode_r{rows}.jaxexp"
        write(name, export(encode, const_specs, request_specs(rows)))
        files["encode"][str(rows)] = name
        state_specs = [jax.ShapeDtypeStruct((rows, *s.shape[1:]), s.dtype) for s in state_leaves_1]
        for width in buckets.chunk_sizes:
            name = f"score_r{rows}_c{width}.jaxexp"
            write(name, export(score, const_specs, state_specs, chunk_specs(rows, width)))
            files["score"][f"{rows}x{width}"] = name
    if len(wanted) < len(platforms):  # the first buckets may have been lowered for more platforms: redo them
        return export_scorer(scorer, out, platforms=wanted, source={**(source or {}), "platform_notes": notes})

    write("params.npz", _npz({f"p{i}": _raw(x) for i, x in enumerate(leaves)}))
    table = {f"feature_{k}": np.asarray(v, np.int32) for k, v in scorer.item_table.items()}
    if has_cache:
        table["item_cache"] = _raw(scorer.item_cache)
    write("item_table.npz", _npz(table))
    manifest = {
        "format": FORMAT,
        "version": VERSION,
        "model_kind": scorer.kind,
        "fp8": bool(scorer.fp8),
        "jax_version": jax.__version__,
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "platforms": list(wanted),
        "platform_notes": notes + list((source or {}).get("platform_notes", [])),
        "tasks": list(tasks),
        "schema": dataclasses.asdict(schema),
        "buckets": buckets.to_dict(),
        "max_candidates": scorer.max_candidates,
        "params": [_leaf_record(n, x) for n, x in zip(names, leaves, strict=True)],
        "item_cache": _leaf_record("item_cache", scorer.item_cache) if has_cache else None,
        "state": [_leaf_record(f"state[{i}]", s) for i, s in enumerate(state_leaves_1)],
        "inputs": {
            "request": {k: {"shape": ["R", *s.shape[1:]], "dtype": str(s.dtype)} for k, s in request_specs(1).items()},
            "candidates": {k: {"shape": ["R", "C"][: len(s.shape)], "dtype": str(s.dtype)}
                           for k, s in chunk_specs(1, 1).items()},  # fmt: skip
            "output": {"shape": ["T", "R", "C"], "dtype": "float32", "meaning": "sigmoid probabilities, tasks order"},
        },
        "files": files,
        "sha256": dict(sorted(sums.items())),
        "source": {k: v for k, v in (source or {}).items() if k != "platform_notes"},
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True))
    return manifest


def export_workdir(
    workdir: str | pathlib.Path,
    out_dir: str | pathlib.Path,
    *,
    buckets: Buckets | None = None,
    step: StepChoice = None,
    fp8: bool = False,
    platforms: Sequence[str] = DEFAULT_PLATFORMS,
) -> dict[str, Any]:
    """Export a trained workdir for ``buckets``; the manifest. ``step`` as in :class:`gesr_jax.workdir.Workdir`
    (None = the best valid step, ``"last"`` = the newest intact one, or a number), so eval and export agree."""
    scorer = Scorer.from_workdir(workdir, step, buckets=buckets, fp8=fp8)
    source = {"workdir": str(pathlib.Path(workdir).absolute()), "step": scorer.step}
    return export_scorer(scorer, out_dir, platforms=platforms, source=source)


def register_cli(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``export`` (``gesr export --workdir W --out DIR``) to the ``gesr`` subparsers."""
    p = subparsers.add_parser("export", help="export a trained workdir as jax.export serving artifacts")
    p.add_argument("--workdir", required=True, help="a `gesr train` workdir")
    p.add_argument("--out", required=True, help="output directory (manifest.json, *.jaxexp, params.npz, ...)")
    p.add_argument("--step", default=None, help="checkpoint step, or 'last' for the newest (default: the best valid step)")
    p.add_argument("--request-buckets", default=None, help="request-batch sizes, e.g. 1,4,16")
    p.add_argument("--chunk-buckets", default=None, help="candidate-chunk sizes, e.g. 64,256,1024")
    p.add_argument("--fp8", action="store_true", help="serve FP8 weights for the large linears")
    p.add_argument("--platforms", default=",".join(DEFAULT_PLATFORMS), help="lowering platforms, e.g. cpu,cuda")
    p.set_defaults(func=_run_export)
    return p


def _run_export(args: argparse.Namespace) -> int:
    step = args.step if args.step in (None, "last") else parse_step(args.step)
    try:
        buckets = Buckets.parse(args.request_buckets, args.chunk_buckets)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    platforms = tuple(s.strip() for s in args.platforms.split(",") if s.strip())
    manifest = export_workdir(args.workdir, args.out, buckets=buckets, step=step, fp8=args.fp8,
                              platforms=platforms)  # fmt: skip
    summary = {k: manifest[k] for k in ("model_kind", "platforms", "buckets", "tasks", "fp8")}
    print(json.dumps({"out": str(args.out), "step": manifest["source"].get("step"), **summary}, sort_keys=True))
    return 0

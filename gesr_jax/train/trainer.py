"""The training and evaluation loop: ``train_and_evaluate(config, workdir)``, model-agnostic.

A run owns one workdir::

    config.json       the full Config; a restart must match it (cadence keys and num_steps may change)
    metrics.jsonl     one JSON object per line: {"step", "split": train|valid|test, "loss", ...}
    checkpoints/      Orbax steps with params, opt_state, step and the data iterator state
    plots/            loss.png and ne.png, drawn at the end
    results.json      final valid and test metrics

Starting ``train_and_evaluate`` on a workdir with checkpoints resumes from the latest one: same
parameters, optimizer state and position in the data stream, so an interrupted run ends with the
same parameters and metrics as an uninterrupted one. A NaN/Inf loss or gradient stops the run with
:class:`TrainingDivergedError`; checkpoints are only written after every step up to them was
checked finite, so the last one on disk is a good one.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import math
import os
import pathlib
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
import tqdm
from flax import nnx
from jax.experimental import multihost_utils

from gesr_jax import config as config_lib
from gesr_jax import metrics as metrics_lib
from gesr_jax.config import Config, ConfigError
from gesr_jax.data import pipeline
from gesr_jax.train import plots
from gesr_jax.train import sharding as sharding_lib
from gesr_jax.train import step as step_lib
from gesr_jax.train.checkpoint import Checkpointer

# Keys that may differ between config.json and a restart: they change how long and how often, not
# what is trained. A new num_steps also stretches the cosine schedule from the restored step on.
RESUMABLE_CHANGES = frozenset(
    {"train.num_steps", "train.log_every", "train.eval_every", "train.checkpoint_every", "train.max_checkpoints"}
)


class TrainingDivergedError(RuntimeError):
    """The loss or gradient became NaN/Inf; the last good checkpoint is kept."""


def default_model_api() -> Any:
    """``gesr_jax.api``, imported on first use so the trainer imports without the model package."""
    return importlib.import_module("gesr_jax.api")


def default_splits(config: Config) -> Any:
    """Train/valid/test arrays of ``config.data`` via ``gesr_jax.data.sources.load_splits``."""
    from gesr_jax.data import sources

    return sources.load_splits(config.data)


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def check_resume_config(saved: Config, config: Config) -> None:
    """Raise ConfigError naming every key where ``config`` differs from the run's saved config."""
    old, new = _flatten(config_lib.to_dict(saved)), _flatten(config_lib.to_dict(config))
    diff = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k) and k not in RESUMABLE_CHANGES)
    if diff:
        details = ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in diff)
        raise ConfigError(
            f"this workdir was trained with a different config ({details}); use a new --workdir, or only change "
            f"{sorted(RESUMABLE_CHANGES)} when resuming"
        )


def init_model(config: Config, model_api: Any, mesh: jax.sharding.Mesh) -> tuple[Any, Any, Any]:
    """``(graphdef, params placed on the mesh, params sharding)`` from ``model_api.init``."""
    # Parameters are created unsharded on the host and placed below; sharding is decided here, not
    # at construction time, so models never need a mesh.
    with nnx.use_eager_sharding(False):
        graphdef, params = model_api.init(config, config.train.seed)
    params_sharding = sharding_lib.param_shardings(params, mesh)
    return graphdef, sharding_lib.place(params, params_sharding), params_sharding


def jsonable(value: Any) -> Any:
    """``value`` with numpy scalars made Python and NaN/Inf made ``None`` (strict JSON has neither)."""
    if isinstance(value, dict):
        return {k: jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, (np.floating, float)):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    return value


class Evaluator:
    """Runs the jitted eval step over a split and computes :class:`~gesr_jax.metrics.CandidateMetrics`.

    Built once per run so the eval step compiles once; the same instance evaluates any split.
    """

    def __init__(
        self,
        model_api: Any,
        graphdef: Any,
        tasks: Sequence[str],
        task_weights: Sequence[float],
        batch_size: int,
        mesh: jax.sharding.Mesh,
        params_sharding: Any,
    ):
        self._model_api, self._graphdef, self._mesh = model_api, graphdef, mesh
        self._tasks, self._weights = tuple(tasks), tuple(task_weights)
        self._batch_size, self._params_sharding = batch_size, params_sharding
        self._steps: dict[tuple[str, ...], Callable[..., Any]] = {}

    def _step(self, keys: tuple[str, ...]) -> Callable[..., Any]:
        if keys not in self._steps:
            self._steps[keys] = step_lib.make_eval_step(
                self._model_api,
                self._graphdef,
                self._tasks,
                mesh=self._mesh,
                params_sharding=self._params_sharding,
                batch_sharding=sharding_lib.batch_shardings(dict.fromkeys(keys), self._mesh),
            )
        return self._steps[keys]

    def __call__(self, params: Any, arrays: dict[str, np.ndarray], name: str = "eval") -> dict[str, float]:
        """Metrics of ``params`` on every request of ``arrays`` (one split in the batch layout)."""
        eval_step = self._step(tuple(arrays))
        accumulator = metrics_lib.CandidateMetrics(self._tasks, self._weights)
        keep = ["user_id", "num_candidates", *(k for k in arrays if k.startswith(("label_", "prob_")))]
        start = time.perf_counter()
        pending = None
        for local in pipeline.make_iterator(pipeline.eval_dataset(arrays, self._batch_size, name=f"{name} split")):
            # Dispatch this batch before pulling the previous one's logits, so host and device overlap.
            outputs = eval_step(params, sharding_lib.shard_batch(local, self._mesh))
            if pending is not None:
                accumulator.update(self._host_outputs(*pending, keep))
            pending = (local, outputs)
        if pending is not None:
            accumulator.update(self._host_outputs(*pending, keep))
        result = accumulator.compute()
        result["examples_per_sec"] = pipeline.check_split(arrays, name) / max(time.perf_counter() - start, 1e-9)
        return result

    @staticmethod
    def _host_outputs(local: dict[str, np.ndarray], outputs: Any, keep: Sequence[str]) -> dict[str, np.ndarray]:
        host = {k: local[k] for k in keep}
        if jax.process_count() > 1:
            # Logits come back replicated for the global batch; gather the other hosts' labels to match.
            host = multihost_utils.process_allgather(host, tiled=True)
        return {**host, **jax.device_get(outputs)}


def evaluate(
    config: Config,
    graphdef: Any,
    params: Any,
    split_arrays: dict[str, np.ndarray],
    *,
    model_api: Any = None,
    mesh: jax.sharding.Mesh | None = None,
    tasks: Sequence[str] | None = None,
) -> dict[str, float]:
    """Per-task NE / AUC / gAUC / logloss (+ oracle NE) of ``params`` on one split.

    ``tasks`` defaults to the split's ``label_<task>`` keys in order. Compiles an eval step per
    call; inside a loop, build one :class:`Evaluator` instead.
    """
    model_api = default_model_api() if model_api is None else model_api
    tasks = tuple(tasks) if tasks is not None else tuple(k[6:] for k in split_arrays if k.startswith("label_"))
    weights = step_lib.resolve_task_weights(tasks, config.train)
    mesh = sharding_lib.make_mesh() if mesh is None else mesh
    sharding_lib.check_batch_size(config.train.eval_batch_size, mesh, "train.eval_batch_size")
    with sharding_lib.mesh_context(mesh):
        params_sharding = sharding_lib.param_shardings(params, mesh)
        params = sharding_lib.place(params, params_sharding)
        evaluator = Evaluator(model_api, graphdef, tasks, weights, config.train.eval_batch_size, mesh, params_sharding)
        return evaluator(params, split_arrays)


class _MetricsLog:
    """Appends JSON lines to ``metrics.jsonl``; on resume drops lines past the restored step."""

    def __init__(self, path: pathlib.Path, resume_step: int | None):
        self.path = path
        if resume_step is None:
            path.write_text("")
        else:
            kept = [r for r in plots.read_metrics(path) if r["step"] <= resume_step and not r.get("final")]
            path.write_text("".join(json.dumps(r) + "\n" for r in kept))

    def write(self, record: dict[str, Any]) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(jsonable(record)) + "\n")


def _progress_enabled() -> bool:
    return sys.stderr.isatty() and os.environ.get("CI", "").lower() not in ("1", "true", "yes")


def _check_finite(window: list[tuple[int, dict[str, Any]]], checkpoints: Checkpointer) -> None:
    """Pull the window's metrics to host (once) and stop at the first non-finite loss or gradient."""
    for i, (step, metrics) in enumerate(window):
        host = {k: float(v) for k, v in jax.device_get(metrics).items()}
        window[i] = (step, host)
        for key in ("loss", "grad_norm"):
            if not math.isfinite(host[key]):
                checkpoints.wait()
                raise TrainingDivergedError(
                    f"{key} became {host[key]} at step {step}; training stopped. The last good checkpoint "
                    f"(step {checkpoints.latest_step()}) is kept in {checkpoints.directory}. Lower "
                    f"train.learning_rate, keep train.grad_clip_norm > 0, or check the data."
                )


def train_and_evaluate(
    config: Config,
    workdir: str | os.PathLike[str],
    *,
    model_api: Any = None,
    splits: Any = None,
    num_devices: int | None = None,
    on_step: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Train ``config`` in ``workdir`` (resuming if it has checkpoints), then evaluate on valid and test.

    ``model_api`` defaults to ``gesr_jax.api``; ``splits`` (an object with ``train``/``valid``/
    ``test`` dicts and ``schema``) defaults to ``load_splits(config.data)``; ``on_step(step)`` runs
    after every step's logging and checkpointing (a hook for notebooks and tests). Returns
    ``{"step", "valid": metrics, "test": metrics}``, also written to ``results.json``.
    """
    model_api = default_model_api() if model_api is None else model_api
    tc = config.train
    try:
        tc.validate()
    except ValueError as err:
        raise ConfigError(str(err)) from None
    workdir = pathlib.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as cleanup:
        checkpoints = Checkpointer(workdir / "checkpoints", max_to_keep=tc.max_checkpoints)
        cleanup.callback(checkpoints.close)
        cleanup.callback(checkpoints.wait)  # callbacks run last-in first-out: pending saves finish, then close
        resume_step = checkpoints.latest_step()
        config_path = workdir / "config.json"
        if resume_step is not None:
            if not config_path.exists():
                raise ConfigError(f"{workdir} has checkpoints but no config.json to check this config against")
            check_resume_config(config_lib.load_json(config_path), config)
        config_lib.save_json(config, config_path)

        splits = default_splits(config) if splits is None else splits
        tasks = tuple(splits.schema.tasks)
        weights = step_lib.resolve_task_weights(tasks, tc)
        mesh = sharding_lib.make_mesh(num_devices)
        sharding_lib.check_batch_size(tc.batch_size, mesh, "train.batch_size")
        sharding_lib.check_batch_size(tc.eval_batch_size, mesh, "train.eval_batch_size")
        cleanup.enter_context(sharding_lib.mesh_context(mesh))

        graphdef, params, params_sharding = init_model(config, model_api, mesh)
        tx = step_lib.make_optimizer(tc)
        opt_state_sharding = sharding_lib.param_shardings(jax.eval_shape(tx.init, params), mesh)
        opt_state = jax.jit(tx.init, out_shardings=opt_state_sharding)(params)
        data_iter = pipeline.make_iterator(pipeline.train_dataset(splits.train, tc.batch_size, seed=tc.seed))
        cleanup.callback(data_iter.close)
        step = 0
        window: list[tuple[int, dict[str, Any]]] = []
        if resume_step is not None:
            params, opt_state, step, meta = checkpoints.restore(
                resume_step, params=params, opt_state=opt_state, data_iterator=data_iter
            )
            window = [(int(s), m) for s, m in meta.get("log_window", [])]
        log = _MetricsLog(workdir / "metrics.jsonl", resume_step)
        train_step = step_lib.make_train_step(
            model_api, graphdef, tx, tasks, weights, mesh=mesh, params_sharding=params_sharding,
            opt_state_sharding=opt_state_sharding, batch_sharding=sharding_lib.batch_shardings(splits.train, mesh),
        )  # fmt: skip
        evaluator = Evaluator(model_api, graphdef, tasks, weights, tc.eval_batch_size, mesh, params_sharding)
        schedule = step_lib.learning_rate_schedule(tc)
        base_key = jax.random.fold_in(jax.random.key(tc.seed), 0x7EA1)  # distinct from the init stream
        start_time = window_start = time.perf_counter()
        bar = cleanup.enter_context(
            tqdm.tqdm(total=tc.num_steps, initial=step, desc="train", unit="step", disable=not _progress_enabled())
        )
        while step < tc.num_steps:
            batch = sharding_lib.shard_batch(next(data_iter), mesh)
            params, opt_state, metrics = train_step(params, opt_state, batch, jax.random.fold_in(base_key, step))
            step += 1
            window.append((step, metrics))
            bar.update(1)
            if _due(step, tc.log_every) or step == tc.num_steps:
                _check_finite(window, checkpoints)
                elapsed = time.perf_counter() - window_start
                record = {"step": step, "split": "train", **_mean_record(window),
                          "learning_rate": float(schedule(step - 1)),
                          "examples_per_sec": len(window) * tc.batch_size / max(elapsed, 1e-9),
                          "wall_time": time.perf_counter() - start_time}  # fmt: skip
                log.write(record)
                bar.set_postfix(loss=f"{record['loss']:.4f}")
                window, window_start = [], time.perf_counter()
            if _due(step, tc.eval_every) and step < tc.num_steps:
                _check_finite(window, checkpoints)
                result = evaluator(params, splits.valid, "valid")
                log.write({"step": step, "split": "valid", **result, "wall_time": time.perf_counter() - start_time})
            if _due(step, tc.checkpoint_every):
                # Only after every step so far was checked finite: a checkpoint on disk is a good one.
                _check_finite(window, checkpoints)
                checkpoints.save(step, params, opt_state, data_iter, {"log_window": window})
            if on_step is not None:
                on_step(step)
        if checkpoints.latest_step() != step:  # the final state is always on disk for `gesr eval`
            checkpoints.save(step, params, opt_state, data_iter, {"log_window": window})
        results: dict[str, Any] = {"step": step}
        for split in ("valid", "test"):
            results[split] = evaluator(params, getattr(splits, split), split)
            log.write({"step": step, "split": split, "final": True, **results[split],
                       "wall_time": time.perf_counter() - start_time})  # fmt: skip
    (workdir / "results.json").write_text(json.dumps(jsonable(results), indent=2, sort_keys=True))
    plots.write_plots(workdir / "metrics.jsonl", workdir / "plots", tasks)
    return results


def _due(step: int, every: int) -> bool:
    return every > 0 and step % every == 0


def _mean_record(window: Sequence[tuple[int, dict[str, float]]]) -> dict[str, float]:
    keys = window[-1][1].keys()
    return {k: float(np.mean([m[k] for _, m in window])) for k in keys}


def evaluate_workdir(
    workdir: str | os.PathLike[str],
    *,
    model_api: Any = None,
    splits: Any = None,
    step: int | None = None,
    split_names: Sequence[str] = ("valid", "test"),
) -> dict[str, Any]:
    """Rebuild data and model from ``workdir/config.json``, restore a checkpoint and evaluate.

    Writes ``workdir/eval.json`` and returns ``{"step", "<split>": metrics, ...}``.
    """
    workdir = pathlib.Path(workdir)
    config_path = workdir / "config.json"
    if not config_path.exists():
        raise ConfigError(f"{workdir} has no config.json; is it a `gesr train` workdir?")
    config = config_lib.load_json(config_path)
    model_api = default_model_api() if model_api is None else model_api
    checkpoints = Checkpointer(workdir / "checkpoints", max_to_keep=config.train.max_checkpoints)
    try:
        step = checkpoints.latest_step() if step is None else step
        if step is None:
            raise ValueError(f"{workdir / 'checkpoints'} holds no checkpoint yet")
        splits = default_splits(config) if splits is None else splits
        tasks = tuple(splits.schema.tasks)
        weights = step_lib.resolve_task_weights(tasks, config.train)
        mesh = sharding_lib.make_mesh()
        sharding_lib.check_batch_size(config.train.eval_batch_size, mesh, "train.eval_batch_size")
        with sharding_lib.mesh_context(mesh):
            graphdef, template, params_sharding = init_model(config, model_api, mesh)
            params = checkpoints.restore_params(step, template)
            evaluator = Evaluator(
                model_api, graphdef, tasks, weights, config.train.eval_batch_size, mesh, params_sharding
            )
            results: dict[str, Any] = {"step": step}
            for name in split_names:
                results[name] = evaluator(params, getattr(splits, name), name)
    finally:
        checkpoints.close()
    (workdir / "eval.json").write_text(json.dumps(jsonable(results), indent=2, sort_keys=True))
    return results

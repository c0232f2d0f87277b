"""The training and evaluation loop: ``train_and_evaluate(config, workdir)``, model-agnostic.

A run owns one workdir::

    config.json       the full Config; a restart must match it (cadence keys and num_steps may change)
    model.json        {"kind": config.model.kind, "api": the model API}; `gesr eval` refuses another API
    metrics.jsonl     one JSON object per line: {"step", "split": train|valid|test, "loss", ...}
    checkpoints/      Orbax steps with params, opt_state, step, the data iterator and hook state
    plots/            loss.png and ne.png, drawn at the end
    results.json      final valid and test metrics

The model enters only through a model API (default ``gesr_jax.api``, which builds ``config.model.kind``
from the model registry); the data through the dataset registry (``data.source``) or injected splits.
Starting ``train_and_evaluate`` on a workdir with checkpoints resumes from the latest one: same
parameters, optimizer state and position in the data stream, so an interrupted run ends with the same
parameters and metrics as an uninterrupted one. A NaN/Inf loss or gradient stops the run with
:class:`TrainingDivergedError`; checkpoints are only written after every step up to them was checked
finite, so the last one on disk is a good one. Logging, evaluation, checkpoints, early stopping and
plots are hooks (gesr_jax/train/hooks.py).
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import sys
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
import tqdm

from gesr_jax.config import Config
from gesr_jax.data import datasets, pipeline
from gesr_jax.train import evaluators as evaluators_lib
from gesr_jax.train import hooks as hooks_lib
from gesr_jax.train import setup as setup_lib
from gesr_jax.train import sharding as sharding_lib
from gesr_jax.train import step as step_lib
from gesr_jax.train.checkpoint import Checkpointer
from gesr_jax.train.hooks import Hook, TrainingDivergedError, jsonable  # noqa: F401  (re-exported)
from gesr_jax.train.setup import RESUMABLE_CHANGES, WorkdirError, check_resume_config  # noqa: F401

Evaluator = evaluators_lib.CandidateEvaluator  # the pre-registry name


def _progress_enabled() -> bool:
    return sys.stderr.isatty() and os.environ.get("CI", "").lower() not in ("1", "true", "yes")


def train_and_evaluate(
    config: Config,
    workdir: str | os.PathLike[str],
    *,
    model_api: Any = None,
    splits: Any = None,
    num_devices: int | None = None,
    on_step: Callable[[int], None] | None = None,
    hooks: Sequence[Hook] = (),
) -> dict[str, Any]:
    """Train ``config`` in ``workdir`` (resuming if it has checkpoints), then evaluate on valid and test.

    ``model_api`` defaults to ``gesr_jax.api``; ``splits`` (an object with ``train``/``valid``/``test``
    dicts and ``schema``, e.g. :class:`gesr_jax.data.datasets.Splits`) defaults to the dataset registry's
    ``load_splits(config.data)``, and the model is built for ``splits.schema``. ``on_step(step)`` runs
    after every step's logging and checkpointing; ``hooks`` run after the standard ones. Returns
    ``{"step", "valid": metrics, "test": metrics}`` (plus ``"stop_reason"`` after an early stop), also
    written to ``results.json``.
    """
    tc = config.train
    setup_lib.validate(config)  # before the workdir is touched
    workdir = pathlib.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as cleanup:
        checkpoints = Checkpointer(workdir / "checkpoints", max_to_keep=tc.max_checkpoints)
        cleanup.callback(checkpoints.close)
        cleanup.callback(checkpoints.wait)  # callbacks run last-in first-out: pending saves finish, then close
        resume_step = checkpoints.latest_step()
        setup_lib.prepare_workdir(workdir, config, model_api, resume_step)
        built = setup_lib.setup(config, model_api=model_api, splits=splits, num_devices=num_devices)
        mesh = built.mesh
        cleanup.enter_context(sharding_lib.mesh_context(mesh))
        try:
            data_iter = pipeline.make_iterator(pipeline.train_dataset(built.splits.train, tc.batch_size, seed=tc.seed))
        except ValueError as err:  # too few requests for one batch, or a malformed injected split
            raise datasets.DataError(str(err)) from None
        cleanup.callback(data_iter.close)
        ctx = hooks_lib.LoopContext(built, workdir, checkpoints, data_iter, built.params, built.opt_state,
                                    resume_step=resume_step)  # fmt: skip
        if resume_step is not None:
            ctx.restore(resume_step)
        train_step = step_lib.make_train_step(
            built.model_api, built.graphdef, built.tx, built.tasks, built.task_weights, mesh=mesh,
            params_sharding=built.params_sharding, opt_state_sharding=built.opt_state_sharding,
            batch_sharding=sharding_lib.batch_shardings(built.splits.train, mesh),
        )  # fmt: skip
        ctx.hooks = [
            *hooks_lib.default_hooks(ctx, step_lib.learning_rate_schedule(tc)),
            *([hooks_lib.StepCallback(on_step)] if on_step is not None else []),
            *hooks,
        ]
        base_key = jax.random.fold_in(jax.random.key(tc.seed), 0x7EA1)  # distinct from the init stream
        bar = cleanup.enter_context(
            tqdm.tqdm(total=tc.num_steps, initial=ctx.step, desc="train", unit="step", disable=not _progress_enabled())
        )
        ctx.progress = bar
        for hook in ctx.hooks:
            hook.on_train_start(ctx)

        while ctx.step < tc.num_steps and ctx.stop_reason is None:
            # One optimizer step. The key is a function of the step alone, so a resumed run draws the same keys.
            batch = sharding_lib.shard_batch(next(data_iter), mesh)
            key = jax.random.fold_in(base_key, ctx.step)
            ctx.params, ctx.opt_state, metrics = train_step(ctx.params, ctx.opt_state, batch, key)
            ctx.step += 1
            # Metrics stay on device until a hook needs them (ctx.require_finite), so steps are not synchronised.
            ctx.window.append((ctx.step, metrics))
            bar.update(1)
            # Log, evaluate, checkpoint, maybe request a stop, user callbacks: in the hooks' order.
            for hook in ctx.hooks:
                hook.on_step(ctx, ctx.step, metrics)

        # The final state goes to disk before the final evaluation, so `gesr eval` can always restore it.
        for hook in ctx.hooks:
            hook.on_loop_end(ctx)
        ctx.finished = True
        results: dict[str, Any] = {"step": ctx.step}
        for split in ("valid", "test"):
            results[split] = ctx.evaluate(split)
        if ctx.stop_reason is not None:
            results["stop_reason"] = ctx.stop_reason
    (workdir / "results.json").write_text(json.dumps(jsonable(results), indent=2, sort_keys=True))
    for hook in ctx.hooks:
        hook.on_end(ctx, results)
    return results


def evaluate_workdir(
    workdir: str | os.PathLike[str],
    *,
    model_api: Any = None,
    splits: Any = None,
    step: int | None = None,
    split_names: Sequence[str] = ("valid", "test"),
) -> dict[str, Any]:
    """Rebuild data and model from ``workdir/config.json``, restore a checkpoint and evaluate.

    ``model_api`` must be the one that trained the workdir (``model.json``; default ``gesr_jax.api``).
    Writes ``workdir/eval.json`` and returns ``{"step", "<split>": metrics, ...}``.
    """
    workdir = pathlib.Path(workdir)
    config = setup_lib.read_workdir_config(workdir)
    setup_lib.check_model_record(workdir, config, model_api)  # before anything is built
    checkpoints = Checkpointer(workdir / "checkpoints", max_to_keep=config.train.max_checkpoints)
    try:
        step = checkpoints.latest_step() if step is None else step
        if step is None:
            raise WorkdirError(f"{workdir / 'checkpoints'} holds no checkpoint yet")
        built = setup_lib.setup(config, model_api=model_api, splits=splits, training=False)
        with sharding_lib.mesh_context(built.mesh):
            params = checkpoints.restore_params(step, built.params)
            results: dict[str, Any] = {"step": step}
            for name in split_names:
                results[name] = built.evaluator(params, getattr(built.splits, name), name)
    finally:
        checkpoints.close()
    (workdir / "eval.json").write_text(json.dumps(jsonable(results), indent=2, sort_keys=True))
    return results


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
    """Per-task NE / AUC / gAUC / logloss (+ oracle NE) of ``params`` on one split (the candidate evaluator).

    ``tasks`` defaults to the split's ``label_<task>`` keys in order. Compiles an eval step per call;
    inside a loop, build one :class:`gesr_jax.train.evaluators.CandidateEvaluator` instead.
    """
    model_api = setup_lib.default_model_api() if model_api is None else model_api
    tasks = tuple(tasks) if tasks is not None else tuple(k[6:] for k in split_arrays if k.startswith("label_"))
    weights = step_lib.resolve_task_weights(tasks, config.train)
    mesh = sharding_lib.make_mesh() if mesh is None else mesh
    sharding_lib.check_batch_size(config.train.eval_batch_size, mesh, "train.eval_batch_size")
    with sharding_lib.mesh_context(mesh):
        params_sharding = sharding_lib.param_shardings(params, mesh)
        params = sharding_lib.place(params, params_sharding)
        evaluator = evaluators_lib.CandidateEvaluator(
            model_api, graphdef, tasks, weights, config.train.eval_batch_size, mesh, params_sharding
        )
        return evaluator(params, split_arrays)

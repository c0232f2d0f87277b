"""The training and evaluation loop: ``train_and_evaluate(config, workdir)``, model-agnostic.

A run owns one workdir::

    config.json       the full Config; a restart must match it (cadence keys and num_steps may change)
    model.json        {"kind": config.model.kind, "api": the model API}; `gesr eval` refuses another API
    metrics.jsonl     one JSON object per line: {"step", "split": train|valid|test, "loss", ...}
    checkpoints/      Orbax steps with params, opt_state, step, the data iterator and hook state
    plots/            loss.png and ne.png, drawn at the end
    best.json         {"step", "metric", "mode", "value"}: the best valid step (train.select_metric)
    data_fingerprint.json   the data's fingerprint at the first start; a resume on other data is refused
    results.json      valid and test metrics at the best step, the valid curve, best_step and last_step
    .lock             held by the running `gesr train` (a second one on the same workdir fails at once)

The model enters only through a model API (default ``gesr_jax.api``, which builds ``config.model.kind``
from the model registry); the data through the dataset registry (``data.source``) or injected splits.
Starting ``train_and_evaluate`` on a workdir with checkpoints resumes from the newest intact one: same
parameters, optimizer state and position in the data stream, so an interrupted run ends with the same
parameters and metrics as an uninterrupted one. A NaN/Inf loss or gradient, or parameters that became
NaN/Inf, stop the run with :class:`TrainingDivergedError`; a checkpoint is written only after the
loss and gradient of every step up to it and the updated parameters were checked finite, so every
step on disk is a good one. Test metrics are computed only at the best valid step
(gesr_jax/train/selection.py). Logging, evaluation, checkpoints, model selection, early stopping and
plots are hooks (gesr_jax/train/hooks.py). Small files are written atomically, by process 0 only.
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np

from gesr_jax.config import Config, ConfigError
from gesr_jax.data import datasets, pipeline
from gesr_jax.train import distributed
from gesr_jax.train import evaluators as evaluators_lib
from gesr_jax.train import hooks as hooks_lib
from gesr_jax.train import reporting, runtime
from gesr_jax.train import selection as selection_lib
from gesr_jax.train import setup as setup_lib
from gesr_jax.train import sharding as sharding_lib
from gesr_jax.train import step as step_lib
from gesr_jax.train import workdir as workdir_lib
from gesr_jax.train.checkpoint import Checkpointer, CheckpointCorruptError, CheckpointNotFoundError, CheckpointWarning
from gesr_jax.train.hooks import Hook, TrainingDivergedError, jsonable  # noqa: F401  (re-exported)
from gesr_jax.train.setup import RESUMABLE_CHANGES, WorkdirError, check_resume_config  # noqa: F401

Evaluator = evaluators_lib.CandidateEvaluator  # the pre-registry name


def train_and_evaluate(
    config: Config,
    workdir: str | os.PathLike[str],
    *,
    model_api: Any = None,
    splits: Any = None,
    num_devices: int | None = None,
    on_step: Callable[[int], None] | None = None,
    hooks: Sequence[Hook] = (),
    strict: bool = False,
    allow_data_change: bool = False,
) -> dict[str, Any]:
    """Train ``config`` in ``workdir`` (resuming if it has checkpoints), select the best valid step, test it.

    ``model_api`` defaults to ``gesr_jax.api``; ``splits`` (an object with ``train``/``valid``/``test``
    dicts and ``schema``, e.g. :class:`gesr_jax.data.datasets.Splits`) defaults to the dataset registry's
    ``load_splits(config.data)``, and the model is built for ``splits.schema``. ``on_step(step)`` runs
    after every step's logging and checkpointing; ``hooks`` run after the standard ones.

    Every check runs before the workdir is written: the config, the workdir (writable, not in use by
    another run: the lock is held until the end), a restart's config and model API, the model and
    evaluators against the data, and the data against the fingerprint saved at the first start
    (a change is refused unless ``allow_data_change``). A resume restores the newest intact checkpoint
    (corrupt ones are quarantined with a warning; ``strict=True`` makes any corruption an error).

    Returns, also written to ``results.json``: ``valid``/``test`` metrics at the best step
    (``train.select_metric``), ``step`` = ``best_step``, ``last_step``, ``best_valid``, ``selection``,
    ``valid_curve`` (``[{"step", "metrics"}]``) and ``stop_reason`` after an early stop.
    """
    tc = config.train
    setup_lib.validate(config)  # before the workdir is touched
    selection_lib.criterion(tc)  # the selection direction is decidable
    distributed.log_layout()
    workdir = pathlib.Path(workdir)
    workdir_lib.check_writable(workdir)  # a read-only or missing-parent workdir is reported before any work
    with contextlib.ExitStack() as cleanup:
        _lock_workdir(workdir, cleanup)
        reporter = reporting.Reporter()  # phase lines on stderr, terminal or not
        cleanup.callback(reporter.close)
        reporter.line(f"{config.name}: {runtime.describe_devices()}")
        resuming = setup_lib.has_checkpoints(workdir)
        if resuming:
            setup_lib.check_resume(workdir, config, model_api)  # before the data is built
        if splits is None:
            with reporter.phase(f"building data (data.source={config.data.source})"):
                splits = setup_lib.default_splits(config)
        with reporter.phase(f"initialising the model (model.kind={setup_lib.model_kind(config)})") as info:
            built = setup_lib.setup(config, model_api=model_api, splits=splits, num_devices=num_devices)
            info["detail"] = f"{sum(int(np.size(x)) for x in jax.tree.leaves(built.params)):,} parameters"
        criterion = selection_lib.check_metric(tc, built.tasks)
        fingerprint = workdir_lib.data_fingerprint(built.splits)
        write_fingerprint = setup_lib.check_data(workdir, fingerprint, resuming, allow_data_change)
        # Every check passed: from here on the workdir is written.
        checkpoints = Checkpointer(workdir / "checkpoints", max_to_keep=tc.max_checkpoints, cleanup_partial=True)
        cleanup.callback(checkpoints.close)
        cleanup.callback(checkpoints.wait)  # callbacks run last-in first-out: pending saves finish, then close
        setup_lib.prepare_workdir(workdir, config, model_api, None, fingerprint if write_fingerprint else None)
        mesh = built.mesh
        cleanup.enter_context(sharding_lib.mesh_context(mesh, embedding_sharding=built.embedding_sharding))
        try:
            data_iter = pipeline.make_iterator(pipeline.train_dataset(built.splits.train, tc.batch_size, seed=tc.seed))
        except ValueError as err:  # a malformed injected split
            raise datasets.DataError(str(err)) from None
        cleanup.callback(data_iter.close)
        ctx = hooks_lib.LoopContext(built, workdir, checkpoints, data_iter, built.params, built.opt_state)
        ctx.reporter = reporter
        with reporter.phase("restoring the newest checkpoint") if resuming else contextlib.nullcontext():
            ctx.restore_latest(strict=strict)  # newest intact step, or a fresh start
        train_step = step_lib.make_train_step(
            built.model_api, built.graphdef, built.tx, built.tasks, built.task_weights, mesh=mesh,
            params_sharding=built.params_sharding, opt_state_sharding=built.opt_state_sharding,
            batch_sharding=sharding_lib.batch_shardings(built.splits.train, mesh),
        )  # fmt: skip
        selection = selection_lib.ModelSelection(criterion, workdir)
        # TensorBoard gets every metrics.jsonl record; purge_step drops what an interrupted run logged after
        # the restored step.
        tensorboard = reporting.TensorBoard(
            workdir / reporting.TENSORBOARD_DIR, purge_step=None if ctx.resume_step is None else ctx.resume_step + 1
        )
        cleanup.callback(tensorboard.close)
        ctx.hooks = [
            reporting.Progress(reporter),  # first: the first step's compile time ends before any other hook runs
            *hooks_lib.default_hooks(ctx, step_lib.learning_rate_schedule(tc), sinks=[tensorboard]),
            selection,
            *([hooks_lib.StepCallback(on_step)] if on_step is not None else []),
            *hooks,
        ]
        base_key = jax.random.fold_in(jax.random.key(tc.seed), 0x7EA1)  # distinct from the init stream
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
            # Log, evaluate, checkpoint, maybe request a stop, user callbacks: in the hooks' order.
            for hook in ctx.hooks:
                hook.on_step(ctx, ctx.step, metrics)
            if ctx.checkpoint_requested:  # a new best valid step: saved with every hook's state of this step
                ctx.save_checkpoint()

        # The final state goes to disk before the final evaluation, so `gesr eval` can always restore it.
        for hook in ctx.hooks:
            hook.on_loop_end(ctx)
        ctx.finished = True
        results = selection_lib.finish(ctx, selection, strict=strict)  # valid at the last step, test at the best
        if ctx.stop_reason is not None:
            results["stop_reason"] = ctx.stop_reason
        if distributed.is_primary():
            workdir_lib.atomic_write_json(workdir / "results.json", jsonable(results))
        for hook in ctx.hooks:
            hook.on_end(ctx, results)
        reporter.line(f"done: {workdir / 'results.json'}; tensorboard --logdir {workdir / reporting.TENSORBOARD_DIR}")
    return results


def _lock_workdir(workdir: pathlib.Path, cleanup: contextlib.ExitStack) -> None:
    """Hold ``workdir``'s lock (process 0) until ``cleanup`` closes; every process fails when it is busy."""
    lock, error = workdir_lib.WorkdirLock(workdir), None
    if distributed.is_primary():
        try:
            lock.acquire()
        except workdir_lib.WorkdirError as err:
            error = err
        else:
            cleanup.callback(lock.release)  # registered first: released after the checkpoints are closed
    if not distributed.agree(error is None):
        raise error or workdir_lib.WorkdirBusyError(f"process 0 could not lock the workdir {workdir}")


def evaluate_workdir(
    workdir: str | os.PathLike[str],
    *,
    model_api: Any = None,
    splits: Any = None,
    step: int | str | None = None,
    split_names: Sequence[str] = ("valid", "test"),
    strict: bool = False,
    write: bool = True,
) -> dict[str, Any]:
    """Rebuild data and model from ``workdir/config.json``, restore a checkpoint and evaluate.

    ``step``: None = the best valid step (``best.json``; the newest intact step, with a warning, when the
    best one is corrupt or gone, or when the run recorded none), ``"last"`` = the newest intact step, or
    a step number. ``strict=True`` makes any corrupt checkpoint an error. ``model_api`` must be the one
    that trained the workdir (``model.json``; default ``gesr_jax.api``). Returns ``{"step", "<split>":
    metrics, ...}`` and, when ``write``, writes it to ``workdir/eval.json`` (a workdir that cannot be
    written gives a :class:`~gesr_jax.train.workdir.WorkdirWarning`; the results are still returned).
    """
    workdir = pathlib.Path(workdir)
    config = setup_lib.read_workdir_config(workdir)
    setup_lib.check_model_record(workdir, config, model_api)  # before anything is built
    if not setup_lib.has_checkpoints(workdir):
        raise WorkdirError(f"{workdir / 'checkpoints'} holds no checkpoint yet")
    built = setup_lib.setup(config, model_api=model_api, splits=splits, training=False)
    checkpoints = Checkpointer(workdir / "checkpoints", max_to_keep=config.train.max_checkpoints)
    try:
        with sharding_lib.mesh_context(built.mesh, embedding_sharding=built.embedding_sharding):
            chosen, params = _restore_for_eval(checkpoints, workdir, built.params, step, strict)
            results: dict[str, Any] = {"step": chosen}
            for name in split_names:
                results[name] = built.evaluator(params, getattr(built.splits, name), name)
    finally:
        checkpoints.close()
    if write:
        try:
            write_eval_results(workdir, results)
        except workdir_lib.WorkdirNotWritableError as err:
            warnings.warn(str(err), workdir_lib.WorkdirWarning, stacklevel=2)
    return results


def write_eval_results(workdir: str | os.PathLike[str], results: dict[str, Any]) -> pathlib.Path:
    """Write ``results`` to ``workdir/eval.json`` atomically (process 0); WorkdirNotWritableError when it cannot."""
    path = pathlib.Path(workdir) / "eval.json"
    if distributed.is_primary():
        try:
            workdir_lib.check_writable(path.parent)
            workdir_lib.atomic_write_json(path, jsonable(results))
        except OSError as err:
            raise workdir_lib.WorkdirNotWritableError(
                f"cannot write {path}: {err.strerror or err}; the results above were not saved"
            ) from None
        except workdir_lib.WorkdirNotWritableError as err:
            raise workdir_lib.WorkdirNotWritableError(f"{err}; {path} was not written") from None
    return path


def _restore_for_eval(
    checkpoints: Checkpointer, workdir: pathlib.Path, template: Any, step: int | str | None, strict: bool
) -> tuple[int, Any]:
    """``(step, params)`` for :func:`evaluate_workdir`'s ``step`` argument."""
    if step is not None and step != "last":
        try:
            number = int(step)
        except ValueError:
            raise ConfigError(f"--step must be a checkpoint step number or 'last', got {step!r}") from None
        return number, checkpoints.restore_params(number, template)
    best = selection_lib.read_best_step(workdir) if step is None else None
    if best is not None:
        try:
            return best, checkpoints.restore_params(best, template)
        except (CheckpointCorruptError, CheckpointNotFoundError) as err:
            if strict:
                raise
            warnings.warn(f"the best step {best} cannot be used ({err}); evaluating the newest intact checkpoint",
                          CheckpointWarning, stacklevel=3)  # fmt: skip
    got = checkpoints.restore_params_latest_intact(template, strict=strict)
    if got is None:
        raise WorkdirError(f"{checkpoints.directory} holds no checkpoint yet")
    return got


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

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
loss and gradient of every step up to it and the updated parameters were checked finite, and the
parameters gave finite logits on a fixed probe batch of the valid split, so every step on disk is usable
and a divergence ends with the newest step that passed. Every folder the run writes (the workdir,
``checkpoints/``, ``tensorboard/``, ``plots/``) is checked writable before any work, and a warning says
when the checkpoint folder cannot hold two checkpoints. On any error the background writers
(TensorBoard, Orbax) are flushed and closed without hiding that first error. Test metrics are computed only at the best valid step
(gesr_jax/train/selection.py). Logging, evaluation, checkpoints, model selection, early stopping and
plots are hooks (gesr_jax/train/hooks.py). Small files are written atomically, by process 0 only.
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import sys
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np

from gesr_jax import workdir_files
from gesr_jax.config import Config
from gesr_jax.data import datasets, pipeline
from gesr_jax.data.fingerprint import data_fingerprint
from gesr_jax.train import distributed
from gesr_jax.train import hooks as hooks_lib
from gesr_jax.train import reporting, runtime
from gesr_jax.train import selection as selection_lib
from gesr_jax.train import setup as setup_lib
from gesr_jax.train import sharding as sharding_lib
from gesr_jax.train import step as step_lib
from gesr_jax.train.checkpoint_errors import CheckpointUnusableError, one_line
from gesr_jax.train.evaluators import NonFinitePredictionsError
from gesr_jax.train.hooks import Hook, jsonable
from gesr_jax.workdir import StepChoice, Workdir, WorkdirError, model_kind

PLOTS_DIR = "plots"


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

    Every check runs before the workdir is written: the config (once per run), every folder the run
    writes, the workdir lock (held until the end), a restart's config and model API, the model and
    evaluators against the data, and the data against the fingerprint saved at the first start (a change
    is refused unless ``allow_data_change``). A new workdir that fails these checks is removed again. A
    resume restores the newest intact checkpoint (corrupt ones are quarantined with a warning;
    ``strict=True`` makes any corruption an error).

    Returns, also written to ``results.json``: ``valid``/``test`` metrics at the best step
    (``train.select_metric``), ``step`` = ``best_step``, ``last_step``, ``best_valid``, ``selection``,
    ``valid_curve`` (``[{"step", "metrics"}]``) and ``stop_reason`` after an early stop.
    """
    tc = config.train
    model_api = setup_lib.default_model_api() if model_api is None else model_api
    setup_lib.validate(config)  # the run's one config check, before the workdir is touched
    selection_lib.criterion(tc)  # the selection direction is decidable
    distributed.log_layout()
    run = Workdir(workdir)
    created = not run.path.exists()
    check_folders(run)  # a read-only workdir, checkpoints/, tensorboard/ or plots/ is reported before any work
    with contextlib.ExitStack() as cleanup:
        lock = _lock_workdir(run, cleanup)
        started = False  # set once the workdir is written: from then on a failure leaves it for a resume

        def forget_new_workdir(exc_type: Any, *_: Any) -> None:
            if exc_type is not None and created and not started and lock is not None:
                _remove_new_workdir(run, lock)

        cleanup.push(forget_new_workdir)
        reporter = reporting.Reporter()  # phase lines on stderr, terminal or not
        cleanup.callback(reporter.close)
        reporter.line(f"{config.name}: {runtime.describe_devices()}")
        resuming = run.has_checkpoints()
        if resuming:
            run.check_resume(config, model_api)  # before the data is built
        if splits is None:
            with reporter.phase(f"building data (data.source={config.data.source})"):
                splits = setup_lib.default_splits(config)
        with reporter.phase(f"initialising the model (model.kind={model_kind(config)})") as info:
            built = setup_lib.setup(config, model_api=model_api, splits=splits, num_devices=num_devices)
            info["detail"] = f"{sum(int(np.size(x)) for x in jax.tree.leaves(built.params)):,} parameters"
        criterion = selection_lib.check_metric(tc, built.tasks)
        fingerprint = data_fingerprint(built.splits)
        write_fingerprint = run.check_data(fingerprint, resuming=resuming, allow_change=allow_data_change)
        # Every check passed: from here on the workdir is written.
        started = True
        checkpoints = run.checkpointer(max_to_keep=tc.max_checkpoints, cleanup_partial=True)
        # Exit callbacks run last-in first-out: pending saves finish, then the manager closes.
        close_quietly_on_error(cleanup, checkpoints.close, "closing the checkpoint manager")
        close_quietly_on_error(cleanup, checkpoints.wait, f"finishing the checkpoint save in {run.checkpoints_dir}")
        warn_free_space(run, built, reporter)
        if distributed.is_primary():
            run.write_records(config, model_api, fingerprint if write_fingerprint else None)
        mesh = built.mesh
        cleanup.enter_context(sharding_lib.mesh_context(mesh, embedding_sharding=built.embedding_sharding))
        try:
            data_iter = pipeline.make_iterator(pipeline.train_dataset(built.splits.train, tc.batch_size, seed=tc.seed))
        except ValueError as err:  # a malformed injected split
            raise datasets.DataError(str(err)) from None
        cleanup.callback(data_iter.close)
        ctx = hooks_lib.LoopContext(built, run.path, checkpoints, data_iter, built.params, built.opt_state)
        ctx.reporter = reporter
        with reporter.phase("restoring the newest checkpoint") if resuming else contextlib.nullcontext():
            ctx.restore_latest(strict=strict)  # newest intact step, or a fresh start
        train_step = step_lib.make_train_step(
            built.model_api, built.graphdef, built.tx, built.tasks, built.task_weights, mesh=mesh,
            params_sharding=built.params_sharding, opt_state_sharding=built.opt_state_sharding,
            batch_sharding=sharding_lib.batch_shardings(built.splits.train, mesh),
        )  # fmt: skip
        selection = selection_lib.ModelSelection(criterion, run.best_path)
        # TensorBoard gets every metrics.jsonl record; purge_step drops what an interrupted run logged after
        # the restored step.
        tensorboard = reporting.TensorBoard(
            run.path / reporting.TENSORBOARD_DIR, purge_step=None if ctx.resume_step is None else ctx.resume_step + 1
        )
        close_quietly_on_error(cleanup, tensorboard.close, f"closing the TensorBoard writer of {tensorboard.logdir}")
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
            workdir_files.atomic_write_json(run.path / "results.json", jsonable(results))
        for hook in ctx.hooks:
            hook.on_end(ctx, results)
        reporter.line(f"done: {run.path / 'results.json'}; tensorboard --logdir {tensorboard.logdir}")
    return results


def check_folders(run: Workdir) -> None:
    """Every folder a run writes: the workdir (created if needed), and checkpoints/, tensorboard/, plots/.

    A folder that does not exist yet is created later inside the workdir, so the workdir's check covers it.
    Raises :class:`~gesr_jax.workdir_files.WorkdirNotWritableError` naming the folder (process 0 only).
    """
    if not distributed.is_primary():
        return
    workdir_files.check_writable(run.path)
    for what, folder in (("checkpoint folder", run.checkpoints_dir),
                         ("TensorBoard folder", run.path / reporting.TENSORBOARD_DIR),
                         ("plots folder", run.path / PLOTS_DIR)):  # fmt: skip
        if folder.exists():
            workdir_files.check_writable(folder, what=what)


def warn_free_space(run: Workdir, built: setup_lib.Setup, reporter: reporting.Reporter) -> None:
    """A warning when the checkpoint folder's filesystem cannot hold two checkpoints of this run."""
    leaves = jax.tree.leaves((built.params, built.opt_state))
    size = sum(int(np.size(x)) * np.dtype(x.dtype).itemsize for x in leaves)
    message = workdir_files.free_space_warning(run.path, size, "the arrays' bytes; on disk it is more")
    if message is not None and distributed.is_primary():
        warnings.warn(message, workdir_files.WorkdirWarning, stacklevel=3)
        reporter.line(f"warning: {message}")


def close_quietly_on_error(stack: contextlib.ExitStack, close: Callable[[], Any], what: str) -> None:
    """Run ``close`` when ``stack`` exits; if an error is already on its way out, a failure of ``close`` is one
    warning line on stderr instead of an exception that would hide the first error."""

    def exit_(exc_type: Any, *_: Any) -> bool:
        try:
            close()
        except Exception as err:  # noqa: BLE001 - reported, the first error wins
            if exc_type is None:
                raise
            print(f"warning: {what} also failed: {one_line(err)}", file=sys.stderr, flush=True)
        return False

    stack.push(exit_)


def _lock_workdir(run: Workdir, cleanup: contextlib.ExitStack) -> workdir_files.WorkdirLock | None:
    """Hold the workdir's lock (process 0) until ``cleanup`` closes; every process fails when it is busy."""
    lock, error = run.lock(), None
    if distributed.is_primary():
        try:
            lock.acquire()
        except WorkdirError as err:
            error = err
        else:
            cleanup.callback(lock.release)  # registered first: released after the checkpoints are closed
    if not distributed.agree(error is None):
        raise error or workdir_files.WorkdirBusyError(f"process 0 could not lock the workdir {run.path}")
    return lock if lock.held else None


def _remove_new_workdir(run: Workdir, lock: workdir_files.WorkdirLock) -> None:
    """Undo a new workdir whose checks failed: its lock file goes (while still held), then the folder if empty."""
    with contextlib.suppress(OSError):
        lock.path.unlink()
    with contextlib.suppress(OSError):
        run.path.rmdir()  # only when nothing else is in it


def evaluate_workdir(
    workdir: str | os.PathLike[str],
    *,
    model_api: Any = None,
    splits: Any = None,
    step: StepChoice = None,
    split_names: Sequence[str] = ("valid", "test"),
    strict: bool = False,
    write: bool = True,
) -> dict[str, Any]:
    """Rebuild data and model from ``workdir/config.json``, restore a checkpoint and evaluate.

    ``step``: None = the best valid step (``best.json``; the newest intact step, with a warning, when the
    best one is corrupt or gone, or when the run recorded none), ``"last"`` = the newest intact step, or
    a step number. ``strict=True`` makes any corrupt checkpoint an error. ``model_api`` must be the one
    that trained the workdir (``model.json``; default ``gesr_jax.api``). A step whose predictions are
    NaN/Inf is a :class:`~gesr_jax.train.checkpoint.CheckpointError` naming it. Returns ``{"step",
    "<split>": metrics, ...}`` and, when ``write``, writes it to ``workdir/eval.json`` (a workdir that cannot
    be written gives a :class:`~gesr_jax.workdir_files.WorkdirWarning`; the results are still returned).
    """
    model_api = setup_lib.default_model_api() if model_api is None else model_api
    run = Workdir(workdir)
    config = run.read_config()
    setup_lib.validate(config)
    run.check_model(config, model_api)  # before anything is built
    if not run.has_checkpoints():
        raise WorkdirError(f"{run.checkpoints_dir} holds no checkpoint yet")
    built = setup_lib.setup(config, model_api=model_api, splits=splits, training=False)
    with run.checkpointer(max_to_keep=config.train.max_checkpoints) as checkpoints:
        with sharding_lib.mesh_context(built.mesh, embedding_sharding=built.embedding_sharding):
            chosen, params = run.restore_params(built.params, step, strict=strict, checkpoints=checkpoints)
            results: dict[str, Any] = {"step": chosen}
            for name in split_names:
                try:
                    results[name] = built.evaluator(params, getattr(built.splits, name), name)
                except NonFinitePredictionsError as err:
                    raise CheckpointUnusableError(
                        f"checkpoint step {chosen} in {run.checkpoints_dir} is unusable: {err}; evaluate an older "
                        "step with --step N"
                    ) from None
    if write:
        try:
            write_eval_results(run.path, results)
        except workdir_files.WorkdirNotWritableError as err:
            warnings.warn(str(err), workdir_files.WorkdirWarning, stacklevel=2)
    return results


def write_eval_results(workdir: str | os.PathLike[str], results: dict[str, Any]) -> pathlib.Path:
    """Write ``results`` to ``workdir/eval.json`` atomically (process 0); WorkdirNotWritableError when it cannot."""
    path = pathlib.Path(workdir) / "eval.json"
    if distributed.is_primary():
        try:
            workdir_files.check_writable(path.parent)
            workdir_files.atomic_write_json(path, jsonable(results))
        except workdir_files.RunIOError as err:
            raise workdir_files.WorkdirNotWritableError(
                f"{err}; {path} was not written (the results above were not saved)", path.parent, err.errno
            ) from None
    return path

"""Training-loop hooks: what happens around the optimizer steps, one small object per concern.

The loop (gesr_jax/train/trainer.py) calls, on every hook in order:

* ``on_train_start(ctx)`` once, after setup and any restore;
* ``on_step(ctx, step, metrics)`` after every optimizer step (``metrics`` still on device);
* ``on_eval(ctx, step, split, metrics)`` whenever a split was evaluated (periodic valid passes and the
  final valid/test passes, where ``ctx.finished`` is True);
* ``on_loop_end(ctx)`` when the loop ends (last step reached or a stop requested), before the final
  evaluation;
* ``on_end(ctx, results)`` after ``results.json`` is written.

Any hook may call ``ctx.request_stop(reason)``: the loop ends after the current step (early stopping).
A hook that keeps state across restarts stores JSON values in ``ctx.hook_state[<its name>]``, which every
checkpoint saves and a resume restores. Before using params or train metrics a hook calls
``ctx.require_finite()``, the NaN guard: it pulls the pending train metrics to host once and raises
:class:`TrainingDivergedError` on a NaN/Inf loss or gradient, so nothing non-finite is logged or saved.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import pathlib
import time
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np

from gesr_jax.train import distributed, plots
from gesr_jax.train.checkpoint import Checkpointer
from gesr_jax.train.checkpoint_errors import CheckpointWarning
from gesr_jax.train.checksums import all_finite
from gesr_jax.train.evaluators import NonFinitePredictionsError
from gesr_jax.train.setup import Setup
from gesr_jax.workdir_files import RunIOError, WorkdirWarning, atomic_write_text, disk_bytes, free_space_warning


class TrainingDivergedError(RuntimeError):
    """The loss, gradient, parameters or predictions became NaN/Inf; the newest usable checkpoint is kept."""


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


def due(step: int, every: int) -> bool:
    return every > 0 and step % every == 0


@dataclasses.dataclass
class LoopContext:
    """The mutable state of one run's loop, shared by the hooks."""

    setup: Setup
    workdir: pathlib.Path
    checkpoints: Checkpointer
    data_iter: Any
    params: Any
    opt_state: Any
    step: int = 0
    resume_step: int | None = None
    window: list[tuple[int, dict[str, Any]]] = dataclasses.field(default_factory=list)  # train metrics not yet logged
    hook_state: dict[str, Any] = dataclasses.field(default_factory=dict)  # JSON; saved with every checkpoint
    stop_reason: str | None = None
    finished: bool = False  # True once the loop is over (the final evaluations)
    hooks: Sequence[Hook] = ()
    progress: Any = None  # the tqdm bar, if any
    last_saved: int | None = None  # the step of the newest checkpoint this run wrote or restored
    checkpoint_requested: bool = False  # a hook asked for a checkpoint of this step (model selection)
    start_time: float = dataclasses.field(default_factory=time.perf_counter)
    reporter: Any = None  # gesr_jax.train.reporting.Reporter: phase lines on stderr (None = silent)

    @property
    def config(self) -> Any:
        return self.setup.config

    def phase(self, what: str) -> Any:
        """A context manager reporting ``what`` and its duration through the run's reporter (no-op without one)."""
        return self.reporter.phase(what) if self.reporter is not None else contextlib.nullcontext({})

    def request_stop(self, reason: str) -> None:
        """End the loop after the current step; the final checkpoint and evaluation still run."""
        if self.stop_reason is None:
            self.stop_reason = reason

    def require_finite(self) -> None:
        """The NaN guard: pull the window's metrics to host (once) and stop at the first non-finite loss or gradient."""
        for i, (step, metrics) in enumerate(self.window):
            host = {k: float(v) for k, v in jax.device_get(metrics).items()}
            self.window[i] = (step, host)
            for key in ("loss", "grad_norm"):
                if not math.isfinite(host[key]):
                    self.diverged(f"{key} became {host[key]} at step {step}")

    def diverged(self, what: str) -> None:
        """Raise :class:`TrainingDivergedError` naming the newest checkpoint, which passed every check (usable)."""
        self.checkpoints.wait()
        last = self.checkpoints.latest_step()
        kept = (
            "no checkpoint was written" if last is None
            else f"the last good checkpoint (step {last}) is kept in {self.checkpoints.directory}"
        )  # fmt: skip
        raise TrainingDivergedError(
            f"{what}; training stopped and {kept}. Lower train.learning_rate, keep train.grad_clip_norm > 0, "
            "or check the data."
        )

    def evaluate(self, split: str, *, params: Any = None, step: int | None = None) -> dict[str, float]:
        """Run the configured evaluators on one split and tell every hook (``on_eval``).

        ``params`` / ``step`` default to the current ones (the final test pass uses the best step's).
        """
        self.require_finite()
        params = self.params if params is None else params
        with self.phase(f"evaluating {split}"):
            try:
                result = self.setup.evaluator(params, getattr(self.setup.splits, split), split)
            except NonFinitePredictionsError as err:
                self.diverged(f"{err} at step {self.step if step is None else step}")
        for hook in self.hooks:
            hook.on_eval(self, self.step if step is None else step, split, result)
        return result

    def request_checkpoint(self) -> None:
        """Ask for a checkpoint of the current step, written once every hook's ``on_step`` ran."""
        self.checkpoint_requested = True

    def save_checkpoint(self) -> None:
        """Save the current state unless this step is already on disk; only finite state is ever saved."""
        self.checkpoint_requested = False
        if self.last_saved == self.step:
            return
        self.require_finite()  # the loss and gradient of every step up to here
        if not (all_finite(self.params) and all_finite(self.opt_state)):  # the state after the update
            self.diverged(f"the parameters or optimizer state became NaN/Inf at step {self.step}")
        if self.setup.probe is not None and not self.setup.probe(self.params):  # finite params can still overflow
            self.diverged(f"the predictions on the valid probe batch became NaN/Inf at step {self.step}")
        meta = {"log_window": self.window, "hooks": self.hook_state, "stop_reason": self.stop_reason}
        with self.phase(f"saving checkpoint {self.step}"):
            self.checkpoints.save(self.step, self.params, self.opt_state, self.data_iter, jsonable(meta))
        if self.last_saved is None:  # this run's first step on disk: the real size, for the free-space check
            self.check_free_space(self.step)
        self.last_saved = self.step

    def check_free_space(self, step: int) -> None:
        """Warn when the checkpoint folder cannot hold two more steps the size ``step`` takes on disk
        (Orbax's files take more than the arrays' bytes, which the check before training used)."""
        if not distributed.is_primary():
            return
        self.checkpoints.wait()
        size = disk_bytes(self.checkpoints.directory / str(step))
        message = free_space_warning(self.checkpoints.directory, size, f"measured on step {step}")
        if message is not None:
            warnings.warn(message, WorkdirWarning, stacklevel=2)

    def restore_latest(self, *, strict: bool = False) -> int | None:
        """Resume from the newest intact checkpoint (corrupt newer ones are quarantined); its step or None."""
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", CheckpointWarning)
            restored = self.checkpoints.restore_latest_intact(
                params=self.params, opt_state=self.opt_state, data_iterator=self.data_iter,
                strict=strict, quarantine=True,
            )  # fmt: skip
        for w in caught:  # re-issued from here, so they point at the trainer and are not de-duplicated away
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
        if restored is None:
            return None
        self.params, self.opt_state, self.step, meta = restored.params, restored.opt_state, restored.step, restored.metadata
        self.window = [(int(s), m) for s, m in meta.get("log_window", [])]
        self.hook_state = dict(meta.get("hooks", {}))
        self.stop_reason = meta.get("stop_reason")
        self.resume_step = self.last_saved = restored.step
        self.check_free_space(restored.step)
        return restored.step


class Hook:
    """Base hook: every method is a no-op; override the ones you need."""

    def on_train_start(self, ctx: LoopContext) -> None:
        pass

    def on_step(self, ctx: LoopContext, step: int, metrics: dict[str, Any]) -> None:
        pass

    def on_eval(self, ctx: LoopContext, step: int, split: str, metrics: dict[str, float]) -> None:
        pass

    def on_loop_end(self, ctx: LoopContext) -> None:
        pass

    def on_end(self, ctx: LoopContext, results: dict[str, Any]) -> None:
        pass


# Keys of metrics.jsonl / results.json that measure time, not the model: they differ between two identical runs.
TIMING_KEYS = ("wall_time", "sec_per_step", "requests_per_sec", "candidates_per_sec")


def _phase_seconds(ctx: LoopContext) -> float:
    return ctx.reporter.phase_seconds if ctx.reporter is not None else 0.0


class MetricsLogger(Hook):
    """Writes ``metrics.jsonl``: mean train metrics every ``train.log_every`` steps, and every evaluation.

    Train lines also carry ``sec_per_step``, ``requests_per_sec`` and ``candidates_per_sec`` (requests x the
    train split's mean candidates per request), timed from the end of this run's first step (which
    compiles) and without the time spent in evaluations and checkpoints. Each record also goes to every
    ``sinks`` callable (e.g. :class:`gesr_jax.train.reporting.TensorBoard`).
    """

    def __init__(self, path: pathlib.Path, schedule: Callable[[int], Any], sinks: Sequence[Callable[[dict], Any]] = ()):
        self.path, self.schedule, self.sinks = path, schedule, tuple(sinks)
        self.window_start = time.perf_counter()
        self.timed_from: int | None = None  # the step after which steps are timed
        self.phase_mark = 0.0
        self.candidates_per_request = 1.0

    def on_train_start(self, ctx: LoopContext) -> None:
        if distributed.is_primary():
            # A resumed run replays every step after the restored one: drop their lines (and any line a
            # crash cut short), so no line appears twice. Rewritten atomically: a crash keeps the old file.
            kept = [] if ctx.resume_step is None else [
                r for r in _read_lines(self.path) if r.get("step", 0) <= ctx.resume_step and not r.get("final")
            ]  # fmt: skip
            atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in kept))
        self.window_start = time.perf_counter()
        train = getattr(ctx.setup.splits, "train", None)
        if isinstance(train, dict) and "num_candidates" in train and len(train["num_candidates"]):
            self.candidates_per_request = float(np.mean(train["num_candidates"]))

    def on_step(self, ctx: LoopContext, step: int, metrics: dict[str, Any]) -> None:
        tc = ctx.config.train
        if self.timed_from is None:  # this run's first step compiles: time from its end
            jax.block_until_ready(metrics)
            self.timed_from, self.window_start, self.phase_mark = step, time.perf_counter(), _phase_seconds(ctx)
        if not (due(step, tc.log_every) or step == tc.num_steps):
            return
        ctx.require_finite()
        elapsed = time.perf_counter() - self.window_start - (_phase_seconds(ctx) - self.phase_mark)
        timed = sum(1 for s, _ in ctx.window if s > self.timed_from)  # a resume's restored window was not timed
        ok = timed > 0 and elapsed > 0
        keys = ctx.window[-1][1].keys()
        record = {"step": step, "split": "train", **{k: float(np.mean([m[k] for _, m in ctx.window])) for k in keys},
                  "learning_rate": float(self.schedule(step - 1)),
                  "sec_per_step": elapsed / timed if ok else float("nan"),
                  "requests_per_sec": timed * tc.batch_size / elapsed if ok else float("nan"),
                  "candidates_per_sec": (timed * tc.batch_size * self.candidates_per_request / elapsed if ok
                                         else float("nan")),
                  "wall_time": time.perf_counter() - ctx.start_time}  # fmt: skip
        self.write(record)
        if ctx.progress is not None:
            ctx.progress.set_postfix(loss=f"{record['loss']:.4f}")
        ctx.window.clear()
        self.window_start, self.phase_mark = time.perf_counter(), _phase_seconds(ctx)

    def on_eval(self, ctx: LoopContext, step: int, split: str, metrics: dict[str, float]) -> None:
        final = {"final": True} if ctx.finished else {}
        wall_time = time.perf_counter() - ctx.start_time
        self.write({"step": step, "split": split, **final, **metrics, "wall_time": wall_time})

    def write(self, record: dict[str, Any]) -> None:
        if distributed.is_primary():
            try:
                with self.path.open("a") as f:
                    f.write(json.dumps(jsonable(record)) + "\n")
            except OSError as err:
                raise RunIOError.wrap("append to", self.path, err) from None
            for sink in self.sinks:
                sink(record)


def _read_lines(path: pathlib.Path) -> list[dict[str, Any]]:
    """The JSON records of ``metrics.jsonl``, skipping a torn (unparsable) line a crash left behind."""
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict):
            out.append(record)
    return out


class PeriodicEval(Hook):
    """Evaluates ``split`` every ``every`` steps (not on the last step: the final evaluation covers it)."""

    def __init__(self, every: int, split: str = "valid"):
        self.every, self.split = every, split

    def on_step(self, ctx: LoopContext, step: int, metrics: dict[str, Any]) -> None:
        if due(step, self.every) and step < ctx.config.train.num_steps:
            ctx.evaluate(self.split)


class Checkpointing(Hook):
    """Saves a checkpoint every ``every`` steps, and the final state when the loop ends (for ``gesr eval``)."""

    def __init__(self, every: int):
        self.every = every

    def on_step(self, ctx: LoopContext, step: int, metrics: dict[str, Any]) -> None:
        if due(step, self.every):
            ctx.save_checkpoint()

    def on_loop_end(self, ctx: LoopContext) -> None:
        ctx.save_checkpoint()  # a no-op when this step is already on disk


class EarlyStopping(Hook):
    """Base for early stopping: after each periodic valid pass, :meth:`should_stop` may end the run.

    Subclasses implement ``should_stop(ctx, step, metrics) -> reason | None`` and keep any state (best
    value, evaluations without improvement) in ``ctx.hook_state[self.name]`` so a resumed run continues it.
    A stop is recorded in the checkpoint: resuming a stopped run only re-runs the final evaluation.
    """

    name = "early_stopping"
    split = "valid"

    def should_stop(self, ctx: LoopContext, step: int, metrics: dict[str, float]) -> str | None:
        raise NotImplementedError

    def on_eval(self, ctx: LoopContext, step: int, split: str, metrics: dict[str, float]) -> None:
        if split == self.split and not ctx.finished:
            reason = self.should_stop(ctx, step, metrics)
            if reason:
                ctx.request_stop(reason)


class StepCallback(Hook):
    """Calls ``fn(step)`` after each step's logging, evaluation and checkpointing (notebooks, tests)."""

    def __init__(self, fn: Callable[[int], None]):
        self.fn = fn

    def on_step(self, ctx: LoopContext, step: int, metrics: dict[str, Any]) -> None:
        self.fn(step)


class Plots(Hook):
    """Draws ``plots/loss.png`` and ``plots/ne.png`` from ``metrics.jsonl`` at the end of the run."""

    def on_end(self, ctx: LoopContext, results: dict[str, Any]) -> None:
        if distributed.is_primary():
            try:
                plots.write_plots(ctx.workdir / "metrics.jsonl", ctx.workdir / "plots", ctx.setup.tasks)
            except OSError as err:
                raise RunIOError.wrap("write the plots in", ctx.workdir / "plots", err) from None


def default_hooks(
    ctx: LoopContext, schedule: Callable[[int], Any], sinks: Sequence[Callable[[dict], Any]] = ()
) -> list[Hook]:
    """The standard behaviour, in order: log (metrics.jsonl and ``sinks``), periodic valid eval, checkpoints, plots."""
    tc = ctx.config.train
    return [
        MetricsLogger(ctx.workdir / "metrics.jsonl", schedule, sinks),
        PeriodicEval(tc.eval_every),
        Checkpointing(tc.checkpoint_every),
        Plots(),
    ]

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

import dataclasses
import json
import math
import pathlib
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np

from gesr_jax.train import plots
from gesr_jax.train.checkpoint import Checkpointer
from gesr_jax.train.setup import Setup


class TrainingDivergedError(RuntimeError):
    """The loss or gradient became NaN/Inf; the last good checkpoint is kept."""


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
    start_time: float = dataclasses.field(default_factory=time.perf_counter)

    @property
    def config(self) -> Any:
        return self.setup.config

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
                    self.checkpoints.wait()
                    raise TrainingDivergedError(
                        f"{key} became {host[key]} at step {step}; training stopped. The last good checkpoint "
                        f"(step {self.checkpoints.latest_step()}) is kept in {self.checkpoints.directory}. Lower "
                        f"train.learning_rate, keep train.grad_clip_norm > 0, or check the data."
                    )

    def evaluate(self, split: str) -> dict[str, float]:
        """Run the configured evaluators on one split and tell every hook (``on_eval``)."""
        self.require_finite()
        result = self.setup.evaluator(self.params, getattr(self.setup.splits, split), split)
        for hook in self.hooks:
            hook.on_eval(self, self.step, split, result)
        return result

    def save_checkpoint(self) -> None:
        self.require_finite()  # a checkpoint on disk is always a good one
        meta = {"log_window": self.window, "hooks": self.hook_state, "stop_reason": self.stop_reason}
        self.checkpoints.save(self.step, self.params, self.opt_state, self.data_iter, jsonable(meta))

    def restore(self, step: int) -> None:
        self.params, self.opt_state, self.step, meta = self.checkpoints.restore(
            step, params=self.params, opt_state=self.opt_state, data_iterator=self.data_iter
        )
        self.window = [(int(s), m) for s, m in meta.get("log_window", [])]
        self.hook_state = dict(meta.get("hooks", {}))
        self.stop_reason = meta.get("stop_reason")


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


class MetricsLogger(Hook):
    """Writes ``metrics.jsonl``: mean train metrics every ``train.log_every`` steps, and every evaluation."""

    def __init__(self, path: pathlib.Path, schedule: Callable[[int], Any]):
        self.path, self.schedule = path, schedule
        self.window_start = time.perf_counter()

    def on_train_start(self, ctx: LoopContext) -> None:
        if ctx.resume_step is None:
            self.path.write_text("")
        else:  # lines past the restored step are replayed by the resumed run
            kept = [r for r in plots.read_metrics(self.path) if r["step"] <= ctx.resume_step and not r.get("final")]
            self.path.write_text("".join(json.dumps(r) + "\n" for r in kept))
        self.window_start = time.perf_counter()

    def on_step(self, ctx: LoopContext, step: int, metrics: dict[str, Any]) -> None:
        tc = ctx.config.train
        if not (due(step, tc.log_every) or step == tc.num_steps):
            return
        ctx.require_finite()
        elapsed = time.perf_counter() - self.window_start
        keys = ctx.window[-1][1].keys()
        record = {"step": step, "split": "train", **{k: float(np.mean([m[k] for _, m in ctx.window])) for k in keys},
                  "learning_rate": float(self.schedule(step - 1)),
                  "examples_per_sec": len(ctx.window) * tc.batch_size / max(elapsed, 1e-9),
                  "wall_time": time.perf_counter() - ctx.start_time}  # fmt: skip
        self.write(record)
        if ctx.progress is not None:
            ctx.progress.set_postfix(loss=f"{record['loss']:.4f}")
        ctx.window.clear()
        self.window_start = time.perf_counter()

    def on_eval(self, ctx: LoopContext, step: int, split: str, metrics: dict[str, float]) -> None:
        final = {"final": True} if ctx.finished else {}
        wall_time = time.perf_counter() - ctx.start_time
        self.write({"step": step, "split": split, **final, **metrics, "wall_time": wall_time})

    def write(self, record: dict[str, Any]) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(jsonable(record)) + "\n")


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
        if ctx.checkpoints.latest_step() != ctx.step:
            ctx.save_checkpoint()


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
        plots.write_plots(ctx.workdir / "metrics.jsonl", ctx.workdir / "plots", ctx.setup.tasks)


def default_hooks(ctx: LoopContext, schedule: Callable[[int], Any]) -> list[Hook]:
    """The standard behaviour, in order: log, periodic valid eval, checkpoints, plots."""
    tc = ctx.config.train
    return [
        MetricsLogger(ctx.workdir / "metrics.jsonl", schedule),
        PeriodicEval(tc.eval_every),
        Checkpointing(tc.checkpoint_every),
        Plots(),
    ]

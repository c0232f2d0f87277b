"""Model selection: keep the best valid checkpoint by ``train.select_metric``, stop early by ``train.patience``.

Every valid pass (``train.eval_every`` and the final one) is a point of the *valid curve*; the point with
the best value of the selection metric names the *best step*. The metric is

* ``mean_ne`` (default): the mean of ``<task>/ne`` over the data's tasks, lower is better;
* any key an evaluator reports, e.g. ``consume/ne`` or ``engage/auc`` (``ranking/mrr`` with the ranking
  evaluator). ``train.select_mode=auto`` derives the direction from the name (NE, loss: min; AUC, gAUC,
  HR@K, NDCG@K, MRR: max); set ``min``/``max`` for any other key.

A periodic pass that improves on the best asks for a checkpoint at that step (written once the step's
hooks ran), and the best step is protected from ``train.max_checkpoints`` (the newest N plus the best are
kept). The curve and the best live in ``ctx.hook_state["selection"]`` (saved with every checkpoint, so a
resume continues them) and in ``best.json`` (``{"step", "metric", "mode", "value"}``, for ``gesr eval``).
With ``train.patience = P > 0`` the run stops after P passes in a row without improvement.
At the end the trainer restores the best step's params and evaluates test there only (:func:`finish`).
"""

from __future__ import annotations

import dataclasses
import math
import pathlib
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

from gesr_jax.config import ConfigError
from gesr_jax.train import distributed
from gesr_jax.train.checkpoint_errors import CheckpointError
from gesr_jax.train.hooks import EarlyStopping, LoopContext, jsonable
from gesr_jax.workdir_files import atomic_write_json

MEAN_NE = "mean_ne"
_MIN_NAMES = ("ne", "loss", "logloss", "oracle_ne")
_MAX_NAMES = ("auc", "gauc", "mrr")
_MAX_PREFIXES = ("hr@", "ndcg@", "recall@", "precision@")
_CANDIDATE_METRICS = ("ne", "auc", "gauc", "logloss", "oracle_ne")


class SelectionWarning(UserWarning):
    """The best step could not be restored and another step's params were used."""


@dataclasses.dataclass(frozen=True)
class Criterion:
    """The selection metric, its direction and the data's tasks (for ``mean_ne``)."""

    metric: str
    mode: str  # "min" | "max"
    tasks: tuple[str, ...] = ()

    def value(self, metrics: Mapping[str, Any]) -> float | None:
        """The metric's value in one pass's metrics; None when absent or not finite."""
        if self.metric == MEAN_NE:
            values = [metrics.get(f"{t}/ne") for t in self.tasks]
            if not values or any(v is None for v in values):
                return None
            v = sum(float(x) for x in values) / len(values)
        else:
            raw = metrics.get(self.metric)
            if raw is None:
                return None
            v = float(raw)
        return v if math.isfinite(v) else None

    def better(self, new: float | None, best: float | None) -> bool:
        if new is None:
            return False
        if best is None:
            return True
        return new < best if self.mode == "min" else new > best


def derive_mode(metric: str) -> str | None:
    """"min" / "max" from a metric's name (its part after the last "/"), None when unknown."""
    if metric == MEAN_NE:
        return "min"
    leaf = metric.rsplit("/", 1)[-1].lower()
    if leaf in _MIN_NAMES:
        return "min"
    if leaf in _MAX_NAMES or leaf.startswith(_MAX_PREFIXES):
        return "max"
    return None


def criterion(train_config: Any, tasks: Sequence[str] = ()) -> Criterion:
    """The :class:`Criterion` of ``train.select_metric`` / ``train.select_mode``; ConfigError if undecidable."""
    metric, mode = train_config.select_metric.strip(), train_config.select_mode
    if mode == "auto":
        mode = derive_mode(metric)
        if mode is None:
            raise ConfigError(
                f"train.select_metric={metric!r}: cannot tell whether lower or higher is better; set "
                "train.select_mode=min or train.select_mode=max"
            )
    return Criterion(metric, mode, tuple(tasks))


def check_metric(train_config: Any, tasks: Sequence[str]) -> Criterion:
    """Check ``train.select_metric`` against the data's tasks and the chosen evaluators (before any work)."""
    crit = criterion(train_config, tasks)
    metric, evaluators = crit.metric, tuple(train_config.evaluators)
    if metric == MEAN_NE:
        if "candidate" not in evaluators:
            raise ConfigError("train.select_metric='mean_ne' needs the 'candidate' evaluator in train.evaluators")
        return crit
    head, _, leaf = metric.rpartition("/")
    if head in tasks:
        if "candidate" not in evaluators or leaf not in _CANDIDATE_METRICS:
            raise ConfigError(
                f"train.select_metric={metric!r}: the candidate evaluator reports {head}/<{'|'.join(_CANDIDATE_METRICS)}>"
                + ("" if "candidate" in evaluators else ", and train.evaluators does not include it")
            )
        return crit
    if head == "ranking":
        if "ranking" not in evaluators:
            raise ConfigError(f"train.select_metric={metric!r} needs 'ranking' in train.evaluators")
        return crit
    builtin = set(evaluators) <= {"candidate", "ranking"}
    if builtin or not head:
        raise ConfigError(
            f"train.select_metric={metric!r} is not a valid metric: use 'mean_ne' or '<task>/ne', '<task>/auc' "
            f"with a task of this data {list(tasks)}"
        )
    return crit  # a custom evaluator's key: checked at the first valid pass


def _state(ctx: LoopContext) -> dict[str, Any]:
    return ctx.hook_state.setdefault(ModelSelection.name, {"best": None, "curve": [], "since_best": 0})


def best_record(ctx: LoopContext) -> dict[str, Any] | None:
    """``{"step", "value", "metrics"}`` of the best valid pass so far, or None."""
    return _state(ctx)["best"]


class ModelSelection(EarlyStopping):
    """Records the valid curve and the best step; asks for the best step's checkpoint; early stopping."""

    name = "selection"

    def __init__(self, crit: Criterion, best_path: pathlib.Path):
        self.criterion, self.path = crit, best_path  # the workdir's best.json (gesr_jax.workdir.Workdir.best_path)

    def on_train_start(self, ctx: LoopContext) -> None:
        best = ctx.hook_state.get(self.name, {}).get("best")  # a resumed run's best keeps its checkpoint
        if best is not None:
            ctx.checkpoints.protect({best["step"]})

    def on_eval(self, ctx: LoopContext, step: int, split: str, metrics: dict[str, float]) -> None:
        if split != self.split or (ctx.finished and step != ctx.step):
            return  # the final pass at the best step (not the last one) is not a new point
        state = _state(ctx)
        if state["curve"] and state["curve"][-1]["step"] == step:
            return  # the final pass of a run that stopped right after a periodic pass: same params
        value = self.criterion.value(metrics)
        if value is None and self.criterion.metric != MEAN_NE and self.criterion.metric not in metrics:
            raise ConfigError(
                f"train.select_metric={self.criterion.metric!r} is not among the valid metrics {sorted(metrics)}"
            )
        state["curve"].append({"step": step, "value": value, "metrics": jsonable(dict(metrics))})
        best = state["best"]
        if self.criterion.better(value, None if best is None else best["value"]):
            state["best"], state["since_best"] = {"step": step, "value": value, "metrics": jsonable(dict(metrics))}, 0
            ctx.checkpoints.protect({step})
            if not ctx.finished:
                ctx.request_checkpoint()
            self.write(state["best"])
        else:
            state["since_best"] += 1
        super().on_eval(ctx, step, split, metrics)

    def should_stop(self, ctx: LoopContext, step: int, metrics: dict[str, float]) -> str | None:
        state, patience = _state(ctx), ctx.config.train.patience
        if patience > 0 and state["since_best"] >= patience and state["best"] is not None:
            best = state["best"]
            return (
                f"early stopping: valid {self.criterion.metric} did not improve for {patience} passes "
                f"(best {best['value']:.6g} at step {best['step']})"
            )
        return None

    def write(self, best: Mapping[str, Any]) -> None:
        if distributed.is_primary():
            record = {"step": best["step"], "metric": self.criterion.metric, "mode": self.criterion.mode,
                      "value": best["value"]}  # fmt: skip
            atomic_write_json(self.path, jsonable(record))


def finish(ctx: LoopContext, hook: ModelSelection, *, strict: bool = False) -> dict[str, Any]:
    """The final passes: valid at the last step (a curve point), then test at the best step only.

    Restores the best step's params (falling back, with a :class:`SelectionWarning`, to the newest
    intact step when the best one is corrupt, unless ``strict``) and returns the results dict.
    """
    last_valid = ctx.evaluate("valid")
    state = _state(ctx)
    best = state["best"]
    if best is None:  # the metric was never finite: report the last step
        warnings.warn(f"valid {hook.criterion.metric} was never finite; reporting the last step", SelectionWarning,
                      stacklevel=2)  # fmt: skip
        best = {"step": ctx.step, "value": None, "metrics": jsonable(last_valid)}
    best_step, params, valid = best["step"], ctx.params, best["metrics"]
    if best_step != ctx.step:
        ctx.checkpoints.wait()
        try:
            params = ctx.checkpoints.restore_params(best_step, ctx.params)
        except CheckpointError as err:
            if strict:
                raise
            warnings.warn(f"cannot restore the best step {best_step} ({err}); reporting the last step {ctx.step}",
                          SelectionWarning, stacklevel=2)  # fmt: skip
            best_step, valid = ctx.step, jsonable(last_valid)
            params = ctx.params
    if best_step == ctx.step:
        valid = last_valid
    test = ctx.evaluate("test", params=params, step=best_step)
    selected = {"metric": hook.criterion.metric, "mode": hook.criterion.mode,
                "value": hook.criterion.value(valid), "patience": ctx.config.train.patience}  # fmt: skip
    hook.write({"step": best_step, "value": selected["value"]})
    return {
        "step": best_step,
        "best_step": best_step,
        "last_step": ctx.step,
        "valid": valid,
        "test": test,
        "best_valid": valid,
        "selection": selected,
        "valid_curve": [{"step": p["step"], "metrics": p["metrics"]} for p in state["curve"]],
    }

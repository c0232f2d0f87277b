"""Metrics of a finished run that need its predictions, not just its results.json (issue 22 items 2, 3).

For a ``gesr train`` workdir restored at its best valid step (the step results.json tests):

* ``<task>/ne_recal`` (test): NE after an intercept fitted on valid (gesr_jax/calibration.py);
* ``test_users``: per task, each test user's candidates, positives and summed BCE (the user bootstrap's input);
* ``<task>/ne@<stratum>``, ``<task>/auc@<stratum>``, ``num_requests@<stratum>`` (test and valid): per user-tenure
  stratum (gesr_jax/strata.py), MovieLens only (the tenure needs the rating log).

They are written once to ``<run>/prediction_metrics.json`` (``{"valid": {...}, "test": {...}, "step": s}``) and
read back after; :func:`merged` adds them to a results.json record.
"""

from __future__ import annotations

import json
import pathlib
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

from gesr_jax import api, calibration, strata
from gesr_jax.data import batch as batch_lib
from gesr_jax.data import datasets

FILE = "prediction_metrics.json"


def predict_logits(run: Any, arrays: Mapping[str, np.ndarray], batch_size: int = 256) -> dict[str, np.ndarray]:
    """``{task: [R, C] logits}`` of a restored run (gesr_jax.cascade.Run) over one split, plus ``mask`` [R, C]."""
    apply = jax.jit(lambda p, b: api.apply(run.graphdef, p, b, validate=False))
    num = int(np.asarray(arrays["num_candidates"]).shape[0])
    out: dict[str, list[np.ndarray]] = {}
    for start in range(0, num, batch_size):
        batch = {k: np.asarray(v[start : start + batch_size]) for k, v in arrays.items()}
        request = {k: v for k, v in batch.items() if not k.startswith(("label_", "prob_"))}
        for task, logits in apply(run.params, request).items():
            out.setdefault(task, []).append(np.asarray(logits, np.float64))
    result = {task: np.concatenate(parts) for task, parts in out.items()}
    counts = np.asarray(arrays["num_candidates"])
    width = next(iter(result.values())).shape[1]
    result["mask"] = batch_lib.lengths_mask(counts, width)
    return result


def compute(run: Any, splits: Any, tasks: tuple[str, ...]) -> dict[str, dict[str, float]]:
    """The prediction metrics of one restored run on its splits (see the module docstring)."""
    preds = {name: predict_logits(run, getattr(splits, name)) for name in ("valid", "test")}
    first_time = None
    if run.config.data.source == "movielens":
        from gesr_jax.data import movielens_dataset

        inter = movielens_dataset.load_interactions_cached(run.config.data)
        first_time = strata.first_event_times(inter.user, inter.timestamp)
    out: dict[str, dict[str, Any]] = {"valid": {}, "test": {}, "test_users": {}}
    for task in tasks:
        labels = {name: np.asarray(getattr(splits, name)[f"label_{task}"], np.float64) for name in preds}
        valid = (labels["valid"], preds["valid"][task], preds["valid"]["mask"])
        test = (labels["test"], preds["test"][task], preds["test"]["mask"])
        out["test"][f"{task}/ne_recal"] = float(calibration.recalibrated_ne(valid, test))
        out["test_users"][task] = calibration.user_stats(*test, np.asarray(splits.test["user_id"]))
        if first_time is not None:
            for name in preds:
                groups = strata.request_strata(getattr(splits, name), first_time)
                out[name] |= strata.stratified_metrics(labels[name], preds[name][task], preds[name]["mask"], groups, task)
    return out


def load_or_compute(run_dir: str | pathlib.Path, step: int | None = None) -> dict[str, Any]:
    """``<run_dir>/prediction_metrics.json``, computed at ``step`` (default the best valid step) when absent or stale."""
    from gesr_jax import cascade

    path = pathlib.Path(run_dir) / FILE
    if path.exists():
        saved = json.loads(path.read_text())
        if step is None or saved.get("step") == step:
            return saved
    run = cascade.load_run(run_dir, step)
    splits = datasets.load_splits(run.config.data)
    saved = {"step": run.step, **compute(run, splits, tuple(run.schema.tasks))}
    path.write_text(json.dumps(saved, indent=1, allow_nan=True))
    return saved


def merged(record: dict[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    """A results.json record with the prediction metrics added to its ``valid`` / ``test`` sections."""
    out = dict(record)
    for split in ("valid", "test"):
        out[split] = {**record.get(split, {}), **extra.get(split, {})}
    if "test_users" in extra:
        out["test_users"] = extra["test_users"]
    return out

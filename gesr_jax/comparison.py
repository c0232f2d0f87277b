"""Train several variants of one experiment and tabulate them against a baseline.

Used by ``experiments/demo.py`` (two-tower vs GESR) and ``experiments/ablations.py``
(GESR with one MoA component removed at a time). Each variant is a config plus
``--set`` overrides; each (variant, seed) trains in its own workdir; the table reports
per-task test NE as mean ± std over seeds, the relative NE change against the first
(baseline) variant in percent — the GESR paper's unit, negative is better — test AUC
and the training loop's wall-clock time.
"""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from gesr_jax import config as config_lib


@dataclasses.dataclass(frozen=True)
class Variant:
    label: str  # row name in the table, e.g. "GESR without HMA"
    config: str  # preset name or .py path, e.g. "synthetic_base_two_tower"
    overrides: tuple[str, ...] = ()  # `--set` style overrides applied on top


@dataclasses.dataclass
class VariantResult:
    variant: Variant
    runs: list[dict[str, Any]]  # one train_and_evaluate() result per seed
    train_seconds: list[float]  # training-loop seconds per seed, from the trainer's metrics.jsonl

    def metric(self, split: str, key: str) -> np.ndarray:
        return np.array([run[split][key] for run in self.runs], dtype=np.float64)


def run_variants(
    variants: Sequence[Variant],
    workdir: str | pathlib.Path,
    *,
    seeds: Sequence[int] = (0,),
    extra_overrides: Sequence[str] = (),
    train_fn: Callable[..., dict[str, Any]] | None = None,
    log: Callable[[str], None] = print,
) -> list[VariantResult]:
    """Train every variant for every seed (``train.seed``) in ``workdir/<label>/seed<k>``; resume-safe."""
    if train_fn is None:
        from gesr_jax.train.trainer import train_and_evaluate as train_fn
    workdir = pathlib.Path(workdir)
    results = []
    for variant in variants:
        runs, seconds = [], []
        for seed in seeds:
            overrides = (*variant.overrides, *extra_overrides, f"train.seed={seed}")
            config = config_lib.load_config(variant.config, overrides)
            run_dir = workdir / _slug(variant.label) / f"seed{seed}"
            log(f"[{variant.label}] seed {seed}: training {config.name} in {run_dir}")
            start = time.perf_counter()
            runs.append(train_fn(config, run_dir))
            seconds.append(_loop_seconds(run_dir, default=time.perf_counter() - start))
        results.append(VariantResult(variant, runs, seconds))
    return results


def _loop_seconds(run_dir: pathlib.Path, default: float) -> float:
    """The trainer's own clock for the training loop (last train record of metrics.jsonl).

    It counts compilation, periodic eval and checkpoints but not data loading or the final eval,
    and it survives re-running a finished workdir (which only restores and re-evaluates).
    """
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return default
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    train = [r for r in records if r.get("split") == "train" and "wall_time" in r]
    return float(train[-1]["wall_time"]) if train else default


def _slug(label: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in label.lower()).strip("_")


def _mean_std(values: np.ndarray, digits: int) -> str:
    if values.size == 1:
        return f"{values[0]:.{digits}f}"
    return f"{values.mean():.{digits}f} ± {values.std(ddof=1):.{digits}f}"


def comparison_table(results: Sequence[VariantResult], tasks: Sequence[str], split: str = "test") -> str:
    """A markdown table; relative NE change is against ``results[0]`` (mean over seeds)."""
    header = ["model"]
    for task in tasks:
        header += [f"NE {task}", f"ΔNE {task} vs {results[0].variant.label} (%)", f"AUC {task}"]
    header.append("train time (s)")
    rows = [header, ["---"] * len(header)]
    base = {task: results[0].metric(split, f"{task}/ne").mean() for task in tasks}
    for res in results:
        row = [res.variant.label]
        for task in tasks:
            ne = res.metric(split, f"{task}/ne")
            rel = (ne - base[task]) / base[task] * 100.0
            row += [_mean_std(ne, 4), _mean_std(rel, 2), _mean_std(res.metric(split, f"{task}/auc"), 4)]
        row.append(_mean_std(np.array(res.train_seconds), 0))
        rows.append(row)
    oracle = [f"{t}/oracle_ne" for t in tasks]
    if all(k in results[0].runs[0][split] for k in oracle):
        row = ["oracle (true probabilities)"]
        for task in tasks:
            ne = results[0].metric(split, f"{task}/oracle_ne")
            rel = (ne.mean() - base[task]) / base[task] * 100.0
            row += [f"{ne.mean():.4f}", f"{rel:.2f}", "—"]
        row.append("—")
        rows.append(row)
    return "\n".join("| " + " | ".join(r) + " |" for r in rows)


def is_finite_table(results: Sequence[VariantResult], tasks: Sequence[str], split: str = "test") -> bool:
    return all(math.isfinite(v) for r in results for t in tasks for v in r.metric(split, f"{t}/ne"))

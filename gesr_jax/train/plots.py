"""Training curves from ``metrics.jsonl``: ``plots/loss.png`` and ``plots/ne.png``, and several runs overlaid.

Every evaluation is drawn as a marker (a run with one valid pass still shows its point, labelled with
its value), and the y-range is fitted to the data with a margin instead of stretched to NE = 1, so
differences of a few thousandths stay visible. Uses matplotlib's object API with the Agg canvas
directly, so importing this never changes the process-wide backend (notebooks keep theirs).
"""

from __future__ import annotations

import json
import math
import pathlib
from collections.abc import Mapping, Sequence
from typing import Any

from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure


def read_metrics(path: str | pathlib.Path) -> list[dict[str, Any]]:
    """Every record of a ``metrics.jsonl`` file; a malformed line is an error naming its number."""
    records = []
    path = pathlib.Path(path)
    if not path.exists():
        return records
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}:{number}: not a JSON line ({err.msg})") from None
    return records


def series(records: Sequence[Mapping[str, Any]], split: str, key: str) -> tuple[list[int], list[float]]:
    """``(steps, values)`` of ``key`` in the ``split`` records, in file order, skipping missing / null / NaN."""
    points = [
        (int(r["step"]), float(r[key]))
        for r in records
        if r.get("split") == split and isinstance(r.get(key), (int, float)) and math.isfinite(r[key])
    ]
    return [p[0] for p in points], [p[1] for p in points]


def tasks_in(records: Sequence[Mapping[str, Any]]) -> list[str]:
    """Task names of the ``<task>/ne`` keys of the evaluation records, in first-seen order."""
    seen: dict[str, None] = {}
    for r in records:
        if r.get("split") in ("valid", "test"):
            for key in r:
                if key.endswith("/ne") and key.count("/") == 1:
                    seen.setdefault(key.split("/")[0])
    return list(seen)


def fit_ylim(ax: Axes, values: Sequence[float], *, margin: float = 0.12, min_span: float = 0.02) -> None:
    """Limit ``ax``'s y-range to ``values`` plus a margin; a single value (or a flat curve) gets ``min_span``."""
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return
    low, high = min(finite), max(finite)
    span = max(high - low, min_span * max(abs(high), 1e-3))
    pad = margin * span
    centre = (low + high) / 2
    ax.set_ylim(min(low, centre - span / 2) - pad, max(high, centre + span / 2) + pad)


def _label_last(ax: Axes, steps: Sequence[int], values: Sequence[float], color: str) -> None:
    if steps:
        ax.annotate(f"{values[-1]:.4f}", (steps[-1], values[-1]), textcoords="offset points", xytext=(4, 4),
                    fontsize="x-small", color=color)  # fmt: skip


def _finish(fig: Figure, ax: Axes, path: pathlib.Path, xlabel: str, ylabel: str, title: str) -> pathlib.Path:
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if ax.has_data():
        ax.set_xlim(left=0)  # a run with one evaluation still shows where in training it sits
        ax.legend(fontsize="small")
    FigureCanvasAgg(fig).print_png(str(path))
    return path


def draw_loss(ax: Axes, records: Sequence[Mapping[str, Any]]) -> list[float]:
    """Train loss (line, small markers), valid loss (markers and line) and test loss (square); returns the values."""
    drawn: list[float] = []
    for split, style, size in (("train", ".-", 3), ("valid", "o-", 6), ("test", "s", 8)):
        steps, values = series(records, split, "loss")
        if steps:
            ax.plot(steps, values, style, markersize=size, label=split)
            drawn += values
    return drawn


def draw_ne(ax: Axes, records: Sequence[Mapping[str, Any]], tasks: Sequence[str]) -> list[float]:
    """Per task: valid NE (markers), test NE (square) and the oracle NE (dashed); returns the values."""
    drawn: list[float] = []
    for i, task in enumerate(tasks):
        color = f"C{i}"
        steps, values = series(records, "valid", f"{task}/ne")
        if steps:
            ax.plot(steps, values, "o-", color=color, label=f"{task} valid")
            _label_last(ax, steps, values, color)
            drawn += values
        steps, values = series(records, "test", f"{task}/ne")
        if steps:
            ax.plot(steps, values, "s", color=color, markersize=8, markerfacecolor="none", label=f"{task} test")
            drawn += values
        steps, values = series(records, "valid", f"{task}/oracle_ne")
        if steps:
            ax.axhline(values[-1], color=color, ls="--", lw=1, alpha=0.6, label=f"{task} oracle")
            drawn.append(values[-1])
    return drawn


def write_plots(
    metrics_path: str | pathlib.Path, out_dir: str | pathlib.Path, tasks: Sequence[str] | None = None
) -> list[pathlib.Path]:
    """Draw the loss curve (train, valid, test) and per-task NE (valid, test, oracle) as PNGs."""
    records = read_metrics(metrics_path)
    tasks = tasks_in(records) if tasks is None else tasks
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    fig = Figure(figsize=(6.4, 4), tight_layout=True)
    ax = fig.add_subplot()
    fit_ylim(ax, draw_loss(ax, records))
    loss_path = _finish(fig, ax, out / "loss.png", "step", "weighted BCE (nats)", "loss")

    fig = Figure(figsize=(6.4, 4), tight_layout=True)
    ax = fig.add_subplot()
    fit_ylim(ax, draw_ne(ax, records, tasks))
    ne_path = _finish(fig, ax, out / "ne.png", "step", "NE (lower is better)", "normalized entropy")
    return [loss_path, ne_path]


def compare_runs(
    runs: Mapping[str, Sequence[Mapping[str, Any]]], out_path: str | pathlib.Path, *, split: str = "valid",
    metric: str = "ne",
) -> pathlib.Path:
    """One panel per task: ``<task>/<metric>`` of ``split`` for every run (label -> records), overlaid."""
    tasks: list[str] = []
    for records in runs.values():
        tasks += [t for t in tasks_in(records) if t not in tasks]
    if not tasks:
        raise ValueError(f"none of the runs has a {split} '<task>/{metric}' record")
    fig = Figure(figsize=(5.2 * len(tasks), 4), tight_layout=True)
    for i, task in enumerate(tasks):
        ax = fig.add_subplot(1, len(tasks), i + 1)
        drawn: list[float] = []
        for j, (label, records) in enumerate(runs.items()):
            color = f"C{j}"
            steps, values = series(records, split, f"{task}/{metric}")
            if steps:
                ax.plot(steps, values, "o-", color=color, label=label)
                _label_last(ax, steps, values, color)
                drawn += values
            t_steps, t_values = series(records, "test", f"{task}/{metric}")
            if t_steps:
                ax.plot(t_steps, t_values, "s", color=color, markersize=8, markerfacecolor="none")
                drawn += t_values
        fit_ylim(ax, drawn)
        ax.set_xlabel("step")
        ax.set_ylabel(f"{split} {metric}" + (" (lower is better)" if metric == "ne" else ""))
        ax.set_title(f"{task}  (squares: test at the best step)")
        ax.grid(alpha=0.3)
        if ax.has_data():
            ax.set_xlim(left=0)
            ax.legend(fontsize="small")
    out_path = pathlib.Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig).print_png(str(out_path))
    return out_path

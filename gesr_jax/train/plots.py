"""Training curves from ``metrics.jsonl``: ``plots/loss.png`` and ``plots/ne.png``.

Uses matplotlib's object API with the Agg canvas directly, so importing this never changes the
process-wide backend (notebooks keep theirs).
"""

from __future__ import annotations

import json
import pathlib
from collections.abc import Sequence
from typing import Any

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


def _series(records: Sequence[dict[str, Any]], split: str, key: str) -> tuple[list[int], list[float]]:
    points = [(r["step"], r[key]) for r in records if r.get("split") == split and r.get(key) is not None]
    return [p[0] for p in points], [p[1] for p in points]


def write_plots(
    metrics_path: str | pathlib.Path, out_dir: str | pathlib.Path, tasks: Sequence[str]
) -> list[pathlib.Path]:
    """Draw the loss curve (train, valid, test) and per-task NE (valid, test, oracle) as PNGs."""
    records = read_metrics(metrics_path)
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    fig = Figure(figsize=(6, 4), tight_layout=True)
    ax = fig.add_subplot()
    for split, style in (("train", "-"), ("valid", "o-"), ("test", "s")):
        steps, values = _series(records, split, "loss")
        if steps:
            ax.plot(steps, values, style, label=split)
    ax.set_xlabel("step")
    ax.set_ylabel("weighted BCE (nats)")
    ax.set_title("loss")
    ax.grid(alpha=0.3)
    if ax.has_data():
        ax.legend()
    loss_path = out / "loss.png"
    FigureCanvasAgg(fig).print_png(str(loss_path))

    fig = Figure(figsize=(6, 4), tight_layout=True)
    ax = fig.add_subplot()
    for i, task in enumerate(tasks):
        color = f"C{i}"
        for split, style in (("valid", "o-"), ("test", "s")):
            steps, values = _series(records, split, f"{task}/ne")
            if steps:
                ax.plot(steps, values, style, color=color, label=f"{task} {split}")
        steps, values = _series(records, "valid", f"{task}/oracle_ne")
        if steps:
            ax.plot(steps, values, "--", color=color, alpha=0.6, label=f"{task} oracle")
    ax.axhline(1.0, color="gray", lw=0.8, ls=":")
    ax.set_xlabel("step")
    ax.set_ylabel("NE (lower is better)")
    ax.set_title("normalized entropy")
    ax.grid(alpha=0.3)
    if ax.has_data():
        ax.legend(fontsize="small")
    ne_path = out / "ne.png"
    FigureCanvasAgg(fig).print_png(str(ne_path))
    return [loss_path, ne_path]

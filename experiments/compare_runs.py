"""Overlay the valid curves of several `gesr train` workdirs in one figure (one panel per task).

Launch:   python experiments/compare_runs.py runs/gesr runs/two_tower [--label GESR --label two-tower]
              [--metric ne | auc | gauc | logloss] [--split valid] --out compare.png
Expected: a PNG with one panel per task (NE by default): each run's valid curve with a marker per
          evaluation and its last value written next to it, test at the best step as an open square;
          plus one line per run on stdout with its best valid and its test value.
"""

from __future__ import annotations

import argparse
import pathlib
import sys

from gesr_jax.train import plots


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("workdirs", nargs="+", help="folders written by `gesr train` (each has metrics.jsonl)")
    parser.add_argument("--out", required=True, help="the PNG to write")
    parser.add_argument("--label", action="append", default=[], help="legend name per workdir, in order (default: folder)")
    parser.add_argument("--metric", default="ne", help="per-task metric: ne (default), auc, gauc, logloss")
    parser.add_argument("--split", default="valid", help="split of the curves (default: valid)")
    args = parser.parse_args(argv)
    if args.label and len(args.label) != len(args.workdirs):
        parser.error(f"--label was given {len(args.label)} times for {len(args.workdirs)} workdirs")
    runs = {}
    for i, workdir in enumerate(map(pathlib.Path, args.workdirs)):
        path = workdir / "metrics.jsonl"
        if not path.is_file():
            print(f"error: {workdir} has no metrics.jsonl; is it a `gesr train` workdir?", file=sys.stderr)
            return 2
        label = args.label[i] if args.label else workdir.name
        if label in runs:
            label = f"{label} ({i})"
        runs[label] = plots.read_metrics(path)
    try:
        out = plots.compare_runs(runs, args.out, split=args.split, metric=args.metric)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for label, records in runs.items():
        for task in plots.tasks_in(records):
            _, valid = plots.series(records, args.split, f"{task}/{args.metric}")
            _, test = plots.series(records, "test", f"{task}/{args.metric}")
            best = (min if args.metric in ("ne", "logloss") else max)(valid) if valid else float("nan")
            print(f"{label:24s} {task:10s} best {args.split} {best:.4f}  test {test[-1] if test else float('nan'):.4f}")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""`make demo`: train the two-tower baseline and GESR on the embedded synthetic data, compare NE.

Launch:   python experiments/demo.py [--config synthetic_base] [--workdir DIR] [--set key=value ...] [--out FILE.md]
          python experiments/demo.py --seeds 5 --workdir ~/.cache/gesr_jax/runs/synthetic --out experiments/results/demo_synthetic.md
          (the second reads back experiments/ablations.py's two-tower and "GESR (all on)" runs when they exist)
Expected: a table with test NE, relative NE change vs the two-tower and AUC per task for both
models, plus two references: the oracle NE of the generator's true probabilities (the floor no model
can beat) and the decoupled ceiling (the best a model whose user and item sides meet only in a dot
product reaches with the planted parts it can represent), then the share of the two-tower-to-oracle
gap GESR closes. The synthetic log plants capped counts, a last-engaged match and recency-weighted
target matches that no f(user, history) . g(item) expresses (gesr_jax/data/synthetic.py), so GESR can
go below the ceiling and the two-tower cannot.
"""

from __future__ import annotations

import argparse
import datetime
import math
import pathlib
import platform
import sys
import tempfile
import time

import jax

from gesr_jax import comparison, config as config_lib
from gesr_jax.train import runtime


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="synthetic_base", help="preset of the GESR run; the baseline is NAME_two_tower")
    parser.add_argument("--workdir", default=None, help="where both runs write (default: a fresh temp folder)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="key=value, applied to both runs")
    parser.add_argument("--seeds", type=int, default=1, help="paired seeds per model (the demo's default: 1)")
    parser.add_argument("--out", default=None, help="also write the table and the gap lines to this markdown file")
    args = parser.parse_args(argv)
    runtime.enable_compilation_cache()  # seeds of one row compile the same programs: compile them once
    workdir = pathlib.Path(args.workdir or tempfile.mkdtemp(prefix="gesr_demo_"))
    variants = [
        comparison.Variant("two-tower", f"{args.config}{config_lib.TWO_TOWER_SUFFIX}"),
        comparison.Variant("GESR (all on)", args.config),  # the ablation table's row name, so the runs are shared
    ]
    start = time.perf_counter()
    try:
        results = comparison.run_variants(
            variants, workdir, seeds=tuple(range(args.seeds)), extra_overrides=args.overrides,
            prediction_metrics=True,  # the recalibrated NE the verdict column needs
        )
        config = config_lib.load_config(args.config, args.overrides)
    except config_lib.ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    tasks = tuple(k.split("/")[0] for k in results[0].runs[0]["test"] if k.endswith("/ne"))
    train = config.train
    lines = [
        f"Data: {comparison.data_description(config)}.",
        "",
        f"Test split of {args.config} ({int(results[0].runs[0]['test']['num_examples'])} candidates), {args.seeds} "
        f"paired seed(s), up to {train.num_steps} steps, valid every {train.eval_every}, test at the best valid "
        f"{train.select_metric} step; workdir {workdir}",
        "",
        comparison.comparison_table(results, tasks, references=comparison.dataset_references(config)),
        "",
    ]
    if all(f"{t}/oracle_ne" in results[0].runs[0]["test"] for t in tasks):
        for task in tasks:
            share, half = comparison.gap_closed(results[0], results[1], task)
            ci = f" ± {100 * half:.0f}" if math.isfinite(half) else ""
            lines.append(f"GESR closes {100 * share:.0f}%{ci} of the two-tower-to-oracle gap on {task}")
    print()
    print("\n".join(lines))
    print(f"\ntotal wall time {time.perf_counter() - start:.0f} s")
    if args.out:
        command = "python experiments/demo.py " + " ".join(argv if argv is not None else sys.argv[1:])
        header = [f"# Demo: two-tower vs GESR on {args.config}", "", f"Command: `{command.strip()}`; jax "
                  f"{jax.__version__}, backend {jax.default_backend()}, {platform.processor() or platform.machine()}, "
                  f"{datetime.date.today().isoformat()}. ΔNE paired per seed (train.seed and data.seed), mean ± 95% "
                  "t half-width; the reference rows were not trained.", ""]  # fmt: skip
        pathlib.Path(args.out).write_text("\n".join(header + lines) + "\n")
        print(f"wrote {args.out} and {comparison.write_sidecar(pathlib.Path(args.out).with_suffix('.json'), results)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

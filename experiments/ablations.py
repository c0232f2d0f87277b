"""MoA ablations: two-tower vs GESR vs GESR with one component removed, paired over 5 seeds.

Launch (writes experiments/results/ablation_<dataset>.md; the README links both tables):
    python experiments/ablations.py --dataset synthetic            # synthetic_base, 30 runs, 30 min on a shared 2-core CPU
    python experiments/ablations.py --dataset ml1m                 # ml1m_base (<= 1600 steps), 30 runs, 75 min
    python experiments/ablations.py --dataset ml1m --set data.movielens.path=/path/to/ml-1m --seeds 3

Rows: two-tower; GESR (all on); without HMA; without target-awareness (the last history position's
HSTU output for every candidate, the paper's U_self[-1] ablation); without cross attention (RO and
NRO); without MLPG (its inputs join the main interaction MLP instead). Seed s sets train.seed = s
(init, data order) and data.seed = s (MovieLens negatives; the synthetic log stays fixed), and every
row shares each seed with the two-tower. Columns: test NE and AUC per task (mean ± 95% CI over
seeds), the paired relative NE change vs the two-tower and vs GESR (all on) in % (per seed, then mean ±
95% Student-t CI; "n.s." when the CI holds 0; the paper's unit, negative = better: a component helps when
removing it gives a positive change vs GESR (all on)), the best-valid step per seed when
the trainer reports one, and the training loop's wall-clock seconds per run. Synthetic tables add
the oracle and the generator's decoupled ceiling as reference rows.
Expected: every GESR row below the two-tower in NE on the synthetic data (it plants cross and
target-aware signals); the measured tables are in experiments/results/.
"""

from __future__ import annotations

import argparse
import datetime
import pathlib
import platform
import sys
import time
from collections.abc import Callable

import jax

from gesr_jax import comparison, config as config_lib, strata
from gesr_jax.train import runtime

RESULTS = pathlib.Path(__file__).resolve().parent / "results"

# Per dataset: the GESR preset and the overrides every row gets (none: the presets' own model selection).
DATASETS = {
    "synthetic": ("synthetic_base", ()),
    "ml1m": ("ml1m_base", ()),
}
# Runs live in RUNS_ROOT/<dataset>/<row>/seed<k>; experiments/model_comparison.py reuses the same root, so the
# two-tower and GESR rows are trained once for both tables (a finished run of the same config is read back).
RUNS_ROOT = comparison.default_runs_root()

ABLATIONS = [
    ("GESR (all on)", ()),
    ("GESR without HMA", ("model.hma.enabled=false",)),
    ("GESR without target-awareness", ("model.hstu.target_aware=false",)),
    ("GESR without cross attention", ("model.cross.ro=false", "model.cross.nro=false")),
    ("GESR without MLPG", ("model.mlpg.enabled=false",)),
]


def variants(preset: str, overrides: tuple[str, ...]) -> list[comparison.Variant]:
    rows = [comparison.Variant("two-tower", preset + config_lib.TWO_TOWER_SUFFIX, overrides)]
    rows += [comparison.Variant(label, preset, (*overrides, *extra)) for label, extra in ABLATIONS]
    return rows


def parse_args(description: str, table_name: str, argv: list[str] | None) -> argparse.Namespace:
    """The command line every paired-seed table script shares (this one, model_comparison.py)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--dataset", choices=sorted(DATASETS), required=True)
    parser.add_argument(
        "--seeds", type=int, default=len(comparison.DEFAULT_SEEDS), help="seeds 0 .. seeds-1 (train.seed and data.seed)"
    )
    parser.add_argument("--steps", type=int, default=None, help="train.num_steps for every run (default: the preset's)")
    parser.add_argument("--workdir", default=None, help="default: <runs root>/<dataset> (comparison.default_runs_root)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="key=value for every run")
    parser.add_argument("--out", default=None, help=f"default: experiments/results/{table_name}_<dataset>.md (+ .json)")
    parser.add_argument("--rows", action="append", default=[], metavar="LABEL",
                        help="only this row (its label; repeatable); default every row. The reference row is always kept")
    parser.add_argument("--no-predictions", action="store_true",
                        help="skip the recalibrated NE and tenure strata (they restore each run and predict valid/test)")
    return parser.parse_args(argv)


def select_rows(rows: list[comparison.Variant], labels: list[str]) -> list[comparison.Variant]:
    """``rows`` whose label is in ``labels`` plus the first (reference) row; all of them when ``labels`` is empty."""
    known = [v.label for v in rows]
    unknown = [label for label in labels if label not in known]
    if unknown:
        raise SystemExit(f"error: --rows {unknown[0]!r} is not a row of this table; rows: {known}")
    return [v for i, v in enumerate(rows) if not labels or i == 0 or v.label in labels]


def run_and_report(
    args: argparse.Namespace, script: str, title: str, table_name: str,
    make_variants: Callable[[str, tuple[str, ...]], list[comparison.Variant]], also_vs: str | None = None,
) -> int:  # fmt: skip
    """Train ``make_variants(preset, overrides)`` over the paired seeds and write the markdown table."""
    runtime.enable_compilation_cache()  # every seed of a row compiles the same programs: compile them once
    preset, preset_overrides = DATASETS[args.dataset]
    overrides = (*preset_overrides, *args.overrides, *((f"train.num_steps={args.steps}",) if args.steps else ()))
    workdir = pathlib.Path(args.workdir) if args.workdir else RUNS_ROOT / args.dataset
    start = time.perf_counter()
    rows = select_rows(make_variants(preset, overrides), args.rows)
    also_vs = also_vs if any(v.label == also_vs for v in rows) else None
    results = comparison.run_variants(rows, workdir, seeds=range(args.seeds), prediction_metrics=not args.no_predictions)
    tasks = tuple(k.split("/")[0] for k in results[0].runs[0]["test"] if k.endswith("/ne"))
    config = config_lib.load_config(preset, overrides)
    references = comparison.dataset_references(config)
    table = comparison.comparison_table(results, tasks, references=references, also_vs=also_vs)
    train = config.train
    lines = [
        f"# {title} on {args.dataset} ({preset})",
        "",
        f"Data: {comparison.data_description(config)}.",
        "",
        f"Generated by `python experiments/{script} --dataset {args.dataset} --seeds {args.seeds}"
        + (f" --steps {args.steps}" if args.steps else "")
        + "".join(f" --set {o}" for o in args.overrides)
        + "".join(f" --rows '{r}'" for r in args.rows)
        + f"` on {datetime.date.today().isoformat()}; jax {jax.__version__}, backend {jax.default_backend()}, "
        f"{platform.processor() or platform.machine()} with {len(jax.devices())} device(s); total "
        f"{(time.perf_counter() - start) / 60:.1f} min to write the table (runs finished earlier, e.g. for another table, are "
        "read back; the train time column is each run's own).",
        "",
        f"Test split: {int(results[0].runs[0]['test']['num_examples'])} candidates (seed 0). Seeds "
        f"{list(range(args.seeds))}, each setting train.seed and data.seed, shared by every row (paired ΔNE: "
        "mean ± 95% Student-t CI over seeds; n.s. = the CI holds 0). "
        f"Overrides on the preset: {list(overrides) or 'none'}. "
        f"Up to {train.num_steps} steps, batch {train.batch_size}, history {config.data.history_len}; valid every "
        f"{train.eval_every} steps, the best valid {train.select_metric} checkpoint is tested"
        + (f", early stop after {train.patience} passes without improvement." if train.patience else "."),
        "",
        table,
        "",
    ]
    by_tenure = strata.strata_table(results, tasks)
    if by_tenure is not None:
        lines += ["## Test NE by user tenure (days from the user's first rating to the request; gesr_jax/strata.py)",
                  "", by_tenure, ""]  # fmt: skip
    comparison.write_report(args.out or RESULTS / f"{table_name}_{args.dataset}.md", lines, results=results)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(__doc__.splitlines()[0], "ablation", argv)
    return run_and_report(args, "ablations.py", "MoA ablation", "ablation", variants, also_vs="GESR (all on)")


if __name__ == "__main__":
    sys.exit(main())

"""History-length study on MovieLens-1M: GESR and the two-tower at N in {25, 50, 100, 200}, paired seeds.

Launch (writes experiments/results/history_length_ml1m.md):
    python experiments/history_length.py                        # 40 runs (10 shared with ablations.py)
    python experiments/history_length.py --lengths 25,50 --seeds 3 --set data.movielens.path=/path/to/ml-1m

The GESR paper's Table 4 reports that a longer user history helps GESR. Each length N sets
data.history_len = N on ml1m_base (and its two-tower); everything else, the requests and their
candidates included (min_history stays 5), is the same, so seed s pairs runs across lengths too. The
N = 50 rows are ml1m_base itself: they reuse experiments/ablations.py's runs in <runs root>/ml1m
(comparison.default_runs_root).
Two tables: (1) every run's test NE at its best valid step with the paired ΔNE vs GESR at the shortest
N (does longer help GESR?), (2) per N, GESR's paired ΔNE vs the two-tower of the same N.
Expected: experiments/results/history_length_ml1m.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import pathlib
import platform
import sys
import time

import ablations
import jax

from gesr_jax import comparison, config as config_lib, statistics, strata
from gesr_jax.train import runtime

PRESET = "ml1m_base"
DEFAULT_N = 50  # ml1m_base's history_len: these rows are the ablation table's


def label(model: str, n: int) -> str:
    if n == DEFAULT_N:  # the same run folders as ablations.py's rows
        return {"GESR": "GESR (all on)", "two-tower": "two-tower"}[model]
    return f"{model} N={n}"


def variants(lengths: list[int], overrides: tuple[str, ...]) -> dict[tuple[str, int], comparison.Variant]:
    rows = {}
    for model, preset in (("two-tower", PRESET + config_lib.TWO_TOWER_SUFFIX), ("GESR", PRESET)):
        for n in lengths:
            extra = () if n == DEFAULT_N else (f"data.history_len={n}",)
            rows[model, n] = comparison.Variant(label(model, n), preset, (*overrides, *extra))
    return rows


def vs_two_tower(results: dict[tuple[str, int], comparison.VariantResult], lengths: list[int], tasks) -> str:
    header = ["N"] + [f"ΔNE {t} GESR vs two-tower (%, paired)" for t in tasks] + ["best valid step GESR"]
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for n in lengths:
        base, gesr = results["two-tower", n], results["GESR", n]
        cells = [str(n)]
        for task in tasks:
            cells.append(statistics.format_delta(*statistics.mean_ci(comparison.paired_delta(base, gesr, f"{task}/ne"))))
        cells.append(", ".join(str(s) for s in gesr.best_steps()))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default="25,50,100,200", help="comma-separated history lengths N")
    parser.add_argument("--seeds", type=int, default=len(comparison.DEFAULT_SEEDS), help="seeds 0 .. seeds-1")
    parser.add_argument("--workdir", default=None, help="default: <runs root>/ml1m (shared with ablations.py; see comparison.default_runs_root)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="key=value for every run")
    parser.add_argument("--out", default=None, help="default: experiments/results/history_length_ml1m.md")
    args = parser.parse_args(argv)
    runtime.enable_compilation_cache()  # seeds of one row compile the same programs: compile them once
    try:
        lengths = sorted({int(n) for n in args.lengths.split(",")})
    except ValueError:
        parser.error(f"--lengths must be comma-separated integers, got {args.lengths!r}")
    if any(n < 1 for n in lengths):
        parser.error(f"--lengths must be >= 1, got {lengths}")
    overrides = tuple(args.overrides)
    workdir = pathlib.Path(args.workdir) if args.workdir else ablations.RUNS_ROOT / "ml1m"
    start = time.perf_counter()
    rows = variants(lengths, overrides)
    # Every two-tower first (cheap), then GESR from the shortest history up.
    order = sorted(rows, key=lambda key: (key[0] == "GESR", key[1]))
    trained = comparison.run_variants(
        [rows[key] for key in order], workdir, seeds=range(args.seeds), prediction_metrics=True
    )
    results = dict(zip(order, trained))
    for (model, n), result in results.items():  # the shared N = 50 rows carry the ablation labels; say N here
        if n == DEFAULT_N:
            result.variant = dataclasses.replace(result.variant, label=f"{model} N={n} (ml1m_base)")
    tasks = tuple(k.split("/")[0] for k in trained[0].runs[0]["test"] if k.endswith("/ne"))
    by_length = [results["GESR", n] for n in lengths] + [results["two-tower", n] for n in lengths]
    config = config_lib.load_config(PRESET, overrides)
    train = config.train
    lines = [
        "# History length on ml1m (ml1m_base, GESR and two-tower)",
        "",
        f"Data: {comparison.data_description(config)}.",
        "",
        f"Generated by `python experiments/history_length.py --lengths {','.join(map(str, lengths))} --seeds "
        f"{args.seeds}" + "".join(f" --set {o}" for o in args.overrides) + f"` on {datetime.date.today().isoformat()}; "
        f"jax {jax.__version__}, backend {jax.default_backend()}, {platform.processor() or platform.machine()}; "
        f"total {(time.perf_counter() - start) / 60:.1f} min (runs trained earlier are only re-evaluated).",
        "",
        f"Seeds {list(range(args.seeds))} (train.seed and data.seed), shared by every row. Up to {train.num_steps} "
        f"steps, valid every {train.eval_every}, best valid {train.select_metric} tested"
        + (f", early stop after {train.patience} passes" if train.patience else "") + ". ΔNE: per seed, mean ± "
        "95% t CI; n.s. = the CI holds 0.",
        "",
        f"## Test NE by history length (ΔNE vs GESR at N={lengths[0]})",
        "",
        comparison.comparison_table(by_length, tasks),
        "",
        "## GESR vs the two-tower at each length",
        "",
        vs_two_tower(results, lengths, tasks),
        "",
    ]
    by_tenure = strata.strata_table(by_length, tasks)
    if by_tenure is not None:
        lines += ["## Test NE by user tenure (days from the user's first rating to the request; gesr_jax/strata.py)",
                  "", by_tenure, ""]  # fmt: skip
    comparison.write_report(args.out or ablations.RESULTS / "history_length_ml1m.md", lines, results=by_length)
    return 0


if __name__ == "__main__":
    sys.exit(main())

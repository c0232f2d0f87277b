"""Cascade ranking quality: two-tower retrieval of the top K, then a re-ranker, paired over seeds.

Launch (after experiments/ablations.py has trained the two-tower and GESR rows of a dataset):
    python experiments/cascade.py --dataset ml1m          # reads <runs root>/ml1m/{two_tower,gesr__all_on}/seed*
    python experiments/cascade.py --dataset synthetic --k 200 --seeds 5
    python experiments/cascade.py --dataset ml1m --catalogue clean   # -> cascade_ml1m_clean.md (issue 22 item 6)

For each seed s, the two-tower run of seed s retrieves its top K of the whole catalogue (item cache,
dot product) for every positive of every test request (gesr_jax/cascade.py: the padding item and the
request's other positives are left out), and three orderings of that list are scored on the positive:
the retriever's own dot product (= retrieval alone), the two-tower's calibrated task head, and GESR's
(seed s). A positive outside the top K counts as a miss. Both runs are restored at their best valid step.
Columns: HR@10, NDCG@10, MRR (mean ± 95% t CI over seeds), and the paired difference to retrieval alone
in points per seed (mean ± CI; "n.s." when the CI holds 0). Writes experiments/results/cascade_<dataset>.md.
Expected: the re-rankers change HR@10 only within the retrieved share (recall@K, the same for every row).
"""

from __future__ import annotations

import argparse
import datetime
import json
import pathlib
import platform
import sys
import time

import ablations
import jax
import numpy as np

from gesr_jax import cascade, catalogue as catalogue_lib, comparison, config as config_lib, statistics
from gesr_jax.data import datasets

RESULTS, RUNS_ROOT = ablations.RESULTS, ablations.RUNS_ROOT  # the table folder and ablations.py's run folders
RETRIEVER = "two_tower"
RERANKERS = [("two-tower → two-tower task head", "two_tower"), ("two-tower → GESR", "gesr__all_on")]
METRICS = ("hr@10", "ndcg@10", "mrr")


def seed_metrics(
    root: pathlib.Path, seed: int, k: int, batch_size: int, catalogue_name: str = "all"
) -> dict[str, dict[str, float]]:
    """Row label -> metrics for one seed; ``catalogue_name`` "all" (original) or "clean" (gesr_jax/catalogue.py)."""
    retriever = cascade.load_run(root / RETRIEVER / f"seed{seed}")
    splits = datasets.load_splits(retriever.config.data)
    table = datasets.item_table(retriever.config.data)
    catalogue_lib.check_catalogue(catalogue_name)
    clean = catalogue_lib.from_data_config(retriever.config.data) if catalogue_name == "clean" else None
    rows: dict[str, dict[str, float]] = {}
    for label, folder in RERANKERS:
        ranker = retriever if folder == RETRIEVER else cascade.load_run(root / folder / f"seed{seed}")
        ranks = cascade.cascade_ranks(
            retriever, ranker, splits.test, k=k, batch_size=batch_size, item_table=table, catalogue=clean
        )
        got = cascade.cascade_metrics(ranks, ks=(10,))
        if not rows:  # the retriever's whole-catalogue ranks, and its own list order = retrieval alone
            rows["two-tower retrieval alone"] = {m: got[f"retrieval/{m}"] for m in METRICS}
            rows["two-tower retrieval alone"] |= {f"recall@{k}": got["retrieved_share"], "steps": retriever.step}
        rows[label] = {m: got[f"cascade/{m}"] for m in METRICS} | {"steps": ranker.step}
        rows[label]["targets"] = got["num_targets"]
    return rows


def table(per_seed: list[dict[str, dict[str, float]]], k: int) -> str:
    labels = list(per_seed[0])
    base = labels[0]
    header = ["pipeline"] + [m.upper() for m in METRICS] + [f"Δ{m.upper()} vs retrieval (points, paired)" for m in METRICS]
    header += ["best valid step per seed"]
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for label in labels:
        cells = [label]
        for m in METRICS:
            mean, half = statistics.mean_ci(np.array([s[label][m] for s in per_seed]))
            cells.append(f"{100 * mean:.2f} ± {100 * half:.2f}")
        for m in METRICS:
            if label == base:
                cells.append("0 (baseline)")
                continue
            diff = np.array([100 * (s[label][m] - s[base][m]) for s in per_seed])
            cells.append(statistics.format_delta(*statistics.mean_ci(diff)))
        cells.append(", ".join(str(int(s[label]["steps"])) for s in per_seed))
        lines.append("| " + " | ".join(cells) + " |")
    recall = statistics.mean_ci(np.array([s[base][f"recall@{k}"] for s in per_seed]))
    lines += ["", f"Retrieved share (recall@{k} of the two-tower, the ceiling of every cascade row's HR): "
              f"{100 * recall[0]:.2f} ± {100 * recall[1]:.2f} %."]  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", required=True, help="a folder under --runs, e.g. ml1m or synthetic")
    parser.add_argument("--runs", default=str(RUNS_ROOT), help="root of experiments/ablations.py's runs")
    parser.add_argument("--seeds", type=int, default=5, help="seeds 0 .. seeds-1 (each needs both runs)")
    parser.add_argument("--k", type=int, default=200, help="items the two-tower retrieves per positive")
    parser.add_argument("--batch-size", type=int, default=64, help="requests per re-rank call")
    parser.add_argument("--out", default=None, help="default: experiments/results/cascade_<dataset>[_clean].md")
    parser.add_argument("--catalogue", choices=catalogue_lib.CATALOGUES, default="all",
                        help="all: every id but the padding and the other positives (the original tables); clean: also "
                        "the user's already-rated items, non-items and items unrated before the request")
    args = parser.parse_args(argv)
    root = pathlib.Path(args.runs) / args.dataset
    start = time.perf_counter()
    per_seed = []
    for seed in range(args.seeds):
        print(f"seed {seed}: cascade over {root}", flush=True)
        try:
            per_seed.append(seed_metrics(root, seed, args.k, args.batch_size, args.catalogue))
        except (cascade.CascadeError, FileNotFoundError, ValueError) as err:
            print(f"error: seed {seed}: {err}", file=sys.stderr)
            return 2
    targets = int(per_seed[0]["two-tower → GESR"]["targets"])
    lines = [
        f"# Cascade on {args.dataset}: two-tower top-{args.k} retrieval, then re-ranking",
        "",
        f"Data: {comparison.data_description(config_lib.load_config(ablations.DATASETS[args.dataset][0], ()))}.",
        "",
        f"Generated by `python experiments/cascade.py --dataset {args.dataset} --k {args.k} --seeds {args.seeds}` on "
        f"{datetime.date.today().isoformat()} from the runs of `experiments/ablations.py --dataset {args.dataset}`; "
        f"jax {jax.__version__}, backend {jax.default_backend()}, {platform.processor() or platform.machine()}; "
        f"{(time.perf_counter() - start) / 60:.1f} min.",
        "",
        f"Test split, {targets} positives (label of the first task = 1) of seed 0. Each positive competes with the "
        "whole catalogue minus the padding item and its request's other positives"
        + (", the items the user rated before the request, ids that are not items and items no one rated before "
           "the request (catalogue=clean)" if args.catalogue == "clean" else " (catalogue=all)") + ". Seeds "
        f"{list(range(args.seeds))}: the two-tower and GESR of the same seed (train.seed and data.seed), each at "
        "its best valid step. Metrics in %; Δ in percentage points, mean ± 95% t CI over seeds, n.s. = CI holds 0.",
        "",
        table(per_seed, args.k),
        "",
    ]
    suffix = "_clean" if args.catalogue == "clean" else ""
    report = comparison.write_report(args.out or RESULTS / f"cascade_{args.dataset}{suffix}.md", lines)
    sidecar = {"catalogue": args.catalogue, "k": args.k, "per_seed": [{"seed": s, **rows} for s, rows in enumerate(per_seed)]}
    report.with_suffix(".json").write_text(json.dumps(sidecar, indent=1) + "\n")  # per seed and row: the metrics, steps
    print(f"wrote {report.with_suffix('.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

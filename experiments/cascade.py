"""Cascade ranking quality: two-tower retrieval of the top K, then a re-ranker, paired over seeds.

Launch (after experiments/ablations.py has trained the two-tower and GESR rows of a dataset):
    python experiments/cascade.py --dataset ml1m          # reads <runs root>/ml1m/{two_tower,gesr__all_on}/seed*
    python experiments/cascade.py --dataset synthetic --k 200 --seeds 5
    python experiments/cascade.py --dataset ml1m --catalogue all     # -> cascade_ml1m.md, the pre-issue-22 catalogue

The default catalogue is "clean" on MovieLens (-> cascade_ml1m_clean.md; gesr_jax/catalogue.default_for) and
"all" on the synthetic log, which has no rating history.

For each seed s, the two-tower run of seed s retrieves its top K of the whole catalogue (item cache,
dot product) for every positive of every test request (gesr_jax/cascade.py: the padding item and the
request's other positives are left out), and three orderings of that list are scored on the positive:
the retriever's own dot product (= retrieval alone), the two-tower's calibrated task head, and GESR's
(seed s). A positive outside the top K counts as a miss. Both runs are restored at their best valid step.
Columns: HR@10, NDCG@10, MRR (mean ± 95% t CI over seeds), and the paired difference to retrieval alone
in points per seed (mean ± CI; "n.s." when the CI holds 0), the same Δ for HR@10 and MRR with a paired
bootstrap over test users on seed-averaged values (gesr_jax/statistics.user_bootstrap_rate_delta: the
t-interval covers only init and negatives, the test users are the same in every seed), and on MovieLens
HR@10 per user-tenure stratum (gesr_jax/strata.py). Writes experiments/results/cascade_<dataset>[_clean].md
and a JSON sidecar with per seed and row the metrics, steps and the per-user and per-stratum sums.
Expected: the re-rankers change HR@10 only within the retrieved share (recall@K, the same for every row).
"""

from __future__ import annotations

import argparse
import datetime
import pathlib
import platform
import sys
import time

import ablations
import jax
import numpy as np

from gesr_jax import cascade, catalogue as catalogue_lib, comparison, config as config_lib, metrics, sidecar
from gesr_jax import statistics, strata
from gesr_jax.data import datasets

RESULTS, RUNS_ROOT = ablations.RESULTS, ablations.RUNS_ROOT  # the table folder and ablations.py's run folders
RETRIEVER = "two_tower"
RERANKERS = [("two-tower → two-tower task head", "two_tower"), ("two-tower → GESR", "gesr__all_on")]
METRICS = ("hr@10", "ndcg@10", "mrr")
PER_TARGET = {"hr@10": "hr@10", "mrr": "rr"}  # table metric -> metrics.ranking_values key (bootstrap and strata)


def per_target(ranks: np.ndarray, rows: np.ndarray, test: dict, first_time: np.ndarray | None) -> dict:
    """Per user (the sufficient statistics of the user bootstrap) and per tenure stratum: targets and metric sums."""
    values = metrics.ranking_values(ranks, 10)
    users, group = np.unique(np.asarray(test["user_id"])[rows], return_inverse=True)
    out: dict = {"users": {"user": users.tolist(), "targets": np.bincount(group).astype(float).tolist()}}
    out["users"] |= {m: np.bincount(group, weights=values[key]).tolist() for m, key in PER_TARGET.items()}
    if first_time is not None:
        stratum = strata.request_strata(test, first_time)[rows]
        out["strata"] = {"targets": np.bincount(stratum, minlength=len(strata.NAMES)).tolist()}
        out["strata"] |= {m: np.bincount(stratum, values[key], minlength=len(strata.NAMES)).tolist()
                          for m, key in PER_TARGET.items()}  # fmt: skip
    return out


def seed_metrics(
    root: pathlib.Path, seed: int, k: int, batch_size: int, catalogue_name: str = "all"
) -> dict[str, dict[str, float]]:
    """Row label -> metrics for one seed; ``catalogue_name`` "all" (original) or "clean" (gesr_jax/catalogue.py)."""
    retriever = cascade.load_run(root / RETRIEVER / f"seed{seed}")
    splits = datasets.load_splits(retriever.config.data)
    table = datasets.item_table(retriever.config.data)
    catalogue_lib.check_catalogue(catalogue_name)
    clean = catalogue_lib.from_data_config(retriever.config.data) if catalogue_name == "clean" else None
    first_time = None
    if retriever.config.data.source == "movielens":  # tenure strata need the event log's timestamps
        from gesr_jax.data import movielens_dataset

        inter = movielens_dataset.load_interactions_cached(retriever.config.data)
        first_time = strata.first_event_times(inter.user, inter.timestamp)
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
            rows["two-tower retrieval alone"] |= per_target(ranks["retrieval"], ranks["row"], splits.test, first_time)
        rows[label] = {m: got[f"cascade/{m}"] for m in METRICS} | {"steps": ranker.step}
        rows[label] |= per_target(ranks["cascade"], ranks["row"], splits.test, first_time)
        rows[label]["targets"] = got["num_targets"]
    return rows


def table(per_seed: list[dict[str, dict[str, float]]], k: int) -> str:
    labels = list(per_seed[0])
    base = labels[0]
    header = ["pipeline"] + [m.upper() for m in METRICS] + [f"Δ{m.upper()} vs retrieval (points, paired)" for m in METRICS]
    header += [f"Δ{PER_TARGET_NAME[m]} vs retrieval (points, 95% bootstrap over test users, seed-averaged)"
               for m in PER_TARGET]  # fmt: skip
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
        for m in PER_TARGET:
            cells.append("0 (baseline)" if label == base else _bootstrap_cell(per_seed, base, label, m))
        cells.append(", ".join(str(int(s[label]["steps"])) for s in per_seed))
        lines.append("| " + " | ".join(cells) + " |")
    recall = statistics.mean_ci(np.array([s[base][f"recall@{k}"] for s in per_seed]))
    lines += ["", f"Retrieved share (recall@{k} of the two-tower, the ceiling of every cascade row's HR): "
              f"{100 * recall[0]:.2f} ± {100 * recall[1]:.2f} %."]  # fmt: skip
    return "\n".join(lines)


PER_TARGET_NAME = {"hr@10": "HR@10", "mrr": "MRR"}


def _bootstrap_cell(per_seed: list[dict], base: str, label: str, metric: str) -> str:
    def stats(row: str) -> list[dict]:
        return [{"user": s[row]["users"]["user"], "targets": s[row]["users"]["targets"], "sum": s[row]["users"][metric]}
                for s in per_seed]  # fmt: skip

    mean, lo, hi = statistics.user_bootstrap_rate_delta(stats(base), stats(label))
    return f"{mean:.2f} [{lo:.2f}, {hi:.2f}]" + (" (n.s.)" if lo <= 0.0 <= hi else "")


def strata_table(per_seed: list[dict]) -> str | None:
    """HR@10 (%) per tenure stratum and row, pooled over each seed's targets and averaged over seeds."""
    labels = list(per_seed[0])
    if "strata" not in per_seed[0][labels[0]]:
        return None
    header = ["pipeline", *(f"HR@10 {n}" for n in strata.NAMES)]
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    counts = per_seed[0][labels[0]]["strata"]["targets"]
    lines.append("| positives (seed 0) | " + " | ".join(str(int(c)) for c in counts) + " |")
    for label in labels:
        with np.errstate(invalid="ignore", divide="ignore"):
            hr = np.nanmean([np.divide(s[label]["strata"]["hr@10"], s[label]["strata"]["targets"]) for s in per_seed], 0)
        lines.append("| " + " | ".join([label, *(f"{100 * v:.2f}" if np.isfinite(v) else "—" for v in hr)]) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", required=True, help="a folder under --runs, e.g. ml1m or synthetic")
    parser.add_argument("--runs", default=str(RUNS_ROOT), help="root of experiments/ablations.py's runs")
    parser.add_argument("--seeds", type=int, default=5, help="seeds 0 .. seeds-1 (each needs both runs)")
    parser.add_argument("--k", type=int, default=200, help="items the two-tower retrieves per positive")
    parser.add_argument("--batch-size", type=int, default=64, help="requests per re-rank call")
    parser.add_argument("--out", default=None, help="default: experiments/results/cascade_<dataset>[_clean].md")
    parser.add_argument("--catalogue", choices=catalogue_lib.CATALOGUES, default=None,
                        help="all: every id but the padding and the other positives (the original tables); clean: also "
                        "the user's already-rated items, non-items and items unrated before the request (default: "
                        "clean on MovieLens, all on the synthetic log, which has no rating history)")
    args = parser.parse_args(argv)
    dataset_config = config_lib.load_config(ablations.DATASETS[args.dataset][0], ())
    args.catalogue = args.catalogue or catalogue_lib.default_for(dataset_config.data)
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
        f"Data: {comparison.data_description(dataset_config)}.",
        "",
        f"Generated by `python experiments/cascade.py --dataset {args.dataset} --k {args.k} --seeds {args.seeds}"
        + f" --catalogue {args.catalogue}` on "
        f"{datetime.date.today().isoformat()} from the run folders that `experiments/ablations.py` and "
        f"`experiments/model_comparison.py --dataset {args.dataset}` share; "
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
    by_tenure = strata_table(per_seed)
    if by_tenure:
        lines += ["## HR@10 by user tenure (days from the user's first rating to the request; gesr_jax/strata.py)",
                  "", by_tenure, ""]  # fmt: skip
    suffix = "_clean" if args.catalogue == "clean" else ""
    report = comparison.write_report(args.out or RESULTS / f"cascade_{args.dataset}{suffix}.md", lines)
    records = {"catalogue": args.catalogue, "k": args.k,
               "per_seed": [{"seed": s, **rows} for s, rows in enumerate(per_seed)]}  # fmt: skip
    # per seed and row: the metrics and steps, and the per-user sums unless they pass sidecar.MAX_SIDECAR_BYTES
    print(f"wrote {sidecar.write_json(report.with_suffix('.json'), records, 'users')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

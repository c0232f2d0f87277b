"""Scale benchmarks of the data path (issue 21): MovieLens ingest; synthetic logs written straight to prepared files.

Usage (figures go to experiments/results/scale_cpu.md with the machine named; never into unit tests)::

    python experiments/bench_scale.py ingest --rows 32000000 --scratch /work/scratch [--old-src DIR] [--rounds 1]
    python experiments/bench_scale.py scale --events 1000000 10000000 --scratch /work/scratch

``ingest`` writes a synthetic ``ratings.csv`` in the official ml-32m format (``userId,movieId,rating,timestamp``,
half stars, rows by user then movie) plus a ``movies.csv``, then loads it with ``load_interactions`` in a fresh
process per variant: today's package and, with ``--old-src``, a checkout of an older commit (its regex +
``np.loadtxt`` reader). Rounds interleave the variants; each reports wall and CPU seconds and peak RSS (``ru_maxrss``).
``scale`` writes synthetic logs straight to prepared folders (gesr_jax/data/synthetic_log.py), then
reads train batches from the files and from an in-memory copy, and trains ml32m_base's model (the
CSV-family GESR) from both. The scratch folder is deleted afterwards unless ``--keep``.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import resource
import shutil
import subprocess
import sys
import time

import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]


def write_ml32m_like(root: pathlib.Path, rows: int, seed: int = 0) -> dict[str, int]:
    """A ratings.csv of ``rows`` ratings in the ml-32m layout, written in 1M-row chunks (never the whole log)."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    per_user = rng.poisson(159, size=rows // 80 + 2) + 1  # ~160 ratings per user, ~200k users at 32M rows
    cum = np.cumsum(per_user)
    n = int(np.searchsorted(cum, rows))
    per_user = per_user[: n + 1]
    per_user[-1] -= cum[n] - rows
    num_items = 0
    with open(root / "ratings.csv", "w", encoding="utf-8") as f:
        f.write("userId,movieId,rating,timestamp\n")
        user = 1
        for lo in range(0, per_user.size, 5000):
            counts = per_user[lo : lo + 5000]
            users = np.repeat(np.arange(user, user + counts.size), counts)
            user += counts.size
            starts = np.cumsum(counts) - counts  # each user's first row in this chunk
            gaps = rng.integers(1, 1300, size=users.size)  # increasing movie ids per user: no pair twice
            cum_gaps = np.cumsum(gaps)
            items = cum_gaps - np.repeat(cum_gaps[starts] - gaps[starts], counts)
            num_items = max(num_items, int(items.max()))
            stars = rng.integers(1, 11, size=users.size) / 2
            ts = rng.integers(789_652_009, 1_697_164_147, size=users.size)
            f.write("".join(f"{u},{i},{r:.1f},{t}\n" for u, i, r, t in zip(users.tolist(), items.tolist(),
                                                                            stars.tolist(), ts.tolist())))  # fmt: skip
    with open(root / "movies.csv", "w", encoding="utf-8") as f:
        f.write("movieId,title,genres\n")
        f.write("".join(f"{m},Movie {m} ({1900 + m % 120}),Drama|Comedy\n" for m in range(1, num_items + 1)))
    return {"rows": rows, "users": int(per_user.size), "bytes": (root / "ratings.csv").stat().st_size}


_LOAD = """
import json, resource, sys, time
from gesr_jax.data import movielens
t0, c0 = time.perf_counter(), time.process_time()
inter = movielens.load_interactions(sys.argv[1])
print(json.dumps({"module": movielens.__file__, "wall_s": time.perf_counter() - t0, "cpu_s": time.process_time() - c0,
                  "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "events": int(inter.user.size)}))
"""


def time_load(src: pathlib.Path, root: pathlib.Path, timeout: int) -> dict:
    """Load ``root`` with the package found at ``src`` in a fresh process; its time, CPU time and peak RSS."""
    env = dict(os.environ, PYTHONPATH=str(src), JAX_PLATFORMS="cpu")
    try:
        # cwd=src too: `python -c` puts the working directory first on sys.path, ahead of PYTHONPATH.
        out = subprocess.run([sys.executable, "-c", _LOAD, str(root)], env=env, capture_output=True, text=True,
                             timeout=timeout, check=True, cwd=src)  # fmt: skip
    except subprocess.TimeoutExpired:
        return {"timed_out_after_s": timeout}
    except subprocess.CalledProcessError as err:
        return {"failed": err.stderr.strip().splitlines()[-1:]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def run_ingest(args: argparse.Namespace) -> dict:
    root = pathlib.Path(args.scratch) / f"ml32m-like-{args.rows}"
    t0 = time.perf_counter()
    info = write_ml32m_like(root, args.rows)
    info["generate_s"] = time.perf_counter() - t0
    variants = {"vectorised (this tree)": REPO}
    if args.old_src:
        variants["regex + loadtxt (old commit)"] = pathlib.Path(args.old_src)
    rounds = []
    for _ in range(args.rounds):  # interleave the variants round by round
        rounds.append({name: time_load(src, root, args.timeout) for name, src in variants.items()})
    if not args.keep:
        shutil.rmtree(root)
    return {"file": info, "rounds": rounds}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("ingest", help="load a synthetic ml-32m-format ratings.csv: this tree vs an old checkout")
    p.add_argument("--rows", type=int, default=32_000_000)
    p.add_argument("--scratch", default="/work/scratch")
    p.add_argument("--old-src", help="a checkout of the commit whose reader to compare with")
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--timeout", type=int, default=1800)
    p.add_argument("--keep", action="store_true")
    p = sub.add_parser("scale", help="synthetic logs straight to prepared files; prepare, disk, RSS, requests/s")
    p.add_argument("--events", type=int, nargs="+", default=[1_000_000, 10_000_000])
    p.add_argument("--scratch", default="/work/scratch")
    p.add_argument("--batches", type=int, default=200, help="timed batches of 512 requests (pipeline only)")
    p.add_argument("--train-steps", type=int, default=100, help="training steps of 128 requests (ml32m_base model)")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--in-memory-up-to", type=int, default=10_000_000, help="largest log also copied into RAM")
    p.add_argument("--train-up-to", type=int, default=1_000_000, help="largest log also trained on")
    p.add_argument("--prepare-only", action="store_true", help="only generate + prepare (time, disk, RSS)")
    p.add_argument("--keep", action="store_true")
    args = parser.parse_args(argv)
    result = run_ingest(args) if args.command == "ingest" else run_scale(args)
    result["peak_rss_mib_driver"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps(result, indent=1))


_PREPARE = """
import json, pathlib, resource, sys, time
from gesr_jax.data import synthetic_log
t0, c0 = time.perf_counter(), time.process_time()
m = synthetic_log.write_prepared_log(int(sys.argv[1]), sys.argv[2], synthetic_log.scale_config(),
                                     log=lambda s: print(s, file=sys.stderr))
print(json.dumps({"wall_s": time.perf_counter() - t0, "cpu_s": time.process_time() - c0,
                  "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "phases": m["phases"], "stats": m["stats"],
                  "bytes_on_disk": sum(p.stat().st_size for p in pathlib.Path(sys.argv[2]).rglob("*") if p.is_file())}))
"""

# Reads batches (pipeline only) or trains (the whole step) from a prepared folder or an in-memory copy of it.
_READ = """
import dataclasses, json, resource, sys, time
import numpy as np
from gesr_jax.data import datasets, event_log, pipeline, synthetic_log
folder, variant, mode, batches = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
dc = synthetic_log.scale_config(prepared=folder)
t0 = time.perf_counter()
splits = datasets.load_splits(dc)
if variant == "in_memory":  # the same requests by reference, every column copied into RAM
    def copy(split):
        log = event_log.EventLog(*(np.array(c) for c in split.log.columns().values()))
        table = {k: np.array(v) for k, v in split.item_table.items()}
        return event_log.RequestSplit(log, table, split.schema, {k: np.array(v) for k, v in split.columns.items()})
    splits = dataclasses.replace(splits, **{s: copy(getattr(splits, s)) for s in ("train", "valid", "test")})
open_s = time.perf_counter() - t0
out = {"variant": variant, "mode": mode, "open_s": open_s}
if mode == "pipeline":
    it = pipeline.make_iterator(pipeline.train_dataset(splits.train, 512, seed=0, process_index=0, process_count=1))
    for _ in range(5):
        next(it)
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in range(batches):
        next(it)
    wall = time.perf_counter() - t0
    cpu = time.process_time() - c0
    out |= {"requests_per_s": 512 * batches / wall, "cpu_s_per_1k_requests": cpu / batches / 0.512}
else:
    import tempfile
    from gesr_jax.config import load_config
    from gesr_jax.train.trainer import train_and_evaluate
    over = [f"train.num_steps={batches}", "train.batch_size=128", "train.log_every=20", f"train.eval_every={batches}",
            f"train.checkpoint_every={batches}"]
    config = dataclasses.replace(load_config("ml32m_base", over), data=dc)
    with tempfile.TemporaryDirectory() as wd:
        train_and_evaluate(config, wd, splits=splits)
        lines = [json.loads(l) for l in open(wd + "/metrics.jsonl")]
    rates = [l["requests_per_sec"] for l in lines if "requests_per_sec" in l and l.get("split", "train") == "train"]
    out |= {"train_requests_per_s": rates[1:] or rates}
out["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps(out))
"""


def _run(code: str, *argv: str, timeout: int = 3000) -> dict:
    env = dict(os.environ, JAX_PLATFORMS="cpu", GESR_NO_COMPILATION_CACHE="1")
    try:
        out = subprocess.run([sys.executable, "-c", code, *argv], env=env, capture_output=True, text=True,
                             timeout=timeout, check=True, cwd=REPO)  # fmt: skip
    except subprocess.TimeoutExpired:
        return {"timed_out_after_s": timeout}
    except subprocess.CalledProcessError as err:
        return {"failed": err.stderr.strip().splitlines()[-3:]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def run_scale(args: argparse.Namespace) -> dict:
    """Per size: generate + prepare; then batches/s from the files vs an in-memory copy (rounds interleaved)."""
    results = []
    for events in args.events:
        folder = pathlib.Path(args.scratch) / f"synthetic-log-{events}"
        shutil.rmtree(folder, ignore_errors=True)
        entry = {"events": events, "prepare": _run(_PREPARE, str(events), str(folder))}
        if args.prepare_only:
            results.append(entry)
            shutil.rmtree(folder, ignore_errors=True)
            continue
        variants = ["prepared"] + (["in_memory"] if events <= args.in_memory_up_to else [])
        entry["pipeline"] = [_run(_READ, str(folder), v, "pipeline", str(args.batches)) for _ in range(args.rounds)
                             for v in variants]  # fmt: skip
        if events <= args.train_up_to:
            entry["train"] = [_run(_READ, str(folder), v, "train", str(args.train_steps)) for _ in range(args.rounds)
                              for v in variants]  # fmt: skip
        results.append(entry)
        print(json.dumps(entry), file=sys.stderr, flush=True)
        if not args.keep:
            shutil.rmtree(folder, ignore_errors=True)
    return {"sizes": results}


if __name__ == "__main__":
    main()

"""Scale benchmarks of the data path (issue 21): MovieLens ingest; synthetic logs written straight to prepared files.

Usage (figures go to experiments/results/scale_cpu.md with the machine named; never into unit tests)::

    python experiments/bench_scale.py ingest --rows 32000000 --scratch /work/scratch [--old-src DIR] [--rounds 1]
    python experiments/bench_scale.py scale --events 1000000 10000000 --scratch /work/scratch
    python experiments/bench_scale.py scale --events 100000000 --prepare-only --keep --scratch DIR
    python experiments/bench_scale.py train --folder DIR/synthetic-log-100000000 --small --eval-requests 10000
    python experiments/bench_scale.py interleaved --folder DIR/synthetic-log-1000000 --set train.batch_size=128

``ingest`` writes a synthetic ``ratings.csv`` in the official ml-32m format (``userId,movieId,rating,timestamp``,
half stars, rows by user then movie) plus a ``movies.csv``, then loads it with ``load_interactions`` in a fresh
process per variant: today's package and, with ``--old-src``, a checkout of an older commit (its regex +
``np.loadtxt`` reader). Rounds interleave the variants; each reports wall and CPU seconds and peak RSS (``ru_maxrss``).
``scale`` writes synthetic logs straight to prepared folders (gesr_jax/data/synthetic_log.py), then
reads train batches from the files and from an in-memory copy, and trains ml32m_base's model (the
CSV-family GESR) from both. The scratch folder is deleted afterwards unless ``--keep``.
``train`` trains from a kept folder in a fresh process (``--small``: a width-8 GESR, so the 10^7-row
tables fit; valid/test cut to ``--eval-requests``) and reports wall, CPU, peak RSS and the process's
anonymous vs file-backed RSS at the end. ``interleaved`` times train steps fed from the files against
steps fed from an in-memory copy in one process with one compiled step (bench_common.interleaved).
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
sys.path.insert(0, str(REPO / "experiments"))
from bench_common import machine_info, machine_line  # noqa: E402


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
import json, os, resource, sys, time
from gesr_jax.data import movielens
load0 = os.getloadavg()
t0, c0 = time.perf_counter(), time.process_time()
inter = movielens.load_interactions(sys.argv[1])
print(json.dumps({"module": movielens.__file__, "wall_s": time.perf_counter() - t0, "cpu_s": time.process_time() - c0,
                  "loadavg_start": load0, "loadavg_end": os.getloadavg(),
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
    p = sub.add_parser("train", help="train from an existing prepared folder (e.g. a kept 10^8 log): RSS, time")
    p.add_argument("--folder", required=True, help="a folder written by `scale --prepare-only --keep`")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--variants", nargs="+", default=["prepared"], choices=["prepared", "in_memory"])
    p.add_argument("--rounds", type=int, default=1, help="rounds interleaving the variants")
    p.add_argument("--eval-requests", type=int, default=0, help="cut valid/test to their first K requests; 0 = all")
    p.add_argument("--small", action="store_true", help=f"the small model: {' '.join(SMALL_MODEL)}")
    p.add_argument("--set", nargs="*", default=[], help="more config overrides")
    p = sub.add_parser("interleaved", help="prepared vs in-memory train steps in one process, rounds interleaved")
    p.add_argument("--folder", required=True, help="a folder written by `scale --prepare-only --keep`")
    p.add_argument("--steps", type=int, default=10, help="train steps per timed sample")
    p.add_argument("--rounds", type=int, default=9)
    p.add_argument("--small", action="store_true", help=f"the small model: {' '.join(SMALL_MODEL)}")
    p.add_argument("--set", nargs="*", default=[], help="more config overrides")
    args = parser.parse_args(argv)
    commands = {"ingest": run_ingest, "scale": run_scale, "train": run_train, "interleaved": run_interleaved}
    result = commands[args.command](args)
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
opts = json.loads(sys.argv[5]) if len(sys.argv) > 5 else {}
dc = synthetic_log.scale_config(prepared=folder)
t0, c_start = time.perf_counter(), time.process_time()
splits = datasets.load_splits(dc)
if opts.get("eval_requests"):  # valid/test cut to their first K requests (views): the run measures training
    k = opts["eval_requests"]
    def head(split):
        return event_log.RequestSplit(split.log, split.item_table, split.schema,
                                      {c: v[:k] for c, v in split.columns.items()})
    splits = dataclasses.replace(splits, valid=head(splits.valid), test=head(splits.test))
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
            f"train.checkpoint_every={batches}", *opts.get("set", [])]
    config = dataclasses.replace(load_config("ml32m_base", over), data=dc)
    t1, c1 = time.perf_counter(), time.process_time()
    with tempfile.TemporaryDirectory(dir=opts.get("workdir_parent")) as wd:
        train_and_evaluate(config, wd, splits=splits)
        lines = [json.loads(l) for l in open(wd + "/metrics.jsonl")]
    rates = [l["requests_per_sec"] for l in lines if "requests_per_sec" in l and l.get("split", "train") == "train"]
    out |= {"train_requests_per_s": rates[1:] or rates, "train_wall_s": time.perf_counter() - t1,
            "train_cpu_s": time.process_time() - c1, "steps": batches, "set": over}
out["wall_s"], out["cpu_s"] = time.perf_counter() - t0, time.process_time() - c_start
out["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
status = dict(l.split(":", 1) for l in open("/proc/self/status") if l.startswith(("VmHWM", "RssAnon", "RssFile")))
out["proc_status_end"] = {k: v.strip() for k, v in status.items()}  # peak total; anonymous vs file-backed now
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


# A small GESR (two 10^7-row item tables at width 8, one HSTU layer) for the 10^8-event run.
SMALL_MODEL = ["model.embed_dim=8", "model.tower_mlp=16,8", "model.interaction_mlp=16", "model.hstu.layers=1",
               "model.hstu.qk_dim=8", "model.hstu.v_dim=8", "model.cross.head_dim=8", "model.mlpg.hidden=16",
               "train.table_optimizer=rowwise_adagrad"]  # fmt: skip


def run_train(args: argparse.Namespace) -> dict:
    """Train ``--steps`` steps from ``--folder`` in a fresh process per variant and round (interleaved)."""
    opts = {"eval_requests": args.eval_requests, "set": (SMALL_MODEL if args.small else []) + list(args.set),
            "workdir_parent": str(pathlib.Path(args.folder).parent)}  # fmt: skip
    runs, info = [], machine_info()
    for round_ in range(args.rounds):
        order = args.variants[round_ % len(args.variants):] + args.variants[: round_ % len(args.variants)]
        for variant in order:  # the order rotates, so load bursts hit every variant alike
            t0 = time.perf_counter()
            out = _run(_READ, args.folder, variant, "train", str(args.steps), json.dumps(opts), timeout=3600)
            out |= {"round": round_, "driver_wall_s": time.perf_counter() - t0, "loadavg": os.getloadavg()}
            print(json.dumps(out), file=sys.stderr, flush=True)
            runs.append(out)
    return {"folder": args.folder, "machine": machine_line(info, finished=machine_info()), "runs": runs,
            "per_round": _per_round(runs)}


def _per_round(runs: list[dict]) -> dict:
    """Per round: prepared / in-memory train rate (median of log windows) and CPU-s-per-step ratio; medians."""
    rounds: dict[int, dict] = {}
    for r in runs:
        if "train_requests_per_s" in r:
            rounds.setdefault(r["round"], {})[r["variant"]] = r
    rate, cpu = [], []
    for pair in rounds.values():
        if {"prepared", "in_memory"} <= set(pair):
            p, m = pair["prepared"], pair["in_memory"]
            rate.append(float(np.median(p["train_requests_per_s"]) / np.median(m["train_requests_per_s"])))
            cpu.append(m["train_cpu_s"] / p["train_cpu_s"])  # > 1: the prepared run used less CPU
    med = (lambda x: float(np.median(x)) if x else None)
    return {"rate_ratio": rate, "cpu_ratio_mem_over_prepared": cpu, "median_rate_ratio": med(rate),
            "median_cpu_ratio": med(cpu)}


# One process, one compiled train step; rounds alternate between batches from the prepared files and from an
# in-memory copy of the same requests (bench_common.interleaved: rotating order, CPU time per round).
_INTERLEAVED = """
import dataclasses, json, sys
import jax, numpy as np
sys.path.insert(0, sys.argv[5])
from bench_common import interleaved, machine_info, machine_line, ratio
from gesr_jax import api
from gesr_jax.config import load_config
from gesr_jax.data import datasets, event_log, pipeline, synthetic_log
from gesr_jax.train import sharding, step
folder, steps, rounds, opts = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), json.loads(sys.argv[4])
info = machine_info()
dc = synthetic_log.scale_config(prepared=folder)
files = datasets.load_splits(dc).train
memory = event_log.RequestSplit(event_log.EventLog(*(np.array(c) for c in files.log.columns().values())),
                                {k: np.array(v) for k, v in files.item_table.items()}, files.schema,
                                {k: np.array(v) for k, v in files.columns.items()})
config = dataclasses.replace(load_config("ml32m_base", opts["set"]), data=dc)
batch_size = config.train.batch_size
mesh = sharding.make_mesh(1)
with sharding.mesh_context(mesh):
    graphdef, params = api.init(config, 0, files.schema)
    p_sharding = sharding.param_shardings(params, mesh)
    params = sharding.place(params, p_sharding)
    tx = step.make_optimizer(config.train)
    o_sharding = sharding.param_shardings(jax.eval_shape(tx.init, params), mesh)
    opt_state = jax.jit(tx.init, out_shardings=o_sharding)(params)
    iters = {name: pipeline.make_iterator(pipeline.train_dataset(split, batch_size, seed=0, process_index=0,
                                                                 process_count=1))
             for name, split in (("prepared", files), ("in_memory", memory))}
    first = next(iters["prepared"])
    tasks = files.schema.tasks
    train_step = step.make_train_step(api, graphdef, tx, tasks, (1.0,) * len(tasks), mesh=mesh,
                                      params_sharding=p_sharding, opt_state_sharding=o_sharding,
                                      batch_sharding=sharding.batch_shardings(first, mesh))
    state = {"params": params, "opt": opt_state, "n": 0}

    def run(name):
        for _ in range(steps):
            batch = sharding.shard_batch(next(iters[name]), mesh)
            state["params"], state["opt"], metrics = train_step(state["params"], state["opt"], batch,
                                                                jax.random.key(state["n"]))
            state["n"] += 1
        return metrics["loss"]

    timings = interleaved({"prepared": lambda: run("prepared"), "in_memory": lambda: run("in_memory")}, rounds)
cpu = ratio(timings, "in_memory", "prepared")  # > 1: the prepared steps took less CPU
wall = ratio(timings, "in_memory", "prepared", clock="wall")
out = {"machine": machine_line(info, finished=machine_info()), "steps_per_sample": steps, "batch_size": batch_size,
       "rounds": rounds, "train_requests": files.num_requests, "set": opts["set"],
       "ratio_in_memory_over_prepared": {"cpu": [cpu.median, cpu.lo, cpu.hi], "wall": [wall.median, wall.lo, wall.hi]}}
for name, t in timings.items():
    out[name] = {"cpu_ms_per_sample": t.cpu, "wall_ms_per_sample": t.wall,
                 "requests_per_cpu_s": steps * batch_size / (t.cpu_ms / 1e3),
                 "requests_per_wall_s": steps * batch_size / (t.wall_ms / 1e3)}
print(json.dumps(out))
"""


def run_interleaved(args: argparse.Namespace) -> dict:
    """Prepared vs in-memory training throughput in one process (see _INTERLEAVED)."""
    opts = {"set": (SMALL_MODEL if args.small else []) + list(args.set)}
    return _run(_INTERLEAVED, args.folder, str(args.steps), str(args.rounds), json.dumps(opts),
                str(REPO / "experiments"), timeout=7200)


def run_scale(args: argparse.Namespace) -> dict:
    """Per size: generate + prepare; then batches/s from the files vs an in-memory copy (rounds interleaved)."""
    results = []
    for events in args.events:
        folder = pathlib.Path(args.scratch) / f"synthetic-log-{events}"
        shutil.rmtree(folder, ignore_errors=True)
        entry = {"events": events, "prepare": _run(_PREPARE, str(events), str(folder))}
        if args.prepare_only:
            results.append(entry)
            if not args.keep:
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

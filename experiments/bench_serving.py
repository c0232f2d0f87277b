"""Serving benchmark (issue 12): GESR Scorer vs two-tower Scorer vs naive ``api.apply``, in one process.

    python experiments/bench_serving.py                 # (N, C) in {(256, 500), (1024, 500), (1024, 2000)}
    python experiments/bench_serving.py --smoke         # tiny shapes, 2 repeats (tests)

Models: the ``synthetic_base`` GESR and its two-tower (``synthetic_base_two_tower``: the same user and item
towers), random parameters (latency does not depend on training), schema of the synthetic log with
history_len N. Every request has a full N-event history and exactly C candidates. Per (N, C) and request
batch B in {1, 16}:

* ``gesr`` / ``two_tower``: the serving Scorer (encode once per request, chunks of 256 / 1024, item cache),
  without user-state reuse (every call encodes) and ``+reuse`` (the same requests again: the user-state
  cache hits, only the candidate side runs). Timed from the request dicts: validation and packing included.
* ``gesr naive apply`` / ``two_tower naive apply``: ``jax.jit(api.apply)`` on the one [B, N] / [B, C]
  batch, item cache on, from ready numpy arrays (no validation): the same model code in one call of the
  exact shape, no chunking, no reuse (``apply`` already encodes the history once and scores candidates
  against its cached K/V).
* ``gesr full-sequence apply``: the same params with ``model.hstu_scoring=full``: HSTU over the packed
  [history ; candidates] sequence, O((N + C)^2), the model as it was before the request/candidate split
  (the issue's baseline).

Latency is per call (B requests), p50 / p99 over the repeats after one untimed call (compiles excluded);
candidates/s = B * C / p50. Ratios are computed from this run only. The table goes to
experiments/results/serving_<device>.md (machine, jax version and date in its header).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import os
import pathlib
import platform
import sys
import time

import jax
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from gesr_jax import api  # noqa: E402
from gesr_jax import config as config_lib  # noqa: E402
from gesr_jax.data import datasets  # noqa: E402
from gesr_jax.serving import Buckets, Scorer, UserStateCache  # noqa: E402

SHAPES = [(256, 500), (1024, 500), (1024, 2000)]
SMOKE_SHAPES = [(16, 20), (16, 50)]
BATCHES = (1, 16)
RESULTS = pathlib.Path(__file__).resolve().parent / "results"


def machine() -> dict[str, str]:
    cpu = platform.processor() or "unknown"
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    device = jax.devices()[0]
    return {
        "platform": jax.default_backend(),
        "device": getattr(device, "device_kind", str(device)),
        "cpu": f"{cpu} ({os.cpu_count()} logical cores visible)",
        "jax": jax.__version__,
        "date": datetime.datetime.now().isoformat(timespec="minutes"),
        "python": platform.python_version(),
    }


def requests_for(schema, table, n: int, c: int, b: int, seed: int) -> tuple[list[dict], dict[str, np.ndarray]]:
    """``b`` requests with full n-event histories and c candidates, and the same as one batch."""
    rng = np.random.default_rng(seed)
    reqs = []
    for i in range(b):
        hist = rng.integers(1, schema.num_items + 1, size=n).astype(np.int32)
        cand = rng.integers(1, schema.num_items + 1, size=c).astype(np.int32)
        req = {"user_id": 1 + i, "request_time": 2_000_000_000,
               "history_item": hist, "history_action": rng.integers(1, schema.num_actions, size=n).astype(np.int32),
               "history_time": (1_000_000_000 + np.arange(n) * 60).astype(np.int32), "cand_item": cand}  # fmt: skip
        for name, vocab in schema.user_features:
            req[f"user_{name}"] = int(rng.integers(1, vocab))
        for name in schema.item_feature_names:
            req[f"history_{name}"] = table[name][hist]
            req[f"cand_{name}"] = table[name][cand]
        reqs.append(req)
    batch = {k: np.stack([np.asarray(r[k]) for r in reqs]).astype(np.int32) for k in reqs[0]}
    batch["history_len"] = np.full(b, n, np.int32)
    batch["num_candidates"] = np.full(b, c, np.int32)
    return reqs, batch


def timed(fn, repeats: int) -> tuple[float, float]:
    """(p50, p99) milliseconds of ``fn()`` after one untimed call."""
    jax.block_until_ready(fn())
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append((time.perf_counter() - start) * 1e3)
    return float(np.percentile(times, 50)), float(np.percentile(times, 99))


def bench_shape(presets: tuple[str, str], n: int, c: int, repeats: int, buckets: Buckets) -> list[dict]:
    rows = []
    models = {}
    for kind, preset in zip(("gesr", "two_tower"), presets, strict=True):
        cfg = config_lib.load_config(preset, [f"data.history_len={n}"])
        schema = dataclasses.replace(datasets.schema_for(cfg.data), num_candidates=c)
        table = datasets.item_table(cfg.data)
        graphdef, params = api.init(cfg, 0, schema)
        scorer = Scorer(graphdef, params, schema, table, buckets=buckets)
        naive = jax.jit(lambda p, batch, cache, g=graphdef: api.apply(g, p, batch, item_cache=cache, validate=False))
        full = None
        if kind == "gesr":  # same parameters, HSTU over the packed [history ; candidates] sequence
            full_cfg = config_lib.load_config(preset, [f"data.history_len={n}", "model.hstu_scoring=full"])
            full_graphdef, _ = api.abstract_init(full_cfg, schema)
            full = jax.jit(lambda p, batch, cache, g=full_graphdef: api.apply(g, p, batch, item_cache=cache,
                                                                               validate=False))  # fmt: skip
        models[kind] = (schema, table, scorer, params, naive, full)
    for b in BATCHES:
        for kind, (schema, table, scorer, params, naive, full) in models.items():
            reqs, batch = requests_for(schema, table, n, c, b, seed=n + c + b)
            scorer.user_cache = None
            p50, p99 = timed(lambda s=scorer, r=reqs: s.score(r), repeats)
            rows.append(dict(n=n, c=c, b=b, model=kind, mode="scorer", p50=p50, p99=p99))
            scorer.user_cache = UserStateCache()
            p50, p99 = timed(lambda s=scorer, r=reqs: s.score(r), repeats)  # the untimed call fills the cache
            assert scorer.user_cache.stats.hits >= repeats * b
            rows.append(dict(n=n, c=c, b=b, model=kind, mode="scorer+reuse", p50=p50, p99=p99))
            cache = scorer.item_cache
            p50, p99 = timed(lambda f=naive, p=params, x=batch, k=cache: f(p, x, k), repeats)
            rows.append(dict(n=n, c=c, b=b, model=kind, mode="naive apply", p50=p50, p99=p99))
            if full is not None:
                p50, p99 = timed(lambda f=full, p=params, x=batch, k=cache: f(p, x, k), repeats)
                rows.append(dict(n=n, c=c, b=b, model=kind, mode="full-sequence apply", p50=p50, p99=p99))
            print(f"N={n} C={c} B={b} {kind}: " + ", ".join(f"{r['mode']} {r['p50']:.1f} ms" for r in rows[-4:]
                                                          if r["model"] == kind), flush=True)  # fmt: skip
    for r in rows:
        r["cps"] = r["b"] * r["c"] / (r["p50"] / 1e3)
    return rows


def render(rows: list[dict], info: dict[str, str], args: argparse.Namespace, elapsed: float) -> str:
    lines = [
        "# Serving benchmark: GESR Scorer vs two-tower Scorer vs api.apply (cached and full-sequence)",
        "",
        f"Machine: platform **{info['platform']}** ({info['device']}), CPU {info['cpu']}; jax {info['jax']}, "
        f"Python {info['python']}; {info['date']}. Command: `python experiments/bench_serving.py"
        f"{' --smoke' if args.smoke else ''} --repeats {args.repeats}`; whole run {elapsed:.0f} s.",
        "",
        "Models: `" + "` / `".join(args.presets) + "` (random parameters), item cache on for every row. "
        f"Scorer buckets: requests {list(args.buckets.request_sizes)}, chunks {list(args.buckets.chunk_sizes)}. "
        "Latency per call of B requests, p50 / p99 over the repeats (compiles excluded); cand/s = B*C/p50. "
        "`+reuse`: the same requests again, user states from the cache (only candidates are scored). "
        "`naive apply`: one `jax.jit(api.apply)` call of the exact [B, N] / [B, C] shape from ready arrays. "
        "`full-sequence apply`: the same GESR params with `model.hstu_scoring=full` (HSTU over the packed "
        "[history ; candidates] sequence, O((N+C)^2): the model before the request/candidate split).",
        "",
        "| N | C | B | model | mode | p50 ms | p99 ms | cand/s | x naive apply (same model) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    index = {(r["n"], r["c"], r["b"], r["model"], r["mode"]): r for r in rows}
    for r in rows:
        naive = index[(r["n"], r["c"], r["b"], r["model"], "naive apply")]
        lines.append(
            f"| {r['n']} | {r['c']} | {r['b']} | {r['model']} | {r['mode']} | {r['p50']:.2f} | {r['p99']:.2f} | "
            f"{r['cps']:,.0f} | {naive['p50'] / r['p50']:.2f} |"
        )
    lines += ["", "Ratios inside this run (p50):", "",
              "| N | C | B | GESR scorer x full-sequence apply | GESR +reuse x full-sequence apply | "
              "GESR scorer x naive | GESR +reuse x naive | GESR +reuse x no reuse | "
              "GESR / two-tower cand/s (scorer) | GESR / two-tower cand/s (+reuse) |",
              "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]  # fmt: skip
    for n, c, b in dict.fromkeys((r["n"], r["c"], r["b"]) for r in rows):
        g = {m: index[(n, c, b, "gesr", m)] for m in ("scorer", "scorer+reuse", "naive apply", "full-sequence apply")}
        t = {m: index[(n, c, b, "two_tower", m)] for m in ("scorer", "scorer+reuse")}
        full = g["full-sequence apply"]["p50"]
        lines.append(
            f"| {n} | {c} | {b} | {full / g['scorer']['p50']:.2f} | {full / g['scorer+reuse']['p50']:.2f} | "
            f"{g['naive apply']['p50'] / g['scorer']['p50']:.2f} | "
            f"{g['naive apply']['p50'] / g['scorer+reuse']['p50']:.2f} | "
            f"{g['scorer']['p50'] / g['scorer+reuse']['p50']:.2f} | {g['scorer']['cps'] / t['scorer']['cps']:.3f} | "
            f"{g['scorer+reuse']['cps'] / t['scorer+reuse']['cps']:.3f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny shapes and models, 2 repeats (for tests)")
    parser.add_argument("--repeats", type=int, default=None, help="timed calls per row (default 5; smoke 2)")
    parser.add_argument("--out", default=None, help="markdown path (default experiments/results/serving_<device>.md)")
    args = parser.parse_args(argv)
    args.repeats = args.repeats or (2 if args.smoke else 5)
    args.presets = ("synthetic_tiny", "synthetic_tiny_two_tower") if args.smoke else (
        "synthetic_base", "synthetic_base_two_tower")  # fmt: skip
    args.buckets = Buckets((1, 16), (16, 64) if args.smoke else (256, 1024))
    info = machine()
    start = time.perf_counter()
    rows = []
    for n, c in SMOKE_SHAPES if args.smoke else SHAPES:
        rows += bench_shape(args.presets, n, c, args.repeats, args.buckets)
    text = render(rows, info, args, time.perf_counter() - start)
    out = pathlib.Path(args.out) if args.out else RESULTS / f"serving_{info['platform']}{'_smoke' if args.smoke else ''}.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(text)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

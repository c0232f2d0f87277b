"""Serving benchmark (issue 12): GESR Scorer vs two-tower Scorer vs naive ``api.apply``, in one process.

    python experiments/bench_serving.py --cpus 1        # (N, C) in {(256, 500), (1024, 500), (1024, 2000)}
    python experiments/bench_serving.py --smoke         # tiny shapes, 2 repeats (tests)

``--cpus 1`` (bench_common.pin_cpus) runs it on one CPU, so CPU time is the work of each call and not also
the spinning of XLA's worker threads, which grows with the machine's load (the unpinned runs of
experiments/results/serving_cpu.md moved by 2x between two runs).

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
* ``gesr full-sequence apply``: the same params with ``model.hstu.scoring=full``: HSTU over the packed
  [history ; candidates] sequence, O((N + C)^2), the model as it was before the request/candidate split
  (the issue's baseline).

All variants of one (N, C, B) are timed interleaved, round by round (``bench_common.interleaved``: one
untimed compile call each, then every variant once per round, each sample after one untimed call of the same
variant: a server runs one model back to back). Latency is per call (B requests): median
wall time (p99 beside it) and median CPU (process) time over the rounds; candidates/s = B * C / wall p50.
Every ratio is the median of per-round CPU-time ratios with its 25th-75th percentile spread, so a load burst
from another job on a shared machine hits both sides of a ratio alike. The table goes to
experiments/results/serving_<device>.md (machine, CPU model, load average, jax version and date in its
header).
"""

from __future__ import annotations

import argparse
import dataclasses
import pathlib
import resource
import sys
import time

import jax
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from bench_common import ratio as bench_ratio  # noqa: E402
from serving_ablations import ABLATIONS, CONTEXTS  # noqa: E402
from bench_common import (  # noqa: E402
    METHOD_NOTE,
    add_cpus_arg,
    compiled_cost,
    interleaved,
    machine_info,
    machine_line,
    start_process,
    with_memory_released,
    write_results,
)

from gesr_jax import api  # noqa: E402
from gesr_jax import config as config_lib  # noqa: E402
from gesr_jax.data import datasets  # noqa: E402
from gesr_jax.serving.buckets import Buckets  # noqa: E402
from gesr_jax.serving.requests import pack_candidates, pack_requests  # noqa: E402
from gesr_jax.serving.scorer import DEFAULT_SCORE_BLOCK, Scorer  # noqa: E402
from gesr_jax.serving.user_cache import UserStateCache  # noqa: E402

SHAPES = [(256, 500), (1024, 500), (1024, 2000)]
SMOKE_SHAPES = [(16, 20), (16, 50)]
BATCHES = (1, 16)
MODES = ("scorer", "scorer+reuse", "naive apply", "full-sequence apply")
FULL_DENSE = "full-sequence apply, dense attention (xla)"
RELEASED = "memory released"  # bench_common.with_memory_released: faulted in per call, as without the setting
DENSE = "model.hstu.attention_impl=xla"


def _full_sequence(preset: str, n: int, schema, *overrides: str):
    """jitted ``api.apply`` of ``preset`` with ``model.hstu.scoring=full`` (params of the cached model fit it)."""
    cfg = config_lib.load_config(preset, [f"data.history_len={n}", "model.hstu.scoring=full", *overrides])
    graphdef, _ = api.abstract_init(cfg, schema)
    return jax.jit(lambda p, batch, cache: api.apply(graphdef, p, batch, item_cache=cache, validate=False))


def faults_per_call(fn) -> tuple[float, float]:
    """(minor page faults, system CPU ms) of one more call of ``fn`` (after the timed rounds)."""
    before = resource.getrusage(resource.RUSAGE_SELF)
    jax.block_until_ready(fn())
    after = resource.getrusage(resource.RUSAGE_SELF)
    return after.ru_minflt - before.ru_minflt, (after.ru_stime - before.ru_stime) * 1e3


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


def bench_shape(
    presets: dict[str, str], n: int, c: int, rounds: int, buckets: Buckets, ablate: bool
) -> tuple[list, dict]:
    """Rows (one per model and mode) and the ratios of each batch size B, all variants of a B interleaved."""
    models = {}
    for kind, preset in presets.items():
        cfg = config_lib.load_config(preset, [f"data.history_len={n}"])
        schema = dataclasses.replace(datasets.schema_for(cfg.data), num_candidates=c)
        table = datasets.item_table(cfg.data)
        graphdef, params = api.init(cfg, 0, schema)
        scorer = Scorer(graphdef, params, schema, table, buckets=buckets)
        naive = jax.jit(lambda p, batch, cache, g=graphdef: api.apply(g, p, batch, item_cache=cache, validate=False))
        full = full_dense = None
        if kind == "gesr":  # same parameters, HSTU over the packed [history ; candidates] sequence
            full = _full_sequence(preset, n, schema)
            # The same on the dense "xla" attention (the CPU default before "xla_blocked"): an ablation row,
            # and the program whose cost analysis counts the FLOPs (a blocked loop body would count once).
            full_dense = _full_sequence(preset, n, schema, DENSE)
        ablations = {}
        if kind == "gesr" and ablate:
            ablations = {mode: Scorer(graphdef, params, schema, table, buckets=buckets, **kw)
                         for mode, kw in ABLATIONS.items()}  # fmt: skip
        models[kind] = (schema, table, scorer, params, naive, full, full_dense, ablations)
    rows, ratios = [], {}
    for b in BATCHES:
        variants, setup, caches = {}, {}, {}
        for kind, (schema, table, scorer, params, naive, full, full_dense, ablations) in models.items():
            reqs, batch = requests_for(schema, table, n, c, b, seed=n + c + b)
            caches[kind] = reuse = UserStateCache()  # filled by the untimed first call, hit by every timed one
            variants[(kind, "scorer")] = lambda s=scorer, r=reqs: s.score(r)
            setup[(kind, "scorer")] = lambda s=scorer: setattr(s, "user_cache", None)
            variants[(kind, "scorer+reuse")] = lambda s=scorer, r=reqs: s.score(r)
            setup[(kind, "scorer+reuse")] = lambda s=scorer, u=reuse: setattr(s, "user_cache", u)
            variants[(kind, "parse and pack only")] = lambda s=scorer, r=reqs: host_work(s, r)
            cache = scorer.item_cache
            variants[(kind, "naive apply")] = lambda f=naive, p=params, x=batch, k=cache: f(p, x, k)
            if full is not None:
                variants[(kind, "full-sequence apply")] = lambda f=full, p=params, x=batch, k=cache: f(p, x, k)
            if full_dense is not None and ablate:
                variants[(kind, FULL_DENSE)] = lambda f=full_dense, p=params, x=batch, k=cache: f(p, x, k)
            if full is not None and ablate:  # what `--host-allocator retain` removes from the goal's baseline
                variants[(kind, f"full-sequence apply, {RELEASED}")] = with_memory_released(
                    variants[(kind, "full-sequence apply")])
            for mode, ablated in ablations.items():
                if mode in CONTEXTS:
                    variants[(kind, mode)] = lambda s=ablated, r=reqs, x=CONTEXTS[mode]: _with(x, s.score, r)
                else:
                    variants[(kind, mode)] = lambda s=ablated, r=reqs: s.score(r)
        timings = interleaved(variants, rounds, before_each=setup, prime=True)
        faults = {}
        for key, fn in variants.items():
            if key in setup:
                setup[key]()
            faults[key] = faults_per_call(fn)
        for kind in models:
            assert caches[kind].stats.hits >= rounds * b, "the +reuse rows must hit the user-state cache"
        for (kind, mode), t in timings.items():
            rows.append(dict(n=n, c=c, b=b, model=kind, mode=mode, p50=t.wall_ms, p99=t.p99_wall_ms, cpu=t.cpu_ms,
                             cps=b * c / (t.wall_ms / 1e3),
                             x_naive=bench_ratio(timings, (kind, "naive apply"), (kind, mode)),
                             faults=faults[(kind, mode)][0], sys_ms=faults[(kind, mode)][1]))  # fmt: skip
        g = {m: ("gesr", m) for m in MODES}

        def ratio(timings: dict, num: tuple, den: tuple) -> object:  # "" where a model was left out (--models)
            return bench_ratio(timings, num, den) if num in timings and den in timings else ""

        ratios[(n, c, b)] = {
            "GESR scorer x full-sequence apply": ratio(timings, g["full-sequence apply"], g["scorer"]),
            "GESR +reuse x full-sequence apply": ratio(timings, g["full-sequence apply"], g["scorer+reuse"]),
            "GESR scorer x naive": ratio(timings, g["naive apply"], g["scorer"]),
            "GESR +reuse x naive": ratio(timings, g["naive apply"], g["scorer+reuse"]),
            "GESR +reuse x no reuse": ratio(timings, g["scorer"], g["scorer+reuse"]),
            "GESR / two-tower cand/s (scorer)": ratio(timings, ("two_tower", "scorer"), g["scorer"]),
            "GESR / two-tower cand/s (+reuse)": ratio(timings, ("two_tower", "scorer+reuse"), g["scorer+reuse"]),
            "two-tower scorer x naive": ratio(timings, ("two_tower", "naive apply"), ("two_tower", "scorer")),
            "two-tower +reuse x naive": ratio(timings, ("two_tower", "naive apply"), ("two_tower", "scorer+reuse")),
            "two-tower parse and pack / naive": ratio(timings, ("two_tower", "parse and pack only"),
                                                      ("two_tower", "naive apply")),  # fmt: skip
        }
        if "gesr" in models:
            full_flops, scorer_flops, score_flops = arithmetic(models["gesr"], presets["gesr"], b)
            ratios[(n, c, b)] |= {
                "FLOPs: full-sequence / scorer": f"{full_flops / scorer_flops:.2f}x",
                "FLOPs: full-sequence / score only (+reuse)": f"{full_flops / score_flops:.2f}x",
            }
        for mode in ABLATIONS if ablate else ():
            ratios[(n, c, b)][f"ablation: {mode} / scorer"] = ratio(timings, ("gesr", mode), g["scorer"])
        if ablate:
            released = ("gesr", f"full-sequence apply, {RELEASED}")
            ratios[(n, c, b)][f"ablation: full-sequence apply, {RELEASED} / full-sequence apply"] = ratio(
                timings, released, g["full-sequence apply"])
            ratios[(n, c, b)] |= {
                f"GESR scorer x {FULL_DENSE}": ratio(timings, ("gesr", FULL_DENSE), g["scorer"]),
                f"GESR +reuse x {FULL_DENSE}": ratio(timings, ("gesr", FULL_DENSE), g["scorer+reuse"]),
            }
        print(f"N={n} C={c} B={b}: " + ", ".join(f"{k[0]} {k[1]} {t.cpu_ms:.1f} ms CPU" for k, t in timings.items()),
              flush=True)  # fmt: skip
    return rows, ratios


def host_work(scorer: Scorer, reqs: list[dict]) -> dict:
    """What the Scorer does on the host before its first jitted call: validate each request, pack the arrays."""
    parsed = [scorer.parse(r, i) for i, r in enumerate(reqs)]
    rows = scorer.buckets.request_bucket(len(parsed))
    width = max(p.num_candidates for p in parsed)
    return pack_requests(parsed, scorer.schema, rows) | pack_candidates(parsed, scorer.schema, rows, width)[0]


def arithmetic(model: tuple, preset: str, b: int) -> tuple[float, float, float]:
    """XLA cost-analysis FLOPs of one call of B requests: full-sequence apply, encode + score, score alone.

    Counted on the dense "xla" attention: "xla_blocked" (the CPU default) runs the same formulas in a loop
    whose body the cost analysis counts once.

    The time ratios against the full-sequence model cannot exceed these FLOP ratios by much unless the
    full-sequence call runs further below the machine's peak than the Scorer does: the candidate-side work
    (projections, NRO cross attention, MLPG) is the same in both, and only the attention pairs differ,
    (N + C)^2 against N^2 + C*N. Exact C, no padding; the Scorer's blocks hold the same arithmetic.
    """
    schema, table, scorer, params, _, _, full, _ = model  # the dense-attention full-sequence model
    _, batch = requests_for(schema, table, schema.history_len, schema.num_candidates, b, seed=0)
    cfg = config_lib.load_config(preset, [f"data.history_len={schema.history_len}", DENSE])
    graphdef, cache = api.abstract_init(cfg, schema)[0], scorer.item_cache
    _, full_flops, _ = compiled_cost(full, params, batch, cache)
    _, encode_flops, _ = compiled_cost(lambda p, x: api.encode_request(graphdef, p, x), params, batch)
    state = jax.jit(lambda p, x: api.encode_request(graphdef, p, x))(params, batch)
    _, score_flops, _ = compiled_cost(
        lambda p, s, x, k: api.score(graphdef, p, s, x, item_cache=k), params, state, batch, cache
    )
    return full_flops, encode_flops + score_flops, score_flops


def _with(context, fn, *args):
    with context():
        return fn(*args)


def _flag(name: str, value: str | None) -> str:
    return f" --{name} {value}" if value else ""


def render(rows: list[dict], ratios: dict, info: dict, end: dict, args: argparse.Namespace, elapsed: float) -> str:
    lines = [
        "# Serving benchmark: GESR Scorer vs two-tower Scorer vs api.apply (cached and full-sequence)",
        "",
        machine_line(info, finished=end) + f" Command: `python experiments/bench_serving.py"
        f"{' --smoke' if args.smoke else ''} --repeats {args.repeats}{_flag('shapes', args.shapes)}"
        f"{_flag('cpus', args.cpus)}{_flag('models', args.models if len(args.presets) < 2 else None)}`"
        f" ({args.repeats} rounds); whole run "
        f"{elapsed:.0f} s.",
        "",
        METHOD_NOTE + " Here each sample follows one untimed call of the same row (`prime=True`): a server runs one "
        "model back to back (runs 1-9 of serving_cpu.md were unprimed).",
        "",
        "Models: `" + "` / `".join(args.presets.values()) + "` (random parameters), item cache on for every row. "
        f"Scorer buckets: requests {list(args.buckets.request_sizes)}, chunks {list(args.buckets.chunk_sizes)}. "
        "Latency per call of B requests (median wall, p99 wall, median CPU); cand/s = B*C/wall p50. "
        "`+reuse`: the same requests again, user states from the cache (only candidates are scored). "
        "`naive apply`: one `jax.jit(api.apply)` call of the exact [B, N] / [B, C] shape from ready arrays. "
        "`full-sequence apply`: the same GESR params with `model.hstu.scoring=full` (HSTU over the packed "
        "[history ; candidates] sequence, O((N+C)^2): the model before the request/candidate split), on the "
        "platform's default attention backend (on CPU `xla_blocked`, the dense formulas over blocks of examples); "
        f"`{FULL_DENSE}` (ablation shape only): the same on the dense `xla` backend, the CPU default before. "
        "`parse and pack only`: the Scorer's host work before its first jitted call (validating every request "
        "and packing its arrays), which `naive apply` skips. `FLOPs:` columns: XLA's cost analysis of one call "
        "(`arithmetic()` in the script), the ratio the time ratios would show at equal FLOP rates.",
        "",
        "",
        f"Scorer: `score_block={DEFAULT_SCORE_BLOCK}` candidates per block, 2 (request, block) units per step "
        "(serving/blocking.py), "
        f"one fused encode+score call per request group without the user cache. Ablations at N={rows[-1]['n']}, "
        f"C={rows[-1]['c']} (GESR, same rounds): " + "; ".join(f"`{m}`" for m in ABLATIONS) + " (each undoes "
        "one fix: blocking, the 2-unit steps, the head-major NRO layout, the split cached HSTU forward, the "
        "head-major value product of the HSTU attention forward, the NRO softmax without selects on its scores); "
        f"and `full-sequence apply` with `{RELEASED}` "
        "(the heap's free memory given back to the kernel before each call, so the call faults its temporaries "
        "in afresh as with glibc's defaults: what the machine line's host memory setting removes; the Scorer's "
        "blocked calls did not fault with glibc's defaults: 2 faults per call in run 8 of serving_cpu.md). "
        "`faults` / `sys ms`: minor page faults "
        "and system CPU of one extra call after the rounds (getrusage).",
        "",
        "| N | C | B | model | mode | wall p50 ms | wall p99 ms | CPU ms | cand/s | x naive apply (same model, CPU) "
        "| faults | sys ms |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        lines.append(
            f"| {r['n']} | {r['c']} | {r['b']} | {r['model']} | {r['mode']} | {r['p50']:.2f} | {r['p99']:.2f} | "
            f"{r['cpu']:.2f} | {r['cps']:,.0f} | {r['x_naive']} | {r['faults']:,.0f} | {r['sys_ms']:.0f} |"
        )
    names = list(dict.fromkeys(k for by_name in ratios.values() for k, v in by_name.items() if v != ""))
    lines += ["", "Ratios of CPU time from the same rounds (median, 25th-75th percentile):", "",
              "| N | C | B | " + " | ".join(names) + " |", "| --- " * (3 + len(names)) + "|"]  # fmt: skip
    for (n, c, b), by_name in ratios.items():
        lines.append(f"| {n} | {c} | {b} | " + " | ".join(f"{by_name.get(k, '')}" for k in names) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny shapes and models, 2 rounds (for tests)")
    parser.add_argument("--repeats", type=int, default=None, help="interleaved rounds (default 5; smoke 2)")
    parser.add_argument("--shapes", default=None, help="N:C pairs, e.g. 1024:2000 (default: the three above)")
    parser.add_argument("--out", default=None, help="markdown path (default experiments/results/serving_<device>.md)")
    parser.add_argument("--models", default="gesr,two_tower", help="which of gesr, two_tower to time (default both)")
    add_cpus_arg(parser)
    args = parser.parse_args(argv)
    start_process(args)
    args.repeats = args.repeats or (2 if args.smoke else 5)
    base = "synthetic_tiny" if args.smoke else "synthetic_base"
    chosen = [m.strip() for m in args.models.split(",") if m.strip()]
    if not chosen or not set(chosen) <= {"gesr", "two_tower"}:
        parser.error(f"--models takes gesr and/or two_tower, got {args.models!r}")
    args.presets = {m: base if m == "gesr" else f"{base}_two_tower" for m in chosen}
    args.buckets = Buckets((1, 16), (16, 64) if args.smoke else (256, 1024))
    info = machine_info()
    start = time.perf_counter()
    rows, ratios = [], {}
    shapes = [tuple(int(x) for x in pair.split(":")) for pair in args.shapes.split(",")] if args.shapes else (
        SMOKE_SHAPES if args.smoke else SHAPES)  # fmt: skip
    for n, c in shapes:
        shape_rows, shape_ratios = bench_shape(args.presets, n, c, args.repeats, args.buckets, (n, c) == shapes[-1])
        rows, ratios = rows + shape_rows, ratios | shape_ratios
    text = render(rows, ratios, info, machine_info(), args, time.perf_counter() - start)
    write_results(text, "serving", info, args.smoke, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Roofline table (issue 23 item 2): how much of the machine each train step and serving call uses.

    python experiments/bench_roofline.py --cpus 1        # the shapes below -> experiments/results/roofline_<platform>.md
    python experiments/bench_roofline.py --smoke         # tiny shapes, 2 rounds (tests)

Rows: the jitted train step (forward, backward, AdamW update) of each model kind (``gesr``, ``two_tower``,
``genrank``; presets ``synthetic_base``, ``synthetic_base_two_tower``, ``synthetic_genrank``, random parameters,
every history full), and GESR's serving pair ``encode_request`` (one request) and ``score`` (one chunk of
candidates against that state, item cache on; once as one call and once blocked as the Scorer runs it,
serving/blocking.py). Issue 23 item 4 (what GESR's train step costs beyond HSTU) adds five GESR train-step rows:
``before`` (the same model with the formulas the train-step work replaced, kept here in
:func:`before_train_fixes`, so before/after is a ratio of the same rounds), ``einsum projections`` (only the
projections' einsum form put back: the effect of layers/core.matmul_last_axis alone), ``dense attention (xla)`` (HSTU
attention on the dense backend instead of the CPU default ``xla_blocked``), ``HSTU off`` and ``HSTU, cross
attention and MLPG off`` (``model.hstu.enabled`` / ``model.cross.*`` / ``model.mlpg.enabled`` switched off: HMA
and the MoA tokens remain; what each part of the MoA costs beyond the two-tower). ``memory released`` runs the
GESR step itself with the heap's free memory given back before each call (the page faults that
``--host-allocator retain``, gesr_jax/host_memory.py, removes).
A second table splits the GESR train step's cost-analysis bytes and its profiled time by the source file of each
compiled HLO op (the stack frames XLA keeps in the op metadata; experiments/roofline_sources.py).

For each row, FLOPs and bytes come from XLA's compiled cost analysis (``jax.jit(f).lower(*args).compile()
.cost_analysis()``: "bytes accessed" sums every HLO op's operand and result bytes, so it over-counts what
reaches DRAM when ops fuse or hit cache; it is the model's traffic, not a measured one).

Two probes run in the same process and the same interleaved rounds (``bench_common.interleaved``):
* a 2048 x 2048 float32 matmul: the matmul peak (FLOP per CPU-second);
* a streaming triad ``a + s * b`` over 32 Mi float32 (384 MiB moved, the result written over ``a``): the
  streaming bandwidth.

Achieved rates are per CPU-second (process time, all threads) and per wall-second; the fractions of peak and
of bandwidth are medians of per-round ratios against the probes (CPU time), so load from other jobs on a
shared machine cancels. ``bound`` is the roofline ``min(peak, intensity * bandwidth)`` for the row's
arithmetic intensity (FLOP per byte), and names which of the two it is.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import pathlib
import re
import sys
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from bench_common import (  # noqa: E402
    METHOD_NOTE, add_cpus_arg, compiled_cost, interleaved, machine_info, patched,
    machine_line, start_process, ratio, with_memory_released, write_results,
)
from roofline_sources import ATTENTION_SOURCE, bytes_by_source, time_by_source  # noqa: E402

from gesr_jax import api  # noqa: E402
from gesr_jax import config as config_lib  # noqa: E402
from gesr_jax.data import datasets  # noqa: E402
from gesr_jax.layers import core as core_lib  # noqa: E402
from gesr_jax.layers import hstu as hstu_lib  # noqa: E402
from gesr_jax.serving import blocking  # noqa: E402
from gesr_jax.serving.scorer import DEFAULT_SCORE_BLOCK  # noqa: E402
from gesr_jax.train import step as step_lib  # noqa: E402

PRESETS = {"gesr": "synthetic_base", "two_tower": "synthetic_base_two_tower", "genrank": "synthetic_genrank"}


@dataclasses.dataclass(frozen=True)
class Shapes:
    train_batch: int
    train_history: int
    train_candidates: int
    serve_history: int
    serve_candidates: int
    matmul: int
    stream: int  # float32 elements per triad array


FULL = Shapes(32, 256, 64, 1024, 1024, 2048, 32 * 2**20)
SMOKE = Shapes(4, 16, 8, 32, 16, 256, 2**16)


@dataclasses.dataclass
class Kernel:
    """A compiled function, its arguments and its cost analysis."""

    call: Callable[[], Any]
    flops: float
    bytes: float
    hlo: str = ""  # the compiled program that runs
    cost_hlo: str = ""  # the program whose cost analysis gave flops and bytes (when not `hlo`)


def compiled(fn: Callable, *args: Any) -> Kernel:
    exe, flops, nbytes = compiled_cost(fn, *args)
    return Kernel(lambda: exe(*args), flops, nbytes, exe.as_text())


def _history_kv_before(layer: hstu_lib.HSTULayer, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Before ed67cfb: the last HSTU layer's history K/V came from the whole UVQK projection (u, q dropped)."""
    _, v, _, k = layer.project(x)
    return k, v


def _einsum_last_axis(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """Before layers/core.matmul_last_axis: Dense and the HSTU history K/V as ``einsum("...i,io->...o")``."""
    return jnp.einsum("...i,io->...o", x, kernel)


@contextlib.contextmanager
def einsum_projections():
    """Trace with the projections' einsum form (same values; tests/layers/test_core_matmul.py)."""
    with contextlib.ExitStack() as stack:
        for module in (core_lib, hstu_lib):
            stack.enter_context(patched(module, "matmul_last_axis", _einsum_last_axis))
        yield


@contextlib.contextmanager
def before_train_fixes():
    """Trace the model with the formulas issue 23's train-step work replaced (same numbers, tested in
    tests/models/test_gesr_train_numerics.py and tests/layers/test_core_matmul.py), for the ``before`` row."""
    with patched(hstu_lib.HSTULayer, "history_kv", _history_kv_before), einsum_projections():
        yield


# GESR train-step variants beyond the three model kinds: (row suffix, config overrides, the context it is traced in).
GESR_VARIANTS = {
    "before": ((), before_train_fixes),
    "einsum projections": ((), einsum_projections),
    "dense attention (xla)": (("model.hstu.attention_impl=xla",), contextlib.nullcontext),
    "HSTU off": (("model.hstu.enabled=false",), contextlib.nullcontext),
    "HSTU, cross attention and MLPG off": (
        ("model.hstu.enabled=false", "model.cross.ro=false", "model.cross.nro=false", "model.mlpg.enabled=false"),
        contextlib.nullcontext),
}  # fmt: skip


def _model(kind: str, n: int, c: int, batch: int, overrides: tuple[str, ...] = ()) -> tuple[Any, Any, Any, dict]:
    cfg = config_lib.load_config(
        PRESETS[kind], [f"data.history_len={n}", f"data.min_history={min(4, n)}", *overrides])
    schema = dataclasses.replace(datasets.schema_for(cfg.data), num_candidates=c)
    graphdef, params = api.init(cfg, 0, schema)
    data = api.example_batch(cfg, 1, batch, schema)
    data["history_len"][:] = n  # every history full
    data = {k: (np.where(v == 0, 1, v) if k.startswith("history_") and v.ndim == 2 else v) for k, v in data.items()}
    data["num_candidates"][:] = c
    for key in [k for k in data if k.startswith("cand_")]:
        data[key] = np.where(data[key] == 0, 1, data[key])
    return graphdef, params, schema, data


# The attention backend field of each model kind that has one: its train-step FLOPs and bytes are counted
# with the dense "xla" backend (see train_step).
ATTENTION_IMPL = {"gesr": "model.hstu.attention_impl", "genrank": "model.decoder.attention_impl"}


def train_step(kind: str, shapes: Shapes, overrides: tuple[str, ...] = ()) -> Kernel:
    """The jitted train step as the config runs it, with FLOPs and bytes counted on the dense "xla" attention.

    On CPU the default attention backend is "xla_blocked": the same formulas over blocks of examples under
    `lax.map`, whose loop body the cost analysis would count once. A step with no attention op (e.g. HSTU
    off) is counted as it runs, without compiling it a second time.
    """
    kernel = _train_step(kind, shapes, overrides)
    if kind not in ATTENTION_IMPL or any(o.startswith(ATTENTION_IMPL[kind] + "=") for o in overrides):
        return kernel
    if not bytes_by_source(kernel.hlo).get(ATTENTION_SOURCE):
        return kernel
    dense = _train_step(kind, shapes, (*overrides, f"{ATTENTION_IMPL[kind]}=xla"))
    return dataclasses.replace(kernel, flops=dense.flops, bytes=dense.bytes, cost_hlo=dense.hlo)


def _train_step(kind: str, shapes: Shapes, overrides: tuple[str, ...] = ()) -> Kernel:
    graphdef, params, schema, data = _model(
        kind, shapes.train_history, shapes.train_candidates, shapes.train_batch, overrides)
    tx = optax.adamw(1e-3)
    tasks = schema.tasks

    def step(p, s, b, key):
        def loss_fn(p):
            logits = api.apply(graphdef, p, b, key=key, train=True, validate=False)
            return step_lib.multitask_loss(logits, b, tasks, (1.0,) * len(tasks))[0]

        loss, grads = jax.value_and_grad(loss_fn)(p)
        updates, s = tx.update(grads, s, p)
        return optax.apply_updates(p, updates), s, loss

    return compiled(step, params, tx.init(params), data, jax.random.key(0))


def serving(shapes: Shapes) -> tuple[Kernel, Kernel, Kernel]:
    graphdef, params, schema, data = _model("gesr", shapes.serve_history, shapes.serve_candidates, 1)
    table = datasets.item_table(config_lib.load_config(PRESETS["gesr"]).data)
    cache = api.item_cache(graphdef, params, table)
    encode = compiled(lambda p, r: api.encode_request(graphdef, p, r), params, data)
    state = jax.jit(lambda p, r: api.encode_request(graphdef, p, r))(params, data)
    score = compiled(lambda p, s, x, k: api.score(graphdef, p, s, x, item_cache=k), params, state, data, cache)

    def probabilities(consts, s, x):  # the Scorer's score function: [T, R, W] float32
        logits = api.score(graphdef, consts[0], s, x, item_cache=consts[1])
        return jnp.stack([jax.nn.sigmoid(logits[t]) for t in schema.tasks]).astype(jnp.float32)

    run = blocking.blocked_score(probabilities, DEFAULT_SCORE_BLOCK, len(schema.tasks))
    cands = {k: v for k, v in data.items() if k.startswith("cand_")} | {"num_candidates": data["num_candidates"]}
    blocked = compiled(lambda p, s, x, k: run((p, k), s, x), params, state, cands, cache)
    return encode, score, dataclasses.replace(blocked, flops=score.flops, bytes=score.bytes)  # see the Goals line


def probes(shapes: Shapes) -> tuple[Kernel, Kernel]:
    key = jax.random.key(1)
    a, b = jax.random.normal(key, (2, shapes.matmul, shapes.matmul), jnp.float32)
    matmul = compiled(lambda x, y: x @ y, a, b)
    matmul = dataclasses.replace(matmul, flops=2.0 * shapes.matmul**3)  # the textbook count
    return matmul, _triad(shapes.stream)


def _triad(n: int) -> Kernel:
    """``x <- x + 1.5 y`` over n float32, the result written over x (donated).

    A fresh 128 MiB result per call would be a new ``mmap`` on CPU (above glibc's 32 MiB threshold), and
    its first-touch page faults, not memory, set the time: 5.6 GB per CPU-second against 42 with the
    buffer reused (2-core AMD EPYC box, 2026-12-07).
    """
    y = jnp.ones((n,), jnp.float32)
    x = [jnp.ones((n,), jnp.float32)]
    exe = jax.jit(lambda a, b: a + 1.5 * b, donate_argnums=0).lower(x[0], y).compile()

    def call() -> jax.Array:
        x[0] = exe(x[0], y)
        return x[0]

    return Kernel(call, flops=2.0 * n, bytes=3.0 * 4 * n, hlo=exe.as_text())  # two reads, one write


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, 2 rounds (for tests)")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds")
    parser.add_argument("--out", default=None, help="markdown path (default experiments/results/roofline_<platform>.md)")
    add_cpus_arg(parser)
    args = parser.parse_args(argv)
    start_process(args)
    shapes, rounds = (SMOKE, 2) if args.smoke else (FULL, args.rounds)
    info = machine_info()
    start = time.perf_counter()
    kernels: dict[str, Kernel] = {}
    for kind in PRESETS:
        kernels[f"train step {kind}"] = train_step(kind, shapes)
    for suffix, (overrides, context) in GESR_VARIANTS.items():
        with context():
            kernels[f"train step gesr, {suffix}"] = train_step("gesr", shapes, overrides)
    kernels["gesr encode_request"], kernels["gesr score"], kernels["gesr score, blocked (Scorer)"] = serving(shapes)
    step = kernels["train step gesr"]  # with the page faults the host allocator setting removes
    kernels["train step gesr, memory released"] = dataclasses.replace(step, call=with_memory_released(step.call))
    kernels["probe: matmul"], kernels["probe: stream"] = probes(shapes)
    print("compiled; timing", flush=True)
    timings = interleaved({name: k.call for name, k in kernels.items()}, rounds, prime=True)
    mm, st = kernels["probe: matmul"], kernels["probe: stream"]
    peak = mm.flops / (timings["probe: matmul"].cpu_ms / 1e3)  # FLOP per CPU-second
    bandwidth = st.bytes / (timings["probe: stream"].cpu_ms / 1e3)  # bytes per CPU-second
    lines = [
        "# Roofline: train steps and serving calls against a matmul peak and a streaming bandwidth",
        "",
        machine_line(info, finished=machine_info())
        + f" Command: `python experiments/bench_roofline.py{' --smoke' if args.smoke else ''}"
        f" --rounds {rounds}{' --cpus ' + args.cpus if args.cpus else ''}`;"
        f" whole run {time.perf_counter() - start:.0f} s.",
        "",
        METHOD_NOTE + " Here each sample follows one untimed call of the same row (`prime=True`), as in a training "
        "loop, which runs one program back to back: without it, a row's time depended on which row ran before.",
        "",
        f"Shapes: train steps B={shapes.train_batch}, N={shapes.train_history}, C={shapes.train_candidates} "
        f"(AdamW update included); serving B=1, N={shapes.serve_history}, one score chunk of "
        f"C={shapes.serve_candidates} with the item cache. Probes: {shapes.matmul}² float32 matmul, triad over "
        f"{shapes.stream:,} float32. Same-process peak **{peak / 1e9:.1f} GFLOP per CPU-second**, streaming "
        f"**{bandwidth / 1e9:.1f} GB per CPU-second** (medians); ridge point {peak / bandwidth:.1f} FLOP/byte.",
        "",
        "| row | GFLOP | MB accessed | FLOP/byte | wall ms | CPU ms | GFLOP/CPU-s | GFLOP/wall-s | GB/CPU-s | "
        "x matmul peak | x stream bandwidth | roofline bound (GFLOP/CPU-s) | x bound |",
        "| --- " * 13 + "|",
    ]
    fractions, beyond = {}, []
    for name, k in kernels.items():
        t = timings[name]
        # Fractions per round: (F / t) / (F_mm / t_mm) = F / F_mm * (t_mm / t), a ratio of the same round.
        f_peak = ratio(timings, "probe: matmul", name).scaled(k.flops / mm.flops)
        f_bw = ratio(timings, "probe: stream", name).scaled(k.bytes / st.bytes)
        intensity = k.flops / max(k.bytes, 1.0)
        bound = min(peak, intensity * bandwidth)
        which = "compute" if peak <= intensity * bandwidth else "memory"
        rate = k.flops / (t.cpu_ms / 1e3)
        fractions[name] = f_peak
        if rate > bound and not name.startswith("probe"):
            beyond.append(name)
        lines.append(
            f"| {name} | {k.flops / 1e9:.4g} | {k.bytes / 1e6:.4g} | {intensity:.2f} | {t.wall_ms:.2f} | "
            f"{t.cpu_ms:.2f} | {rate / 1e9:.2f} | {k.flops / (t.wall_ms / 1e3) / 1e9:.2f} | "
            f"{k.bytes / (t.cpu_ms / 1e3) / 1e9:.2f} | {f_peak:.3f} | {f_bw:.3f} | {bound / 1e9:.1f} ({which}) | "
            f"{rate / bound:.3f} |"
        )
    gesr = "train step gesr"
    step_ratios = [
        (f"{gesr}, before / {gesr} (CPU time)", ratio(timings, f"{gesr}, before", gesr)),
        (f"{gesr}, einsum projections / {gesr}", ratio(timings, f"{gesr}, einsum projections", gesr)),
        (f"{gesr}, dense attention (xla) / {gesr}", ratio(timings, f"{gesr}, dense attention (xla)", gesr)),
        (f"{gesr}, memory released / {gesr}", ratio(timings, f"{gesr}, memory released", gesr)),
        (f"{gesr} / train step two_tower", ratio(timings, gesr, "train step two_tower")),
        (f"{gesr}, HSTU off / train step two_tower", ratio(timings, f"{gesr}, HSTU off", "train step two_tower")),
        (f"{gesr}, HSTU, cross attention and MLPG off / train step two_tower",
         ratio(timings, f"{gesr}, HSTU, cross attention and MLPG off", "train step two_tower")),
        (f"{gesr} / {gesr}, HSTU off", ratio(timings, gesr, f"{gesr}, HSTU off")),
    ]  # fmt: skip
    lines += ["", "GESR train step (issue 23 item 4), ratios of CPU time from the same rounds:", "",
              "| ratio | median (25th-75th percentile) |", "| --- | --- |"]  # fmt: skip
    lines += [f"| {name} | {r} |" for name, r in step_ratios]
    step, off = kernels[gesr], kernels[f"{gesr}, HSTU off"]
    split, split_off = bytes_by_source(step.cost_hlo or step.hlo), bytes_by_source(off.cost_hlo or off.hlo)
    spent = time_by_source(step.hlo, step.call)
    if split:
        total, total_off = sum(split.values()), max(sum(split_off.values()), 1.0)
        total_ms = max(sum(spent.values()), 1e-9)
        lines += ["", f"Where the GESR train step's bytes and time come from, by the first of these source files in "
                  f"each compiled op's stack frames. Bytes: operand and result bytes of each op of the dense-attention "
                  f"program ({total / 1e6:.0f} MB in all; the cost analysis counts {step.bytes / 1e6:.0f} MB). "
                  f"Time: each executed op of the program that runs, from a `jax.profiler` trace of 5 calls after "
                  f"the timed rounds ({total_ms:.1f} ms of ops per call). Beside them the bytes of the `HSTU off` "
                  "row:", "",
                  f"| source | MB ({gesr}) | share | ms per call (profiled) | share | MB (HSTU off) | share |",
                  "| --- | --- | --- | --- | --- | --- | --- |"]
        for name in sorted(set(split) | set(spent), key=lambda n: -spent.get(n, 0.0)):
            b, ms, b_off = split.get(name, 0.0), spent.get(name, 0.0), split_off.get(name, 0.0)
            lines.append(f"| {name} | {b / 1e6:.1f} | {b / total:.1%} | {ms:.2f} | {ms / total_ms:.1%} | "
                         f"{b_off / 1e6:.1f} | {b_off / total_off:.1%} |")
    lines += [
        "",
        "FLOPs and bytes are XLA's compiled cost analysis of each row (for the probes, the textbook counts: "
        "2n³ and 3 x 4 bytes per element). `x matmul peak` and `x stream bandwidth`: median and 25th-75th "
        "percentile of the per-round ratios of the achieved rate to the probe's rate in the same round. "
        "`x bound`: achieved GFLOP/CPU-s over the roofline bound at the row's intensity (medians). The GESR and "
        "GenRank train-step rows run the platform's default attention backend (on CPU \"xla_blocked\": the dense "
        "formulas over blocks of examples, kernels/hstu_attention/backends/xla/blocked.py) and count FLOPs and "
        "bytes with the dense \"xla\" backend: the same formulas, whose loop body the cost analysis of the "
        "blocked program would count once. The count is low for the blocked program: in the dense one XLA shares "
        "the forward's scores with the backward's recomputation, while each block's backward recomputes them, "
        "so the blocked rows' true rate is somewhat above the one shown.",
        "",
        f"Goals (issue 23): `gesr score` reaches {fractions['gesr score']} of the matmul peak as one call and "
        f"{fractions['gesr score, blocked (Scorer)']} blocked as the Scorer runs it (goal >= 0.15x; the blocked "
        "row reuses the one-call row's FLOPs and bytes: the same arithmetic, and the cost analysis counts a loop "
        "body once); the "
        f"GESR train step {fractions['train step gesr']} (goal >= 0.20x; on the dense attention "
        f"{fractions['train step gesr, dense attention (xla)']}; the `before` row does more FLOPs for the same "
        "result, so compare it by time, in the ratio table).",
    ]
    g = kernels[gesr]
    g_bound = min(peak, g.flops / max(g.bytes, 1.0) * bandwidth)
    lines.append(
        f"The GESR train step's own roofline bound, at its cost-analysis intensity {g.flops / g.bytes:.2f} FLOP/byte, "
        f"is {g_bound / 1e9:.1f} GFLOP/CPU-s = {g_bound / peak:.3f}x the matmul peak"
        + ("." if g.flops / (timings[gesr].cpu_ms / 1e3) <= g_bound else
           ": the step runs faster than that, so those bytes do not all reach memory (see below).")
    )
    models = [n for n in kernels if not n.startswith("probe")]
    top = max(kernels[n].flops / max(kernels[n].bytes, 1.0) for n in models)
    if top < peak / bandwidth:
        lines.append(
            f"Every model row's cost-analysis intensity (at most {top:.2f} FLOP/byte) lies below the ridge point "
            f"({peak / bandwidth:.1f}), so by these bytes each is bound by bandwidth, not by the matmul peak."
        )
    if beyond:
        lines.append(
            f"{', '.join(beyond)} ran faster than that memory bound allows: cost-analysis bytes count every HLO "
            "op's operands and results, so traffic that stays in cache or inside a fusion is counted as if it "
            "went to memory; their real bound lies between the memory bound shown and the matmul peak."
        )
    lines.append(
        "Host memory (the machine line): `train step gesr, memory released` gives the heap's free memory back to "
        "the kernel before each call (`host_memory.release_free_memory`), so the step faults its temporary buffer "
        "in again, as every call did with glibc's defaults: the cost that `--host-allocator retain` removes."
    )
    lines.append(
        "The streaming probe measures bandwidth per CPU-second of this process; other jobs on a loaded machine "
        "contend for the same memory channels, so it (and every memory-bound row with it) falls with the load "
        "average named above."
    )
    write_results("\n".join(lines) + "\n", "roofline", info, args.smoke, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())

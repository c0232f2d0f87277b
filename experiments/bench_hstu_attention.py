"""Benchmark of target-aware HSTU attention: correctness first, then forward and forward+backward timings.

    python experiments/bench_hstu_attention.py            # on a GPU (or TPU) host: the issue's shapes, bf16
    python experiments/bench_hstu_attention.py --smoke    # on CPU: tiny shapes, Pallas backends interpreted
    python experiments/bench_hstu_attention.py --sweep --shapes 0,2   # time every tile candidate in config.py

For every shape and backend it (1) checks the output and the three gradients against the float32 reference
(bf16 tolerance), then (2) times the jitted forward and the jitted forward+backward, warm-up excluded, as the
median over repeats. On NVIDIA GPUs the times are device kernel times from CUPTI (jax's Mosaic GPU profiler,
summed over every kernel the step launches). Elsewhere every (backend, tiles) of a shape is timed in the same
interleaved rounds (`bench_common.interleaved`): the table gives median wall times, and the speed-ups over XLA
are medians of per-round CPU-time ratios, so load from other jobs on a shared machine hits both sides alike.
The table goes to experiments/results/hstu_attention_<device>.md (`_sweep.md` with --sweep) with the device
name, jax version and date, and is rewritten after every row: a run cut short keeps what it measured. A backend
that fails to compile or run becomes a row with its error instead of ending the run; `--budget-minutes` stops
starting new rows so that one call fits a time limit.

Shapes are (B, H, L, D, targets) with every row full (lengths = L) and the last `targets` tokens candidates.
The reference numbers are the issue's H100 measurements (2026-11-22) of the XLA reference and of Meta's
Triton HSTU kernel; the targets are fwd+bwd <= 2/3 of Meta's for L <= 1024, >= 4x faster than XLA
everywhere, and fwd <= 0.15 ms at (32, 4, 1024, 128, 0).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import os
import pathlib
import re
import statistics
import sys
import time

if "--smoke" in sys.argv and "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    # The Mosaic GPU interpreter deadlocks on a single host device (see mosaic_gpu_pipeline.interpret_params).
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4").strip()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from bench_common import interleaved, ratio  # noqa: E402
from kernels.hstu_attention import BlockSizes, attention_mask, hstu_attention, hstu_attention_reference  # noqa: E402
from kernels.hstu_attention.registry import BACKENDS  # noqa: E402

# Read from the backend declarations (kernels/hstu_attention/registry.py), the same table the API selects from.
DEFAULT_BLOCK_SIZES = {name: b.default_blocks for name, b in BACKENDS.items() if b.default_blocks is not None}
TUNING_CANDIDATES = {name: list(b.tuning) for name, b in BACKENDS.items() if b.default_blocks is not None}

Shape = tuple[int, int, int, int, int]  # (B, H, L, D, targets)

SHAPES: list[Shape] = [(32, 4, 1024, 128, 0), (32, 4, 1024, 128, 256), (128, 2, 512, 64, 128), (8, 4, 4096, 128, 0)]
SMOKE_SHAPES: list[Shape] = [(2, 2, 64, 16, 8)]
# Issue's H100 measurements, ms (fwd, fwd+bwd).
XLA_H100 = dict(zip(SHAPES, [(0.973, 1.952), (0.900, 1.887), (0.544, 1.009), (2.804, 6.148)]))
META_H100 = dict(zip(SHAPES, [(0.232, 0.758), (0.295, 0.724), (0.113, 1.023), (0.418, 2.416)]))
RESULTS = pathlib.Path(__file__).resolve().parent / "results"


def default_implementations(platform: str) -> list[str]:
    """"xla" and every backend declared for this platform and device (on CPU, all of them: --smoke)."""
    if platform not in ("gpu", "tpu"):
        return ["xla"] + [name for name in BACKENDS if name != "xla"]
    device = jax.devices()[0]
    ranked = sorted(BACKENDS.values(), key=lambda b: b.priority)
    return ["xla"] + [b.name for b in ranked if b.name != "xla" and b.runs_on(platform, device)]


def make_inputs(shape: Shape, seed: int = 0):
    batch, heads, seq_len, dim, targets = shape
    keys = jax.random.split(jax.random.key(seed), 4)
    q, k, v, d_out = (jax.random.normal(key, (batch, seq_len, heads, dim), jnp.bfloat16) for key in keys)
    lengths = jnp.full((batch,), seq_len, jnp.int32)
    num_targets = jnp.full((batch,), targets, jnp.int32)
    return q, k, v, lengths, num_targets, d_out


def build(implementation: str, shape: Shape, interpret: bool, blocks: BlockSizes | None = None):
    """(jitted forward, jitted forward+backward) of one backend; normalizer = L as a model would fix it."""
    normalizer = float(shape[2])

    def forward(q, k, v, lengths, num_targets):
        if implementation == "reference":
            f32 = [x.astype(jnp.float32) for x in (q, k, v)]
            return hstu_attention_reference(*f32, lengths, num_targets, normalizer=normalizer)
        return hstu_attention(
            q, k, v, lengths, num_targets, normalizer=normalizer, implementation=implementation,
            interpret=interpret, block_sizes=blocks,
        )

    def forward_backward(q, k, v, lengths, num_targets, d_out):
        out, vjp = jax.vjp(lambda q, k, v: forward(q, k, v, lengths, num_targets), q, k, v)
        return out, vjp(d_out.astype(out.dtype))

    return jax.jit(forward), jax.jit(forward_backward)


@functools.cache  # the table is re-rendered after every row; build each shape's L x L mask once
def forward_flops(shape: Shape) -> float:
    """FLOPs of the forward on the valid pairs only (q.k and p.v, 2 per multiply-add): what a kernel that
    skips every masked block must do, so TF/s from it compare kernels on useful work."""
    batch, heads, seq_len, dim, targets = shape
    row = attention_mask(jnp.array([seq_len]), jnp.array([targets]), seq_len)
    return 4.0 * batch * heads * dim * float(row.sum())


def check(fwd_bwd, inputs, reference) -> float:
    """Largest error of output and gradients, relative to each reference tensor's largest magnitude."""
    out, grads = fwd_bwd(*inputs)
    worst = 0.0
    for got, want in zip((out, *grads), reference):
        got = np.asarray(got, np.float32)
        want = np.asarray(want, np.float32)
        if not np.isfinite(got).all():
            return float("inf")
        worst = max(worst, float(np.abs(got - want).max() / max(np.abs(want).max(), 1e-6)))
    return worst


def _cupti_timer():
    try:
        from jax.experimental.mosaic.gpu import profiler
    except ImportError:
        return None
    return profiler.measure


def time_ms(fn, args, repeats: int) -> tuple[float, str]:
    """Median time of fn(*args) in ms, warm-up excluded, and which timer measured it."""
    jax.block_until_ready(fn(*args))
    jax.block_until_ready(fn(*args))
    measure = _cupti_timer() if jax.default_backend() == "gpu" else None
    if measure is not None:
        try:
            _, times = measure(fn, iterations=repeats)(*args)
            if times:
                return statistics.median(times), "CUPTI device kernel time"
        except Exception as err:  # CUPTI missing or busy: fall back to wall-clock, and say so in the table
            print(f"CUPTI timing unavailable ({err}); using wall-clock", file=sys.stderr)
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        samples.append((time.perf_counter() - start) * 1e3)
    return statistics.median(samples), "wall-clock around block_until_ready"


def device_slug(device) -> str:
    return re.sub(r"[^a-z0-9]+", "_", device.device_kind.lower()).strip("_") or device.platform


@dataclasses.dataclass
class Row:
    """One measured (or failed) combination of shape, backend and tiles."""

    shape: Shape
    impl: str
    blocks: str
    err: float | None = None  # correctness: max |err| / max |ref|
    error: str | None = None  # why the row has no numbers (exception, skipped)
    fwd_ms: float | None = None
    fwd_bwd_ms: float | None = None
    speedup: tuple[float, float] | None = None  # XLA time / this time (fwd, fwd+bwd), this run, same shape


def describe(impl: str, blocks: BlockSizes | None) -> str:
    if impl not in DEFAULT_BLOCK_SIZES:  # no tiles: "xla", and "xla_blocked" (examples per block chosen by size)
        return "-" if blocks is None else f"{blocks.examples} examples per block"
    b = blocks or DEFAULT_BLOCK_SIZES[impl]
    text = f"fwd {b.block_q}x{b.block_k}, bwd {b.block_q_bwd}x{b.block_k_bwd}"
    return text + (f", w{b.num_warps} s{b.num_stages}" if impl == "pallas_triton" else "")


def build_and_check(row: Row, interpret: bool, blocks, inputs, reference):
    """(fwd, fwd_bwd) compiled and checked for `row`, or None with the row's `error` set (never aborts the run)."""
    try:
        fwd, fwd_bwd = build(row.impl, row.shape, interpret, blocks)
        row.err = check(fwd_bwd, inputs, reference)
        return fwd, fwd_bwd
    except Exception as err:  # a backend failing to compile must not lose the other rows
        first_line = (str(err).strip().splitlines() or [""])[0][:160].replace("|", "/")
        row.error = f"{type(err).__name__}: {first_line}"
        return None


def time_rows(built: list[tuple[Row, object, object]], inputs, repeats: int) -> str:
    """Fill the times and XLA speed-ups of the rows of one shape; returns the timer used."""
    if not built:
        return "n/a"
    xla = next((i for i, (row, _, _) in enumerate(built) if row.impl == "xla"), None)
    if jax.default_backend() == "gpu" and _cupti_timer() is not None:
        timer = "n/a"
        for row, fwd, fwd_bwd in built:
            try:
                row.fwd_ms, timer = time_ms(fwd, inputs[:5], repeats)
                row.fwd_bwd_ms, timer = time_ms(fwd_bwd, inputs, repeats)
            except Exception as err:
                row.error = f"{type(err).__name__}: {(str(err).strip().splitlines() or [''])[0][:160]}"
        base = built[xla][0] if xla is not None else None
        for row, _, _ in built:
            if base is not None and base.fwd_ms and row.fwd_ms:
                row.speedup = (base.fwd_ms / row.fwd_ms, base.fwd_bwd_ms / row.fwd_bwd_ms)
        return timer
    variants = {}
    for i, (_, fwd, fwd_bwd) in enumerate(built):
        variants[f"{i}:fwd"] = functools.partial(fwd, *inputs[:5])
        variants[f"{i}:fwd_bwd"] = functools.partial(fwd_bwd, *inputs)
    timings = interleaved(variants, rounds=repeats, min_call_ms=0.0)
    # CPU time is what a shared CPU host measures fairly; an accelerator's work is not on this process's clock.
    clock = "cpu" if jax.default_backend() == "cpu" else "wall"
    for i, (row, _, _) in enumerate(built):
        row.fwd_ms, row.fwd_bwd_ms = timings[f"{i}:fwd"].wall_ms, timings[f"{i}:fwd_bwd"].wall_ms
        if xla is not None:
            row.speedup = tuple(ratio(timings, f"{xla}:{kind}", f"{i}:{kind}", clock=clock).median
                                for kind in ("fwd", "fwd_bwd"))
    return f"wall-clock, interleaved rounds (bench_common); speed-ups are medians of per-round {clock}-time ratios"


def verdict(row: Row, smoke: bool) -> str:
    if smoke or row.impl == "xla" or row.speedup is None or row.fwd_ms is None:
        return "-"
    goals = [row.speedup[1] >= 4 and row.speedup[0] >= 4]
    meta = META_H100.get(row.shape)
    if meta and row.shape[2] <= 1024:
        goals.append(row.fwd_bwd_ms <= 2 / 3 * meta[1])
    if row.shape == (32, 4, 1024, 128, 0):
        goals.append(row.fwd_ms <= 0.15)
    return "met" if all(goals) else "missed"


def render(rows: list[Row], device, timer: str, smoke: bool, sweep: bool, tolerance: float) -> str:
    title = "HSTU attention block-size sweep" if sweep else "HSTU attention benchmark"
    lines = [
        f"# {title}{' (smoke: tiny shapes, interpreted Pallas, not a measurement)' if smoke else ''}",
        "",
        f"- device: {device.device_kind} ({device.platform}), jax {jax.__version__}, "
        f"date {datetime.date.today().isoformat()}",
        f"- timer: {timer}; median, warm-up excluded; bf16 inputs; lengths = L; normalizer = L",
        f"- correctness: max |err| / max |ref| over output and dq, dk, dv vs the float32 reference "
        f"(pass <= {tolerance})",
        "- fwd TF/s counts the valid (unmasked) pairs only: 4 * B * H * D * pairs / fwd time",
        "",
        "| (B, H, L, D, targets) | backend | tiles | check | fwd ms | fwd+bwd ms | fwd vs XLA | fwd+bwd vs XLA "
        "| fwd+bwd / Meta | fwd TF/s | targets |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        head = f"| {row.shape} | {row.impl} | {row.blocks} |"
        if row.error is not None or row.fwd_ms is None:
            lines.append(f"{head} {row.error or 'not timed'} | - | - | - | - | - | - | - |")
            continue
        ok = "ok" if row.err <= tolerance else f"FAIL {row.err:.2e}"
        speed_f = f"{row.speedup[0]:.2f}x" if row.speedup else "-"
        speed_fb = f"{row.speedup[1]:.2f}x" if row.speedup else "-"
        meta = META_H100.get(row.shape)
        vs_meta = f"{row.fwd_bwd_ms / meta[1]:.2f}" if meta and not smoke else "-"
        tflops = forward_flops(row.shape) / (row.fwd_ms * 1e-3) / 1e12
        lines.append(f"{head} {ok} | {row.fwd_ms:.3f} | {row.fwd_bwd_ms:.3f} | {speed_f} | {speed_fb} "
                     f"| {vs_meta} | {tflops:.1f} | {verdict(row, smoke)} |")
    if sweep:
        lines += ["", "Fastest passing tiles per shape and backend (fwd+bwd):", ""]
        for (shape, impl), group in _groups(rows).items():
            passing = [r for r in group if r.error is None and r.err <= tolerance]
            if impl != "xla" and passing:
                best = min(passing, key=lambda r: r.fwd_bwd_ms)
                lines.append(f"- {shape} {impl}: {best.blocks} ({best.fwd_ms:.3f} / {best.fwd_bwd_ms:.3f} ms)")
    lines += ["", "Issue's H100 reference points (ms, fwd / fwd+bwd):", ""]
    for shape in SHAPES:
        lines.append(f"- {shape}: XLA {XLA_H100[shape][0]} / {XLA_H100[shape][1]}, "
                     f"Meta Triton {META_H100[shape][0]} / {META_H100[shape][1]}")
    return "\n".join(lines) + "\n"


def _groups(rows: list[Row]) -> dict[tuple[Shape, str], list[Row]]:
    groups: dict[tuple[Shape, str], list[Row]] = {}
    for row in rows:
        groups.setdefault((row.shape, row.impl), []).append(row)
    return groups


def parse_shapes(text: str | None, smoke: bool) -> list[Shape]:
    """--shapes: comma-separated indices into SHAPES (e.g. "0,2"); default all (SMOKE_SHAPES with --smoke)."""
    pool = SMOKE_SHAPES if smoke else SHAPES
    if not text:
        return pool
    try:
        return [pool[int(index)] for index in text.split(",")]
    except (ValueError, IndexError):
        raise SystemExit(f"--shapes: expected comma-separated indices in 0..{len(pool) - 1}, got {text!r}")


def main(argv: list[str] | None = None) -> pathlib.Path:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, Pallas in interpret mode (CPU)")
    parser.add_argument("--impl", default=None, help="comma-separated backends (default: all for the platform)")
    parser.add_argument("--shapes", default=None, help="comma-separated indices into SHAPES (default: all)")
    parser.add_argument("--sweep", action="store_true", help="time every TUNING_CANDIDATES tile set of each Pallas backend")
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats per measurement")
    parser.add_argument("--budget-minutes", type=float, default=None,
                        help="stop starting new rows after this long (they are listed as skipped)")
    parser.add_argument("--out", type=pathlib.Path, default=None, help="markdown output path")
    args = parser.parse_args(argv)

    device = jax.devices()[0]
    shapes = parse_shapes(args.shapes, args.smoke)
    interpret = args.smoke
    repeats = args.repeats or (2 if args.smoke else 50)
    impls = args.impl.split(",") if args.impl else default_implementations(jax.default_backend())
    unknown = sorted(set(impls) - set(BACKENDS))
    if unknown:
        raise SystemExit(f"--impl: unknown backend(s) {unknown}; known: {', '.join(BACKENDS)}")
    impls = (["xla"] if "xla" in impls else []) + [i for i in impls if i != "xla"]
    tolerance = 3e-2
    suffix = ("_sweep" if args.sweep else "") + ("_smoke" if args.smoke else "")
    out = args.out or RESULTS / f"hstu_attention_{device_slug(device)}{suffix}.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    deadline = None if args.budget_minutes is None else time.monotonic() + 60 * args.budget_minutes

    rows: list[Row] = []
    timer = "n/a"
    for shape in shapes:
        inputs = make_inputs(shape)
        _, ref_fwd_bwd = build("reference", shape, False)
        ref_out, ref_grads = ref_fwd_bwd(*inputs)
        reference = [np.asarray(x, np.float32) for x in (ref_out, *ref_grads)]
        del ref_out, ref_grads
        built, shape_rows = [], []
        for impl in impls:
            candidates = TUNING_CANDIDATES.get(impl, [None]) if args.sweep else [None]
            for blocks in candidates:
                row = Row(shape, impl, describe(impl, blocks))
                shape_rows.append(row)
                if deadline is not None and time.monotonic() > deadline:
                    row.error = "skipped: --budget-minutes reached"
                    continue
                compiled = build_and_check(row, interpret, blocks, inputs, reference)
                if compiled is not None:
                    built.append((row, *compiled))
        used = time_rows(built, inputs, repeats)
        timer = timer if used == "n/a" else used
        rows += shape_rows
        for row in shape_rows:
            status = row.error or f"err {row.err:.2e}  fwd {row.fwd_ms:8.3f} ms  fwd+bwd {row.fwd_bwd_ms:8.3f} ms"
            print(f"{shape} {row.impl:18s} [{row.blocks}] {status}", flush=True)
        # Rewritten after every shape, so a run cut short still leaves its table.
        out.write_text(render(rows, device, timer, args.smoke, args.sweep, tolerance))
    print(f"wrote {out}")
    failures = [(r.shape, r.impl, r.blocks) for r in rows if r.error is None and r.err > tolerance]
    if failures:
        raise SystemExit(f"correctness check failed for {failures}")
    # A sweep candidate a backend rejects is information; a default configuration that fails is a bug.
    broken = [(r.shape, r.impl, r.error) for r in rows if r.error and not args.sweep and not r.error.startswith("skipped")]
    if broken:
        raise SystemExit(f"backends failed to run: {broken}")
    return out


if __name__ == "__main__":
    main()

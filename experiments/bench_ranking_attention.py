"""Benchmark of the ranking-attention features: softmax + ALiBi, and the cached-prefix mode.

    python experiments/bench_ranking_attention.py            # GPU/TPU host: the shapes below, bf16
    python experiments/bench_ranking_attention.py --smoke    # CPU: tiny shapes, Pallas backends interpreted

Table 1, softmax + ALiBi on the target-aware mask, at the four (B, H, L, D, targets) of bench_hstu_attention.py: every
backend that declares softmax with the ALiBi bias (`kernels/hstu_attention/registry.py`), beside
`jax.nn.dot_product_attention(implementation="cudnn")` given the same boolean mask and the ALiBi bias as a dense
[B, H, L, L] tensor (cuDNN needs one; on CPU the "xla" implementation of dot_product_attention stands in).
Table 2, cached prefix at (B, N, C) = (1, 1024, 2048), (32, 1024, 512), (32, 256, 64) with H = 4, D = 128,
softmax + ALiBi: `hstu_attention_cached` (O(C * N)) beside the full-sequence call on [history ; candidates]
(L = N + C, targets = C) that it replaces. Each row is checked against the float32 reference forward first.
Times: forward and forward+backward. On an NVIDIA GPU with CUPTI, device kernel time per row (median of repeats,
as in bench_hstu_attention.py). Elsewhere every row of a shape, forward and forward+backward, is timed in the same
interleaved rounds (``bench_common.interleaved``: rotating order, one untimed compile call each): the table gives
median wall and CPU (process) time per call, and each row's time relative to the shape's first row (table 1: the
first backend; table 2: the "xla cached" row) as the median of per-round CPU-time ratios (wall-time ratios off
CPU), so load from other jobs hits every row of a round alike. The table goes to
experiments/results/ranking_attention_<device>.md with the machine, its load average, jax version and date.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import os
import pathlib
import sys

if "--smoke" in sys.argv and "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4").strip()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import bench_hstu_attention as hb  # noqa: E402
from bench_common import METHOD_NOTE, interleaved, machine_info, machine_line, ratio  # noqa: E402
from kernels.hstu_attention import (  # noqa: E402
    attention_mask,
    geometric_alibi_slopes,
    hstu_attention,
    hstu_attention_cached,
    hstu_attention_cached_reference,
    hstu_attention_reference,
)
from kernels.hstu_attention.base import Request  # noqa: E402
from kernels.hstu_attention.registry import BACKENDS  # noqa: E402

SOFTMAX_SHAPES = hb.SHAPES  # the four shapes of bench_hstu_attention.py
SMOKE_SOFTMAX = [(2, 2, 64, 16, 8)]
CACHED_SHAPES = [(1, 1024, 2048), (32, 1024, 512), (32, 256, 64)]  # (B, N, C)
SMOKE_CACHED = [(2, 32, 16)]
HEADS, DIM = 4, 128
TOLERANCE = 3e-2


def _alibi_bias(lengths, targets, seq_len, slopes):
    hist = (lengths - targets)[:, None, None]
    pos = jnp.arange(seq_len)
    dist = (jnp.minimum(pos[None, :, None], hist) - jnp.minimum(pos[None, None, :], hist)).astype(jnp.float32)
    return -slopes[None, :, None, None] * dist[:, None]


def _compiled(fwd, args, diff_argnums):
    """(jitted forward, jitted value_and_grad of its float32 sum)."""
    loss = lambda *a: jnp.sum(fwd(*a).astype(jnp.float32))
    return jax.jit(fwd), jax.jit(jax.value_and_grad(loss, argnums=diff_argnums))


def _err(got, want) -> float:
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    if not np.isfinite(got).all():
        return float("inf")
    return float(np.abs(got - want).max() / max(np.abs(want).max(), 1e-6))


def _supports(name, mode, smoke):
    request = Request(mode, "bfloat16", "softmax", frozenset({"alibi"}), DIM, DIM)
    backend = BACKENDS[name]
    if backend.unsupported_reason(request) is not None:
        return False
    return smoke or backend.runs_on(jax.default_backend(), jax.devices()[0]) or name == "xla"


def softmax_rows(shape, smoke):
    batch, heads, seq_len, dim, targets = shape
    q, k, v, lengths, num_targets, _ = hb.make_inputs(shape)
    slopes = geometric_alibi_slopes(heads)
    want = hstu_attention_reference(*(x.astype(jnp.float32) for x in (q, k, v)), lengths, num_targets,
                                    score_fn="softmax", alibi_slopes=slopes)
    rows = []
    for name in BACKENDS:
        if not _supports(name, "full", smoke):
            continue
        fwd = lambda q, k, v, name=name: hstu_attention(q, k, v, lengths, num_targets, score_fn="softmax",
                                                        alibi_slopes=slopes, implementation=name, interpret=smoke)
        rows.append(_row(shape, name, fwd, (q, k, v), want))
    mask = attention_mask(lengths, num_targets, seq_len)[:, None]
    bias = _alibi_bias(lengths, num_targets, seq_len, slopes).astype(q.dtype)
    impl = "cudnn" if jax.default_backend() == "gpu" else "xla"
    dpa = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, bias=bias, mask=mask, implementation=impl)
    rows.append(_row(shape, f"dot_product_attention[{impl}], dense bias", dpa, (q, k, v), want))
    return rows


def cached_rows(shape, smoke):
    batch, n, c = shape
    heads, dim = (2, 16) if smoke else (HEADS, DIM)
    keys = jax.random.split(jax.random.key(0), 5)
    q, k, v = (jax.random.normal(keys[i], (batch, c, heads, dim), jnp.bfloat16) for i in range(3))
    kp, vp = (jax.random.normal(keys[i], (batch, n, heads, dim), jnp.bfloat16) for i in (3, 4))
    plen, nq = jnp.full((batch,), n, jnp.int32), jnp.full((batch,), c, jnp.int32)
    slopes = geometric_alibi_slopes(heads)
    kw = dict(score_fn="softmax", alibi_slopes=slopes)
    want = hstu_attention_cached_reference(*(x.astype(jnp.float32) for x in (q, k, v, kp, vp)), plen, nq, **kw)
    label = (batch, n, c)
    rows = []
    for name in BACKENDS:
        if not _supports(name, "cached", smoke):
            continue
        fwd = lambda q, k, v, kp, vp, name=name: hstu_attention_cached(q, k, v, kp, vp, plen, nq, implementation=name,
                                                                       interpret=smoke, **kw)
        rows.append(_row(label, f"{name} cached", fwd, (q, k, v, kp, vp), want))
    for name in BACKENDS:
        if not _supports(name, "full", smoke):
            continue

        def full(q, k, v, kp, vp, name=name):
            cat = lambda a, b: jnp.concatenate([a, b], axis=1)  # every prefix is full: [history ; candidates]
            out = hstu_attention(cat(kp, q), cat(kp, k), cat(vp, v), plen + nq, nq, implementation=name,
                                 interpret=smoke, **kw)
            return out[:, n:]

        rows.append(_row(label, f"{name} full L=N+C", full, (q, k, v, kp, vp), want))
    return rows


def _row(shape, label, fwd, args, want):
    """A row's check, and its compiled calls for :func:`time_rows` (None when it failed)."""
    try:
        err = _err(jax.jit(fwd)(*args), want)
        fwd_c, fwd_bwd_c = _compiled(fwd, args, tuple(range(len(args))))
        row = [shape, label, "ok" if err <= TOLERANCE else f"FAIL {err:.2e}", "-", "-", "-", "-", "-"]
        return row, (fwd_c, fwd_bwd_c, args)
    except Exception as err:  # a failing backend becomes a row, not a lost run
        first = (str(err).strip().splitlines() or [""])[0][:160].replace("|", "/")
        return [shape, label, f"{type(err).__name__}: {first}", "-", "-", "-", "-", "-"], None


def time_rows(built, repeats: int) -> str:
    """Fill the time columns of one shape's rows (``(row, calls or None)`` pairs); returns the timer used."""
    ok = [(row, calls) for row, calls in built if calls is not None]
    if not ok:
        return "n/a"
    if jax.default_backend() == "gpu" and hb._cupti_timer() is not None:  # device kernel time, row by row
        timer = "n/a"
        for row, (fwd, fwd_bwd, args) in ok:
            try:
                fwd_ms, timer = hb.time_ms(fwd, args, repeats)
                fwd_bwd_ms, timer = hb.time_ms(fwd_bwd, args, repeats)
                row[3:5] = f"{fwd_ms:.3f}", f"{fwd_bwd_ms:.3f}"
            except Exception as err:
                row[2] = f"{type(err).__name__}: {(str(err).strip().splitlines() or [''])[0][:160]}"
        return timer
    variants = {}
    for i, (_, (fwd, fwd_bwd, args)) in enumerate(ok):
        variants[f"{i}:fwd"] = functools.partial(fwd, *args)
        variants[f"{i}:fwd_bwd"] = functools.partial(fwd_bwd, *args)
    timings = interleaved(variants, rounds=repeats, min_call_ms=0.0)
    # CPU time is what a shared CPU host measures fairly; an accelerator's work is not on this process's clock.
    clock = "cpu" if jax.default_backend() == "cpu" else "wall"
    for i, (row, _) in enumerate(ok):
        f, fb = timings[f"{i}:fwd"], timings[f"{i}:fwd_bwd"]
        row[3:7] = f"{f.wall_ms:.3f}", f"{fb.wall_ms:.3f}", f"{f.cpu_ms:.3f}", f"{fb.cpu_ms:.3f}"
        row[7] = f"{ratio(timings, f'{i}:fwd_bwd', '0:fwd_bwd', clock=clock)}"
    return f"interleaved rounds; relative times are medians of per-round {clock}-time ratios"


def render(softmax, cached, machine, smoke, timer) -> str:
    head = ("| shape | call | check | fwd ms | fwd+bwd ms | fwd CPU ms | fwd+bwd CPU ms | fwd+bwd x first row |\n"
            "|---|---|---|---|---|---|---|---|")
    lines = [
        f"# Ranking attention benchmark{' (smoke: tiny shapes, interpreted Pallas, not a measurement)' if smoke else ''}",
        "",
        f"- {machine}",
        f"- bf16 inputs, softmax + ALiBi (geometric slopes), full rows; check: forward max |err| / max |ref| "
        f"vs the float32 reference (pass <= {TOLERANCE}); timer: {timer}",
        f"- {METHOD_NOTE}",
        "", "## Softmax + ALiBi, (B, H, L, D, targets)", "", head,
        *[f"| {' | '.join(map(str, r))} |" for r in softmax],
        "", f"## Cached prefix, (B, N, C), H = {2 if smoke else HEADS}, D = {16 if smoke else DIM}", "", head,
        *[f"| {' | '.join(map(str, r))} |" for r in cached],
    ]
    return "\n".join(lines) + "\n"


def main(argv=None) -> pathlib.Path:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, Pallas in interpret mode (CPU)")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--out", type=pathlib.Path, default=None)
    args = parser.parse_args(argv)
    device = jax.devices()[0]
    info = machine_info()
    repeats = args.repeats or (2 if args.smoke else 20)
    out = args.out or hb.RESULTS / f"ranking_attention_{hb.device_slug(device)}{'_smoke' if args.smoke else ''}.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    softmax, cached, timer = [], [], "n/a"

    def machine() -> str:  # device and load average at the start and now: the file is rewritten after each shape
        return f"device: {device.device_kind} ({device.platform}), date {datetime.date.today().isoformat()}. " + \
            machine_line(info, finished=machine_info())

    for shape in SMOKE_SOFTMAX if args.smoke else SOFTMAX_SHAPES:
        built = softmax_rows(shape, args.smoke)
        timer = time_rows(built, repeats)
        softmax += [row for row, _ in built]
        out.write_text(render(softmax, cached, machine(), args.smoke, timer))
    for shape in SMOKE_CACHED if args.smoke else CACHED_SHAPES:
        built = cached_rows(shape, args.smoke)
        timer = time_rows(built, repeats)
        cached += [row for row, _ in built]
        out.write_text(render(softmax, cached, machine(), args.smoke, timer))
    print(out.read_text())
    return out


if __name__ == "__main__":
    main()

"""GenRank efficiency (issue 13): action-oriented vs interleaved tokens, beside GESR and the two-tower.

    python experiments/bench_genrank.py                  # N in {50, 200}
    python experiments/bench_genrank.py --smoke          # tiny, 2 repeats (tests)

For each history length N, one process times on the same machine (ratios are computed inside this run):
* train step: ``jax.jit(value_and_grad(loss))`` + AdamW update of one batch (B = 64 requests, C = 16
  candidates), median over the repeats after one untimed compile call;
* serving latency: one request (B = 1, C = 16): ``encode_request`` + ``score``, jitted, median.
Models: ``synthetic_genrank`` (action-oriented), ``synthetic_genrank_interleaved``, ``synthetic_base`` (GESR)
and ``synthetic_base_two_tower``, random parameters, every history full. The paper's claim (spec §3.3): the
action-oriented layout halves the sequence, cutting attention cost ~75 % and linear-projection cost ~50 %;
the table reports the measured step-time and latency ratios interleaved / action-oriented next to it.
Writes experiments/results/genrank_efficiency_<platform>.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import pathlib
import platform
import statistics
import sys
import time

import jax
import numpy as np
import optax

from gesr_jax import api
from gesr_jax import config as config_lib
from gesr_jax.data import datasets
from gesr_jax.train import step as step_lib

MODELS = {
    "GenRank (action-oriented)": "synthetic_genrank",
    "GenRank (interleaved)": "synthetic_genrank_interleaved",
    "GESR": "synthetic_base",
    "two-tower": "synthetic_base_two_tower",
}


def _median_ms(fn, repeats: int) -> float:
    jax.block_until_ready(fn())  # compile
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def bench(preset: str, n: int, batch: int, cands: int, repeats: int) -> dict[str, float]:
    cfg = config_lib.load_config(preset, [f"data.history_len={n}", f"data.min_history={min(4, n)}"])
    schema = dataclasses.replace(datasets.schema_for(cfg.data), num_candidates=cands)
    graphdef, params = api.init(cfg, 0, schema)
    data = api.example_batch(cfg, 1, batch, schema)
    data["history_len"][:] = n  # every history full
    data = {k: v for k, v in data.items()}
    data = {**data, **{k: np.where(v == 0, 1, v) for k, v in data.items() if k.startswith("history_") and v.ndim == 2}}
    tasks = schema.tasks
    tx = optax.adamw(1e-3)
    opt_state = tx.init(params)

    def loss_fn(p, b, key):
        logits = api.apply(graphdef, p, b, key=key, train=True, validate=False)
        return step_lib.multitask_loss(logits, b, tasks, (1.0,) * len(tasks))[0]

    @jax.jit
    def train_step(p, s, b, key):
        loss, grads = jax.value_and_grad(loss_fn)(p, b, key)
        updates, s = tx.update(grads, s, p)
        return optax.apply_updates(p, updates), s, loss

    key = jax.random.key(0)
    step_ms = _median_ms(lambda: train_step(params, opt_state, data, key)[2], repeats)
    one = {k: v[:1] for k, v in data.items()}

    @jax.jit
    def serve(p, b):
        state = api.encode_request(graphdef, p, b)
        return api.score(graphdef, p, state, b)

    latency_ms = _median_ms(lambda: serve(params, one), repeats)
    return {"train_step_ms": step_ms, "latency_ms": latency_ms, "params": api.num_params(params)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny shapes and 2 repeats (for tests)")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--out", default=None, help="output markdown path")
    args = parser.parse_args(argv)
    lengths, batch, repeats = ((8,), 4, 2) if args.smoke else ((50, 200), 64, args.repeats)
    start = time.perf_counter()
    rows = []
    for n in lengths:
        for label, preset in MODELS.items():
            r = bench(preset, n, batch, 16, repeats)
            rows.append({"n": n, "model": label, **r})
            print(f"N={n} {label}: step {r['train_step_ms']:.1f} ms, latency {r['latency_ms']:.2f} ms", flush=True)
    device = jax.devices()[0]
    lines = [
        "# GenRank efficiency: action-oriented vs interleaved tokens",
        "",
        f"Machine: {jax.default_backend()} ({device.device_kind}), {platform.processor() or platform.machine()}, "
        f"jax {jax.__version__}, {datetime.date.today()}; command `python experiments/bench_genrank.py"
        f"{' --smoke' if args.smoke else ''}`; whole run {time.perf_counter() - start:.0f} s. Random parameters; "
        f"train step B={batch}, C=16; latency B=1, C=16; medians of {repeats} after a compile call.",
        "",
        "| N | model | params | train step (ms) | serving latency per request (ms) |",
        "| --- | --- | --- | --- | --- |",
    ]
    lines += [f"| {r['n']} | {r['model']} | {r['params']:,} | {r['train_step_ms']:.2f} | {r['latency_ms']:.3f} |"
              for r in rows]  # fmt: skip
    lines += ["", "Ratios inside this run (the paper: attention cost −75 %, linear projections −50 %):", "",
              "| N | interleaved / action-oriented train step | interleaved / action-oriented latency | "
              "GenRank (action) / GESR train step |", "| --- | --- | --- | --- |"]  # fmt: skip
    for n in lengths:
        by = {r["model"]: r for r in rows if r["n"] == n}
        a, i, g = by["GenRank (action-oriented)"], by["GenRank (interleaved)"], by["GESR"]
        lines.append(f"| {n} | {i['train_step_ms'] / a['train_step_ms']:.2f} | {i['latency_ms'] / a['latency_ms']:.2f} "
                     f"| {a['train_step_ms'] / g['train_step_ms']:.2f} |")  # fmt: skip
    out = pathlib.Path(args.out or f"experiments/results/genrank_efficiency_{jax.default_backend()}.md")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

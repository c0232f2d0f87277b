"""GenRank efficiency (issue 13): action-oriented vs interleaved tokens, beside GESR and the two-tower.

    python experiments/bench_genrank.py                  # N in {50, 200}
    python experiments/bench_genrank.py --smoke          # tiny, 2 repeats (tests)

For each history length N, one process times on the same machine, every variant of that N interleaved
round by round (``bench_common.interleaved``: one untimed compile call each, then each variant once per round):
* train step: ``jax.jit(value_and_grad(loss))`` + AdamW update of one batch (B = 64 requests, C = 16
  candidates);
* serving latency: one request (B = 1, C = 16): ``encode_request`` + ``score``, jitted.
Each gets its median wall and CPU (process) time; the ratios are medians of per-round CPU-time ratios with
their 25th-75th percentile spread.
Models: ``synthetic_genrank`` (action-oriented), ``synthetic_genrank_interleaved``, ``synthetic_base`` (GESR)
and ``synthetic_base_two_tower``, random parameters, every history full. The paper's claim (spec §3.3): the
action-oriented layout halves the sequence, cutting attention cost ~75 % and linear-projection cost ~50 %;
the table reports the measured step-time and latency ratios interleaved / action-oriented next to it.
Writes experiments/results/genrank_efficiency_<platform>.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import pathlib
import sys
import time
from collections.abc import Callable

import jax
import numpy as np
import optax

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from bench_common import (  # noqa: E402
    METHOD_NOTE, add_cpus_arg, interleaved, machine_info, machine_line, start_process, ratio,
)

from gesr_jax import api  # noqa: E402
from gesr_jax import config as config_lib  # noqa: E402
from gesr_jax.data import datasets  # noqa: E402
from gesr_jax.train import step as step_lib  # noqa: E402

MODELS = {
    "GenRank (action-oriented)": "synthetic_genrank",
    "GenRank (interleaved)": "synthetic_genrank_interleaved",
    "GESR": "synthetic_base",
    "two-tower": "synthetic_base_two_tower",
}


def variants(preset: str, n: int, batch: int, cands: int) -> tuple[Callable, Callable, int]:
    """(train step, one-request serving call, parameter count) of one model, ready to time."""
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
    one = {k: v[:1] for k, v in data.items()}

    @jax.jit
    def serve(p, b):
        state = api.encode_request(graphdef, p, b)
        return api.score(graphdef, p, state, b)

    return lambda: train_step(params, opt_state, data, key)[2], lambda: serve(params, one), api.num_params(params)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny shapes and 2 rounds (for tests)")
    parser.add_argument("--repeats", type=int, default=10, help="interleaved rounds")
    parser.add_argument("--out", default=None, help="output markdown path")
    add_cpus_arg(parser)
    args = parser.parse_args(argv)
    start_process(args)
    lengths, batch, rounds = ((8,), 4, 2) if args.smoke else ((50, 200), 64, args.repeats)
    info = machine_info()
    start = time.perf_counter()
    rows, ratios = [], {}
    for n in lengths:
        fns, sizes = {}, {}
        for label, preset in MODELS.items():
            fns[(label, "step")], fns[(label, "serve")], sizes[label] = variants(preset, n, batch, 16)
        timings = interleaved(fns, rounds)
        for label in MODELS:
            step, serve = timings[(label, "step")], timings[(label, "serve")]
            rows.append({"n": n, "model": label, "params": sizes[label], "step": step, "serve": serve})
            print(f"N={n} {label}: step {step.cpu_ms:.1f} ms CPU, latency {serve.cpu_ms:.2f} ms CPU", flush=True)
        a, i, g = "GenRank (action-oriented)", "GenRank (interleaved)", "GESR"
        ratios[n] = (ratio(timings, (i, "step"), (a, "step")), ratio(timings, (i, "serve"), (a, "serve")),
                     ratio(timings, (a, "step"), (g, "step")))  # fmt: skip
    lines = [
        "# GenRank efficiency: action-oriented vs interleaved tokens",
        "",
        machine_line(info, finished=machine_info()) + " Command `python experiments/bench_genrank.py"
        f"{' --smoke' if args.smoke else f' --repeats {rounds}'}{' --cpus ' + args.cpus if args.cpus else ''}`; "
        f"whole run {time.perf_counter() - start:.0f} s. "
        f"Random parameters; train step B={batch}, C=16; latency B=1, C=16; {rounds} interleaved rounds.",
        "",
        METHOD_NOTE,
        "",
        "| N | model | params | train step wall (ms) | train step CPU (ms) | latency wall (ms) | latency CPU (ms) |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    lines += [f"| {r['n']} | {r['model']} | {r['params']:,} | {r['step'].wall_ms:.2f} | {r['step'].cpu_ms:.2f} | "
              f"{r['serve'].wall_ms:.3f} | {r['serve'].cpu_ms:.3f} |" for r in rows]  # fmt: skip
    lines += ["", "CPU-time ratios from the same rounds (the paper: attention cost −75 %, linear projections −50 %):",
              "", "| N | interleaved / action-oriented train step | interleaved / action-oriented latency | "
              "GenRank (action) / GESR train step |", "| --- | --- | --- | --- |"]  # fmt: skip
    lines += [f"| {n} | {s} | {lat} | {gs} |" for n, (s, lat, gs) in ratios.items()]
    out = pathlib.Path(args.out or f"experiments/results/genrank_efficiency_{jax.default_backend()}.md")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""How GESR serving cost grows (issue 23 item 5): Scorer latency over history length N and candidate count C.

    python experiments/bench_serving_scaling.py --cpus 1        # -> experiments/results/serving_scaling_<platform>.md
    python experiments/bench_serving_scaling.py --smoke         # tiny sweeps, 2 rounds (tests)

One request (B=1) with a full N-event history and C candidates, served by the ``synthetic_base`` GESR
``Scorer`` as ``gesr_jax/serving`` builds it by default (default buckets and blocks, item cache on, no
user-state reuse: every call encodes the history and scores every candidate; validation and packing included).
Random parameters: latency does not depend on training. Two sweeps:

* N in {128, 256, 512, 1024, 2048} at C = 1000 (one model per N: the schema's history length);
* C in {250, 500, 1000, 2000, 4000} at N = 512 (one model, five requests).

All points of a sweep are timed in the same interleaved rounds (``bench_common.interleaved``), each sample
after one untimed call of the same point (``prime=True``): a server runs one model back to back, while a
sample right after a larger model's call starts with that model's data in cache (the N=128 point took 2.5 ms
alone and 7 ms between the N=256 and N=2048 models). Latency is the median CPU (process) time per call,
wall time beside it.

The design promises O(N^2 + C N): the history's causal self attention is N^2, each candidate attends to the N
history keys. The fit is ``t = a N^2 + b C N + c`` by non-negative least squares over both sweeps (relative
errors weighted alike: each point's equation is divided by its measured time), with how well it explains the
data (R^2 of log t, largest relative error). Exponents: the log-log least-squares slope of each sweep, beside
the slope the fitted model predicts over the same points (and the local slope at each point,
``d ln t / d ln N = (2 a N^2 + b C N) / t`` and ``d ln t / d ln C = b C N / t``): under O(N^2 + C N) a sweep's
slope is not a fixed number but lies between 0 and 2 (N) or 0 and 1 (C), depending on which term dominates,
so the check is measured slope vs the fitted model's slope (goal: within 0.15). A second fit adds linear terms
``d N + e C`` (projections, item side, MLPG) to show what the quadratic model leaves out.
"""

from __future__ import annotations

import argparse
import dataclasses
import pathlib
import sys
import time

import numpy as np
from scipy.optimize import nnls

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from bench_common import (  # noqa: E402
    METHOD_NOTE,
    add_cpus_arg,
    interleaved,
    machine_info,
    machine_line,
    start_process,
    write_results,
)
from bench_serving import requests_for  # noqa: E402

from gesr_jax import api  # noqa: E402
from gesr_jax import config as config_lib  # noqa: E402
from gesr_jax.data import datasets  # noqa: E402
from gesr_jax.serving.scorer import Scorer  # noqa: E402

TOLERANCE = 0.15  # issue 23: fitted exponents within +-0.15


@dataclasses.dataclass(frozen=True)
class Sweeps:
    n_values: tuple[int, ...]
    fixed_c: int
    c_values: tuple[int, ...]
    fixed_n: int


FULL = Sweeps((128, 256, 512, 1024, 2048), 1000, (250, 500, 1000, 2000, 4000), 512)
SMOKE = Sweeps((16, 32), 40, (20, 40), 16)


def scorer_for(preset: str, n: int, max_c: int) -> tuple[Scorer, object, dict]:
    cfg = config_lib.load_config(preset, [f"data.history_len={n}"])
    schema = dataclasses.replace(datasets.schema_for(cfg.data), num_candidates=max_c)
    table = datasets.item_table(cfg.data)
    graphdef, params = api.init(cfg, 0, schema)
    return Scorer(graphdef, params, schema, table), schema, table


def sweep_n(preset: str, sweeps: Sweeps, rounds: int) -> dict[int, object]:
    calls = {}
    for n in sweeps.n_values:
        scorer, schema, table = scorer_for(preset, n, sweeps.fixed_c)
        reqs, _ = requests_for(schema, table, n, sweeps.fixed_c, 1, seed=n)
        calls[n] = lambda s=scorer, r=reqs: s.score(r)
    return interleaved(calls, rounds, prime=True)


def sweep_c(preset: str, sweeps: Sweeps, rounds: int) -> dict[int, object]:
    scorer, schema, table = scorer_for(preset, sweeps.fixed_n, max(sweeps.c_values))
    calls = {}
    for c in sweeps.c_values:
        reqs, _ = requests_for(schema, table, sweeps.fixed_n, c, 1, seed=c)
        calls[c] = lambda s=scorer, r=reqs: s.score(r)
    return interleaved(calls, rounds, prime=True)


def slope(x: np.ndarray, y: np.ndarray) -> float:
    """Least-squares slope of log y on log x."""
    return float(np.polyfit(np.log(x), np.log(y), 1)[0])


def fit(points: list[tuple[int, int, float]], linear: bool) -> np.ndarray:
    """Non-negative coefficients of t = a N^2 + b C N + c (+ d N + e C), relative errors weighted alike."""
    n, c, t = (np.asarray(v, float) for v in zip(*points, strict=True))
    cols = [n**2, c * n, np.ones_like(n)] + ([n, c] if linear else [])
    design = np.stack(cols, axis=1) / t[:, None]
    coef, _ = nnls(design, np.ones_like(t))
    return coef


def model(coef: np.ndarray, n, c):
    n, c = np.asarray(n, float), np.asarray(c, float)
    t = coef[0] * n**2 + coef[1] * c * n + coef[2]
    if len(coef) > 3:
        t = t + coef[3] * n + coef[4] * c
    return t


def quality(coef: np.ndarray, points) -> tuple[float, float]:
    """(R^2 of log t, largest |relative error|) of a fit."""
    n, c, t = (np.asarray(v, float) for v in zip(*points, strict=True))
    pred = model(coef, n, c)
    resid = np.log(t) - np.log(pred)
    r2 = 1.0 - float(np.sum(resid**2) / max(np.sum((np.log(t) - np.log(t).mean()) ** 2), 1e-30))
    return r2, float(np.max(np.abs(pred / t - 1.0)))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sweeps and model, 2 rounds (for tests)")
    parser.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 7; smoke 2)")
    parser.add_argument("--out", default=None, help="markdown path (default results/serving_scaling_<platform>.md)")
    add_cpus_arg(parser)
    args = parser.parse_args(argv)
    start_process(args)
    sweeps, preset = (SMOKE, "synthetic_tiny") if args.smoke else (FULL, "synthetic_base")
    rounds = args.rounds or (2 if args.smoke else 7)
    info = machine_info()
    start = time.perf_counter()
    by_n = sweep_n(preset, sweeps, rounds)
    print("N sweep: " + ", ".join(f"{n}: {t.cpu_ms:.1f} ms" for n, t in by_n.items()), flush=True)
    by_c = sweep_c(preset, sweeps, rounds)
    print("C sweep: " + ", ".join(f"{c}: {t.cpu_ms:.1f} ms" for c, t in by_c.items()), flush=True)
    points = [(n, sweeps.fixed_c, t.cpu_ms) for n, t in by_n.items()]
    points += [(sweeps.fixed_n, c, t.cpu_ms) for c, t in by_c.items()]
    quad, lin = fit(points, linear=False), fit(points, linear=True)
    ns, cs = np.asarray(sweeps.n_values, float), np.asarray(sweeps.c_values, float)
    t_n = np.asarray([by_n[n].cpu_ms for n in sweeps.n_values])
    t_c = np.asarray([by_c[c].cpu_ms for c in sweeps.c_values])
    measured = {"N": slope(ns, t_n), "C": slope(cs, t_c)}
    predicted = {"N": slope(ns, model(quad, ns, sweeps.fixed_c)), "C": slope(cs, model(quad, sweeps.fixed_n, cs))}
    predicted_lin = {"N": slope(ns, model(lin, ns, sweeps.fixed_c)), "C": slope(cs, model(lin, sweeps.fixed_n, cs))}
    (r2_q, err_q), (r2_l, err_l) = quality(quad, points), quality(lin, points)
    end = machine_info()
    lines = [
        "# How GESR serving cost grows with history length N and candidate count C",
        "",
        machine_line(info, finished=end) + f" Command: `python experiments/bench_serving_scaling.py"
        f"{' --smoke' if args.smoke else ''} --rounds {rounds}{' --cpus ' + args.cpus if args.cpus else ''}`;"
        f" whole run {time.perf_counter() - start:.0f} s.",
        "",
        METHOD_NOTE,
        "",
        f"Model `{preset}` (random parameters), served by `gesr_jax.serving.Scorer` with its defaults (item "
        "cache on, no user-state reuse); one request (B=1), full history, every candidate scored; latency per "
        "call, validation and packing included. Local slope: d ln t / d ln N (or C) of the fitted "
        "`t = a N^2 + b C N + c` at that point.",
        "",
        "| sweep | N | C | CPU ms | wall ms | measured slope to next point | fitted-model local slope | "
        "fit a N^2 + b C N + c (ms) | relative error |",
        "| --- " * 9 + "|",
    ]

    def rows(sweep: str, keys, ts, n_of, c_of) -> None:
        for i, k in enumerate(keys):
            n, c = n_of(k), c_of(k)
            t = ts[k]
            pred = float(model(quad, n, c))
            local = (2 * quad[0] * n**2 + quad[1] * c * n) / pred if sweep == "N" else quad[1] * c * n / pred
            nxt = "-"
            if i + 1 < len(keys):
                k2 = keys[i + 1]
                nxt = f"{np.log(ts[k2].cpu_ms / t.cpu_ms) / np.log(k2 / k):.2f}"
            lines.append(f"| {sweep} | {n} | {c} | {t.cpu_ms:.2f} | {t.wall_ms:.2f} | {nxt} | {local:.2f} | "
                         f"{pred:.2f} | {pred / t.cpu_ms - 1:+.1%} |")  # fmt: skip

    rows("N", list(sweeps.n_values), by_n, lambda k: k, lambda k: sweeps.fixed_c)
    rows("C", list(sweeps.c_values), by_c, lambda k: sweeps.fixed_n, lambda k: k)
    verdict = {s: abs(measured[s] - predicted[s]) <= TOLERANCE for s in ("N", "C")}
    lines += [
        "",
        f"Fit over all {len(points)} points (non-negative least squares on relative errors): "
        f"a = {quad[0]:.3g} ms per N², b = {quad[1]:.3g} ms per C·N, c = {quad[2]:.3g} ms; "
        f"R² of log t {r2_q:.4f}, largest relative error {err_q:.1%}.",
        f"With linear terms (t = a N² + b C N + c + d N + e C): a = {lin[0]:.3g}, b = {lin[1]:.3g}, c = {lin[2]:.3g}, "
        f"d = {lin[3]:.3g} ms per N, e = {lin[4]:.3g} ms per C; R² of log t {r2_l:.4f}, largest relative error "
        f"{err_l:.1%}.",
        "",
        "| sweep | measured log-log slope | slope of the fitted O(N² + C·N) model, same points | difference | "
        f"within ±{TOLERANCE} | slope of the fit with linear terms |",
        "| --- " * 6 + "|",
    ]
    for s, label in (("N", f"N at C={sweeps.fixed_c}"), ("C", f"C at N={sweeps.fixed_n}")):
        lines.append(f"| {label} | {measured[s]:.3f} | {predicted[s]:.3f} | {measured[s] - predicted[s]:+.3f} | "
                     f"{'yes' if verdict[s] else 'no'} | {predicted_lin[s]:.3f} |")  # fmt: skip
    lines += [
        "",
        "A pure N² law would give an N slope of 2 and a pure C·N law a C slope of 1; the fitted model's slopes "
        "say how far each sweep is from those limits, given how much of the time is the other term and the "
        "constant (per-call overhead, the user tower, the item-cache lookups).",
    ]
    write_results("\n".join(lines) + "\n", "serving_scaling", info, args.smoke, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())

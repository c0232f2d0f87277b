"""Train-step table of the accelerator check (experiments/gpu_check.py step 4): GESR and GenRank, xla vs Pallas.

    python experiments/gpu_check_train.py --out DIR/train_step_<device>.md     # history 1024, 256 candidates, B 32
    python experiments/gpu_check_train.py --dry-run --out /tmp/t.md           # CPU, tiny shapes, Triton interpreted

Models: the `synthetic_base` GESR and the `synthetic_genrank` GenRank with random parameters, every history full,
bf16 attention stacks (`compute_dtype=bfloat16`). The step is one jitted `value_and_grad` of the multitask loss
plus the AdamW update. Variants: `attention_impl=xla` and `attention_impl=None` (what the model runs on this
device: the best declared Pallas backend; the table names the backend(s) it dispatched to, which is "xla" when
none applies). Timing: `bench_common.interleaved` (rounds alternate the variants; wall and CPU time per step);
on a GPU the wall time is the step time. MFU: the XLA variant's compiled cost analysis gives the step's FLOPs
(XLA cannot see inside a Pallas kernel, so the Pallas variant's own count would omit its attention); both
variants are divided by the same count and by the device's dense bf16 peak (a table below; "-" when unknown).
Peak memory: the compiled executable's memory analysis (arguments + outputs + temporaries) and, where the
runtime reports it, the device's peak bytes in use after the timed steps.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import pathlib
import sys

import jax
import numpy as np
import optax

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from bench_common import interleaved, machine_info, machine_line  # noqa: E402

from gesr_jax import api  # noqa: E402
from gesr_jax import config as config_lib  # noqa: E402
from gesr_jax.data import datasets  # noqa: E402
from gesr_jax.train import step as step_lib  # noqa: E402
from kernels.hstu_attention import registry  # noqa: E402

MODELS = {"GESR": ("synthetic_base", "model.hstu"), "GenRank": ("synthetic_genrank", "model.decoder")}
# Dense bf16 tensor-core peaks, TFLOP/s (vendor data sheets), by a substring of jax's device_kind.
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100 PCIe": 756.0, "H100": 989.0, "A100": 312.0, "L4": 121.0}


@dataclasses.dataclass(frozen=True)
class Shape:
    history: int
    candidates: int
    batch: int
    rounds: int
    layers: int | None = None  # None: the preset's attention layers


FULL = Shape(1024, 256, 32, 10)
DRY = Shape(8, 4, 2, 2, layers=1)  # one layer: the interpreted kernels make every layer a long CPU compile


def peak_tflops(device_kind: str) -> float | None:
    for name, peak in PEAK_BF16_TFLOPS.items():
        if name in device_kind:
            return peak
    return None


def model_inputs(name: str, shape: Shape, impl: str | None) -> tuple:
    """(graphdef, params, schema, batch) of one model at `shape`, bf16 stack, attention_impl=`impl`."""
    preset, section = MODELS[name]
    overrides = [f"data.history_len={shape.history}", f"data.min_history={min(4, shape.history)}",
                 f"{section}.compute_dtype=bfloat16"] + ([f"{section}.attention_impl={impl}"] if impl else [])
    overrides += [f"{section}.layers={shape.layers}"] if shape.layers else []
    cfg = config_lib.load_config(preset, overrides)
    schema = dataclasses.replace(datasets.schema_for(cfg.data), num_candidates=shape.candidates)
    graphdef, params = api.init(cfg, 0, schema)
    batch = api.example_batch(cfg, 1, shape.batch, schema)
    batch["history_len"][:] = shape.history  # every history full
    batch["num_candidates"][:] = shape.candidates
    for key in [k for k in batch if k.startswith(("history_", "cand_")) and batch[k].ndim == 2]:
        batch[key] = np.where(batch[key] == 0, 1, batch[key])  # no padding ids inside the full rows
    return graphdef, params, schema, batch


def compiled_step(graphdef, params, schema, batch):
    """The jitted train step (loss, grads, AdamW) compiled for these inputs, and its arguments."""
    tx = optax.adamw(1e-3)
    tasks = schema.tasks

    def step(p, s, b, key):
        def loss_fn(p):
            logits = api.apply(graphdef, p, b, key=key, train=True, validate=False)
            return step_lib.multitask_loss(logits, b, tasks, (1.0,) * len(tasks))[0]

        loss, grads = jax.value_and_grad(loss_fn)(p)
        updates, s = tx.update(grads, s, p)
        return optax.apply_updates(p, updates), s, loss

    args = (params, tx.init(params), batch, jax.random.key(0))
    return jax.jit(step).lower(*args).compile(), args


def recording_backends(seen: set[str], interpret: bool) -> dict:
    """Registry entries that note which backend the API dispatched to (at trace time); interpret=True runs the
    Pallas ones in their CPU interpreters and lets them run on "cpu" (the dry run)."""

    def wrap(name, fn):
        if fn is None:
            return None

        @functools.wraps(fn)
        def call(*args, **kwargs):
            seen.add(name)
            if interpret and name != "xla":
                kwargs["interpret"] = True
            return fn(*args, **kwargs)

        return call

    return {name: dataclasses.replace(b, attention=wrap(name, b.attention),
                                      attention_cached=wrap(name, b.attention_cached),
                                      platforms=tuple({*b.platforms, "cpu"}) if interpret else b.platforms)
            for name, b in registry.BACKENDS.items()}


def measure(name: str, shape: Shape, dry_run: bool) -> list[dict]:
    """Both variants of one model: compile, record the dispatched backend, time interleaved."""
    variants = {"xla": "xla", "pallas": "pallas_triton" if dry_run else None}
    rows, calls = [], {}
    original = dict(registry.BACKENDS)
    for label, impl in variants.items():
        seen: set[str] = set()
        registry.BACKENDS.update(recording_backends(seen, dry_run))
        try:
            exe, args = compiled_step(*model_inputs(name, shape, impl))
        finally:
            registry.BACKENDS.update(original)
        cost = exe.cost_analysis()
        cost = cost[0] if isinstance(cost, list | tuple) else cost
        memory = exe.memory_analysis()
        compiled_bytes = sum(getattr(memory, f, 0) or 0 for f in ("argument_size_in_bytes", "output_size_in_bytes",
                                                                  "temp_size_in_bytes")) if memory else None
        calls[label] = functools.partial(exe, *args)
        rows.append(dict(model=name, variant=label, backends=", ".join(sorted(seen)) or "-",
                         flops=float(cost.get("flops", 0.0)), compiled_bytes=compiled_bytes))
    timings = interleaved(calls, rounds=shape.rounds)
    stats = jax.devices()[0].memory_stats() or {}
    model_flops = rows[0]["flops"]  # the XLA step's count: Pallas kernels are opaque to the cost analysis
    peak = peak_tflops(jax.devices()[0].device_kind)
    for row in rows:
        t = timings[row["variant"]]
        row.update(wall_ms=t.wall_ms, cpu_ms=t.cpu_ms, device_peak=stats.get("peak_bytes_in_use"),
                   tflops=model_flops / (t.wall_ms * 1e-3) / 1e12,
                   mfu=None if peak is None else model_flops / (t.wall_ms * 1e-3) / (peak * 1e12))
    return rows


def render(rows: list[dict], shape: Shape, header: str, dry_run: bool) -> str:
    gib = lambda b: "-" if not b else f"{b / 2**30:.3g}"
    device = jax.devices()[0]
    lines = [f"# Train step, xla vs Pallas{' (dry run: CPU, tiny shapes, interpreted, not a measurement)' if dry_run else ''}",
             "", header, f"- device: {device.device_kind} ({device.platform}); dense bf16 peak "
             f"{peak_tflops(device.device_kind) or '-'} TFLOP/s",
             f"- history {shape.history}, {shape.candidates} candidates, batch {shape.batch}, bf16 attention stacks; "
             f"{shape.rounds} interleaved rounds, medians",
             "- model TFLOP/s and MFU use the XLA step's compiled FLOP count for both variants",
             "", "| model | variant | dispatched to | step ms (wall) | step ms (CPU) | GFLOP/step | model TFLOP/s "
             "| MFU | compiled GiB | device peak GiB |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        mfu = "-" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"
        lines.append(f"| {r['model']} | {r['variant']} | {r['backends']} | {r['wall_ms']:.2f} | {r['cpu_ms']:.2f} "
                     f"| {r['flops'] / 1e9:.4g} | {r['tflops']:.4g} | {mfu} | {gib(r['compiled_bytes'])} "
                     f"| {gib(r['device_peak'])} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> pathlib.Path:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes, Triton interpreted")
    parser.add_argument("--out", type=pathlib.Path, required=True, help="markdown path")
    args = parser.parse_args(argv)
    shape = DRY if args.dry_run else FULL
    info = machine_info()
    rows = []
    for name in MODELS:
        rows += measure(name, shape, args.dry_run)
        args.out.write_text(render(rows, shape, machine_line(info, finished=machine_info()), args.dry_run))
    print(args.out.read_text())
    return args.out


if __name__ == "__main__":
    main()

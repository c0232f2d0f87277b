"""Sharded embedding tables at model=8 on 8 host devices: table bytes per device and the collective bytes of a step.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python experiments/bench_sharding.py \\
        [--items 100000] [--out experiments/results/sharding_cpu.md]

For each model (two-tower, GESR) and each layout (replicated, row, column), one train step is compiled for a
mesh of 8 host CPU devices with ``train.model_parallel=8`` and read back:

* table bytes per device: the bytes of every embedding table held by device 0, against the total;
* collective bytes per step: for every all-reduce, reduce-scatter, all-gather and all-to-all in the compiled
  HLO, the bytes of its result on one device (what each device receives or keeps), summed by kind.
  All-reduces of the looked-up activations would show up as all-reduces of ``[b, L, D]`` arrays.

Nothing is timed: these are sizes read from the compiled program, the same on any machine with this jax
version, so the table names the machine only for the record. The item vocabulary grows with ``--items``
(synthetic data); the batch is ``train.batch_size=64``.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from bench_common import machine_info, machine_line  # noqa: E402

from gesr_jax import api  # noqa: E402
from gesr_jax import config as config_lib  # noqa: E402
from gesr_jax.data import batch as batch_lib  # noqa: E402
from gesr_jax.data import datasets  # noqa: E402
from gesr_jax.train import hlo_collectives, sharding, step  # noqa: E402

LAYOUTS = ("replicated", "row", "column")
KINDS = {"two-tower": "two_tower", "GESR": "gesr"}
COLLECTIVES = hlo_collectives.KINDS


def measure(kind: str, layout: str, items: int) -> dict[str, int]:
    overrides = [f"model.kind={kind}", f"model.embedding_sharding={layout}", "train.model_parallel=8",
                 "train.batch_size=64", f"data.synthetic.num_items={items}", "model.embed_dim=64"]  # fmt: skip
    config = config_lib.load_config("synthetic_tiny", overrides)
    schema = datasets.schema_for(config.data)
    mesh, layout = sharding.mesh_for(config, 8)
    graphdef, params = api.abstract_init(config, schema)
    params = sharding.layout_params(params, layout)
    p_sharding = sharding.param_shardings(params, mesh, embedding_sharding=layout)
    tx = step.make_optimizer(config.train)
    batch = batch_lib.random_batch(schema, config.train.batch_size, seed=0)
    b_sharding = sharding.batch_shardings(batch, mesh)
    with sharding.mesh_context(mesh, embedding_sharding=layout):
        o_shape = jax.eval_shape(tx.init, params)
        o_sharding = sharding.param_shardings(o_shape, mesh, embedding_sharding=layout)
        train_step = step.make_train_step(
            api, graphdef, tx, schema.tasks, (1.0,) * len(schema.tasks), mesh=mesh, params_sharding=p_sharding,
            opt_state_sharding=o_sharding, batch_sharding=b_sharding,
        )  # fmt: skip
        def abstract(tree, shardings):  # noqa: ANN001, ANN202
            return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)

        batch_abs = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=b_sharding[k]) for k, v in batch.items()}
        hlo = train_step.lower(abstract(params, p_sharding), abstract(o_shape, o_sharding), batch_abs,
                               jax.random.key(0)).compile().as_text()  # fmt: skip
    total = per_device = 0
    for var in jax.tree.leaves(params, is_leaf=lambda x: hasattr(x, "get_metadata")):
        if hasattr(var, "get_metadata") and sharding.sharded_lookup.is_table(var.get_metadata().get("out_sharding")):
            value = var.get_value()
            nbytes = int(np.prod(value.shape)) * value.dtype.itemsize
            shard = sharding.param_shardings(var, mesh, embedding_sharding=layout).get_value()
            local = shard.shard_shape(value.shape)
            total += nbytes
            per_device += int(np.prod(local)) * value.dtype.itemsize
    return {"total": total, "per_device": per_device, **hlo_collectives.bytes_by_kind(hlo)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=100_000, help="item vocabulary of the synthetic data")
    parser.add_argument("--out", default="experiments/results/sharding_cpu.md")
    args = parser.parse_args(argv)
    info = machine_info()
    mib = lambda n: f"{n / 2**20:.2f}"  # noqa: E731
    rows = []
    for label, kind in KINDS.items():
        for layout in LAYOUTS:
            r = measure(kind, layout, args.items)
            ratio = r["total"] / r["per_device"]
            cells = [label, layout, mib(r["total"]), mib(r["per_device"]), f"{ratio:.1f}"]
            cells += [mib(r[c]) for c in COLLECTIVES]
            rows.append("| " + " | ".join(cells) + " |")
            print(rows[-1], flush=True)
    text = "\n".join([
        "# Sharded embedding tables: bytes per device and collective bytes per train step (8 host devices, model=8)",
        "",
        f"Command: `python experiments/bench_sharding.py --items {args.items}`. Synthetic data (synthetic_tiny with "
        f"{args.items:,} items, `model.embed_dim=64`, `train.batch_size=64`), `train.model_parallel=8` on a "
        "`(data=1, model=8)` mesh of 8 host CPU devices; sizes read from the compiled train step's HLO (nothing "
        "is timed).",
        "",
        machine_line(info, finished=machine_info()),
        "",
        "| model | layout | table MiB (total) | table MiB per device | total / per device | all-reduce MiB | "
        "reduce-scatter MiB | all-gather MiB | all-to-all MiB |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
        *rows,
        "",
        "Collective bytes: the result size on one device of every collective of one compiled step, summed by",
        "kind (collectives over a group of one device, which move nothing, are left out). A reduce-scatter's",
        "input is M times its result, an all-gather's result M times its input: each moves about (M-1)/M of",
        "the larger one. How they grow: replicated tables are all-reduced whole as gradients each step, once per",
        "lookup site (a table read by both the history and the candidates has two [V, D] all-reduces), so these",
        "bytes follow the vocabulary. Row and column layouts move the ids, the looked-up embeddings and their",
        "gradients: bytes follow batch x length x D, not the vocabulary; each device holds 1/8 of every table.",
        "With model=8 the data axis has size 1: no table gradient is all-reduced over `data`; the remaining",
        "all-reduce is the dense parameters'.",
        "",
    ])
    pathlib.Path(args.out).write_text(text)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

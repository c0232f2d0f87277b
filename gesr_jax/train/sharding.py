"""The device mesh and the logical-axis rules: the only module that knows how arrays map to devices.

Modules name *logical* axes on their parameters (``vocab``, ``embed``, ``mlp``, ``heads``) and the
batch's leading axis is ``batch``. :data:`LOGICAL_AXIS_RULES` maps each logical axis to a mesh axis
(or to ``None`` = replicated). The batch is split over every device (``batch -> (data, model)``); dense
parameters are replicated. ``model.embedding_sharding`` picks the layout of the embedding tables
(parameters whose first logical axis is ``vocab``) over the ``model`` axis, of size ``train.model_parallel``:

* ``replicated``: a full copy per device (``vocab -> None``);
* ``row``: the rule ``vocab -> model`` shards table rows (tables are zero-padded to
  ``sharded_lookup.TABLE_ROW_MULTIPLE`` rows first);
* ``column``: every table is ``[rows, D / M]`` per device (its width over ``model``).

Lookups follow the layout through ``gesr_jax/layers/sharded_lookup.py`` (entered by :func:`mesh_context`).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from gesr_jax.layers import sharded_lookup
from gesr_jax.layers.sharded_lookup import DATA_AXIS, LAYOUTS, MODEL_AXIS

Rules = tuple[tuple[str, Any], ...]

# Logical axis -> mesh axis. The batch is split over every device; dense parameters are replicated.
LOGICAL_AXIS_RULES: Rules = (
    ("batch", (DATA_AXIS, MODEL_AXIS)),
    ("vocab", None),
    ("embed", None),
    ("mlp", None),
    ("heads", None),
)


def rules_for(embedding_sharding: str = "replicated") -> Rules:
    """The logical-axis rules of an embedding layout: ``row`` adds ``vocab -> model``."""
    if embedding_sharding not in LAYOUTS:
        raise ValueError(f"model.embedding_sharding must be one of {list(LAYOUTS)}, got {embedding_sharding!r}")
    if embedding_sharding != "row":
        return LOGICAL_AXIS_RULES
    return tuple((name, MODEL_AXIS if name == "vocab" else axis) for name, axis in LOGICAL_AXIS_RULES)


def make_mesh(num_devices: int | None = None, *, model_parallel: int = 1) -> Mesh:
    """A ``(data, model)`` mesh over the first ``num_devices`` devices (all by default), Auto axes."""
    available = jax.devices()
    n = len(available) if num_devices is None else num_devices
    if not 1 <= n <= len(available):
        raise ValueError(f"num_devices={n} but {len(available)} devices are available")
    if model_parallel < 1 or n % model_parallel:
        raise ValueError(f"model_parallel={model_parallel} must divide the number of devices ({n})")
    return jax.make_mesh(
        (n // model_parallel, model_parallel),
        (DATA_AXIS, MODEL_AXIS),
        axis_types=(AxisType.Auto, AxisType.Auto),
        devices=available[:n],
    )


@contextlib.contextmanager
def mesh_context(mesh: Mesh, rules: Rules | None = None, *, embedding_sharding: str = "replicated") -> Iterator[Mesh]:
    """Make ``mesh``, the logical-axis rules and the embedding layout current (for code traced inside)."""
    rules = rules_for(embedding_sharding) if rules is None else rules
    with jax.set_mesh(mesh), nnx.logical_axis_rules(rules), sharded_lookup.lookup_layout(embedding_sharding):
        yield mesh


def data_parallel_size(mesh: Mesh) -> int:
    """How many ways the batch is split: every device of the ``(data, model)`` mesh."""
    return int(mesh.shape[DATA_AXIS]) * int(mesh.shape.get(MODEL_AXIS, 1))


def check_batch_size(batch_size: int, mesh: Mesh, field: str = "train.batch_size") -> None:
    """Raise unless the global batch splits evenly over the devices of the ``(data, model)`` axes."""
    n = data_parallel_size(mesh)
    if batch_size % n:
        raise ValueError(f"{field}={batch_size} must be divisible by the {n} devices of the ('data', 'model') mesh")


def check_layout(embedding_sharding: str, mesh: Mesh, embed_dim: int | None = None) -> None:
    """Raise (naming the fields) unless the tables can be laid out ``embedding_sharding`` on ``mesh``."""
    rules_for(embedding_sharding)
    m = int(mesh.shape[MODEL_AXIS])
    if embedding_sharding == "row" and sharded_lookup.TABLE_ROW_MULTIPLE % m:
        raise ValueError(
            f"train.model_parallel={m} must divide {sharded_lookup.TABLE_ROW_MULTIPLE} (the row padding of "
            f"row-sharded tables) with model.embedding_sharding='row'"
        )
    if embedding_sharding == "column" and embed_dim is not None and embed_dim % m:
        raise ValueError(
            f"model.embed_dim={embed_dim} must be divisible by train.model_parallel={m} with "
            f"model.embedding_sharding='column'"
        )


def logical_to_mesh(spec: Sequence[Any] | PartitionSpec, rules: Rules = LOGICAL_AXIS_RULES) -> PartitionSpec:
    """Translate a PartitionSpec of logical axis names into mesh axis names."""
    table = dict(rules)

    def one(name: Any) -> Any:
        if name is None:
            return None
        if isinstance(name, tuple):
            mapped = tuple(m for m in (one(n) for n in name) if m is not None)
            return mapped or None
        if name in (DATA_AXIS, MODEL_AXIS):  # already a mesh axis (nnx translates inside logical_axis_rules)
            return name
        if name not in table:
            raise ValueError(f"logical axis {name!r} has no sharding rule; known axes: {sorted(table)}")
        return table[name]

    return PartitionSpec(*(one(name) for name in spec))


def param_shardings(
    params: Any, mesh: Mesh, rules: Rules | None = None, *, embedding_sharding: str = "replicated"
) -> Any:
    """NamedShardings for a params (or optimizer state) pytree, read from its logical axis metadata.

    Leaves without metadata (e.g. optax step counters) are replicated. With ``column``, tables (logical
    axes ``(vocab, embed)``) shard their width over ``model``.
    """
    rules = rules_for(embedding_sharding) if rules is None else rules
    with nnx.logical_axis_rules(()):  # the logical names themselves, not the ambient rules' translation
        specs = nnx.get_partition_spec(params)

    def one(spec: PartitionSpec) -> NamedSharding:
        if embedding_sharding == "column" and tuple(spec) == ("vocab", "embed"):
            return NamedSharding(mesh, PartitionSpec(None, MODEL_AXIS))
        return NamedSharding(mesh, logical_to_mesh(spec, rules))

    return jax.tree.map(one, specs, is_leaf=lambda x: isinstance(x, PartitionSpec))


def table_bytes_per_device(params: Any) -> tuple[int, int]:
    """``(total bytes of every table, bytes of them on the first device)`` of placed params."""
    total = per_device = 0
    first = jax.devices()[0]
    for var in jax.tree.leaves(params, is_leaf=lambda x: isinstance(x, nnx.Variable)):
        if isinstance(var, nnx.Variable) and sharded_lookup.is_table(var.get_metadata().get("out_sharding")):
            value = var.get_value()
            total += value.nbytes
            per_device += sum(s.data.nbytes for s in value.addressable_shards if s.device == first)
    return total, per_device


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh: Mesh, rules: Rules = LOGICAL_AXIS_RULES) -> NamedSharding:
    """Sharding of any batch array: the leading (request) axis over the data axis, the rest replicated."""
    return NamedSharding(mesh, logical_to_mesh(("batch",), rules))


def batch_shardings(batch: Mapping[str, Any], mesh: Mesh) -> dict[str, NamedSharding]:
    sharding = batch_sharding(mesh)
    return {k: sharding for k in batch}


def shard_batch(batch: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Assemble this host's local batch into global arrays sharded over ``data``.

    Each host passes its own rows; the global batch is their concatenation in process order.
    """
    sharding = batch_sharding(mesh)
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in batch.items()}


def place(tree: Any, shardings: Any) -> Any:
    """Put a host-side or device pytree onto the given shardings."""
    return jax.device_put(tree, shardings)


def embedding_layout(config: Any) -> str:
    """``config.model.embedding_sharding`` ("replicated" for model configs that have no such field)."""
    return str(getattr(config.model, "embedding_sharding", "replicated"))


def mesh_for(config: Any, num_devices: int | None = None, *, strict: bool = True) -> tuple[Mesh, str]:
    """``(mesh, embedding layout)`` of a run; ``train.model_parallel`` sizes the ``model`` axis (ValueError names it).

    ``strict=False`` (evaluation, serving) shrinks the ``model`` axis to what the devices here allow (the
    greatest common divisor), so a run trained on 8 devices can be scored on fewer: table padding does not
    depend on the axis size, the parameters restore onto any mesh.
    """
    model_parallel = int(getattr(config.train, "model_parallel", 1))
    if not strict:
        model_parallel = math.gcd(model_parallel, len(jax.devices()) if num_devices is None else num_devices)
    try:
        mesh = make_mesh(num_devices, model_parallel=model_parallel)
    except ValueError as err:
        raise ValueError(f"train.model_parallel: {err}") from None
    layout = embedding_layout(config)
    check_layout(layout, mesh, getattr(config.model, "embed_dim", None))
    return mesh, layout


def layout_params(params: Any, embedding_sharding: str) -> Any:
    """``params`` as the layout stores them: row-sharded tables are zero-padded (``sharded_lookup.pad_table_rows``)."""
    return sharded_lookup.pad_table_rows(params) if embedding_sharding == "row" else params

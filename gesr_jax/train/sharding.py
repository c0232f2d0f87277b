"""The device mesh and the logical-axis rules: the only module that knows how arrays map to devices.

Modules name *logical* axes on their parameters (``vocab``, ``embed``, ``mlp``, ``heads``) and the
batch's leading axis is ``batch``. :data:`LOGICAL_AXIS_RULES` maps each logical axis to a mesh axis
(or to ``None`` = replicated). Today that is plain data parallelism; sharding embedding tables
over a ``model`` axis later means changing the ``vocab`` rule here and nothing else.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

DATA_AXIS = "data"
MODEL_AXIS = "model"

Rules = tuple[tuple[str, str | None], ...]

# Logical axis -> mesh axis. Everything but the batch is replicated (data parallelism).
LOGICAL_AXIS_RULES: Rules = (
    ("batch", DATA_AXIS),
    ("vocab", None),
    ("embed", None),
    ("mlp", None),
    ("heads", None),
)


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
def mesh_context(mesh: Mesh, rules: Rules = LOGICAL_AXIS_RULES) -> Iterator[Mesh]:
    """Make ``mesh`` and the logical-axis rules current, so model code may name logical axes in constraints."""
    with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
        yield mesh


def data_parallel_size(mesh: Mesh) -> int:
    return int(mesh.shape[DATA_AXIS])


def check_batch_size(batch_size: int, mesh: Mesh, field: str = "train.batch_size") -> None:
    """Raise unless the global batch splits evenly over the ``data`` axis."""
    n = data_parallel_size(mesh)
    if batch_size % n:
        raise ValueError(f"{field}={batch_size} must be divisible by the {n} devices of the '{DATA_AXIS}' mesh axis")


def logical_to_mesh(spec: Sequence[Any] | PartitionSpec, rules: Rules = LOGICAL_AXIS_RULES) -> PartitionSpec:
    """Translate a PartitionSpec of logical axis names into mesh axis names."""
    table = dict(rules)

    def one(name: Any) -> Any:
        if name is None:
            return None
        if isinstance(name, tuple):
            mapped = tuple(m for m in (one(n) for n in name) if m is not None)
            return mapped or None
        if name not in table:
            raise ValueError(f"logical axis {name!r} has no sharding rule; known axes: {sorted(table)}")
        return table[name]

    return PartitionSpec(*(one(name) for name in spec))


def param_shardings(params: Any, mesh: Mesh, rules: Rules = LOGICAL_AXIS_RULES) -> Any:
    """NamedShardings for a params (or optimizer state) pytree, read from its logical axis metadata.

    Leaves without metadata (e.g. optax step counters) are replicated.
    """
    specs = nnx.get_partition_spec(params)
    return jax.tree.map(
        lambda spec: NamedSharding(mesh, logical_to_mesh(spec, rules)),
        specs,
        is_leaf=lambda x: isinstance(x, PartitionSpec),
    )


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

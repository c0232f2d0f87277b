"""Embedding lookups that follow the table's layout on the mesh: replicated, row-sharded or column-sharded.

Every ``Embed`` lookup goes through :func:`sharded_lookup`. The layout is a trace-time context
(:func:`lookup_layout`, entered by ``train/sharding.mesh_context``), not module state, so one model trains
under any layout and is served on one device with the same parameters. The batch is sharded over every
device (``batch -> (data, model)``); the table over the ``model`` axis only (replicated over ``data``).

* ``replicated``: ``jnp.take`` (each device holds the whole table).
* ``row``: each device holds ``rows / M`` consecutive rows. Inside ``jax.shard_map`` each device
  all-gathers the ids of its ``model`` group, takes the rows it owns (others masked to 0), and a
  ``psum_scatter`` over ``model`` sums the partial embeddings and hands every device back only its own
  batch slice: one reduce-scatter of ``[M * b, ..., D]`` per lookup. XLA's own gather partitioner would
  instead all-reduce the whole looked-up ``[global_B, ..., D]`` (the reason this is written by hand).
  The backward pass is the transpose: an all-gather of the cotangent and a local scatter-add.
* ``column``: each device holds every row but ``D / M`` columns: all-gather the ids, take, then an
  ``all_to_all`` trades batch slices for column slices so each device ends with full ``D`` rows of its
  own batch slice.

Row sharding needs the row count divisible by the ``model`` axis: :func:`pad_table_rows` pads every table
(a parameter whose first logical axis is ``vocab``) with zero rows to a multiple of
:data:`TABLE_ROW_MULTIPLE`, a constant, so a checkpoint restores onto any ``model`` size dividing it
(8 devices -> 4). Padding rows are never looked up: ids are clipped to the table's real ``vocab``.

Ids past a table's size can be hashed into ``hash_buckets`` extra rows (:func:`hash_ids`).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec

LAYOUTS = ("replicated", "row", "column")
DATA_AXIS, MODEL_AXIS = "data", "model"
BATCH_AXES = (DATA_AXIS, MODEL_AXIS)
TABLE_ROW_MULTIPLE = 128  # row-sharded tables are padded to this; any model-axis size dividing it works

_state = threading.local()


@contextlib.contextmanager
def lookup_layout(layout: str) -> Iterator[str]:
    """Make ``layout`` the embedding layout that lookups traced inside this block use."""
    if layout not in LAYOUTS:
        raise ValueError(f"model.embedding_sharding must be one of {list(LAYOUTS)}, got {layout!r}")
    previous = getattr(_state, "layout", "replicated")
    _state.layout = layout
    try:
        yield layout
    finally:
        _state.layout = previous


def current_layout() -> str:
    return getattr(_state, "layout", "replicated")


def hash_ids(ids: jax.Array, vocab: int, hash_buckets: int) -> jax.Array:
    """The table row of each id, for a table of ``vocab + hash_buckets`` rows.

    Ids below ``vocab + hash_buckets`` are their own row (the vocabulary, then the first ``hash_buckets``
    ids past it, e.g. items appended after the table was sized); ids at or past ``vocab + hash_buckets``
    are mapped to ``vocab + h(id) % hash_buckets``. Every id in ``[0, vocab + hash_buckets)`` is thus
    a fixed point, so a table of rows (the serving item cache, built over ``arange(vocab + hash_buckets)``)
    is indexed by the same rows. ``h`` is a 32-bit multiplicative (Knuth/Fibonacci) mix, so neighbouring
    ids land in unrelated rows. ``hash_buckets=0`` leaves ids as they are (the batch validator refuses
    ids past the vocabulary).

    What collisions cost: ids sharing a row share one embedding, so the model cannot tell them apart and
    their gradient updates mix in that row. It costs accuracy, not memory. Hashing ``k`` distinct ids into
    ``b`` rows gives about ``k**2 / (2 b)`` colliding pairs (for ``k`` much smaller than ``b``). The
    vocabulary's own ids never collide.
    """
    if hash_buckets <= 0:
        return ids
    mixed = (ids.astype(jnp.uint32) * jnp.uint32(2654435761)) >> jnp.uint32(7)
    bucket = (mixed % jnp.uint32(hash_buckets)).astype(ids.dtype)
    return jnp.where(ids >= vocab + hash_buckets, vocab + bucket, ids)


def is_table(names: Any) -> bool:
    """True for a parameter whose logical axes start with ``vocab`` (an embedding table)."""
    return isinstance(names, tuple | PartitionSpec) and len(names) == 2 and tuple(names)[0] == "vocab"


def padded_rows(rows: int, multiple: int = TABLE_ROW_MULTIPLE) -> int:
    return -(-rows // multiple) * multiple


def pad_table_rows(params: Any, multiple: int = TABLE_ROW_MULTIPLE) -> Any:
    """``params`` (an ``nnx.State`` or a tree of ``nnx.Variable``) with every table zero-padded to ``multiple`` rows.

    Works on concrete arrays and on ``jax.ShapeDtypeStruct`` templates. Idempotent.
    """

    def pad(var: Any) -> Any:
        if not isinstance(var, nnx.Variable) or not is_table(var.get_metadata().get("out_sharding")):
            return var
        value = var.get_value()
        extra = padded_rows(value.shape[0], multiple) - value.shape[0]
        if extra == 0:
            return var
        if isinstance(value, jax.ShapeDtypeStruct):
            new = jax.ShapeDtypeStruct((value.shape[0] + extra, *value.shape[1:]), value.dtype)
        else:
            new = jnp.concatenate([value, jnp.zeros((extra, *value.shape[1:]), value.dtype)], axis=0)
        return var.replace(new)

    return jax.tree.map(pad, params, is_leaf=lambda x: isinstance(x, nnx.Variable))


def _model_size() -> int:
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or MODEL_AXIS not in mesh.axis_names:
        return 1
    return int(mesh.shape[MODEL_AXIS])


def _devices() -> int:
    mesh = jax.sharding.get_abstract_mesh()
    return 1 if mesh.empty else int(mesh.size)


def sharded_lookup(table: jax.Array, ids: jax.Array, vocab: int | None = None, layout: str | None = None) -> jax.Array:
    """``table[clip(ids, 0, vocab - 1)]`` of shape ``[*ids.shape, D]``, computed for the table's layout.

    ``vocab`` is the real row count (``table`` may hold padding rows past it; default: all rows).
    ``layout`` defaults to the current :func:`lookup_layout`; without a mesh with a ``model`` axis
    larger than 1 every layout is a plain ``take``.
    """
    layout = current_layout() if layout is None else layout
    vocab = table.shape[0] if vocab is None else vocab
    ids = jnp.clip(ids, 0, vocab - 1)
    m = _model_size()
    if layout == "replicated" or m == 1:
        return jnp.take(table, ids, axis=0)
    if layout == "row" and table.shape[0] % m:
        raise ValueError(
            f"a row-sharded table needs its {table.shape[0]} rows divisible by the model axis ({m}); "
            f"pad it with sharded_lookup.pad_table_rows"
        )
    if layout == "column" and table.shape[1] % m:
        raise ValueError(
            f"a column-sharded table needs its width {table.shape[1]} divisible by train.model_parallel={m}"
        )
    # The batch is split over every device: pad the leading axis to a multiple of the device count.
    n = _devices()
    lead = ids.shape[0] if ids.ndim else 1
    flat = ids.reshape(lead, -1) if ids.ndim else ids.reshape(1, 1)
    pad = -lead % n
    if pad:
        flat = jnp.concatenate([flat, jnp.zeros((pad, flat.shape[1]), flat.dtype)], axis=0)
    body = _row_body if layout == "row" else _column_body
    table_spec = PartitionSpec(MODEL_AXIS, None) if layout == "row" else PartitionSpec(None, MODEL_AXIS)
    out = jax.shard_map(
        body, in_specs=(table_spec, PartitionSpec(BATCH_AXES)), out_specs=PartitionSpec(BATCH_AXES)
    )(table, flat)
    return out[:lead].reshape(*ids.shape, table.shape[1])


def _row_body(local_table: jax.Array, local_ids: jax.Array) -> jax.Array:
    """Per device: [b, L] ids, [rows / M, D] table shard -> [b, L, D] embeddings of its own ids."""
    group_ids = jax.lax.all_gather(local_ids, MODEL_AXIS, axis=0, tiled=True)  # [M * b, L]
    rows = local_table.shape[0]
    local = group_ids - jax.lax.axis_index(MODEL_AXIS) * rows
    owned = (local >= 0) & (local < rows)
    partial = jnp.take(local_table, jnp.where(owned, local, 0), axis=0)
    partial = jnp.where(owned[..., None], partial, jnp.zeros((), partial.dtype))
    return jax.lax.psum_scatter(partial, MODEL_AXIS, scatter_dimension=0, tiled=True)


def _column_body(local_table: jax.Array, local_ids: jax.Array) -> jax.Array:
    """Per device: [b, L] ids, [rows, D / M] column shard -> [b, L, D] embeddings of its own ids."""
    group_ids = jax.lax.all_gather(local_ids, MODEL_AXIS, axis=0, tiled=True)  # [M * b, L]
    columns = jnp.take(local_table, group_ids, axis=0)  # [M * b, L, D / M]
    return jax.lax.all_to_all(columns, MODEL_AXIS, split_axis=0, concat_axis=2, tiled=True)

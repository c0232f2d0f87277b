"""The embedding tables' own optimiser partition: row-wise Adagrad, or the dense optimiser (``train.table_optimizer``).

Embedding tables (parameters whose first logical axis is ``vocab``) are most of a recommender's
parameters and see sparse gradients: only the rows of the ids in a batch are non-zero. Adam keeps two
full-size moments per table; row-wise Adagrad keeps one scalar per row (the mean squared gradient of the
row, accumulated), the usual choice for large sparse tables (FBGEMM / TorchRec "rowwise adagrad"):

    acc[r] += mean_d(g[r, d] ** 2);   update[r, d] = -lr * g[r, d] / (sqrt(acc[r]) + eps)

Rows that a batch did not touch get a zero gradient, so their accumulator and values do not move (Adam's
decayed moments would still move them). The accumulator is an ``nnx.Param`` shaped ``[rows, 1]`` with
logical axes ``(vocab, None)``: it is row-sharded exactly like its table under ``vocab -> model``.

UNCONFIRMED: neither paper states a table optimiser; "dense" (AdamW on every parameter, the default)
keeps the earlier runs' numbers and checkpoints exactly.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from gesr_jax.layers.sharded_lookup import is_table

TABLE, DENSE = "table", "dense"
EPS = 1e-8


class RowwiseAdagradState(NamedTuple):
    accumulators: Any  # per table: [rows, 1] sum of the row's mean squared gradient


def _is_var(x: Any) -> bool:
    return isinstance(x, nnx.Variable)


def _row_accumulator(leaf: Any) -> Any:
    if not _is_var(leaf):
        return jnp.zeros((jnp.shape(leaf)[0], 1), jnp.float32) if jnp.ndim(leaf) >= 1 else jnp.zeros((), jnp.float32)
    value = leaf.get_value()
    if not hasattr(value, "shape"):  # optax.MaskedNode: a parameter of the other partition
        return leaf
    meta = {**leaf.get_metadata(), "out_sharding": ("vocab", None)}
    return type(leaf)(jnp.zeros((value.shape[0], 1), jnp.float32), **meta)


def scale_by_rowwise_adagrad(eps: float = EPS) -> optax.GradientTransformation:
    """``g / (sqrt(acc) + eps)`` with one accumulator per row of each parameter (the direction, not the step)."""

    def init(params: Any) -> RowwiseAdagradState:
        return RowwiseAdagradState(jax.tree.map(_row_accumulator, params, is_leaf=_is_var))

    def update(grads: Any, state: RowwiseAdagradState, params: Any = None) -> tuple[Any, RowwiseAdagradState]:
        del params
        # The accumulators' logical axes differ from their parameters' (a pytree difference): walk leaves.
        g_leaves, g_def = jax.tree.flatten(grads)
        a_leaves, a_def = jax.tree.flatten(state.accumulators)
        acc = [a + jnp.mean(jnp.square(g), axis=-1, keepdims=True) for g, a in zip(g_leaves, a_leaves, strict=True)]
        steps = [g / (jnp.sqrt(a) + eps) for g, a in zip(g_leaves, acc, strict=True)]
        return g_def.unflatten(steps), RowwiseAdagradState(a_def.unflatten(acc))

    return optax.GradientTransformation(init, update)


def rowwise_adagrad(learning_rate: optax.ScalarOrSchedule, eps: float = EPS) -> optax.GradientTransformation:
    """Row-wise Adagrad at ``learning_rate`` (a float or a schedule of the step, e.g. the dense warm-up/cosine)."""
    return optax.chain(scale_by_rowwise_adagrad(eps), optax.scale_by_learning_rate(learning_rate))


def table_labels(params: Any) -> Any:
    """``"table"`` for every embedding table of ``params``, ``"dense"`` for everything else (same tree)."""

    def label(leaf: Any) -> Any:
        name = TABLE if _is_var(leaf) and is_table(leaf.get_metadata().get("out_sharding")) else DENSE
        return leaf.replace(name) if _is_var(leaf) else name

    return jax.tree.map(label, params, is_leaf=_is_var)


def partitioned(
    dense: optax.GradientTransformation, table: optax.GradientTransformation
) -> optax.GradientTransformation:
    """``dense`` on every parameter but the tables, ``table`` on the tables (``optax.multi_transform``)."""
    return optax.multi_transform({DENSE: dense, TABLE: table}, table_labels)

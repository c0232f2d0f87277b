"""The tables' own optimiser partition: row-wise Adagrad (one accumulator per row), sharded like its table."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import train_fixtures as fx
from flax import nnx
from jax.sharding import PartitionSpec

from gesr_jax.layers import sharded_lookup
from gesr_jax.train import sharding, step, table_optimizer


def test_rowwise_adagrad_keeps_one_accumulator_per_row_and_leaves_untouched_rows_alone():
    table = jnp.arange(12.0).reshape(4, 3)
    tx = table_optimizer.rowwise_adagrad(0.5)
    state = tx.init(table)
    assert jax.tree.leaves(state)[0].shape == (4, 1)
    grads = jnp.zeros((4, 3)).at[1].set(jnp.array([1.0, 2.0, 2.0]))
    updates, state = tx.update(grads, state, table)
    acc = 9.0 / 3  # mean of the squared row gradient
    np.testing.assert_allclose(np.asarray(updates[1]), -0.5 * np.array([1.0, 2.0, 2.0]) / (np.sqrt(acc) + 1e-8))
    assert not np.asarray(updates)[[0, 2, 3]].any()  # rows not in the batch do not move
    updates, state = tx.update(grads, state, table)  # the accumulator grows: smaller steps
    np.testing.assert_allclose(np.asarray(updates[1]), -0.5 * np.array([1.0, 2.0, 2.0]) / np.sqrt(2 * acc), rtol=1e-6)


def test_switch_partitions_tables_from_dense_params_and_shards_accumulators_like_tables():
    _, params = fx.linear_api().init(None, 0)
    assert jax.tree.leaves(table_optimizer.table_labels(params)) == ["dense", "table", "table", "dense"]  # b item user w
    dense = step.make_optimizer(fx.tiny_config().train)
    rowwise = step.make_optimizer(dataclasses.replace(fx.tiny_config().train, table_optimizer="rowwise_adagrad"))
    n_dense = sum(x.size for x in jax.tree.leaves(jax.eval_shape(dense.init, params)))
    n_rowwise = sum(x.size for x in jax.tree.leaves(jax.eval_shape(rowwise.init, params)))
    table_sizes = [params["user"].get_value().shape, params["item"].get_value().shape]
    # Adam's 2 moments per table entry become 1 accumulator per row (plus the row-wise schedule's step count).
    assert n_dense - n_rowwise == sum(2 * r * d - r for r, d in table_sizes) - 1
    padded = sharded_lookup.pad_table_rows(params)
    mesh = sharding.make_mesh(8, model_parallel=4)
    shardings = sharding.param_shardings(jax.eval_shape(rowwise.init, padded), mesh, embedding_sharding="row")
    accumulators = [
        s for s in jax.tree.leaves(shardings, is_leaf=lambda x: isinstance(x, nnx.Variable))
        if isinstance(s, nnx.Variable) and s.get_metadata().get("out_sharding") == ("vocab", None)
    ]  # fmt: skip
    assert len(accumulators) == 2 and all(a.get_value().spec == PartitionSpec("model", None) for a in accumulators)


@pytest.mark.parametrize("layout", ["row", "column"])
def test_rowwise_adagrad_steps_equal_across_layouts(layout):
    config = fx.tiny_config(table_optimizer="rowwise_adagrad", warmup_steps=0)
    splits = fx.make_splits()
    api = fx.linear_api()
    batch = {k: v[:16] for k, v in splits.train.items()}

    def run(mesh, lay):
        graphdef, params = api.init(config, 0)
        params = sharding.layout_params(params, lay)
        p_sh = sharding.param_shardings(params, mesh, embedding_sharding=lay)
        params = sharding.place(params, p_sh)
        tx = step.make_optimizer(config.train)
        with sharding.mesh_context(mesh, embedding_sharding=lay):
            o_sh = sharding.param_shardings(jax.eval_shape(tx.init, params), mesh, embedding_sharding=lay)
            opt_state = jax.jit(tx.init, out_shardings=o_sh)(params)
            train_step = step.make_train_step(
                api, graphdef, tx, fx.SCHEMA.tasks, (1.0,) * len(fx.SCHEMA.tasks), mesh=mesh, params_sharding=p_sh,
                opt_state_sharding=o_sh, batch_sharding=sharding.batch_shardings(batch, mesh),
            )  # fmt: skip
            for i in range(3):
                params, opt_state, _ = train_step(params, opt_state, sharding.shard_batch(batch, mesh), jax.random.key(i))
        return params

    base = run(sharding.make_mesh(8), "replicated")
    other = run(sharding.make_mesh(8, model_parallel=4), layout)
    for a, b in zip(jax.tree.leaves(base), jax.tree.leaves(other), strict=True):
        b = np.asarray(b)[: a.shape[0]]
        np.testing.assert_allclose(b, np.asarray(a), atol=1e-6)

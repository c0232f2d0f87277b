"""Sharded embedding tables on 8 host devices: row and column layouts equal the replicated one (issue 21).

The suite's conftest gives 8 CPU devices. For GESR, GenRank and the two-tower, logits, loss and every
gradient of the row- and column-sharded model equal the replicated model's within 1e-5; the per-device
table bytes are the total over the model-axis size; the row layout's compiled train step holds a
reduce-scatter and no all-reduce of the looked-up activations.
"""

from __future__ import annotations


import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec

from gesr_jax import api
from gesr_jax import config as config_lib
from gesr_jax.data import batch as batch_lib
from gesr_jax.data import datasets
from gesr_jax.layers import sharded_lookup
from gesr_jax.train import hlo_collectives, sharding, step

KINDS = {"gesr": [], "genrank": ["model.kind=genrank"], "two_tower": ["model.kind=two_tower"]}
BATCH = 16


def _model(kind: str):
    config = config_lib.load_config("synthetic_tiny", KINDS[kind])
    schema = datasets.schema_for(config.data)
    graphdef, params = api.init(config, 0, schema)
    batch = {k: jnp.asarray(v) for k, v in batch_lib.random_batch(schema, BATCH, seed=3).items()}
    return config, schema, graphdef, params, batch


def _logits_loss_grads(graphdef, params, batch, tasks, mesh, layout):
    """Logits, loss and gradients of ``params`` placed in ``layout`` on ``mesh``, all compiled."""
    params = sharding.layout_params(params, layout)
    p_sharding = sharding.param_shardings(params, mesh, embedding_sharding=layout)
    params = sharding.place(params, p_sharding)
    b_sharding = sharding.batch_shardings(batch, mesh)
    batch = sharding.place(batch, b_sharding)
    weights = (1.0,) * len(tasks)

    def loss_fn(p):
        logits = api.apply(graphdef, p, batch, train=False, validate=False)
        loss, _ = step.multitask_loss(logits, batch, tasks, weights)
        return loss, logits

    with sharding.mesh_context(mesh, embedding_sharding=layout):
        (loss, logits), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(params)
    return logits, loss, grads, params


def _unpad(tree, reference):
    """``tree``'s arrays cut to ``reference``'s shapes (row padding dropped), as numpy."""
    return jax.tree.map(lambda x, r: np.asarray(x)[tuple(slice(0, n) for n in r.shape)], tree, reference)


# The two-tower compiles fastest: it runs by default; GESR and GenRank (minutes on the shared 2-core box) are slow.
@pytest.mark.parametrize(
    "kind", [pytest.param("gesr", marks=pytest.mark.slow), pytest.param("genrank", marks=pytest.mark.slow), "two_tower"]
)
def test_row_and_column_layouts_equal_the_replicated_one(kind):
    config, schema, graphdef, params, batch = _model(kind)
    tasks = schema.tasks
    base_logits, base_loss, base_grads, _ = _logits_loss_grads(
        graphdef, params, batch, tasks, sharding.make_mesh(8), "replicated"
    )
    for layout in ("row", "column"):
        mesh = sharding.make_mesh(8, model_parallel=4)  # data=2 x model=4
        logits, loss, grads, _ = _logits_loss_grads(graphdef, params, batch, tasks, mesh, layout)
        assert float(loss) == pytest.approx(float(base_loss), abs=1e-5), layout
        for t in tasks:
            np.testing.assert_allclose(np.asarray(logits[t]), np.asarray(base_logits[t]), atol=1e-5, rtol=0)
        for (path, g), (_, g0) in zip(
            jax.tree_util.tree_leaves_with_path(_unpad(grads, base_grads)),
            jax.tree_util.tree_leaves_with_path(base_grads), strict=True,
        ):  # fmt: skip
            np.testing.assert_allclose(g, np.asarray(g0), atol=1e-5, rtol=0, err_msg=f"{layout} {path}")
        if layout == "row":  # the padding rows got no gradient
            for var in jax.tree.leaves(grads, is_leaf=lambda x: isinstance(x, nnx.Variable)):
                if sharded_lookup.is_table(var.get_metadata().get("out_sharding")):
                    assert var.get_value().shape[0] % sharded_lookup.TABLE_ROW_MULTIPLE == 0


@pytest.mark.parametrize("layout", ["row", "column"])
def test_per_device_table_bytes_are_the_total_over_the_model_axis(layout):
    _, _, _, params, _ = _model("gesr")
    for m in (2, 8):
        mesh = sharding.make_mesh(8, model_parallel=m)
        padded = sharding.layout_params(params, layout)
        placed = sharding.place(padded, sharding.param_shardings(padded, mesh, embedding_sharding=layout))
        total, per_device = sharding.table_bytes_per_device(placed)
        assert total > 0 and per_device * m == total
    replicated = sharding.place(params, sharding.param_shardings(params, sharding.make_mesh(8)))
    total, per_device = sharding.table_bytes_per_device(replicated)
    assert per_device == total


def test_row_layout_step_reduce_scatters_the_lookups_and_never_all_reduces_them():
    config, schema, graphdef, params, batch = _model("two_tower")
    mesh = sharding.make_mesh(8, model_parallel=8)
    params = sharding.layout_params(params, "row")
    p_sharding = sharding.param_shardings(params, mesh, embedding_sharding="row")
    params = sharding.place(params, p_sharding)
    tx = step.make_optimizer(config.train)
    with sharding.mesh_context(mesh, embedding_sharding="row"):
        o_sharding = sharding.param_shardings(jax.eval_shape(tx.init, params), mesh, embedding_sharding="row")
        train_step = step.make_train_step(
            api, graphdef, tx, schema.tasks, (1.0,) * len(schema.tasks), mesh=mesh, params_sharding=p_sharding,
            opt_state_sharding=o_sharding, batch_sharding=sharding.batch_shardings(batch, mesh),
        )  # fmt: skip
        opt_state = jax.eval_shape(tx.init, params)
        hlo = train_step.lower(params, opt_state, batch, jax.random.key(0)).compile().as_text()
    moved = [c for c in hlo_collectives.collectives(hlo) if c.group_size != 1]  # size-1 groups move nothing
    d = config.model.embed_dim
    scatters = [s for c in moved if c.kind == "reduce-scatter" for s in c.shapes]
    assert scatters and all(s[-1] == d for s in scatters)  # one per lookup: [b, L, D] slices of embeddings
    # The only all-reduces are of gradients of replicated parameters and of scalars: never a [B, L, D] lookup.
    reduced = [s for c in moved if c.kind == "all-reduce" for s in c.shapes]
    looked_up = [s for s in reduced if len(s) >= 2 and s[-1] == d and s[0] >= BATCH // 8]
    dense_shapes = {tuple(np.shape(x)) for x in jax.tree.leaves(params)}
    assert all(s in dense_shapes for s in looked_up), looked_up


def test_serving_item_cache_is_built_from_a_row_sharded_table():
    """What ``serving.Scorer`` does (``api.item_cache``), on row-sharded params under the row layout."""
    config, _, graphdef, params, _ = _model("two_tower")
    table = datasets.item_table(config.data)
    expected = np.asarray(api.item_cache(graphdef, params, table))
    mesh = sharding.make_mesh(8, model_parallel=8)
    padded = sharding.layout_params(params, "row")
    placed = sharding.place(padded, sharding.param_shardings(padded, mesh, embedding_sharding="row"))
    tables = [
        v.get_value() for v in jax.tree.leaves(placed, is_leaf=lambda x: isinstance(x, nnx.Variable))
        if isinstance(v, nnx.Variable) and sharded_lookup.is_table(v.get_metadata().get("out_sharding"))
    ]  # fmt: skip
    assert tables and all(t.sharding.spec == PartitionSpec("model", None) for t in tables)
    with sharding.mesh_context(mesh, embedding_sharding="row"):
        cache = api.item_cache(graphdef, placed, table)
    assert cache.shape == expected.shape
    np.testing.assert_allclose(np.asarray(cache), expected, atol=1e-6, rtol=0)

"""Orbax saves row-sharded tables and their row-wise optimiser state, and restores them onto another mesh (8 -> 4)."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import train_fixtures as fx
from jax.sharding import PartitionSpec

from gesr_jax.data import pipeline
from gesr_jax.train import sharding, step
from gesr_jax.train.checkpoint import Checkpointer


def _state(seed: int, devices: int, model_parallel: int, layout: str):
    mesh = sharding.make_mesh(devices, model_parallel=model_parallel)
    _, params = fx.linear_api().init(None, seed)
    params = sharding.layout_params(params, "row")  # the saved run was row-sharded: its padded shapes
    p_sharding = sharding.param_shardings(params, mesh, embedding_sharding=layout)
    params = sharding.place(params, p_sharding)
    tx = step.make_optimizer(dataclasses.replace(fx.tiny_config().train, table_optimizer="rowwise_adagrad"))
    o_sharding = sharding.param_shardings(jax.eval_shape(tx.init, params), mesh, embedding_sharding=layout)
    opt_state = jax.jit(tx.init, out_shardings=o_sharding)(params)
    # One update, so the accumulators are not all zero.
    grads = jax.tree.map(lambda x: x * 0.1 + 0.01, params)
    updates, opt_state = jax.jit(tx.update, out_shardings=(p_sharding, o_sharding))(grads, opt_state, params)
    return params, opt_state


def test_row_sharded_params_and_optimizer_restore_onto_a_mesh_of_another_shape(tmp_path):
    params, opt_state = _state(0, 8, 8, "row")
    assert params["user"][...].sharding.spec == PartitionSpec("model", None)
    assert len({s.device for s in params["user"][...].addressable_shards}) == 8
    it = pipeline.make_iterator(pipeline.train_dataset(fx.make_splits().train, 8, seed=0))
    with Checkpointer(tmp_path / "ck") as ckpt:
        ckpt.save(1, params, opt_state, it)
        ckpt.wait()
    for devices, model_parallel, layout in [(4, 4, "row"), (4, 2, "column"), (2, 1, "replicated")]:
        template_params, template_opt = _state(1, devices, model_parallel, layout)
        it2 = pipeline.make_iterator(pipeline.train_dataset(fx.make_splits().train, 8, seed=0))
        with Checkpointer(tmp_path / "ck") as ckpt:
            got_params, got_opt, got_step, _ = ckpt.restore(
                1, params=template_params, opt_state=template_opt, data_iterator=it2
            )
        assert got_step == 1
        for want, got in [(params, got_params), (opt_state, got_opt)]:
            for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(got), strict=True):
                np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        user = got_params["user"][...]
        assert user.sharding == template_params["user"][...].sharding, layout
        assert len({s.device for s in user.addressable_shards}) == devices

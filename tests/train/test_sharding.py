"""Mesh construction and the logical-axis rules."""

from __future__ import annotations

import jax
import numpy as np
import pytest
import train_fixtures as fx
from jax.sharding import AxisType, PartitionSpec

from gesr_jax.data import batch as batch_lib
from gesr_jax.train import sharding


def test_mesh_has_auto_data_and_model_axes():
    mesh = sharding.make_mesh()
    assert mesh.axis_names == ("data", "model")
    assert dict(mesh.shape) == {"data": len(jax.devices()), "model": 1}
    assert all(t == AxisType.Auto for t in mesh.axis_types)
    assert dict(sharding.make_mesh(8, model_parallel=2).shape) == {"data": 4, "model": 2}
    with pytest.raises(ValueError, match="num_devices=99"):
        sharding.make_mesh(99)


def test_batch_size_must_divide_data_axis_and_names_the_field():
    mesh = sharding.make_mesh(8)
    sharding.check_batch_size(16, mesh)
    with pytest.raises(ValueError, match=r"train.batch_size=12 must be divisible by the 8 devices"):
        sharding.check_batch_size(12, mesh)


def test_rules_translate_logical_names():
    # The batch is split over every device; tables follow model.embedding_sharding.
    assert sharding.logical_to_mesh(("batch", None, "embed")) == PartitionSpec(("data", "model"), None, None)
    assert sharding.logical_to_mesh(("vocab", "embed")) == PartitionSpec(None, None)
    assert sharding.logical_to_mesh(("vocab", "embed"), sharding.rules_for("row")) == PartitionSpec("model", None)
    with pytest.raises(ValueError, match="logical axis 'time'"):
        sharding.logical_to_mesh(("time",))
    with pytest.raises(ValueError, match="model.embedding_sharding must be one of"):
        sharding.rules_for("diagonal")


def test_column_layout_shards_table_width_and_the_mesh_checks_name_the_fields():
    mesh = sharding.make_mesh(8, model_parallel=4)
    _, params = fx.linear_api().init(None, 0)
    column = sharding.param_shardings(params, mesh, embedding_sharding="column")
    assert column["user"].get_value().spec == PartitionSpec(None, "model")
    assert column["w"].get_value().spec == PartitionSpec(None, None)
    with sharding.mesh_context(mesh, embedding_sharding="column"):  # inside the run's context: the same
        inside = sharding.param_shardings(params, mesh, embedding_sharding="column")
    assert inside["user"].get_value().spec == PartitionSpec(None, "model")
    config = fx.tiny_config(model_parallel=3)
    with pytest.raises(ValueError, match=r"train.model_parallel: model_parallel=3 must divide"):
        sharding.mesh_for(config, 8)
    with pytest.raises(ValueError, match=r"model.embed_dim=6 must be divisible by train.model_parallel=4"):
        sharding.check_layout("column", mesh, 6)


def test_params_replicated_under_default_rules_and_sharded_when_rules_change():
    mesh = sharding.make_mesh(8)
    _, params = fx.linear_api().init(None, 0)
    default = sharding.param_shardings(params, mesh)
    assert all(s.spec == PartitionSpec(None, None) or s.spec == PartitionSpec(None) for s in jax.tree.leaves(default))
    # Moving the embedding rows onto the data axis is a rules change only.
    rules = tuple((name, "data" if name == "vocab" else axis) for name, axis in sharding.LOGICAL_AXIS_RULES)
    custom = sharding.param_shardings(params, mesh, rules)
    assert custom["user"].get_value().spec == PartitionSpec("data", None)
    assert custom["w"].get_value().spec == PartitionSpec(None, None)


def test_shard_batch_splits_requests_over_devices():
    mesh = sharding.make_mesh(4)
    host = batch_lib.random_batch(fx.SCHEMA, 8, seed=0)
    batch = sharding.shard_batch(host, mesh)
    shards = batch["cand_item"].addressable_shards
    assert len(shards) == 4 and shards[0].data.shape == (2, fx.SCHEMA.num_candidates)
    np.testing.assert_array_equal(np.asarray(batch["cand_item"]), host["cand_item"])


def test_evaluation_meshes_shrink_the_model_axis_to_the_devices_at_hand():
    config = fx.tiny_config(model_parallel=8)
    assert dict(sharding.mesh_for(config, 8)[0].shape) == {"data": 1, "model": 8}
    assert dict(sharding.mesh_for(config, 4, strict=False)[0].shape) == {"data": 1, "model": 4}
    assert dict(sharding.mesh_for(config, 6, strict=False)[0].shape) == {"data": 3, "model": 2}
    with pytest.raises(ValueError, match="train.model_parallel"):
        sharding.mesh_for(config, 4)

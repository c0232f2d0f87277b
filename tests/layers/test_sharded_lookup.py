"""sharded_lookup on 8 host devices: every layout equals jnp.take for any id shape; hashing of overflow ids."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from gesr_jax.layers import sharded_lookup
from gesr_jax.layers.core import Embed
from gesr_jax.train import sharding


@pytest.mark.parametrize("layout", ["row", "column"])
@pytest.mark.parametrize("shape", [(5,), (16, 2, 3)])  # padded batch axis; several id axes
def test_every_layout_equals_take_for_any_id_shape_including_gradients(layout, shape):
    table = jax.random.normal(jax.random.key(0), (128, 16))
    ids = jax.random.randint(jax.random.key(1), shape, -3, 140)  # out of range: clipped like mode="clip"
    mesh = sharding.make_mesh(8, model_parallel=4)
    spec = jax.sharding.PartitionSpec("model", None) if layout == "row" else jax.sharding.PartitionSpec(None, "model")
    placed = jax.device_put(table, jax.sharding.NamedSharding(mesh, spec))
    cotangent = jax.random.normal(jax.random.key(2), (*shape, 16))

    def loss(t, lay):
        return jnp.sum(sharded_lookup.sharded_lookup(t, ids, 120, lay) * cotangent)

    with sharding.mesh_context(mesh, embedding_sharding=layout):
        got = jax.jit(lambda t: sharded_lookup.sharded_lookup(t, ids, 120))(placed)
        grad = jax.jit(jax.grad(lambda t: loss(t, layout)))(placed)
    np.testing.assert_allclose(np.asarray(got), np.asarray(jnp.take(table, jnp.clip(ids, 0, 119), axis=0)), atol=1e-6)
    np.testing.assert_allclose(np.asarray(grad), np.asarray(jax.grad(lambda t: loss(t, "replicated"))(table)), atol=1e-5)


def test_row_layout_refuses_a_table_the_model_axis_does_not_divide():
    mesh = sharding.make_mesh(8, model_parallel=8)
    with sharding.mesh_context(mesh, embedding_sharding="row"), pytest.raises(ValueError, match="pad_table_rows"):
        sharded_lookup.sharded_lookup(jnp.zeros((13, 4)), jnp.zeros((8,), jnp.int32))


def test_pad_table_rows_pads_only_tables_with_zero_rows_and_is_idempotent():
    embed = Embed(13, 4, rngs=nnx.Rngs(params=0))
    _, state = nnx.split(embed)
    padded = sharded_lookup.pad_table_rows(state)
    table = padded["table"].get_value()
    assert table.shape == (sharded_lookup.TABLE_ROW_MULTIPLE, 4) and not np.asarray(table[13:]).any()
    np.testing.assert_array_equal(np.asarray(table[:13]), np.asarray(state["table"].get_value()))
    again = sharded_lookup.pad_table_rows(padded)
    assert again["table"].get_value().shape == table.shape


def test_overflow_ids_hash_into_the_extra_rows_and_ids_in_the_vocabulary_never_move():
    ids = jnp.arange(0, 5000)
    hashed = np.asarray(sharded_lookup.hash_ids(ids, 100, 64))
    np.testing.assert_array_equal(hashed[:100], np.arange(100))
    assert hashed[100:].min() >= 100 and hashed[100:].max() < 164
    assert len(set(hashed[100:].tolist())) == 64  # consecutive overflow ids spread over every bucket
    np.testing.assert_array_equal(hashed, np.asarray(sharded_lookup.hash_ids(ids, 100, 64)))  # deterministic
    assert sharded_lookup.hash_ids(ids, 100, 0) is ids  # 0 = off

    embed = Embed(10, 4, rngs=nnx.Rngs(params=0), hash_buckets=8)
    assert embed.table.shape == (18, 4)
    row = int(sharded_lookup.hash_ids(jnp.array(10**6), 10, 8))
    np.testing.assert_array_equal(np.asarray(embed(jnp.array([10**6]))[0]), np.asarray(embed.table[...][row]))
    with pytest.raises(ValueError, match="hash_buckets must be >= 0"):
        Embed(10, 4, rngs=nnx.Rngs(params=0), hash_buckets=-1)

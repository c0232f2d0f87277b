"""The two-tower interaction: normalised towers bound the dot product; scale 0 keeps raw outputs."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np
from flax import nnx

from gesr_jax.models.two_tower.towers import Interaction
from helpers.models import TINY


def _interaction(scale: float) -> Interaction:
    config = dataclasses.replace(TINY, tower_norm_scale=scale, interaction_mlp=(4,), dropout=0.0)
    return Interaction(config, extra_dim=0, num_tasks=2, rngs=nnx.Rngs(params=0))


def test_normalised_towers_bound_the_dot_product_by_scale_squared():
    layer = _interaction(3.0)
    rng = np.random.default_rng(0)
    u = jnp.asarray(rng.normal(size=(2, TINY.tower_mlp[-1])) * 50.0, jnp.float32)
    i = jnp.asarray(rng.normal(size=(2, 5, TINY.tower_mlp[-1])) * 1e-3, jnp.float32)
    # The dot part alone: zero the MLP's output layer so only a * <u, i> + b remains.
    layer.mlp.layers[-1].kernel[...] = jnp.zeros_like(layer.mlp.layers[-1].kernel[...])
    layer.mlp.layers[-1].bias[...] = jnp.zeros_like(layer.mlp.layers[-1].bias[...])
    out = np.asarray(layer(u, i, []))
    un = u / jnp.linalg.norm(u, axis=-1, keepdims=True)
    inn = i / jnp.linalg.norm(i, axis=-1, keepdims=True)
    expected = 9.0 * np.asarray(jnp.einsum("bd,bcd->bc", un, inn))[..., None]
    np.testing.assert_allclose(out, np.broadcast_to(expected, out.shape), rtol=1e-5, atol=1e-5)
    assert np.abs(out).max() <= 9.0 + 1e-4


def test_scale_zero_uses_the_raw_tower_outputs():
    layer = _interaction(0.0)
    layer.mlp.layers[-1].kernel[...] = jnp.zeros_like(layer.mlp.layers[-1].kernel[...])
    layer.mlp.layers[-1].bias[...] = jnp.zeros_like(layer.mlp.layers[-1].bias[...])
    u = jnp.full((1, TINY.tower_mlp[-1]), 2.0)
    i = jnp.full((1, 3, TINY.tower_mlp[-1]), 0.5)
    np.testing.assert_allclose(np.asarray(layer(u, i, [])), float(TINY.tower_mlp[-1]), rtol=1e-6)


def test_all_zero_tower_output_keeps_finite_gradients():
    import jax

    layer = _interaction(3.0)
    graphdef, params = nnx.split(layer)

    def loss(u):
        return nnx.merge(graphdef, params)(u, jnp.ones((1, 2, u.shape[-1])), []).sum()

    grad = jax.grad(loss)(jnp.zeros((1, TINY.tower_mlp[-1])))
    assert np.all(np.isfinite(np.asarray(grad)))

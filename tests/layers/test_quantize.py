"""FP8 post-training quantisation: kernels become float8 with per-column scales and logits stay close."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from gesr_jax import api
from gesr_jax.layers.core import Dense
from gesr_jax.layers.quantize import FP8, quantize_fp8
from helpers.models import batch_for, make_model


def _nbytes(params) -> int:
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(params))


def test_fp8_quantised_model_is_close_and_smaller():
    model = make_model()
    graphdef, params = nnx.split(model)
    qgraph, qparams = api.quantize_fp8(graphdef, params, min_elements=128)
    kernels = [x for x in jax.tree.leaves(qparams) if x.dtype == FP8]
    assert len(kernels) >= 10
    assert _nbytes(qparams) < _nbytes(params)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params))  # the original is untouched
    batch = batch_for(batch_size=8, seed=11)
    run = jax.jit(lambda g, p, b: api.apply(g, p, b), static_argnums=0)
    ref, out = run(graphdef, params, batch), run(qgraph, qparams, batch)
    # The float32 model with each kernel set to its dequantised value must agree exactly...
    dequantised = {
        path: node.kernel[...].astype(jnp.float32) * node.kernel_scale[...]
        for path, node in nnx.iter_graph(nnx.merge(qgraph, qparams))
        if isinstance(node, Dense) and node.kernel_scale is not None
    }
    float_model = nnx.merge(graphdef, jax.tree.map(lambda x: x, params))
    for path, node in nnx.iter_graph(float_model):
        if path in dequantised:
            # Independent of Dense's formula: each dequantised weight is the original to within e4m3's
            # rounding (3 mantissa bits: relative error <= 2^-4, plus the subnormal step 2^-9 of the scale),
            # and each column's largest weight maps to e4m3's largest value.
            w = np.asarray(node.kernel[...])
            scale = np.asarray(dict(nnx.iter_graph(nnx.merge(qgraph, qparams)))[path].kernel_scale[...])
            np.testing.assert_array_less(np.abs(np.asarray(dequantised[path]) - w), 2**-4 * np.abs(w) + scale * 2**-9 + 1e-12)
            np.testing.assert_allclose(np.abs(w).max(axis=0), scale * 448.0, rtol=1e-6)
            node.kernel[...] = dequantised[path]
    exact = run(graphdef, nnx.state(float_model), batch)  # same graph as the original: no new compile
    for task in ref:
        r, q = np.asarray(ref[task]), np.asarray(out[task])
        np.testing.assert_allclose(q, np.asarray(exact[task]), atol=1e-5)
        # ...and e4m3's 3 mantissa bits (~2% relative weight error) move the logits by a few percent.
        assert np.all(np.isfinite(q)) and not np.array_equal(q, r)
        assert np.linalg.norm(q - r) / np.linalg.norm(r) < 0.15
        assert np.corrcoef(q.ravel(), r.ravel())[0, 1] > 0.99


def test_large_weights_never_overflow_to_nan():
    model = make_model()
    dense = model.towers.interaction.mlp.layers[0]
    dense.kernel[...] = dense.kernel[...] * 1e4  # far beyond e4m3's 448 before scaling
    assert quantize_fp8(model, min_elements=1) > 0
    assert np.all(np.isfinite(np.asarray(dense.kernel[...].astype(jnp.float32))))
    assert quantize_fp8(model, min_elements=1) == 0  # idempotent
    with pytest.raises(ValueError, match="min_elements"):
        quantize_fp8(model, min_elements=0)

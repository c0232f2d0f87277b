"""The head-major cross attention (layers/cross_attention.attend) equals the spec's literal einsums.

The literal form (attend_literal) is the formula as first written ([B, H, M, N] scores from "bmhd,bnhd", values back with
"bhmn,bnhd->bmhd"); attend computes the same numbers in a head-major layout that is faster on CPU. Forward and
gradients (training differentiates through it) must agree within 1e-5 on random inputs, masked rows included.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gesr_jax.layers.cross_attention import attend, attend_literal as literal_attend


@pytest.mark.parametrize("kind", ["silu", "softmax"])
@pytest.mark.parametrize("shared_queries", [False, True], ids=["per_request", "shared"])
def test_attend_equals_the_literal_einsums_forward_and_grads(kind, shared_queries):
    rng = np.random.default_rng(7)
    b, m, n, h, d = 3, 5, 11, 2, 4
    q_shape = (m, h, d) if shared_queries else (b, m, h, d)
    q, k, v = (jnp.asarray(rng.normal(size=s), jnp.float32) for s in (q_shape, (b, n, h, d), (b, n, h, d)))
    valid = jnp.asarray(np.arange(n)[None, :] < np.array([[n], [4], [0]]))  # full, partial, empty history
    out = attend(q, k, v, valid, kind=kind, normalizer=8.0)
    ref = literal_attend(q, k, v, valid, kind=kind, normalizer=8.0)
    assert out.shape == ref.shape == (b, m, h, d)
    np.testing.assert_allclose(out, ref, atol=1e-5, rtol=0)
    assert np.all(np.asarray(out[2]) == 0.0)  # no valid history: zeros, never NaN
    cot = jnp.asarray(rng.normal(size=ref.shape), jnp.float32)

    def loss(fn):
        return lambda q, k, v: jnp.sum(fn(q, k, v, valid, kind=kind, normalizer=8.0) * cot)

    grads = jax.grad(loss(attend), argnums=(0, 1, 2))(q, k, v)
    ref_grads = jax.grad(loss(literal_attend), argnums=(0, 1, 2))(q, k, v)
    for got, want in zip(grads, ref_grads, strict=True):
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)

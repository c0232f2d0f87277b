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


def test_softmax_ignores_huge_padded_keys_and_keeps_very_negative_rows():
    """Masking without a select on the scores: a padded key of any size weighs nothing, and a row whose valid
    scores are all near -200 is still the softmax over them (the shift is the max over valid keys only)."""
    b, n, h, d = 2, 6, 1, 4
    k = np.zeros((b, n, h, d), np.float32)
    k[:, :3, 0, 0] = [-50.0, -51.0, -52.0]
    k[:, 3:] = 1e30  # padding: finite garbage far above every valid key
    v = np.arange(b * n * h * d, dtype=np.float32).reshape(b, n, h, d)
    q = np.zeros((b, 1, h, d), np.float32)
    q[..., 0] = 8.0  # valid scores 8 * [-50, -51, -52] / sqrt(4) = [-200, -204, -208]
    valid = jnp.asarray(np.arange(n)[None, :] < np.array([[3], [3]]))
    out = attend(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), valid, kind="softmax", normalizer=1.0)
    z = np.array([-200.0, -204.0, -208.0])
    w = np.exp(z - z.max()) / np.exp(z - z.max()).sum()
    want = np.einsum("j,bjhd->bhd", w, v[:, :3])[:, None]
    assert np.all(np.isfinite(np.asarray(out)))
    np.testing.assert_allclose(out, want, rtol=1e-5)

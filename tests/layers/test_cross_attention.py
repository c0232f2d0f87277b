"""RO / NRO cross attention: equals a per-candidate brute force, padding-invariant, safe on empty histories."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from gesr_jax.layers.cross_attention import attend
from gesr_jax.models.gesr.moa import NROCrossComponent, ROCrossComponent
from helpers.models import SCHEMA, tiny_config

B, N, C, D = 3, 6, 4, 8
HLEN = jnp.array([6, 2, 0], jnp.int32)


def _history(seed=0):
    x = jax.random.normal(jax.random.key(seed), (B, N, D))
    valid = jnp.arange(N)[None] < HLEN[:, None]
    return jnp.where(valid[..., None], x, 0.0), valid


def _naive(q, k, v, valid, kind, normalizer):
    """One query at a time against an explicit copy of its request's history (what the model avoids)."""
    q, k, v, valid = map(np.asarray, (q, k, v, valid))
    b_, m_, h_, dh = q.shape
    out = np.zeros((b_, m_, h_, v.shape[-1]), np.float32)
    for b in range(b_):
        for m in range(m_):
            for h in range(h_):
                s = k[b, :, h] @ q[b, m, h] / np.sqrt(dh)
                if kind == "softmax":
                    if not valid[b].any():
                        continue
                    e = np.exp(s[valid[b]] - s[valid[b]].max())
                    w = e / e.sum()
                else:
                    w = (s * (1 / (1 + np.exp(-s))))[valid[b]] / normalizer
                out[b, m, h] = w @ v[b, valid[b], h]
    return out


@pytest.mark.parametrize("kind", ["softmax", "silu"])
def test_attend_matches_per_query_brute_force(kind):
    keys = jax.random.split(jax.random.key(3), 3)
    q = jax.random.normal(keys[0], (B, C, 2, 4))
    k = jax.random.normal(keys[1], (B, N, 2, 4))
    v = jax.random.normal(keys[2], (B, N, 2, 4))
    _, valid = _history()
    run = jax.jit(functools.partial(attend, kind=kind, normalizer=8.0))
    out = run(q, k, v, valid)
    np.testing.assert_allclose(out, _naive(q, k, v, valid, kind, 8.0), atol=1e-5)
    # Shared (seed) queries without a batch dim give the same result as explicit per-request copies.
    shared = run(q[0], k, v, valid)
    copied = run(jnp.broadcast_to(q[0], q.shape), k, v, valid)
    np.testing.assert_allclose(shared, copied, atol=1e-6)
    assert not np.asarray(out[2]).any()  # empty history -> zeros, not NaN


def test_ro_outputs_shapes_padding_invariance_and_gradients():
    ro = ROCrossComponent.from_config(tiny_config(), SCHEMA, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(ro)
    run = jax.jit(lambda p, h, v, pr: nnx.merge(graphdef, p)(h, v, pr))
    hist, valid = _history()
    profile = jax.random.normal(jax.random.key(5), (B, D))
    summary, prof = run(params, hist, valid, profile)
    assert summary.shape == (B, 2 * D) and prof.shape == (B, D)
    assert np.all(np.isfinite(summary)) and np.all(np.isfinite(prof))
    hist_p = jnp.pad(hist, ((0, 0), (0, 4), (0, 0)), constant_values=3.0)  # garbage in padding
    valid_p = jnp.pad(valid, ((0, 0), (0, 4)))
    summary_p, prof_p = run(params, hist_p, valid_p, profile)
    np.testing.assert_allclose(summary_p, summary, atol=1e-5)
    np.testing.assert_allclose(prof_p, prof, atol=1e-5)

    def loss(p):
        s, pr = nnx.merge(graphdef, p)(hist, valid, profile)
        return jnp.sum(s**2) + jnp.sum(pr**2)

    grads = jax.jit(jax.grad(loss))(params)
    for path, g in jax.tree_util.tree_leaves_with_path(grads):
        assert np.abs(np.asarray(g)).sum() > 0, path


def test_nro_is_per_candidate_and_gated():
    nro = NROCrossComponent.from_config(tiny_config(), SCHEMA, rngs=nnx.Rngs(0))
    hist, valid = _history()
    query = jax.random.normal(jax.random.key(7), (B, C, D))
    out = nro(query, hist, valid)
    assert out.shape == (B, C, D)
    changed = query.at[0, 2].multiply(-2.0)
    out2 = nro(changed, hist, valid)
    np.testing.assert_allclose(np.delete(np.asarray(out2), 2, 1)[0], np.delete(np.asarray(out), 2, 1)[0], atol=1e-6)
    # Gated update: with no history the attention term is 0 and the output is (1 - g) * q, a shrunk query.
    g = jax.nn.sigmoid(nro.gate([query[2], jnp.zeros_like(query[2]) + nro.o.bias[...]]))
    a = nro.o.bias[...]
    np.testing.assert_allclose(out[2], g * a + (1 - g) * query[2], atol=1e-6)

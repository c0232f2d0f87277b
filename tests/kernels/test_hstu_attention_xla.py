"""The "xla" backend (pure jnp, hand-written custom_vjp backward) against autodiff of the reference."""

import jax.numpy as jnp

from hstu_attention_cases import HSTUAttentionBackendTests


class TestXla(HSTUAttentionBackendTests):
    IMPLEMENTATION = "xla"
    DTYPES = (jnp.float32, jnp.bfloat16)
    BF16_CASES = ("mixed", "contextual_window")
    HYPOTHESIS_EXAMPLES = 15
    EXPORT_PLATFORMS = ("tpu", "cuda")


# --- checks only the dense backend can make -------------------------------------------------------------------
import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from kernels.hstu_attention import attention_mask, geometric_alibi_slopes, hstu_attention  # noqa: E402


def test_geometric_alibi_slopes():
    np.testing.assert_allclose(geometric_alibi_slopes(8), [2.0 ** -(h + 1) for h in range(8)], rtol=1e-7)
    np.testing.assert_allclose(geometric_alibi_slopes(2), [2.0 ** -4, 2.0 ** -8], rtol=1e-7)


@pytest.mark.parametrize("with_time", [False, True])
def test_softmax_equals_dot_product_attention_with_mask_and_bias(with_time):
    """jax.nn.dot_product_attention with the explicit boolean mask and dense bias, on rows with a valid key."""
    b, length, h, d = 2, 11, 2, 8
    q, k, v = (jax.random.normal(jax.random.key(i), (b, length, h, d)) for i in range(3))
    lengths, targets = jnp.array([11, 8]), jnp.array([3, 2])
    slopes = geometric_alibi_slopes(h)
    ts = jnp.cumsum(jax.random.randint(jax.random.key(5), (b, length), 0, 100), axis=1) if with_time else None
    tslopes = jnp.array([0.2, 0.1]) if with_time else None
    out = hstu_attention(q, k, v, lengths, targets, score_fn="softmax", alibi_slopes=slopes, timestamps=ts,
                         time_slopes=tslopes, implementation="xla")
    mask = attention_mask(lengths, targets, length)
    hist = (lengths - targets)[:, None, None]
    pos = jnp.arange(length)
    dist = (jnp.minimum(pos[None, :, None], hist) - jnp.minimum(pos[None, None, :], hist)).astype(jnp.float32)
    bias = -slopes[None, :, None, None] * dist[:, None]
    if with_time:
        bias = bias - tslopes[None, :, None, None] * jnp.log1p(jnp.abs(ts[:, :, None] - ts[:, None, :]))[:, None]
    want = jax.nn.dot_product_attention(q, k, v, bias=bias, mask=mask[:, None], implementation="xla")
    rows = np.arange(length)[None, :] < np.asarray(lengths)[:, None]
    np.testing.assert_allclose(np.asarray(out)[rows], np.asarray(want)[rows], rtol=2e-5, atol=2e-6)
    assert (np.asarray(out)[~rows] == 0).all()


def test_softmax_empty_rows_are_zero_with_finite_grads():
    q = jax.random.normal(jax.random.key(0), (2, 6, 1, 4)) * 300
    lengths = jnp.array([0, 6])

    def loss(q, slopes):
        return hstu_attention(q, q, q, lengths, lengths, score_fn="softmax", alibi_slopes=slopes).sum()

    out = hstu_attention(q, q, q, lengths, lengths, score_fn="softmax")
    assert (np.asarray(out[0]) == 0).all() and np.isfinite(np.asarray(out)).all()
    grads = jax.grad(loss, argnums=(0, 1))(q, jnp.ones((1,)))
    assert all(np.isfinite(np.asarray(g)).all() for g in grads)


def test_candidate_order_does_not_change_scores():
    """ALiBi on the collapsed index: permuting the candidates permutes their outputs, nothing else."""
    q, k, v = (jax.random.normal(jax.random.key(i), (1, 9, 2, 8)) for i in range(3))
    perm = jnp.array([0, 1, 2, 3, 4, 5, 8, 6, 7])
    kw = dict(score_fn="softmax", alibi_slopes=geometric_alibi_slopes(2))
    out = hstu_attention(q, k, v, jnp.array([9]), jnp.array([3]), **kw)
    out_p = hstu_attention(q[:, perm], k[:, perm], v[:, perm], jnp.array([9]), jnp.array([3]), **kw)
    np.testing.assert_allclose(out[:, perm], out_p, rtol=1e-6, atol=1e-6)


@settings(max_examples=6, deadline=None, derandomize=True)
@given(data=st.data())
def test_hypothesis_sweep_cached_lengths(data):
    """Random prefix lengths / query counts: cached forward and gradients against the reference."""
    import test_hstu_attention_xla as me

    score_fn = data.draw(st.sampled_from(["silu", "softmax"]), label="score_fn")
    plen = np.array(data.draw(st.lists(st.integers(0, 12), min_size=3, max_size=3), label="prefix_len"))
    nq = np.array(data.draw(st.lists(st.integers(0, 5), min_size=3, max_size=3), label="num_queries"))
    case = me.TestXla()
    case.CACHED_SHAPE = (3, 5, 12, 2, 16, 8, tuple(plen), tuple(nq))
    case.check_cached(score_fn, ("alibi",), jnp.float32, seed=int(plen.sum()))

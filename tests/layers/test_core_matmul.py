"""layers/core.matmul_last_axis: the 2-D GEMM form of ``einsum("...i,io->...o")`` (Dense, HSTU projections)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from gesr_jax.layers.core import Dense, matmul_last_axis


@pytest.mark.parametrize("lead", [(), (5,), (3, 4), (2, 3, 4), (0, 4)])
def test_values_and_gradients_equal_the_einsum(lead):
    kx, kw, kg = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(kx, (*lead, 6))
    w = jax.random.normal(kw, (6, 7))
    dy = jax.random.normal(kg, (*lead, 7))
    y, vjp = jax.vjp(matmul_last_axis, x, w)
    y_ref, vjp_ref = jax.vjp(lambda a, b: jnp.einsum("...i,io->...o", a, b, precision="highest"), x, w)
    assert y.shape == (*lead, 7)
    np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
    for got, want in zip(vjp(dy), vjp_ref(dy), strict=True):
        assert got.shape == want.shape
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_dense_kernel_gradient_is_one_gemm():
    """The reason for the 2-D form: the kernel gradient of a [B, N, i] input compiles to a GEMM on the
    flattened rows, with no transposed copy of dy (what the einsum's gradient compiled to on CPU)."""
    layer = Dense(8, 16, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(layer)
    x = jnp.ones((4, 32, 8))

    def loss(p):
        return jnp.sum(nnx.merge(graphdef, p)(x) ** 2)

    hlo = jax.jit(jax.grad(loss)).lower(params).as_text()
    assert "dot_general" in hlo
    # The kernel gradient contracts the 128 flattened rows in one dimension (not [4, 32] as two).
    assert "tensor<128x8xf32>" in hlo and "tensor<128x16xf32>" in hlo

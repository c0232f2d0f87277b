"""The CPU "xla_blocked" backend (the "xla" formulas over blocks of examples) against autodiff of the reference."""

import jax
import jax.numpy as jnp
import numpy as np

from hstu_attention_cases import HSTUAttentionBackendTests
from kernels.hstu_attention import BlockSizes, hstu_attention, hstu_attention_cached
from kernels.hstu_attention.backends.xla import blocked as xla_blocked


class TestXlaBlocked(HSTUAttentionBackendTests):
    IMPLEMENTATION = "xla_blocked"
    DTYPES = (jnp.float32, jnp.bfloat16)
    # One example per block, two (the 3-example cases pad to 4), and the automatic choice (one block).
    BLOCKS = (BlockSizes(examples=1), BlockSizes(examples=2), None)
    HYPOTHESIS_EXAMPLES = 5


def test_examples_per_block_fits_the_byte_budget():
    # 4 bytes x H=2 x 256 x 256 = 512 KiB per example: two fit 1 MiB.
    assert xla_blocked.examples_per_block(32, 2, 256, 256) == 2
    assert xla_blocked.examples_per_block(32, 2, 2048, 2048) == 2  # never fewer than 2 (one alone is slower)
    assert xla_blocked.examples_per_block(3, 1, 8, 8) == 3  # never more than the batch
    assert xla_blocked.examples_per_block(1, 2, 2048, 2048) == 1
    assert xla_blocked.examples_per_block(32, 2, 64, 257) == 4  # 7 fit; 4 is the largest divisor of 32 (no padding)
    assert xla_blocked.examples_per_block(31, 2, 64, 257) == 7  # 31 is prime: 7 per block, padded to 35
    assert xla_blocked.examples_per_block(32, 2, 256, 256, BlockSizes(examples=5)) == 5


def test_blocked_equals_dense_in_float32():
    """Blocks run the dense backend's own ops on a slice of the batch (padded batch: 5 examples, blocks of 2)."""
    keys = jax.random.split(jax.random.key(3), 5)
    b, n, c, h, d = 5, 12, 4, 2, 8
    q, k, v = (jax.random.normal(kk, (b, n, h, d)) for kk in keys[:3])
    lengths, targets = jnp.array([12, 7, 0, 3, 12]), jnp.array([2, 1, 0, 3, 0])
    blocks = BlockSizes(examples=2)
    run = lambda impl, **kw: hstu_attention(q, k, v, lengths, targets, normalizer=8.0, implementation=impl, **kw)
    np.testing.assert_allclose(run("xla_blocked", block_sizes=blocks), run("xla"), rtol=1e-6, atol=1e-7)
    qc, kc, vc = (jax.random.normal(kk, (b, c, h, d)) for kk in jax.random.split(keys[3], 3))
    prefix_len, nq = jnp.array([12, 0, 5, 9, 1]), jnp.array([4, 4, 2, 0, 1])
    cached = lambda impl, **kw: hstu_attention_cached(qc, kc, vc, k, v, prefix_len, nq, normalizer=8.0,
                                                      implementation=impl, **kw)
    np.testing.assert_allclose(cached("xla_blocked", block_sizes=blocks), cached("xla"), rtol=1e-6, atol=1e-7)

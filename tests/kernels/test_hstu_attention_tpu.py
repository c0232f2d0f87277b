"""The Pallas TPU backend under the TPU interpreter (`pltpu.InterpretParams`); lowering checked for TPU."""

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from hstu_attention_cases import HSTUAttentionBackendTests
from kernels.hstu_attention import BlockSizes


class TestPallasTpu(HSTUAttentionBackendTests):
    IMPLEMENTATION = "pallas_tpu"
    DTYPES = (jnp.float32, jnp.bfloat16)
    # Few, mixed tiles: every TPU-interpreter grid step costs host callbacks.
    BLOCKS = (BlockSizes(32, 32, 32, 32), BlockSizes(16, 32, 32, 16))
    HYPOTHESIS_EXAMPLES = 4
    SWEEP_SEQ_LENS = (23, 40)
    EXPORT_PLATFORMS = ("tpu",)

    def unwritten_output(self):
        return pl.pallas_call(
            lambda x_ref, o_ref: None,
            out_shape=jax.ShapeDtypeStruct((16, 128), jnp.float32),
            interpret=pltpu.InterpretParams(uninitialized_memory="nan"),
        )(jnp.zeros((16, 128), jnp.float32))

    def test_export_lowering_softmax_full_no_bias(self):
        """Full-mode softmax without biases, forward + gradients, lowers for TPU at D = 128, L = 1024 (bf16)."""
        from jax import export

        from kernels.hstu_attention import hstu_attention

        qkv = jax.ShapeDtypeStruct((2, 1024, 2, 128), jnp.bfloat16)
        ints = jax.ShapeDtypeStruct((2,), jnp.int32)
        for contextual_len, max_attn_len in ((0, None), (2, 64)):
            def loss(q, k, v, lengths, targets):
                out = hstu_attention(q, k, v, lengths, targets, score_fn="softmax", implementation=self.IMPLEMENTATION,
                                     contextual_len=contextual_len, max_attn_len=max_attn_len)
                return jnp.sum(out.astype(jnp.float32))

            fn = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))
            export.export(fn, platforms=["tpu"])(qkv, qkv, qkv, ints, ints)

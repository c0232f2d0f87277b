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

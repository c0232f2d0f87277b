"""The Pallas Triton backend, run by the generic Pallas interpreter; lowering checked for CUDA."""

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from hstu_attention_cases import HSTUAttentionBackendTests
from kernels.hstu_attention import BlockSizes


class TestPallasTriton(HSTUAttentionBackendTests):
    IMPLEMENTATION = "pallas_triton"
    DTYPES = (jnp.float32, jnp.bfloat16)
    # 16 is Triton's smallest dot tile; mixed sizes exercise bq != bk in both passes.
    BLOCKS = (BlockSizes(16, 16, 16, 16), BlockSizes(16, 32, 32, 16))
    HYPOTHESIS_EXAMPLES = 8
    EXPORT_PLATFORMS = ("cuda",)

    def unwritten_output(self):
        return pl.pallas_call(
            lambda x_ref, o_ref: None, out_shape=jax.ShapeDtypeStruct((16, 16), jnp.float32), interpret=True
        )(jnp.zeros((16, 16), jnp.float32))

"""The Pallas Mosaic GPU backend under the Mosaic GPU interpreter (TMA, barriers and warpgroups simulated
on CPU); the compiled variant, which feeds wgmma from registers, is checked by lowering for CUDA.

Mosaic GPU kernels take bfloat16/float16 only, so the float32 checks are skipped and the bfloat16 check
covers the mask cases. Tiles are the fixed warpgroup shapes (64 rows, L padded to 128), so tiny cases
run one CTA; the "long" case spans several CTAs, key blocks and diagonal steps.
"""

import dataclasses

import jax
import jax.numpy as jnp
from jax.experimental.pallas import mosaic_gpu as plgpu

from hstu_attention_cases import CASES, Case, HSTUAttentionBackendTests
from kernels.hstu_attention import BlockSizes


class TestPallasMosaicGpu(HSTUAttentionBackendTests):
    IMPLEMENTATION = "pallas_mosaic_gpu"
    DTYPES = (jnp.bfloat16,)
    # One head per case: every simulated CTA costs seconds. contextual_window covers the masked-only
    # schedule of contextual and windowed masks (the range arithmetic in masks.py is shared and tested case
    # by case on the other backends); "long" spans several CTAs, mask-free, masked and diagonal steps.
    CASES = (
        dataclasses.replace(CASES[0], heads=1),
        CASES[1],
        CASES[4],
        Case("long", 1, 300, 1, 64, 64, (290,), (70,)),
    )
    BF16_CASES = ("mixed", "one_head", "contextual_window", "long")
    BLOCKS = (None, BlockSizes(block_q=64, block_k=64, block_q_bwd=128, block_k_bwd=64))
    HYPOTHESIS_EXAMPLES = 3
    SWEEP_SEQ_LENS = (40,)
    EXPORT_PLATFORMS = ("cuda",)

    def unwritten_output(self):
        return plgpu.kernel(
            lambda x_ref, o_ref: None,
            out_type=jax.ShapeDtypeStruct((64, 64), jnp.float32),
            grid=(1,),
            grid_names=("g",),
            interpret=plgpu.InterpretGPUParams(uninitialized_memory="nan"),
        )(jnp.zeros((64, 64), jnp.float32))

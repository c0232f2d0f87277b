"""The Pallas Mosaic GPU backend under the Mosaic GPU interpreter (TMA, barriers and warpgroups simulated
on CPU); the compiled variant, which feeds wgmma from registers, is checked by lowering for CUDA.

Mosaic GPU kernels take bfloat16/float16 only, so the float32 checks are skipped and the bfloat16 check
covers the mask cases. Tiles are the fixed warpgroup shapes (64 rows, L padded to 128), so tiny cases
run one CTA; the "long" case spans several CTAs, key blocks and diagonal steps.
"""

import dataclasses

import jax
import jax.numpy as jnp
import pytest
from jax.experimental.pallas import mosaic_gpu as plgpu

from hstu_attention_cases import CASES, Case, HSTUAttentionBackendTests, export_fwd_bwd
from kernels.hstu_attention import BlockSizes, hstu_attention
from kernels.hstu_attention import backend_pallas_mosaic_gpu as pallas_mosaic_gpu
from kernels.hstu_attention.registry import BACKENDS


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


# Head dims around the shared-memory limit: (128, 128) fits the default tiles, (192, 192) and (128, 256) need the
# streamed tiles shrunk to 64, (256, 256) fits no tiles (the dq kernel alone would need 256 KiB).
@pytest.mark.parametrize("dqk,dv,fitted_block_k", [(128, 128, 128), (192, 192, 64), (256, 256, None), (128, 256, 64)])
def test_shared_memory_accounting_agrees_with_mosaic(dqk, dv, fitted_block_k, monkeypatch):
    """Tiles the backend accepts lower under Mosaic GPU's own shared-memory check; tiles it rejects (or
    shrinks from) exceed that check when forced through, so the estimate is neither loose nor too strict."""
    default = BACKENDS["pallas_mosaic_gpu"].default_blocks
    try:
        fitted = pallas_mosaic_gpu.fit_shared_memory(default, dqk, dv, 2, shrink=True)
    except NotImplementedError as err:
        assert "shared memory" in str(err) and f"Dqk={dqk}" in str(err)
        fitted = None
    assert (fitted and fitted.block_k) == fitted_block_k
    if fitted is None:
        rejected = dataclasses.replace(default, block_k=64, block_q_bwd=64)
    else:
        export_fwd_bwd("pallas_mosaic_gpu", "cuda", seq_len=256, head_dim=dqk, value_dim=dv, contextual_len=0)
        rejected = default if fitted != default else None
    if rejected is not None:
        with pytest.raises(NotImplementedError, match="shared memory"):
            export_fwd_bwd("pallas_mosaic_gpu", "cuda", seq_len=256, head_dim=dqk, value_dim=dv,
                           contextual_len=0, block_sizes=rejected)
        monkeypatch.setattr(pallas_mosaic_gpu, "SMEM_BUDGET", 1 << 30)
        with pytest.raises(ValueError, match="exceeds available shared memory"):
            export_fwd_bwd("pallas_mosaic_gpu", "cuda", seq_len=256, head_dim=dqk, value_dim=dv,
                           contextual_len=0, block_sizes=rejected)


def test_oversized_head_dims_fall_back_with_one_warning(monkeypatch):
    """implementation=None on a Hopper whose kernels cannot hold the tiles: Mosaic GPU warns, Triton runs."""
    from kernels.hstu_attention import api

    monkeypatch.setattr(api, "_auto_candidates", lambda request: [BACKENDS["pallas_mosaic_gpu"], BACKENDS["xla"]])
    api._warned.clear()
    q = jnp.ones((1, 64, 1, 320), jnp.bfloat16)
    lengths = jnp.array([64], jnp.int32)
    with pytest.warns(RuntimeWarning, match="pallas_mosaic_gpu unavailable.*shared memory"):
        out = hstu_attention(q, q, q, lengths, normalizer=64.0)
    assert out.shape == q.shape

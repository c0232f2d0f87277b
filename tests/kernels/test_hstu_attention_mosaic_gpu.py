"""The Pallas Mosaic GPU backend under the Mosaic GPU interpreter (TMA, barriers and warpgroups simulated
on CPU); the compiled variant, which feeds wgmma from registers, is checked by lowering for CUDA.

Mosaic GPU kernels take bfloat16/float16 only, so the float32 checks are skipped and the bfloat16 check
covers the mask cases. Tiles are the fixed warpgroup shapes (64 rows, L padded to 128), so tiny cases
run one CTA; the "long" case spans several CTAs, key blocks and diagonal steps. Softmax, both biases and the
cached mode run through the shared checks (`ranking_attention_cases.py`); every (score, bias, mode) combination
also lowers for CUDA at D = 128 (slow). "gesr_traced" is issue 25's backward "hang" shape (B = 4, H = 2, GESR's
history 50 / head dim 16, lengths traced); `experiments/mosaic_gpu_backward_shapes.py` runs the whole matrix.
"""

import dataclasses
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest
from jax.experimental.pallas import mosaic_gpu as plgpu

from hstu_attention_cases import CASES, Case, HSTUAttentionBackendTests, export_fwd_bwd
from ranking_attention_cases import COMBOS, COMBO_IDS
from kernels.hstu_attention import BlockSizes, hstu_attention
from kernels.hstu_attention.backends.mosaic_gpu import _common as mosaic_common
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
        Case("gesr_traced", 4, 50, 2, 16, 16, (50, 11, 0, 7), (4, 0, 0, 7)),
    )
    BF16_CASES = ("mixed", "one_head", "contextual_window", "long", "gesr_traced")
    BLOCKS = (None, BlockSizes(block_q=64, block_k=64, block_q_bwd=128, block_k_bwd=64))
    HYPOTHESIS_EXAMPLES = 3
    SWEEP_SEQ_LENS = (40,)
    EXPORT_PLATFORMS = ("cuda",)

    @pytest.mark.parametrize("self_term", [True, False])
    @pytest.mark.parametrize("combo", range(len(COMBOS)), ids=COMBO_IDS)
    def test_scores_and_biases_cached(self, combo, self_term, request):
        if COMBOS[combo] == ("softmax", ("alibi", "time")) and not self_term:
            # bf16 kernels get this head's time-slope gradient 0.4067 against the float32 reference's 0.3539 (the
            # Triton kernels in bf16 give 0.4067 too): with softmax sum_j dS = 0, so the slope gradient is a
            # cancelling sum, and bf16 rounding of O (hence delta) moves it more than the base's tolerance,
            # which is relative to the (small) result. The float32 backends run this check in float32.
            request.applymarker(pytest.mark.xfail(strict=True, reason="bf16 cancellation in a softmax slope gradient"))
        super().test_scores_and_biases_cached(combo, self_term)

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
        fitted = mosaic_common.fit_shared_memory(default, dqk, dv, 2, shrink=True)
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
        monkeypatch.setattr(mosaic_common, "SMEM_BUDGET", 1 << 30)
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


def export_combination(mode: str, score_fn: str, biases: tuple, seq_len: int = 256, head_dim: int = 128):
    """jax.export for CUDA of value_and_grad (q, k, v, prefixes, slopes) through pallas_mosaic_gpu, bf16."""
    from jax import export

    from kernels.hstu_attention import hstu_attention_cached

    bf = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.bfloat16)
    ints, slopes = jax.ShapeDtypeStruct((2,), jnp.int32), jax.ShapeDtypeStruct((2,), jnp.float32)
    stamps = lambda n: jax.ShapeDtypeStruct((2, n), jnp.int32)
    rows = seq_len if mode == "full" else seq_len // 2
    kw = dict(score_fn=score_fn, implementation="pallas_mosaic_gpu",
              normalizer=float(seq_len) if score_fn == "silu" else None)
    alibi_on, time_on = "alibi" in biases, "time" in biases

    def loss(q, k, v, kp, vp, a, b, alibi, tslopes, ts, pts):
        bias_kw = dict(alibi_slopes=alibi if alibi_on else None, time_slopes=tslopes if time_on else None,
                       timestamps=ts if time_on else None)
        if mode == "full":
            out = hstu_attention(q, k, v, a, b, **bias_kw, **kw)
        else:
            out = hstu_attention_cached(q, k, v, kp, vp, a, b, prefix_timestamps=pts if time_on else None,
                                        **bias_kw, **kw)
        return jnp.sum(out.astype(jnp.float32))

    fn = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3, 4, 7, 8)))
    args = (bf(2, rows, 2, head_dim),) * 3 + (bf(2, seq_len, 2, head_dim),) * 2 + (ints, ints, slopes, slopes,
                                                                                   stamps(rows), stamps(seq_len))
    return export.export(fn, platforms=["cuda"])(*args)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["full", "cached"])
@pytest.mark.parametrize("combo", range(len(COMBOS) + 1), ids=["silu-nobias"] + COMBO_IDS)
def test_every_combination_lowers_for_cuda(combo, mode):
    """Each (score, bias) combination, forward + every gradient, lowers for CUDA at D = 128 in both modes."""
    score_fn, biases = (("silu", ()), *COMBOS)[combo]
    export_combination(mode, score_fn, biases)


@pytest.mark.slow
def test_issue25_backward_matrix_finishes():
    """Issue 25's traced-lengths backward matrix finishes (under a timeout, so a deadlock fails) and is right."""
    script = pathlib.Path(__file__).resolve().parents[2] / "experiments" / "mosaic_gpu_backward_shapes.py"
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=1500)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "ALL FINISHED" in done.stdout

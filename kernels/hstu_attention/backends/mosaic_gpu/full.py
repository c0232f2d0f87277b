"""The Mosaic GPU full-sequence mode as one differentiable function: `forward.py`'s kernel under a custom_vjp
whose backward is the dq (`backward_dq.py`) and dk/dv (`backward_dkdv.py`) kernels. Entry point `attention`
(see `api.hstu_attention`)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from kernels.hstu_attention import common
from kernels.hstu_attention.backends.mosaic_gpu import backward_dkdv, backward_dq, forward
from kernels.hstu_attention.backends.mosaic_gpu._common import COMPUTE_WGS, WG_TILE, check_blocks, fit_shared_memory
from kernels.hstu_attention.common import KernelParams
from kernels.hstu_attention.config import BlockSizes
from kernels.hstu_attention.masks import MaskSpec
from kernels.hstu_attention.scores import ScoreSpec

NAME = "pallas_mosaic_gpu"


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _attention(params, q, k, v, lengths, hist, alibi, ts, tslopes):
    return forward.forward(q, k, v, lengths, hist, alibi, ts, tslopes, params)[0]


def _attention_fwd(params, q, k, v, lengths, hist, alibi, ts, tslopes):
    # Scores are recomputed in the backward: residuals are O(L) (plus softmax's output and row LSE).
    out, lse = forward.forward(q, k, v, lengths, hist, alibi, ts, tslopes, params)
    return out, (q, k, v, lengths, hist, alibi, ts, tslopes, out if params.score.softmax else None, lse)


def _attention_bwd(params, res, d_out):
    q, k, v, lengths, hist, alibi, ts, tslopes, out, lse = res
    d_out = d_out.astype(q.dtype)
    delta = None
    if params.score.softmax:
        delta = jnp.transpose(jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), axis=-1), (0, 2, 1))
    args = (alibi, ts, tslopes, lse, delta, params)
    d_q, ga, gt = backward_dq.dq(q, k, v, d_out, lengths, hist, *args)
    d_k, d_v = backward_dkdv.dkdv(q, k, v, d_out, lengths, hist, *args)
    live = (jnp.arange(q.shape[1])[None, None, :] < lengths[:, None, None])
    slope_grad = lambda g: None if g is None else jnp.sum(jnp.where(live, g, 0.0), axis=(0, 2)) * params.acc_scale
    return d_q, d_k, d_v, None, None, slope_grad(ga), None, slope_grad(gt)


_attention.defvjp(_attention_fwd, _attention_bwd)


def attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    lengths: jax.Array,
    num_targets: jax.Array,
    *,
    spec: ScoreSpec,
    normalizer: float | None,
    alpha: float,
    alibi_slopes: jax.Array | None,
    timestamps: jax.Array | None,
    time_slopes: jax.Array | None,
    contextual_len: int,
    max_attn_len: int | None,
    interpret: bool = False,
    block_sizes: BlockSizes | None = None,
    default_blocks: BlockSizes,
) -> jax.Array:
    """Mosaic GPU backend of `kernels.hstu_attention.hstu_attention` (validated, clipped int32 lengths).

    `interpret=True` runs the Mosaic GPU interpreter (`plgpu.InterpretGPUParams()`), which simulates TMA,
    barriers and warpgroups on CPU; there the P/dS tiles go through shared memory (see `mma_from_registers`).
    """
    blocks = block_sizes if block_sizes is not None else default_blocks
    check_blocks(NAME, blocks)
    dqk_p, dv_p = common.round_up(q.shape[-1], 64), common.round_up(v.shape[-1], 64)
    blocks = fit_shared_memory(blocks, dqk_p, dv_p, jnp.dtype(q.dtype).itemsize, shrink=block_sizes is None,
                               score=spec)
    params = KernelParams(normalizer, alpha, MaskSpec(contextual_len, max_attn_len), blocks, interpret, spec)
    multiple = max(COMPUTE_WGS * WG_TILE, blocks.block_k, blocks.block_q_bwd)
    padded_len = common.round_up(q.shape[1], multiple)
    ts = None if timestamps is None else common.pad_axis(timestamps.astype(jnp.int32), 1, padded_len)
    f32 = lambda x: None if x is None else x.astype(jnp.float32)

    def run(qp, kp, vp, lengths, hist, params):
        return _attention(params, qp, kp, vp, lengths, hist, f32(alibi_slopes), ts, f32(time_slopes))

    return common.run_padded(
        run, q, k, v, lengths, num_targets, params,
        seq_multiple=multiple, head_multiple=lambda d: common.round_up(d, 64),
    )

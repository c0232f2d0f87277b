"""The TPU full-sequence mode as one differentiable function: `full_fwd.py`'s kernel under a custom_vjp whose
backward is `full_bwd.py`. Entry point `attention` (see `api.hstu_attention`)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from kernels.hstu_attention import common
from kernels.hstu_attention.backends.tpu import full_bwd, full_fwd
from kernels.hstu_attention.common import KernelParams
from kernels.hstu_attention.config import BlockSizes
from kernels.hstu_attention.masks import MaskSpec
from kernels.hstu_attention.scores import ScoreSpec


@functools.partial(jax.custom_vjp, nondiff_argnums=(8,))
def _attention_bhld(q, k, v, lengths, hist, alibi, ts, tslopes, params):
    return full_fwd.forward(q, k, v, lengths, hist, alibi, ts, tslopes, params)[0]


def _attention_bhld_fwd(q, k, v, lengths, hist, alibi, ts, tslopes, params):
    # Scores are recomputed in the backward: residuals are O(L) (plus softmax's output and row LSE).
    out, lse = full_fwd.forward(q, k, v, lengths, hist, alibi, ts, tslopes, params)
    return out, (q, k, v, lengths, hist, alibi, ts, tslopes, out if params.score.softmax else None, lse)


def _attention_bhld_bwd(params, res, d_out):
    q, k, v, lengths, hist, alibi, ts, tslopes, out, lse = res
    dq, dk, dv, d_alibi, d_time = full_bwd.backward(q, k, v, lengths, hist, alibi, ts, tslopes, out, lse, d_out,
                                                    params)
    # Timestamps get no cotangent (they are data, not parameters).
    return dq, dk, dv, None, None, d_alibi, None, d_time


_attention_bhld.defvjp(_attention_bhld_fwd, _attention_bhld_bwd)


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
    """TPU backend of `kernels.hstu_attention.hstu_attention` (validated, clipped int32 lengths).

    `interpret=True` runs the TPU interpreter (`pltpu.InterpretParams()`), which models TPU memory spaces.
    """
    blocks = block_sizes if block_sizes is not None else default_blocks.fitted(q.shape[1], 16)
    params = KernelParams(normalizer, alpha, MaskSpec(contextual_len, max_attn_len), blocks, interpret, spec)
    multiple = max(blocks.block_q, blocks.block_k, blocks.block_q_bwd, blocks.block_k_bwd)
    ts = None if timestamps is None else common.pad_axis(timestamps, 1, common.round_up(q.shape[1], multiple))
    f32 = lambda x: None if x is None else x.astype(jnp.float32)

    def run(qp, kp, vp, lengths, hist, params):
        # [B, L, H, D] <-> [B, H, L, D]: TPU tiles want (rows, head dim) as the two minor dims.
        to_bhld = lambda x: jnp.swapaxes(x, 1, 2)
        out = _attention_bhld(to_bhld(qp), to_bhld(kp), to_bhld(vp), lengths, hist, f32(alibi_slopes), ts,
                              f32(time_slopes), params)
        return to_bhld(out)

    return common.run_padded(run, q, k, v, lengths, num_targets, params, seq_multiple=multiple,
                             head_multiple=lambda d: d)

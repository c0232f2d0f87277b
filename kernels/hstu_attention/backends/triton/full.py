"""The Triton full-sequence mode as one differentiable function: `full_fwd.py`'s kernel under a custom_vjp whose
backward is `full_bwd.py`. Entry point `attention` (see `api.hstu_attention`)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from kernels.hstu_attention import common
from kernels.hstu_attention.backends.triton import full_bwd, full_fwd
from kernels.hstu_attention.common import KernelParams
from kernels.hstu_attention.config import BlockSizes
from kernels.hstu_attention.masks import MaskSpec
from kernels.hstu_attention.scores import ScoreSpec


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _attention(params, q, k, v, lengths, hist, alibi, ts, tslopes):
    return full_fwd.forward(params, q, k, v, lengths, hist, alibi, ts, tslopes)[0]


def _attention_fwd(params, q, k, v, lengths, hist, alibi, ts, tslopes):
    # Scores are recomputed in the backward: residuals are O(L) (plus softmax's row LSE).
    out, lse = full_fwd.forward(params, q, k, v, lengths, hist, alibi, ts, tslopes)
    return out, (q, k, v, lengths, hist, alibi, ts, tslopes, out if params.score.softmax else None, lse)


def _attention_bwd(params, res, d_out):
    q, k, v, lengths, hist, alibi, ts, tslopes, out, lse = res
    dq, dk, dv, d_alibi, d_time = full_bwd.backward(params, q, k, v, lengths, hist, alibi, ts, tslopes, out, lse, d_out)
    return dq, dk, dv, None, None, d_alibi, None, d_time


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
    """Triton backend of `kernels.hstu_attention.hstu_attention` (validated, clipped int32 lengths)."""
    blocks = block_sizes if block_sizes is not None else default_blocks.fitted(q.shape[1], 16)
    params = KernelParams(normalizer, alpha, MaskSpec(contextual_len, max_attn_len), blocks, interpret, spec)
    multiple = max(blocks.block_q, blocks.block_k, blocks.block_q_bwd, blocks.block_k_bwd)
    ts = None if timestamps is None else common.pad_axis(timestamps, 1, common.round_up(q.shape[1], multiple))
    f32 = lambda x: None if x is None else x.astype(jnp.float32)

    def run(qp, kp, vp, lengths, hist, params):
        return _attention(params, qp, kp, vp, lengths, hist, f32(alibi_slopes), ts, f32(time_slopes))

    return common.run_padded(
        run, q, k, v, lengths, num_targets, params, seq_multiple=multiple, head_multiple=common.next_power_of_two,
    )

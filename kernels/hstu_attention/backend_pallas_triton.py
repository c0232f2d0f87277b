"""Target-aware ranking attention in Pallas lowered through Triton (any CUDA GPU; interpretable on CPU).

Full mode (`hstu_attention`), three kernels, one program per (row or key block, batch, head):
  * forward (here): a row block keeps q and its accumulator in registers and walks the key blocks that
    `masks.key_blocks_for_rows` says it needs, mask-free blocks first, then the masked edge blocks; silu
    accumulates silu(z) V, softmax runs the online softmax and saves the row LSE for the backward;
  * dq and dk/dv (`backend_pallas_triton_bwd.py`): the same walks, with the slope gradients as partial sums.
Each candidate's own diagonal pair, when the walk does not reach it, is added as a row-wise term instead of
visiting a mostly empty block (it is at distance 0 and time difference 0, so it carries no bias). alpha and
1/normalizer are applied once to the accumulators, not per score. Scores and biases (ALiBi on the collapsed
index, the log1p time bias) come from `scores.py`. The cached-prefix mode is `backend_pallas_triton_cached*.py`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltr

from kernels.hstu_attention import backend_pallas_triton_cached, common, scores
from kernels.hstu_attention.backend_pallas_triton_cached import read_slopes, slope_args, take_refs
from kernels.hstu_attention.common import KernelParams, silu
from kernels.hstu_attention.base import Backend
from kernels.hstu_attention.scores import ScoreSpec, position_distance
from kernels.hstu_attention.config import BlockSizes
from kernels.hstu_attention.masks import MaskSpec, key_blocks_for_rows, tile_mask, uncovered_diagonal

DEFAULT_BLOCKS = BlockSizes(block_q=64, block_k=64, block_q_bwd=64, block_k_bwd=64, num_warps=4, num_stages=3)
# What `experiments/bench_hstu_attention.py --sweep` times: the defaults first, then tiles that trade registers
# and shared memory for fewer steps. Every candidate must lower for its target (tests export each one).
TUNING = (
    DEFAULT_BLOCKS,
    BlockSizes(block_q=128, block_k=64, block_q_bwd=64, block_k_bwd=128, num_warps=8, num_stages=3),
    BlockSizes(block_q=128, block_k=128, block_q_bwd=64, block_k_bwd=128, num_warps=8, num_stages=2),
    BlockSizes(block_q=64, block_k=128, block_q_bwd=64, block_k_bwd=64, num_warps=4, num_stages=2),
    BlockSizes(block_q=128, block_k=64, block_q_bwd=128, block_k_bwd=64, num_warps=8, num_stages=2),
    BlockSizes(block_q=64, block_k=64, block_q_bwd=32, block_k_bwd=64, num_warps=4, num_stages=2),
)



def _row_block_spec(block: int, dim: int, reverse_blocks: int | None = None) -> pl.BlockSpec:
    """[block, dim] tile of a [B, L, H, D] array, for grid (block index, batch, head)."""
    if reverse_blocks is None:
        return pl.BlockSpec((None, block, None, dim), lambda i, b, h: (b, i, h, 0))
    # Heaviest row blocks (the last ones, which see the most keys) are launched first.
    return pl.BlockSpec((None, block, None, dim), lambda i, b, h: (b, reverse_blocks - 1 - i, h, 0))


def _full_seq_spec(seq_len: int, dim: int) -> pl.BlockSpec:
    return pl.BlockSpec((None, seq_len, None, dim), lambda i, b, h: (b, 0, h, 0))


def _scalar_spec() -> pl.BlockSpec:
    return pl.BlockSpec((None,), lambda i, b, h: (b,))


def _compiler_params(blocks: BlockSizes) -> pltr.CompilerParams:
    return pltr.CompilerParams(num_warps=blocks.num_warps, num_stages=blocks.num_stages)


def _stat_spec(block: int, reverse_blocks: int | None = None) -> pl.BlockSpec:
    """[block] of a [B, H, L] row statistic (LSE, delta); the whole row when block is the sequence length."""
    if reverse_blocks is None:
        return pl.BlockSpec((None, None, block), lambda i, b, h: (b, h, i))
    return pl.BlockSpec((None, None, block), lambda i, b, h: (b, h, reverse_blocks - 1 - i))


def _whole_stat_spec(seq_len: int) -> pl.BlockSpec:
    return pl.BlockSpec((None, None, seq_len), lambda i, b, h: (b, h, 0))


def _ts_spec(seq_len: int) -> pl.BlockSpec:
    return pl.BlockSpec((None, seq_len), lambda i, b, h: (b, 0))


def _statics_specs(params: KernelParams) -> list[pl.BlockSpec]:
    """lengths, hist, then the per-head slopes that are on."""
    per_head = pl.BlockSpec((None,), lambda i, b, h: (h,))
    return [_scalar_spec(), _scalar_spec()] + [per_head] * (int(params.score.alibi) + int(params.score.time))


def acc_scale(params: KernelParams) -> float:
    """The factor applied once to the accumulators: 1/normalizer for silu, 1 for softmax."""
    return 1.0 if params.score.softmax else params.inv_normalizer


def bias_terms(params: KernelParams, rows, cols, hist, ts_ref, i0, j0, bq: int, bk: int):
    """(collapsed position distance, raw time difference) of the tile; None for terms that are off."""
    score = params.score
    dist = position_distance(rows, cols, hist) if score.alibi else None
    dt = (ts_ref[pl.ds(i0, bq)][:, None] - ts_ref[pl.ds(j0, bk)][None, :]) if score.time else None
    return dist, dt


def tile_scores(params: KernelParams, q, k, rows, cols, hist, r, i0, j0, bq: int, bk: int):
    """alpha q.k (+ the bias when one is on) of one tile, float32."""
    z = params.alpha * common.matmul(q, k, trans_b=True)
    if not params.score.has_bias:
        return z
    dist, dt = bias_terms(params, rows, cols, hist, r["ts"], i0, j0, bq, bk)
    a_slope, t_slope = read_slopes(r)
    return scores.add_bias(z, scores.bias(params.score, dist, dt, a_slope, t_slope))


_FWD_NAMES = ("q", "k", "v", "ts?ts", "o", "lse?sm")


def _fwd_kernel(*refs, params: KernelParams, nq: int):
    r = take_refs(refs, params, _FWD_NAMES)
    bq, bk = params.blocks.block_q, params.blocks.block_k
    spec, softmax = params.spec, params.score.softmax
    k_ref, v_ref = r["k"], r["v"]
    length, hist = r["plen"][...], r["nq"][...]
    i0 = (nq - 1 - pl.program_id(0)) * bq
    q = r["q"][...]
    rows = i0 + lax.broadcasted_iota(jnp.int32, (bq, 1), 0)
    lo, full_hi, hi = key_blocks_for_rows(i0, bq, bk, length, hist, spec)

    def step(kb, carry, masked):
        j0 = pl.multiple_of(kb * bk, bk)
        k = k_ref[pl.ds(j0, bk), :]
        v = v_ref[pl.ds(j0, bk), :]
        cols = j0 + lax.broadcasted_iota(jnp.int32, (1, bk), 1)
        z = tile_scores(params, q, k, rows, cols, hist, r, i0, j0, bq, bk)
        if softmax:
            acc, m, l = carry
            valid = tile_mask(rows, cols, length, hist, spec) if masked else None
            m, corr, w, l = scores.online_softmax_step(m, l, z, valid)
            return acc * corr + common.matmul(w.astype(v.dtype), v), m, l
        p = silu(z)
        if masked:
            p = jnp.where(tile_mask(rows, cols, length, hist, spec), p, 0.0)
        return (carry[0] + common.matmul(p.astype(v.dtype), v),)

    carry = (jnp.zeros((bq, v_ref.shape[-1]), jnp.float32),)
    if softmax:
        carry += (jnp.full((bq, 1), scores.MASK_VALUE, jnp.float32), jnp.zeros((bq, 1), jnp.float32))
    carry = lax.fori_loop(lo, full_hi, functools.partial(step, masked=False), carry)
    carry = lax.fori_loop(full_hi, hi, functools.partial(step, masked=True), carry)
    acc = carry[0]

    # The candidate's own pair: distance 0 and time difference 0, so it never carries a bias.
    pos = i0 + lax.broadcasted_iota(jnp.int32, (bq,), 0)
    diag = uncovered_diagonal(pos, length, hist, lo, hi, bk)
    kd = k_ref[pl.ds(i0, bq), :].astype(jnp.float32)
    vd = v_ref[pl.ds(i0, bq), :].astype(jnp.float32)
    sd = params.alpha * jnp.sum(q.astype(jnp.float32) * kd, axis=1)
    if softmax:
        _, m, l = carry
        m, corr, w, l = scores.online_softmax_step(m, l, sd[:, None], diag[:, None])
        inv_l, lse = scores.softmax_finish(m, l)
        out = jnp.where(rows < length, (acc * corr + w * vd) * inv_l, 0.0)
        r["lse"][...] = jnp.where(rows < length, lse, 0.0)[:, 0]
    else:
        acc += jnp.where(diag, silu(sd), 0.0)[:, None] * vd
        out = jnp.where(rows < length, acc * params.inv_normalizer, 0.0)
    r["o"][...] = out.astype(r["o"].dtype)


def _forward(params: KernelParams, q, k, v, lengths, hist, alibi, ts, tslopes):
    batch, seq_len, heads, dqk = q.shape
    dv = v.shape[-1]
    bq = params.blocks.block_q
    nq = seq_len // bq
    out_specs = [_row_block_spec(bq, dv, reverse_blocks=nq)]
    out_shape = [jax.ShapeDtypeStruct((batch, seq_len, heads, dv), q.dtype)]
    if params.score.softmax:
        out_specs.append(_stat_spec(bq, reverse_blocks=nq))
        out_shape.append(jax.ShapeDtypeStruct((batch, heads, seq_len), jnp.float32))
    outs = pl.pallas_call(
        functools.partial(_fwd_kernel, params=params, nq=nq),
        grid=(nq, batch, heads),
        in_specs=_statics_specs(params) + [
            _row_block_spec(bq, dqk, reverse_blocks=nq),
            _full_seq_spec(seq_len, dqk),
            _full_seq_spec(seq_len, dv),
        ] + ([_ts_spec(seq_len)] if params.score.time else []),
        out_specs=out_specs,
        out_shape=out_shape,
        compiler_params=_compiler_params(params.blocks),
        interpret=params.interpret,
        name="hstu_attention_fwd",
    )(lengths, hist, *slope_args(alibi, tslopes), q, k, v, *([ts] if params.score.time else []))
    return outs[0], (outs[1] if params.score.softmax else None)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _attention(params, q, k, v, lengths, hist, alibi, ts, tslopes):
    return _forward(params, q, k, v, lengths, hist, alibi, ts, tslopes)[0]


def _attention_fwd(params, q, k, v, lengths, hist, alibi, ts, tslopes):
    # Scores are recomputed in the backward: residuals are O(L) (plus softmax's row LSE).
    out, lse = _forward(params, q, k, v, lengths, hist, alibi, ts, tslopes)
    return out, (q, k, v, lengths, hist, alibi, ts, tslopes, out if params.score.softmax else None, lse)


def _attention_bwd(params, res, d_out):
    from kernels.hstu_attention.backend_pallas_triton_bwd import backward  # builds on this module's helpers

    q, k, v, lengths, hist, alibi, ts, tslopes, out, lse = res
    dq, dk, dv, d_alibi, d_time = backward(params, q, k, v, lengths, hist, alibi, ts, tslopes, out, lse, d_out)
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
) -> jax.Array:
    """Triton backend of `kernels.hstu_attention.hstu_attention` (validated, clipped int32 lengths)."""
    blocks = block_sizes if block_sizes is not None else BACKEND.default_block_sizes(q.shape[1])
    params = KernelParams(normalizer, alpha, MaskSpec(contextual_len, max_attn_len), blocks, interpret, spec)
    multiple = max(blocks.block_q, blocks.block_k, blocks.block_q_bwd, blocks.block_k_bwd)
    ts = None if timestamps is None else common.pad_axis(timestamps, 1, common.round_up(q.shape[1], multiple))
    f32 = lambda x: None if x is None else x.astype(jnp.float32)

    def run(qp, kp, vp, lengths, hist, params):
        return _attention(params, qp, kp, vp, lengths, hist, f32(alibi_slopes), ts, f32(time_slopes))

    return common.run_padded(
        run, q, k, v, lengths, num_targets, params, seq_multiple=multiple, head_multiple=common.next_power_of_two,
    )


BACKEND = Backend(
    name="pallas_triton",
    module=__name__,
    platforms=("gpu",),
    dtypes=("float32", "bfloat16", "float16"),
    priority=10,
    score_fns=("silu", "softmax"),
    biases=frozenset({"alibi", "time"}),
    modes=("full", "cached"),
    default_blocks=DEFAULT_BLOCKS,
    tuning=TUNING,
    attention=attention,
    attention_cached=functools.partial(backend_pallas_triton_cached.attention_cached, default_blocks=DEFAULT_BLOCKS),
)

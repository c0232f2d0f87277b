"""Target-aware HSTU attention in Pallas lowered through Triton (any CUDA GPU; interpretable on CPU).

Three kernels, one program per (row or key block, batch, head):
  * forward: a row block keeps q and its accumulator in registers and walks the key blocks that
    `masks.key_blocks_for_rows` says it needs, mask-free blocks first, then the masked edge blocks;
  * dq: the same walk, accumulating dS K;
  * dk/dv: a key block walks the row blocks of `masks.row_blocks_for_keys` and accumulates P^T dO and dS^T Q.
Each candidate's own diagonal pair, when the walk does not reach it, is added as a row-wise term instead of
visiting a mostly empty block. alpha and 1/normalizer are applied once to the accumulators, not per score.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltr

from kernels.hstu_attention import common
from kernels.hstu_attention.common import KernelParams, silu, silu_and_grad
from kernels.hstu_attention.base import Backend
from kernels.hstu_attention.scores import ScoreSpec
from kernels.hstu_attention.config import BlockSizes
from kernels.hstu_attention.masks import MaskSpec, key_blocks_for_rows, row_blocks_for_keys, tile_mask, uncovered_diagonal

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


def _fwd_kernel(len_ref, hist_ref, q_ref, k_ref, v_ref, o_ref, *, params: KernelParams, nq: int):
    bq, bk = params.blocks.block_q, params.blocks.block_k
    spec = params.spec
    length, hist = len_ref[...], hist_ref[...]
    i0 = (nq - 1 - pl.program_id(0)) * bq
    q = q_ref[...]
    rows = i0 + lax.broadcasted_iota(jnp.int32, (bq, 1), 0)
    lo, full_hi, hi = key_blocks_for_rows(i0, bq, bk, length, hist, spec)

    def step(kb, acc, masked):
        j0 = pl.multiple_of(kb * bk, bk)
        k = k_ref[pl.ds(j0, bk), :]
        v = v_ref[pl.ds(j0, bk), :]
        p = silu(params.alpha * common.matmul(q, k, trans_b=True))
        if masked:
            cols = j0 + lax.broadcasted_iota(jnp.int32, (1, bk), 1)
            p = jnp.where(tile_mask(rows, cols, length, hist, spec), p, 0.0)
        return acc + common.matmul(p.astype(v.dtype), v)

    acc = jnp.zeros((bq, v_ref.shape[-1]), jnp.float32)
    acc = lax.fori_loop(lo, full_hi, functools.partial(step, masked=False), acc)
    acc = lax.fori_loop(full_hi, hi, functools.partial(step, masked=True), acc)

    pos = i0 + lax.broadcasted_iota(jnp.int32, (bq,), 0)
    diag = uncovered_diagonal(pos, length, hist, lo, hi, bk)
    kd = k_ref[pl.ds(i0, bq), :].astype(jnp.float32)
    vd = v_ref[pl.ds(i0, bq), :].astype(jnp.float32)
    sd = params.alpha * jnp.sum(q.astype(jnp.float32) * kd, axis=1)
    acc += jnp.where(diag, silu(sd), 0.0)[:, None] * vd

    out = jnp.where(rows < length, acc * params.inv_normalizer, 0.0)
    o_ref[...] = out.astype(o_ref.dtype)


def _forward(q, k, v, lengths, hist, params: KernelParams) -> jax.Array:
    batch, seq_len, heads, dqk = q.shape
    dv = v.shape[-1]
    bq = params.blocks.block_q
    nq = seq_len // bq
    return pl.pallas_call(
        functools.partial(_fwd_kernel, params=params, nq=nq),
        grid=(nq, batch, heads),
        in_specs=[
            _scalar_spec(),
            _scalar_spec(),
            _row_block_spec(bq, dqk, reverse_blocks=nq),
            _full_seq_spec(seq_len, dqk),
            _full_seq_spec(seq_len, dv),
        ],
        out_specs=_row_block_spec(bq, dv, reverse_blocks=nq),
        out_shape=jax.ShapeDtypeStruct((batch, seq_len, heads, dv), q.dtype),
        compiler_params=_compiler_params(params.blocks),
        interpret=params.interpret,
        name="hstu_attention_fwd",
    )(lengths, hist, q, k, v)


def _dq_kernel(len_ref, hist_ref, q_ref, do_ref, k_ref, v_ref, dq_ref, *, params: KernelParams, nq: int):
    bq, bk = params.blocks.block_q, params.blocks.block_k
    spec = params.spec
    length, hist = len_ref[...], hist_ref[...]
    i0 = (nq - 1 - pl.program_id(0)) * bq
    q = q_ref[...]
    do = do_ref[...]
    rows = i0 + lax.broadcasted_iota(jnp.int32, (bq, 1), 0)
    lo, full_hi, hi = key_blocks_for_rows(i0, bq, bk, length, hist, spec)

    def step(kb, acc, masked):
        j0 = pl.multiple_of(kb * bk, bk)
        k = k_ref[pl.ds(j0, bk), :]
        v = v_ref[pl.ds(j0, bk), :]
        _, grad = silu_and_grad(params.alpha * common.matmul(q, k, trans_b=True))
        ds = common.matmul(do, v, trans_b=True) * grad
        if masked:
            cols = j0 + lax.broadcasted_iota(jnp.int32, (1, bk), 1)
            ds = jnp.where(tile_mask(rows, cols, length, hist, spec), ds, 0.0)
        return acc + common.matmul(ds.astype(k.dtype), k)

    acc = jnp.zeros((bq, q_ref.shape[-1]), jnp.float32)
    acc = lax.fori_loop(lo, full_hi, functools.partial(step, masked=False), acc)
    acc = lax.fori_loop(full_hi, hi, functools.partial(step, masked=True), acc)

    pos = i0 + lax.broadcasted_iota(jnp.int32, (bq,), 0)
    diag = uncovered_diagonal(pos, length, hist, lo, hi, bk)
    kd = k_ref[pl.ds(i0, bq), :].astype(jnp.float32)
    vd = v_ref[pl.ds(i0, bq), :].astype(jnp.float32)
    _, grad_d = silu_and_grad(params.alpha * jnp.sum(q.astype(jnp.float32) * kd, axis=1))
    dsd = jnp.sum(do.astype(jnp.float32) * vd, axis=1) * grad_d
    acc += jnp.where(diag, dsd, 0.0)[:, None] * kd

    scale = params.alpha * params.inv_normalizer
    dq_ref[...] = jnp.where(rows < length, acc * scale, 0.0).astype(dq_ref.dtype)


def _dkdv_kernel(
    len_ref, hist_ref, k_ref, v_ref, q_ref, do_ref, dk_ref, dv_ref, *, params: KernelParams
):
    bq, bk = params.blocks.block_q_bwd, params.blocks.block_k_bwd
    spec = params.spec
    length, hist = len_ref[...], hist_ref[...]
    j0 = pl.program_id(0) * bk
    k = k_ref[...]
    v = v_ref[...]
    cols = j0 + lax.broadcasted_iota(jnp.int32, (1, bk), 1)
    lo, full_lo, full_hi, hi = row_blocks_for_keys(j0, bk, bq, length, hist, spec)

    def step(rb, carry, masked):
        dk, dv = carry
        i0 = pl.multiple_of(rb * bq, bq)
        q = q_ref[pl.ds(i0, bq), :]
        do = do_ref[pl.ds(i0, bq), :]
        p, grad = silu_and_grad(params.alpha * common.matmul(q, k, trans_b=True))
        ds = common.matmul(do, v, trans_b=True) * grad
        if masked:
            rows = i0 + lax.broadcasted_iota(jnp.int32, (bq, 1), 0)
            valid = tile_mask(rows, cols, length, hist, spec)
            p = jnp.where(valid, p, 0.0)
            ds = jnp.where(valid, ds, 0.0)
        dv = dv + common.matmul(p.astype(do.dtype), do, trans_a=True)
        dk = dk + common.matmul(ds.astype(q.dtype), q, trans_a=True)
        return dk, dv

    carry = (jnp.zeros((bk, k_ref.shape[-1]), jnp.float32), jnp.zeros((bk, v_ref.shape[-1]), jnp.float32))
    carry = lax.fori_loop(lo, full_lo, functools.partial(step, masked=True), carry)
    carry = lax.fori_loop(full_lo, full_hi, functools.partial(step, masked=False), carry)
    dk, dv = lax.fori_loop(full_hi, hi, functools.partial(step, masked=True), carry)

    pos = j0 + lax.broadcasted_iota(jnp.int32, (bk,), 0)
    diag = uncovered_diagonal(pos, length, hist, lo, hi, bq)
    qd = q_ref[pl.ds(j0, bk), :].astype(jnp.float32)
    dod = do_ref[pl.ds(j0, bk), :].astype(jnp.float32)
    pd, grad_d = silu_and_grad(params.alpha * jnp.sum(qd * k.astype(jnp.float32), axis=1))
    dsd = jnp.sum(dod * v.astype(jnp.float32), axis=1) * grad_d
    dv += jnp.where(diag, pd, 0.0)[:, None] * dod
    dk += jnp.where(diag, dsd, 0.0)[:, None] * qd

    valid_key = pos[:, None] < length
    dk_ref[...] = jnp.where(valid_key, dk * (params.alpha * params.inv_normalizer), 0.0).astype(dk_ref.dtype)
    dv_ref[...] = jnp.where(valid_key, dv * params.inv_normalizer, 0.0).astype(dv_ref.dtype)


def _backward(q, k, v, lengths, hist, d_out, params: KernelParams):
    batch, seq_len, heads, dqk = q.shape
    dv = v.shape[-1]
    blocks = params.blocks
    nq = seq_len // blocks.block_q
    d_out = d_out.astype(q.dtype)
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, params=params, nq=nq),
        grid=(nq, batch, heads),
        in_specs=[
            _scalar_spec(),
            _scalar_spec(),
            _row_block_spec(blocks.block_q, dqk, reverse_blocks=nq),
            _row_block_spec(blocks.block_q, dv, reverse_blocks=nq),
            _full_seq_spec(seq_len, dqk),
            _full_seq_spec(seq_len, dv),
        ],
        out_specs=_row_block_spec(blocks.block_q, dqk, reverse_blocks=nq),
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        compiler_params=_compiler_params(blocks),
        interpret=params.interpret,
        name="hstu_attention_dq",
    )(lengths, hist, q, d_out, k, v)
    nk = seq_len // blocks.block_k_bwd
    dk, dv_out = pl.pallas_call(
        functools.partial(_dkdv_kernel, params=params),
        grid=(nk, batch, heads),
        in_specs=[
            _scalar_spec(),
            _scalar_spec(),
            _row_block_spec(blocks.block_k_bwd, dqk),
            _row_block_spec(blocks.block_k_bwd, dv),
            _full_seq_spec(seq_len, dqk),
            _full_seq_spec(seq_len, dv),
        ],
        out_specs=[_row_block_spec(blocks.block_k_bwd, dqk), _row_block_spec(blocks.block_k_bwd, dv)],
        out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
        compiler_params=_compiler_params(blocks),
        interpret=params.interpret,
        name="hstu_attention_dkdv",
    )(lengths, hist, k, v, q, d_out)
    return dq, dk, dv_out


_attention = common.make_attention(_forward, _backward)


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
    if spec != ScoreSpec():
        raise NotImplementedError(f"{BACKEND.name} runs silu without biases only")
    blocks = block_sizes if block_sizes is not None else BACKEND.default_block_sizes(q.shape[1])
    params = KernelParams(normalizer, alpha, MaskSpec(contextual_len, max_attn_len), blocks, interpret)
    multiple = max(blocks.block_q, blocks.block_k, blocks.block_q_bwd, blocks.block_k_bwd)
    return common.run_padded(
        _attention, q, k, v, lengths, num_targets, params,
        seq_multiple=multiple, head_multiple=common.next_power_of_two,
    )


BACKEND = Backend(
    name="pallas_triton",
    module=__name__,
    platforms=("gpu",),
    dtypes=("float32", "bfloat16", "float16"),
    priority=10,
    score_fns=("silu",),
    biases=frozenset(),
    modes=("full",),
    default_blocks=DEFAULT_BLOCKS,
    tuning=TUNING,
    attention=attention,
)

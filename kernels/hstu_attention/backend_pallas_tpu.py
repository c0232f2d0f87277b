"""Target-aware HSTU attention in Pallas for TPU (Mosaic TPU), with block skipping by scalar prefetch.

Arrays are laid out [B, H, L, D] so that a tile is (rows, head dim) in VMEM. Grids end in a reduction axis
("arbitrary") over key blocks (forward, dq) or row blocks (dk/dv). `lengths` and `hist` are scalar-prefetched
so that both the index maps and the kernel bodies know each row's live range: index maps clamp the reduction
index into [lo, hi), which makes the pipeline re-use the resident tile instead of fetching a skipped one, and
`pl.when` skips the compute. Candidate diagonal terms not reached by the walk are added at the last step from
an extra tile of k/v (or q/dO) at the resident block's own rows.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from kernels.hstu_attention import common
from kernels.hstu_attention.common import KernelParams, silu, silu_and_grad
from kernels.hstu_attention.base import Backend
from kernels.hstu_attention.scores import ScoreSpec
from kernels.hstu_attention.config import BlockSizes
from kernels.hstu_attention.masks import MaskSpec, key_blocks_for_rows, row_blocks_for_keys, tile_mask, uncovered_diagonal

_SEMANTICS = ("parallel", "parallel", "parallel", "arbitrary")

DEFAULT_BLOCKS = BlockSizes(block_q=128, block_k=128, block_q_bwd=128, block_k_bwd=128)
TUNING = (
    DEFAULT_BLOCKS,
    BlockSizes(block_q=256, block_k=128, block_q_bwd=128, block_k_bwd=256),
    BlockSizes(block_q=256, block_k=256, block_q_bwd=256, block_k_bwd=256),
)



def _mm(a: jax.Array, b: jax.Array, *, trans_a: bool = False, trans_b: bool = False) -> jax.Array:
    # Mosaic wants a transposed lhs spelled as an explicit transpose.
    if trans_a:
        a = a.T
    return common.matmul(a, b, trans_b=trans_b)


def _interpret(params: KernelParams):
    return pltpu.InterpretParams(uninitialized_memory="nan") if params.interpret is True else params.interpret


def _clamp(idx, lo, hi):
    """Reduction index for the index map: outside [lo, hi) it repeats the nearest live block (no new DMA)."""
    return jnp.maximum(jnp.minimum(idx, hi - 1), jnp.minimum(lo, jnp.maximum(hi - 1, 0)))


def _kv_index(params: KernelParams, bq: int, bk: int):
    def index(b, h, i, j, len_ref, hist_ref):
        lo, _, hi = key_blocks_for_rows(i * bq, bq, bk, len_ref[b], hist_ref[b], params.spec)
        return b, h, _clamp(j, lo, hi), 0

    return index


def _row_index(b, h, i, j, len_ref, hist_ref):
    return b, h, i, 0


def _fwd_kernel(len_ref, hist_ref, q_ref, k_ref, v_ref, kd_ref, vd_ref, o_ref, acc_ref, *, params: KernelParams):
    bq, bk = params.blocks.block_q, params.blocks.block_k
    b, qb, kb = pl.program_id(0), pl.program_id(2), pl.program_id(3)
    length, hist = len_ref[b], hist_ref[b]
    i0 = qb * bq
    lo, full_hi, hi = key_blocks_for_rows(i0, bq, bk, length, hist, params.spec)
    rows = i0 + lax.broadcasted_iota(jnp.int32, (bq, bk), 0)

    @pl.when(kb == 0)
    def _init():
        acc_ref[...] = jnp.zeros_like(acc_ref)

    def step(masked: bool):
        q, k, v = q_ref[...], k_ref[...], v_ref[...]
        p = silu(params.alpha * _mm(q, k, trans_b=True))
        if masked:
            cols = kb * bk + lax.broadcasted_iota(jnp.int32, (bq, bk), 1)
            p = jnp.where(tile_mask(rows, cols, length, hist, params.spec), p, 0.0)
        acc_ref[...] += _mm(p.astype(v.dtype), v)

    pl.when((kb >= lo) & (kb < full_hi))(functools.partial(step, False))
    pl.when((kb >= full_hi) & (kb < hi))(functools.partial(step, True))

    @pl.when(kb == pl.num_programs(3) - 1)
    def _finish():
        pos = i0 + lax.broadcasted_iota(jnp.int32, (bq, 1), 0)
        diag = uncovered_diagonal(pos, length, hist, lo, hi, bk)
        q = q_ref[...].astype(jnp.float32)
        sd = params.alpha * jnp.sum(q * kd_ref[...].astype(jnp.float32), axis=1, keepdims=True)
        acc = acc_ref[...] + jnp.where(diag, silu(sd), 0.0) * vd_ref[...].astype(jnp.float32)
        o_ref[...] = jnp.where(pos < length, acc * params.inv_normalizer, 0.0).astype(o_ref.dtype)


def _spec(block: int, dim: int, index) -> pl.BlockSpec:
    return pl.BlockSpec((None, None, block, dim), index)


def _forward(q, k, v, lengths, hist, params: KernelParams) -> jax.Array:
    batch, heads, seq_len, dqk = q.shape
    dv = v.shape[-1]
    bq, bk = params.blocks.block_q, params.blocks.block_k
    kv_index = _kv_index(params, bq, bk)
    return pl.pallas_call(
        functools.partial(_fwd_kernel, params=params),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=2,
            grid=(batch, heads, seq_len // bq, seq_len // bk),
            in_specs=[
                _spec(bq, dqk, _row_index),
                _spec(bk, dqk, kv_index),
                _spec(bk, dv, kv_index),
                _spec(bq, dqk, _row_index),
                _spec(bq, dv, _row_index),
            ],
            out_specs=_spec(bq, dv, _row_index),
            scratch_shapes=[pltpu.VMEM((bq, dv), jnp.float32)],
        ),
        out_shape=jax.ShapeDtypeStruct((batch, heads, seq_len, dv), q.dtype),
        compiler_params=pltpu.CompilerParams(dimension_semantics=_SEMANTICS),
        interpret=_interpret(params),
        name="hstu_attention_fwd",
    )(lengths, hist, q, k, v, k, v)


def _dq_kernel(len_ref, hist_ref, q_ref, do_ref, k_ref, v_ref, kd_ref, vd_ref, dq_ref, acc_ref, *, params):
    bq, bk = params.blocks.block_q, params.blocks.block_k
    b, qb, kb = pl.program_id(0), pl.program_id(2), pl.program_id(3)
    length, hist = len_ref[b], hist_ref[b]
    i0 = qb * bq
    lo, full_hi, hi = key_blocks_for_rows(i0, bq, bk, length, hist, params.spec)
    rows = i0 + lax.broadcasted_iota(jnp.int32, (bq, bk), 0)

    @pl.when(kb == 0)
    def _init():
        acc_ref[...] = jnp.zeros_like(acc_ref)

    def step(masked: bool):
        q, do, k, v = q_ref[...], do_ref[...], k_ref[...], v_ref[...]
        _, grad = silu_and_grad(params.alpha * _mm(q, k, trans_b=True))
        ds = _mm(do, v, trans_b=True) * grad
        if masked:
            cols = kb * bk + lax.broadcasted_iota(jnp.int32, (bq, bk), 1)
            ds = jnp.where(tile_mask(rows, cols, length, hist, params.spec), ds, 0.0)
        acc_ref[...] += _mm(ds.astype(k.dtype), k)

    pl.when((kb >= lo) & (kb < full_hi))(functools.partial(step, False))
    pl.when((kb >= full_hi) & (kb < hi))(functools.partial(step, True))

    @pl.when(kb == pl.num_programs(3) - 1)
    def _finish():
        pos = i0 + lax.broadcasted_iota(jnp.int32, (bq, 1), 0)
        diag = uncovered_diagonal(pos, length, hist, lo, hi, bk)
        kd = kd_ref[...].astype(jnp.float32)
        _, grad_d = silu_and_grad(params.alpha * jnp.sum(q_ref[...].astype(jnp.float32) * kd, axis=1, keepdims=True))
        dpd = jnp.sum(do_ref[...].astype(jnp.float32) * vd_ref[...].astype(jnp.float32), axis=1, keepdims=True)
        acc = acc_ref[...] + jnp.where(diag, dpd * grad_d, 0.0) * kd
        scale = params.alpha * params.inv_normalizer
        dq_ref[...] = jnp.where(pos < length, acc * scale, 0.0).astype(dq_ref.dtype)


def _dkdv_kernel(len_ref, hist_ref, k_ref, v_ref, q_ref, do_ref, qd_ref, dod_ref, dk_ref, dv_ref, dk_acc, dv_acc,
                 *, params):
    bq, bk = params.blocks.block_q_bwd, params.blocks.block_k_bwd
    b, kb, qb = pl.program_id(0), pl.program_id(2), pl.program_id(3)
    length, hist = len_ref[b], hist_ref[b]
    j0 = kb * bk
    lo, full_lo, full_hi, hi = row_blocks_for_keys(j0, bk, bq, length, hist, params.spec)
    cols = j0 + lax.broadcasted_iota(jnp.int32, (bq, bk), 1)

    @pl.when(qb == 0)
    def _init():
        dk_acc[...] = jnp.zeros_like(dk_acc)
        dv_acc[...] = jnp.zeros_like(dv_acc)

    def step(masked: bool):
        q, do, k, v = q_ref[...], do_ref[...], k_ref[...], v_ref[...]
        p, grad = silu_and_grad(params.alpha * _mm(q, k, trans_b=True))
        ds = _mm(do, v, trans_b=True) * grad
        if masked:
            rows = qb * bq + lax.broadcasted_iota(jnp.int32, (bq, bk), 0)
            valid = tile_mask(rows, cols, length, hist, params.spec)
            p = jnp.where(valid, p, 0.0)
            ds = jnp.where(valid, ds, 0.0)
        dv_acc[...] += _mm(p.astype(do.dtype), do, trans_a=True)
        dk_acc[...] += _mm(ds.astype(q.dtype), q, trans_a=True)

    in_range = (qb >= lo) & (qb < hi)
    unmasked = (qb >= full_lo) & (qb < full_hi)
    pl.when(in_range & unmasked)(functools.partial(step, False))
    pl.when(in_range & ~unmasked)(functools.partial(step, True))

    @pl.when(qb == pl.num_programs(3) - 1)
    def _finish():
        pos = j0 + lax.broadcasted_iota(jnp.int32, (bk, 1), 0)
        diag = uncovered_diagonal(pos, length, hist, lo, hi, bq)
        qd = qd_ref[...].astype(jnp.float32)
        dod = dod_ref[...].astype(jnp.float32)
        pd, grad_d = silu_and_grad(params.alpha * jnp.sum(qd * k_ref[...].astype(jnp.float32), axis=1, keepdims=True))
        dsd = jnp.sum(dod * v_ref[...].astype(jnp.float32), axis=1, keepdims=True) * grad_d
        dk = dk_acc[...] + jnp.where(diag, dsd, 0.0) * qd
        dv = dv_acc[...] + jnp.where(diag, pd, 0.0) * dod
        valid = pos < length
        dk_ref[...] = jnp.where(valid, dk * (params.alpha * params.inv_normalizer), 0.0).astype(dk_ref.dtype)
        dv_ref[...] = jnp.where(valid, dv * params.inv_normalizer, 0.0).astype(dv_ref.dtype)


def _backward(q, k, v, lengths, hist, d_out, params: KernelParams):
    batch, heads, seq_len, dqk = q.shape
    dv = v.shape[-1]
    blocks = params.blocks
    d_out = d_out.astype(q.dtype)
    bq, bk = blocks.block_q, blocks.block_k
    kv_index = _kv_index(params, bq, bk)
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, params=params),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=2,
            grid=(batch, heads, seq_len // bq, seq_len // bk),
            in_specs=[
                _spec(bq, dqk, _row_index),
                _spec(bq, dv, _row_index),
                _spec(bk, dqk, kv_index),
                _spec(bk, dv, kv_index),
                _spec(bq, dqk, _row_index),
                _spec(bq, dv, _row_index),
            ],
            out_specs=_spec(bq, dqk, _row_index),
            scratch_shapes=[pltpu.VMEM((bq, dqk), jnp.float32)],
        ),
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        compiler_params=pltpu.CompilerParams(dimension_semantics=_SEMANTICS),
        interpret=_interpret(params),
        name="hstu_attention_dq",
    )(lengths, hist, q, d_out, k, v, k, v)

    bq, bk = blocks.block_q_bwd, blocks.block_k_bwd

    def q_index(b, h, j, i, len_ref, hist_ref):
        lo, _, _, hi = row_blocks_for_keys(j * bk, bk, bq, len_ref[b], hist_ref[b], params.spec)
        return b, h, _clamp(i, lo, hi), 0

    def key_index(b, h, j, i, len_ref, hist_ref):
        return b, h, j, 0

    dk, dv_out = pl.pallas_call(
        functools.partial(_dkdv_kernel, params=params),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=2,
            grid=(batch, heads, seq_len // bk, seq_len // bq),
            in_specs=[
                _spec(bk, dqk, key_index),
                _spec(bk, dv, key_index),
                _spec(bq, dqk, q_index),
                _spec(bq, dv, q_index),
                _spec(bk, dqk, key_index),
                _spec(bk, dv, key_index),
            ],
            out_specs=[_spec(bk, dqk, key_index), _spec(bk, dv, key_index)],
            scratch_shapes=[pltpu.VMEM((bk, dqk), jnp.float32), pltpu.VMEM((bk, dv), jnp.float32)],
        ),
        out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
        compiler_params=pltpu.CompilerParams(dimension_semantics=_SEMANTICS),
        interpret=_interpret(params),
        name="hstu_attention_dkdv",
    )(lengths, hist, k, v, q, d_out, q, d_out)
    return dq, dk, dv_out


_attention_bhld = common.make_attention(_forward, _backward)


def _attention(q, k, v, lengths, hist, params):
    # [B, L, H, D] <-> [B, H, L, D]: TPU tiles want (rows, head dim) as the two minor dims.
    to_bhld = lambda x: jnp.swapaxes(x, 1, 2)
    out = _attention_bhld(to_bhld(q), to_bhld(k), to_bhld(v), lengths, hist, params)
    return to_bhld(out)


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
    """TPU backend of `kernels.hstu_attention.hstu_attention` (validated, clipped int32 lengths).

    `interpret=True` runs the TPU interpreter (`pltpu.InterpretParams()`), which models TPU memory spaces.
    """
    if spec != ScoreSpec():
        raise NotImplementedError(f"{BACKEND.name} runs silu without biases only")
    blocks = block_sizes if block_sizes is not None else BACKEND.default_block_sizes(q.shape[1])
    params = KernelParams(normalizer, alpha, MaskSpec(contextual_len, max_attn_len), blocks, interpret)
    multiple = max(blocks.block_q, blocks.block_k, blocks.block_q_bwd, blocks.block_k_bwd)
    return common.run_padded(
        _attention, q, k, v, lengths, num_targets, params, seq_multiple=multiple, head_multiple=lambda d: d
    )


BACKEND = Backend(
    name="pallas_tpu",
    module=__name__,
    platforms=("tpu",),
    dtypes=("float32", "bfloat16"),
    priority=10,
    score_fns=("silu",),
    biases=frozenset(),
    modes=("full",),
    default_blocks=DEFAULT_BLOCKS,
    tuning=TUNING,
    attention=attention,
)

"""Target-aware HSTU attention in Pallas for TPU (Mosaic TPU), with block skipping by scalar prefetch.

Arrays are laid out [B, H, L, D] so that a tile is (rows, head dim) in VMEM. Grids end in a reduction axis
("arbitrary") over key blocks (forward, dq) or row blocks (dk/dv). `lengths` and `hist` are scalar-prefetched
so that both the index maps and the kernel bodies know each row's live range: index maps clamp the reduction
index into [lo, hi), which makes the pipeline re-use the resident tile instead of fetching a skipped one, and
`pl.when` skips the compute. Candidate diagonal terms not reached by the walk are added at the last step from
an extra tile of k/v (or q/dO) at the resident block's own rows. score_fn "silu" accumulates silu(z) V;
"softmax" runs the online softmax (m, l in VMEM scratch) and saves the row LSE [B, H, L, 1] for the backward.
No biases yet. Backward kernels: `backend_pallas_tpu_bwd.py`; the cached-prefix mode:
`backend_pallas_tpu_cached*.py`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from kernels.hstu_attention import backend_pallas_tpu_cached, common, scores
from kernels.hstu_attention.common import KernelParams, silu
from kernels.hstu_attention.base import Backend
from kernels.hstu_attention.scores import ScoreSpec
from kernels.hstu_attention.config import BlockSizes
from kernels.hstu_attention.masks import MaskSpec, key_blocks_for_rows, tile_mask, uncovered_diagonal

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


def _fwd_kernel(len_ref, hist_ref, q_ref, k_ref, v_ref, kd_ref, vd_ref, *refs, params: KernelParams):
    sm = params.score.softmax
    if sm:
        o_ref, lse_ref, acc_ref, m_ref, l_ref = refs
    else:
        o_ref, acc_ref = refs
    bq, bk = params.blocks.block_q, params.blocks.block_k
    b, qb, kb = pl.program_id(0), pl.program_id(2), pl.program_id(3)
    length, hist = len_ref[b], hist_ref[b]
    i0 = qb * bq
    lo, full_hi, hi = key_blocks_for_rows(i0, bq, bk, length, hist, params.spec)
    rows = i0 + lax.broadcasted_iota(jnp.int32, (bq, bk), 0)

    @pl.when(kb == 0)
    def _init():
        acc_ref[...] = jnp.zeros_like(acc_ref)
        if sm:
            m_ref[...] = jnp.full_like(m_ref, scores.MASK_VALUE)
            l_ref[...] = jnp.zeros_like(l_ref)

    def step(masked: bool):
        q, k, v = q_ref[...], k_ref[...], v_ref[...]
        if sm:
            valid = None
            if masked:
                cols = kb * bk + lax.broadcasted_iota(jnp.int32, (bq, bk), 1)
                valid = tile_mask(rows, cols, length, hist, params.spec)
            z = params.alpha * _mm(q, k, trans_b=True)
            m, corr, w, l = scores.online_softmax_step(m_ref[...], l_ref[...], z, valid)
            m_ref[...], l_ref[...] = m, l
            acc_ref[...] = acc_ref[...] * corr + _mm(w.astype(v.dtype), v)
            return
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
        if sm:
            m, corr, w, l = scores.online_softmax_step(m_ref[...], l_ref[...], sd, diag)
            inv_l, lse = scores.softmax_finish(m, l)
            acc = (acc_ref[...] * corr + w * vd_ref[...].astype(jnp.float32)) * inv_l
            o_ref[...] = jnp.where(pos < length, acc, 0.0).astype(o_ref.dtype)
            lse_ref[...] = jnp.where(pos < length, lse, 0.0)
            return
        acc = acc_ref[...] + jnp.where(diag, silu(sd), 0.0) * vd_ref[...].astype(jnp.float32)
        o_ref[...] = jnp.where(pos < length, acc * params.inv_normalizer, 0.0).astype(o_ref.dtype)


def _spec(block: int, dim: int, index) -> pl.BlockSpec:
    return pl.BlockSpec((None, None, block, dim), index)


def _forward(q, k, v, lengths, hist, params: KernelParams):
    """(out, lse [B, H, L, 1] or None) on padded [B, H, L, D] operands."""
    batch, heads, seq_len, dqk = q.shape
    dv = v.shape[-1]
    bq, bk = params.blocks.block_q, params.blocks.block_k
    kv_index = _kv_index(params, bq, bk)
    out_specs = [_spec(bq, dv, _row_index)]
    out_shape = [jax.ShapeDtypeStruct((batch, heads, seq_len, dv), q.dtype)]
    scratch = [pltpu.VMEM((bq, dv), jnp.float32)]
    if params.score.softmax:
        out_specs.append(_spec(bq, 1, _row_index))
        out_shape.append(jax.ShapeDtypeStruct((batch, heads, seq_len, 1), jnp.float32))
        scratch += [pltpu.VMEM((bq, 1), jnp.float32)] * 2
    outs = pl.pallas_call(
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
            out_specs=out_specs,
            scratch_shapes=scratch,
        ),
        out_shape=out_shape,
        compiler_params=pltpu.CompilerParams(dimension_semantics=_SEMANTICS),
        interpret=_interpret(params),
        name="hstu_attention_fwd",
    )(lengths, hist, q, k, v, k, v)
    return outs[0], (outs[1] if params.score.softmax else None)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _attention_bhld(q, k, v, lengths, hist, params):
    return _forward(q, k, v, lengths, hist, params)[0]


def _attention_bhld_fwd(q, k, v, lengths, hist, params):
    # Scores are recomputed in the backward: residuals are O(L) (plus softmax's output and row LSE).
    out, lse = _forward(q, k, v, lengths, hist, params)
    return out, (q, k, v, lengths, hist, out if params.score.softmax else None, lse)


def _attention_bhld_bwd(params, res, d_out):
    from kernels.hstu_attention.backend_pallas_tpu_bwd import backward  # builds on this module's helpers

    q, k, v, lengths, hist, out, lse = res
    dq, dk, dv = backward(q, k, v, lengths, hist, out, lse, d_out, params)
    return dq, dk, dv, None, None


_attention_bhld.defvjp(_attention_bhld_fwd, _attention_bhld_bwd)


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
    if spec.has_bias:
        raise NotImplementedError(f"{BACKEND.name} runs without biases only")
    blocks = block_sizes if block_sizes is not None else BACKEND.default_block_sizes(q.shape[1])
    params = KernelParams(normalizer, alpha, MaskSpec(contextual_len, max_attn_len), blocks, interpret, spec)
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
    score_fns=("silu", "softmax"),
    biases=frozenset(),
    modes=("full", "cached"),
    default_blocks=DEFAULT_BLOCKS,
    tuning=TUNING,
    attention=attention,
    attention_cached=functools.partial(backend_pallas_tpu_cached.attention_cached, default_blocks=DEFAULT_BLOCKS),
)

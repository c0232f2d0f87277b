"""Cached-prefix ranking attention (`hstu_attention_cached`) in Pallas lowered through Triton.

C query rows attend to a cached prefix k_prefix/v_prefix [B, N, H, D] of valid length prefix_len and, with
`self_term`, each to its own k, v (never to another row). The mask is separable (valid row x valid key), which
keeps the walks simple. Three kernels, one program per (block, batch, head):
  * forward: a query block stays resident and streams prefix key blocks [lo, hi) only (hi = cdiv(prefix_len,
    block_k); with a window, lo skips keys further than max_attn_len), the interior blocks without a mask;
    the self term is added row-wise; silu accumulates silu(z) V, softmax runs the online softmax (the self
    key is its last step) and saves the row LSE for the backward;
  * dq: the same walk, accumulating dS K_prefix; it also writes the self-term d(k, v) row-wise and the
    slope gradients as per-(row block, batch, head) partial sums, reduced outside the kernel;
  * dk_prefix/dv_prefix: a prefix key block walks the query blocks [0, cdiv(num_queries, block_q_bwd)).
Scores and biases come from `scores.py` (ALiBi distance prefix_len - j; the self key has distance 0 and time
difference 0, so it never carries a bias). Rows >= num_queries and prefix keys >= prefix_len get exactly 0.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltr

from kernels.hstu_attention import common, scores
from kernels.hstu_attention.config import BlockSizes
from kernels.hstu_attention.masks import MaskSpec
from kernels.hstu_attention.scores import ScoreSpec


@dataclasses.dataclass(frozen=True)
class CachedParams:
    """Static parameters of one cached call."""

    normalizer: float | None
    alpha: float
    mask: MaskSpec
    blocks: BlockSizes
    interpret: object
    score: ScoreSpec
    self_term: bool

    @property
    def scale(self) -> float:
        """The factor silu's accumulators get once at the end (1/normalizer); 1 for softmax."""
        return 1.0 if self.score.softmax else 1.0 / self.normalizer


# --- block specs for grid (block index, batch, head) --------------------------------------------------------
def rows_spec(block: int, dim: int) -> pl.BlockSpec:
    return pl.BlockSpec((None, block, None, dim), lambda i, b, h: (b, i, h, 0))


def whole_spec(size: int, dim: int) -> pl.BlockSpec:
    return pl.BlockSpec((None, size, None, dim), lambda i, b, h: (b, 0, h, 0))


def per_batch_spec() -> pl.BlockSpec:
    return pl.BlockSpec((None,), lambda i, b, h: (b,))


def per_head_spec() -> pl.BlockSpec:
    return pl.BlockSpec((None,), lambda i, b, h: (h,))


def row_stat_spec(block: int) -> pl.BlockSpec:
    """[block] of a [B, H, C] row statistic (LSE, delta)."""
    return pl.BlockSpec((None, None, block), lambda i, b, h: (b, h, i))


def whole_stat_spec(size: int) -> pl.BlockSpec:
    return pl.BlockSpec((None, None, size), lambda i, b, h: (b, h, 0))


def ts_rows_spec(block: int) -> pl.BlockSpec:
    return pl.BlockSpec((None, block), lambda i, b, h: (b, i))


def ts_whole_spec(size: int) -> pl.BlockSpec:
    return pl.BlockSpec((None, size), lambda i, b, h: (b, 0))


def partial_spec() -> pl.BlockSpec:
    """One float32 per (row block, batch, head): slope-gradient partial sums."""
    return pl.BlockSpec((None, None, None, 1), lambda i, b, h: (i, b, h, 0))


def compiler_params(blocks: BlockSizes) -> pltr.CompilerParams:
    return pltr.CompilerParams(num_warps=blocks.num_warps, num_stages=blocks.num_stages)


# --- the cached mask and walks --------------------------------------------------------------------------------
def key_valid(cols, plen, mask: MaskSpec):
    """Prefix keys j < prefix_len, and within the window prefix_len - j <= w unless j < contextual_len."""
    valid = cols < plen
    if mask.max_attn_len is not None:
        near = (plen - cols) <= mask.max_attn_len
        if mask.contextual_len > 0:
            near |= cols < mask.contextual_len
        valid &= near
    return valid


def key_blocks(plen, bk: int, mask: MaskSpec, active):
    """(lo, full_hi, hi): a row block needs prefix key blocks [lo, hi); [lo, full_hi) need no mask."""
    zero = jnp.int32(0)
    hi = lax.div(plen + (bk - 1), jnp.int32(bk))
    lo = zero
    if mask.max_attn_len is not None and mask.contextual_len == 0:
        lo = jnp.minimum(lax.div(jnp.maximum(plen - mask.max_attn_len, zero), jnp.int32(bk)), hi)
    full_hi = lax.div(plen, jnp.int32(bk)) if mask.max_attn_len is None else lo
    hi = jnp.where(active, hi, lo)
    return lo, jnp.minimum(full_hi, hi), hi


def block_has_key(j0, bk: int, plen, mask: MaskSpec):
    last = j0 + (bk - 1)
    has = j0 < plen
    if mask.max_attn_len is not None:
        near = last >= plen - mask.max_attn_len
        if mask.contextual_len > 0:
            near |= j0 < mask.contextual_len
        has &= near
    return has


def tile_scores(p: CachedParams, q, k, cols, plen, row_ts, col_ts, a_slope, t_slope):
    """z = alpha q.k + bias of one [rows, keys] tile (float32)."""
    z = p.alpha * common.matmul(q, k, trans_b=True)
    if not p.score.has_bias:
        return z
    dist, dt = bias_terms(p, cols, plen, row_ts, col_ts)
    return scores.add_bias(z, scores.bias(p.score, dist, dt, a_slope, t_slope))


def bias_terms(p: CachedParams, cols, plen, row_ts, col_ts):
    """(ALiBi distance prefix_len - j, raw time difference) of a tile; None for terms that are off."""
    dist = (plen - cols).astype(jnp.float32) if p.score.alibi else None
    dt = (row_ts[:, None] - col_ts[None, :]) if p.score.time else None
    return dist, dt


def take_refs(refs, p: CachedParams, names):
    """Name a kernel's refs: two int32 scalars ("plen", "nq": prefix_len and num_queries here, lengths and hist
    in the full-mode kernels), the slopes that are on ("alibi", "tslope"), then `names`, where a name ending in
    '?ts' is present only with the time bias, '?sm' only for softmax and '?alibi' only with ALiBi."""
    refs = list(refs)
    out = {"plen": refs.pop(0), "nq": refs.pop(0)}
    out["alibi"] = refs.pop(0) if p.score.alibi else None
    out["tslope"] = refs.pop(0) if p.score.time else None
    for name in names:
        base, _, cond = name.partition("?")
        on = {"": True, "ts": p.score.time, "sm": p.score.softmax, "alibi": p.score.alibi}[cond]
        out[base] = refs.pop(0) if on else None
    assert not refs, refs
    return out


def read_slopes(r):
    a = r["alibi"][...] if r["alibi"] is not None else None
    t = r["tslope"][...] if r["tslope"] is not None else None
    return a, t


def self_score(p: CachedParams, q, k):
    return p.alpha * jnp.sum(q.astype(jnp.float32) * k.astype(jnp.float32), axis=1, keepdims=True)


# --- forward ---------------------------------------------------------------------------------------------------
_FWD_NAMES = ("q", "k", "v", "kp", "vp", "ts?ts", "pts?ts", "o", "lse?sm")


def _fwd_kernel(*refs, p: CachedParams):
    r = take_refs(refs, p, _FWD_NAMES)
    bq, bk = p.blocks.block_q, p.blocks.block_k
    plen, nq = r["plen"][...], r["nq"][...]
    i0 = pl.program_id(0) * bq
    q = r["q"][...]
    rows = i0 + lax.broadcasted_iota(jnp.int32, (bq, 1), 0)
    row_ts = r["ts"][...] if p.score.time else None
    a_slope, t_slope = read_slopes(r)
    lo, full_hi, hi = key_blocks(plen, bk, p.mask, i0 < nq)

    def step(kb, carry, masked):
        j0 = pl.multiple_of(kb * bk, bk)
        k, v = r["kp"][pl.ds(j0, bk), :], r["vp"][pl.ds(j0, bk), :]
        cols = j0 + lax.broadcasted_iota(jnp.int32, (1, bk), 1)
        col_ts = r["pts"][pl.ds(j0, bk)] if p.score.time else None
        z = tile_scores(p, q, k, cols, plen, row_ts, col_ts, a_slope, t_slope)
        valid = key_valid(cols, plen, p.mask) if masked else None
        if p.score.softmax:
            acc, m, l = carry
            m, corr, w, l = scores.online_softmax_step(m, l, z, valid)
            return acc * corr + common.matmul(w.astype(v.dtype), v), m, l
        w = scores.silu(z)
        if masked:
            w = jnp.where(valid, w, 0.0)
        return (carry[0] + common.matmul(w.astype(v.dtype), v),)

    dv = r["vp"].shape[-1]
    carry = (jnp.zeros((bq, dv), jnp.float32),)
    if p.score.softmax:
        carry += (jnp.full((bq, 1), scores.MASK_VALUE, jnp.float32), jnp.zeros((bq, 1), jnp.float32))
    carry = lax.fori_loop(lo, full_hi, functools.partial(step, masked=False), carry)
    carry = lax.fori_loop(full_hi, hi, functools.partial(step, masked=True), carry)

    acc = carry[0]
    vs = r["v"][...].astype(jnp.float32)
    s = self_score(p, q, r["k"][...])
    if p.score.softmax:
        _, m, l = carry
        if p.self_term:
            m, corr, w, l = scores.online_softmax_step(m, l, s, None)
            acc = acc * corr + w * vs
        inv_l, lse = scores.softmax_finish(m, l)
        acc = acc * inv_l
        r["lse"][...] = jnp.where(rows < nq, lse, 0.0)[:, 0]
    else:
        if p.self_term:
            acc += scores.silu(s) * vs
        acc = acc * p.scale
    r["o"][...] = jnp.where(rows < nq, acc, 0.0).astype(r["o"].dtype)


def statics_in(p: CachedParams):
    return [per_batch_spec(), per_batch_spec()] + ([per_head_spec()] if p.score.alibi else []) + (
        [per_head_spec()] if p.score.time else [])


def slope_args(alibi, tslopes):
    return [x for x in (alibi, tslopes) if x is not None]


def _forward(p: CachedParams, q, k, v, kp, vp, plen, nq, alibi, ts, pts, tslopes):
    batch, rows, heads, dqk = q.shape
    n, dv = kp.shape[1], v.shape[-1]
    bq = p.blocks.block_q
    time_specs = [ts_rows_spec(bq), ts_whole_spec(n)] if p.score.time else []
    out_specs = [rows_spec(bq, dv)]
    out_shape = [jax.ShapeDtypeStruct((batch, rows, heads, dv), q.dtype)]
    if p.score.softmax:
        out_specs.append(row_stat_spec(bq))
        out_shape.append(jax.ShapeDtypeStruct((batch, heads, rows), jnp.float32))
    outs = pl.pallas_call(
        functools.partial(_fwd_kernel, p=p),
        grid=(rows // bq, batch, heads),
        in_specs=statics_in(p)
        + [rows_spec(bq, dqk), rows_spec(bq, dqk), rows_spec(bq, dv), whole_spec(n, dqk), whole_spec(n, dv)]
        + time_specs,
        out_specs=out_specs,
        out_shape=out_shape,
        compiler_params=compiler_params(p.blocks),
        interpret=p.interpret,
        name="hstu_attention_cached_fwd",
    )(plen, nq, *slope_args(alibi, tslopes), q, k, v, kp, vp, *([ts, pts] if p.score.time else []))
    return outs[0], (outs[1] if p.score.softmax else None)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _cached(p, q, k, v, kp, vp, plen, nq, alibi, ts, pts, tslopes):
    return _forward(p, q, k, v, kp, vp, plen, nq, alibi, ts, pts, tslopes)[0]


def _cached_fwd(p, q, k, v, kp, vp, plen, nq, alibi, ts, pts, tslopes):
    out, lse = _forward(p, q, k, v, kp, vp, plen, nq, alibi, ts, pts, tslopes)
    return out, (q, k, v, kp, vp, plen, nq, alibi, ts, pts, tslopes, out, lse)


def _cached_bwd(p, res, d_out):
    # Imported here: the backward module builds on this one's helpers.
    from kernels.hstu_attention.backend_pallas_triton_cached_bwd import backward

    q, k, v, kp, vp, plen, nq, alibi, ts, pts, tslopes, out, lse = res
    grads = backward(p, q, k, v, kp, vp, plen, nq, alibi, ts, pts, tslopes, out, lse, d_out)
    dq, dk, dv, dkp, dvp, d_alibi, d_time = grads
    return dq, dk, dv, dkp, dvp, None, None, d_alibi, None, None, d_time


_cached.defvjp(_cached_fwd, _cached_bwd)


def fit_blocks(blocks: BlockSizes, rows: int, keys: int) -> BlockSizes:
    """Default tiles shrunk separately to the C query rows and the N prefix keys (power of two >= 16)."""
    fr, fk = blocks.fitted(rows, 16), blocks.fitted(keys, 16)
    return dataclasses.replace(blocks, block_q=fr.block_q, block_q_bwd=fr.block_q_bwd, block_k=fk.block_k,
                               block_k_bwd=fk.block_k_bwd)


def attention_cached(q, k, v, k_prefix, v_prefix, prefix_len, num_queries, *, self_term, spec, normalizer, alpha,
                     alibi_slopes, timestamps, prefix_timestamps, time_slopes, contextual_len, max_attn_len,
                     interpret=False, block_sizes=None, default_blocks=None):
    """Triton backend of `kernels.hstu_attention.hstu_attention_cached` (validated, clipped int32 lengths)."""
    rows, n = q.shape[1], k_prefix.shape[1]
    blocks = block_sizes if block_sizes is not None else fit_blocks(default_blocks, rows, n)
    p = CachedParams(normalizer, alpha, MaskSpec(contextual_len, max_attn_len), blocks, interpret, spec, self_term)
    rp = common.round_up(rows, max(blocks.block_q, blocks.block_q_bwd))
    np_ = common.round_up(max(n, 1), max(blocks.block_k, blocks.block_k_bwd))
    dqk_p, dv_p = common.next_power_of_two(q.shape[-1]), common.next_power_of_two(v.shape[-1])
    pad = lambda x, length, d: common.pad_axis(common.pad_axis(x, 1, length), 3, d)
    ts = pts = None
    if spec.time:
        ts, pts = common.pad_axis(timestamps, 1, rp), common.pad_axis(prefix_timestamps, 1, np_)
    alibi = None if alibi_slopes is None else alibi_slopes.astype(jnp.float32)
    tslopes = None if time_slopes is None else time_slopes.astype(jnp.float32)
    out = _cached(p, pad(q, rp, dqk_p), pad(k, rp, dqk_p), pad(v, rp, dv_p), pad(k_prefix, np_, dqk_p),
                  pad(v_prefix, np_, dv_p), prefix_len, num_queries, alibi, ts, pts, tslopes)
    return out[:, :rows, :, : v.shape[-1]]

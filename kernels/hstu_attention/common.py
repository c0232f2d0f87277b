"""What every Pallas backend shares: static kernel parameters (full and cached mode), padding, matmul, tiles
fitted to short sequences, and a custom_vjp wrapper. Backend-neutral: nothing here names a Pallas dialect."""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable, Protocol

import jax
import jax.numpy as jnp
from jax import lax

from kernels.hstu_attention.config import BlockSizes
from kernels.hstu_attention.masks import MaskSpec
from kernels.hstu_attention.scores import ScoreSpec, silu, silu_and_grad  # noqa: F401  (kernels import them here)


@dataclasses.dataclass(frozen=True)
class KernelParams:
    """Static (hashable) parameters of one attention call, after validation and defaults."""

    normalizer: float
    alpha: float
    spec: MaskSpec
    blocks: BlockSizes
    interpret: object = False
    score: ScoreSpec = ScoreSpec()

    @property
    def inv_normalizer(self) -> float:
        return 1.0 / self.normalizer

    @property
    def acc_scale(self) -> float:
        """The factor applied once to the accumulators: 1/normalizer for silu, 1 for softmax."""
        return 1.0 if self.score.softmax else self.inv_normalizer


@dataclasses.dataclass(frozen=True)
class CachedParams:
    """Static parameters of one cached-prefix call (`hstu_attention_cached`)."""

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


def fit_cached_blocks(blocks: BlockSizes, rows: int, keys: int) -> BlockSizes:
    """Default tiles shrunk separately to the C query rows and the N prefix keys (power of two >= 16)."""
    fr, fk = blocks.fitted(rows, 16), blocks.fitted(keys, 16)
    return dataclasses.replace(blocks, block_q=fr.block_q, block_q_bwd=fr.block_q_bwd, block_k=fk.block_k,
                               block_k_bwd=fk.block_k_bwd)

def dot_precision(dtype: jnp.dtype) -> lax.Precision | None:
    """Full-precision float32 products (the float32 tests are tight); native tensor-core math otherwise."""
    return lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else None


def round_up(x: int, multiple: int) -> int:
    return -(-x // multiple) * multiple


def pad_axis(x: jax.Array, axis: int, size: int) -> jax.Array:
    """Zero-pad `axis` of `x` up to `size` (no-op when already that size)."""
    if x.shape[axis] == size:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, size - x.shape[axis])
    return jnp.pad(x, widths)


class Forward(Protocol):
    def __call__(self, q, k, v, lengths, hist, params: KernelParams) -> jax.Array: ...


class Backward(Protocol):
    def __call__(self, q, k, v, lengths, hist, d_out, params: KernelParams) -> tuple[jax.Array, ...]: ...


def make_attention(forward: Forward, backward: Backward) -> Callable[..., jax.Array]:
    """Wrap a backend's padded-shape forward and backward kernels into one differentiable function.

    The returned function takes (q, k, v, lengths, hist, params) on already padded tensors; lengths and hist
    are int32 [B] and receive no cotangent.
    """

    @functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
    def attention(q, k, v, lengths, hist, params):
        return forward(q, k, v, lengths, hist, params)

    def attention_fwd(q, k, v, lengths, hist, params):
        # No softmax statistics: the backward recomputes scores from q and k alone.
        return forward(q, k, v, lengths, hist, params), (q, k, v, lengths, hist)

    def attention_bwd(params, residuals, d_out):
        q, k, v, lengths, hist = residuals
        dq, dk, dv = backward(q, k, v, lengths, hist, d_out, params)
        return dq, dk, dv, None, None

    attention.defvjp(attention_fwd, attention_bwd)
    return attention


def run_padded(
    attention: Callable[..., jax.Array],
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    lengths: jax.Array,
    num_targets: jax.Array,
    params: KernelParams,
    *,
    seq_multiple: int,
    head_multiple: Callable[[int], int],
) -> jax.Array:
    """Pad L to `seq_multiple` and each head dim to `head_multiple(d)`, run, and slice the result back.

    Zero padding is exact: padded keys lie beyond every length, zero q/k columns add nothing to q.k and zero
    v columns only produce output columns that are sliced away.
    """
    _, seq_len, _, dqk = q.shape
    dv = v.shape[-1]
    lp = round_up(seq_len, seq_multiple)
    dqk_p, dv_p = head_multiple(dqk), head_multiple(dv)
    qp = pad_axis(pad_axis(q, 1, lp), 3, dqk_p)
    kp = pad_axis(pad_axis(k, 1, lp), 3, dqk_p)
    vp = pad_axis(pad_axis(v, 1, lp), 3, dv_p)
    hist = lengths - num_targets
    out = attention(qp, kp, vp, lengths, hist, params)
    return out[:, :seq_len, :, :dv]


def next_power_of_two(x: int, minimum: int = 16) -> int:
    return max(minimum, 1 << max(0, (x - 1).bit_length()))


def matmul(a: jax.Array, b: jax.Array, *, trans_a: bool = False, trans_b: bool = False) -> jax.Array:
    """a @ b (optionally transposing either operand in the contraction), accumulated in float32."""
    contract = (((0,) if trans_a else (1,)), ((1,) if trans_b else (0,)))
    return lax.dot_general(
        a, b, (contract, ((), ())), precision=dot_precision(a.dtype), preferred_element_type=jnp.float32
    )

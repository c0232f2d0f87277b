"""The one definition of scores and biases, shared by the reference and every kernel body.

A score is z = alpha * q.k + bias(i, j). The bias is a sum of optional terms, each a per-head slope times a
non-negative distance:
  * ALiBi over positions: -alibi_slope[h] * dist(i, j), dist = c(i) - c(j) on the target-aware collapsed
    index c(x) = min(x, hist), so a candidate is at distance hist - j from history key j and 0 from itself
    (scores do not depend on candidate order); in cached mode, prefix key j is at prefix_len - j;
  * time: -time_slope[h] * time_bucket(t_i - t_j), time_bucket(dt) = log1p(|dt|) (natural log, float32).
The activation turns z into a weight: "silu" gives silu(z) / normalizer; "softmax" gives exp(z - lse_i) over
the valid keys of row i (a row with no valid key has weight 0 everywhere). Everything is elementwise jnp on
tiles, so it traces inside Triton, Mosaic GPU and Mosaic TPU kernels as well as in plain XLA.

To add a score function or a bias, edit this file (and declare it in the backends that support it).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

SCORE_FNS = ("silu", "softmax")
# Running-max start and masked-score value of the online softmax: finite, so exp(m_old - m_new) of a row
# that has seen no valid key yet is exp(0) = 1 instead of NaN; weights of masked pairs are selected to 0.
MASK_VALUE = -1e30


@dataclasses.dataclass(frozen=True)
class ScoreSpec:
    """Static description of the score: activation and which bias terms are on."""

    score_fn: str = "silu"
    alibi: bool = False
    time: bool = False

    @property
    def has_bias(self) -> bool:
        return self.alibi or self.time

    @property
    def softmax(self) -> bool:
        return self.score_fn == "softmax"

    @property
    def biases(self) -> frozenset[str]:
        return frozenset(name for name, on in (("alibi", self.alibi), ("time", self.time)) if on)


def time_bucket(dt: jax.Array) -> jax.Array:
    """log1p(|dt|) in float32 (natural log). Integer dt is subtracted exactly before the cast."""
    return jnp.log1p(jnp.abs(dt).astype(jnp.float32))


def position_distance(i: jax.Array, j: jax.Array, hist: jax.Array) -> jax.Array:
    """c(i) - c(j) with c(x) = min(x, hist), float32 (>= 0 on every valid pair of the target-aware mask)."""
    return (jnp.minimum(i, hist) - jnp.minimum(j, hist)).astype(jnp.float32)


def bias(spec: ScoreSpec, dist, dt, alibi_slope, time_slope):
    """The additive bias of a tile from its position distance and raw time difference (either may be None
    when its term is off); None when no bias is on. Slopes broadcast against the tile (scalars in kernels)."""
    out = None
    if spec.alibi:
        out = -alibi_slope * dist
    if spec.time:
        term = -time_slope * time_bucket(dt)
        out = term if out is None else out + term
    return out


def add_bias(z: jax.Array, b) -> jax.Array:
    # Skipping the add when there is no bias keeps bias-free results bit-identical to the plain score.
    return z if b is None else z + b


def silu(x: jax.Array) -> jax.Array:
    """x * sigmoid(x), written so that exp overflow for very negative x gives -0, never NaN."""
    return x / (1.0 + jnp.exp(-x))


def silu_and_grad(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """silu(x) and d silu / dx = sigma(x) (1 + x (1 - sigma(x)))."""
    sig = 1.0 / (1.0 + jnp.exp(-x))
    return x * sig, sig * (1.0 + x * (1.0 - sig))


def online_softmax_step(m_prev, l_prev, z, valid):
    """One tile of the online softmax. Returns (m_new, corr, p, l_new): rescale the accumulator by corr, then
    add p @ v. `valid` None means every pair of the tile is valid. Shapes: m, l [rows, 1], z [rows, keys]."""
    if valid is not None:
        z = jnp.where(valid, z, MASK_VALUE)
    m_new = jnp.maximum(m_prev, jnp.max(z, axis=1, keepdims=True))
    corr = jnp.exp(m_prev - m_new)
    p = jnp.exp(z - m_new)
    if valid is not None:
        p = jnp.where(valid, p, 0.0)
    return m_new, corr, p, corr * l_prev + jnp.sum(p, axis=1, keepdims=True)


def softmax_finish(m, l):
    """(1 / l, lse) at the end of a row; a row with no valid key (l == 0) gets 1/l = 0 and lse = 0."""
    empty = l <= 0.0
    inv_l = jnp.where(empty, 0.0, 1.0 / jnp.where(empty, 1.0, l))
    lse = jnp.where(empty, 0.0, m + jnp.log(jnp.where(empty, 1.0, l)))
    return inv_l, lse


def weights_and_ds(spec: ScoreSpec, z, dp, lse=None, delta=None):
    """Backward pieces of one tile, before masking: (weights P, dS = dL/dz).

    silu: P = silu(z) and dS = dp * silu'(z), both still to be divided by the normalizer (kernels fold it
    into the accumulators); softmax: P = exp(z - lse), dS = P * (dp - delta) with delta_i = sum_d dO_i O_i.
    """
    if spec.softmax:
        p = jnp.exp(z - lse)
        return p, p * (dp - delta)
    p, grad = silu_and_grad(z)
    return p, dp * grad


def slope_grad_terms(spec: ScoreSpec, ds, dist, dt):
    """Row sums of dS * d(bias)/d(slope), i.e. -sum_j dS * dist and -sum_j dS * bucket; None for off terms."""
    g_alibi = -jnp.sum(ds * dist, axis=-1) if spec.alibi else None
    g_time = -jnp.sum(ds * time_bucket(dt), axis=-1) if spec.time else None
    return g_alibi, g_time


def geometric_alibi_slopes(num_heads: int) -> jax.Array:
    """The ALiBi paper's slopes 2^(-8h/H) for heads h = 1..H, float32 [H]."""
    if not isinstance(num_heads, int) or num_heads <= 0:
        raise ValueError(f"geometric_alibi_slopes: num_heads must be a positive int, got {num_heads!r}")
    h = jnp.arange(1, num_heads + 1, dtype=jnp.float32)
    return jnp.exp2(-8.0 * h / num_heads)

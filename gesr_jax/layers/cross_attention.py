"""RO and NRO cross attention into the user history (spec §1.7, §1.8).

The paper confirms only the blocks' existence and their inputs/outputs; the formulas here
are the spec's proposals (UNCONFIRMED):

* RO cross attention (once per request): k learnable query seeds, Set-Transformer PMA
  style, ``H = S + W_o MHA(S W_q, U W_k, U W_v)`` then ``H + FFN(LN(H))``; its
  flattened output is the "User History Summarization". With ``model.cross.profile_query``
  one more query, the sum-pooled user profile embedding, gives the "User Profile Embs".
* NRO cross attention (per candidate): ``q_c`` = sum-pooled candidate query features,
  ``a_c = W_o MHA(q_c W_q, U W_k, U W_v)``, gate ``g_c = sigmoid(W_g [q_c ; a_c] + b)``,
  output ``g_c * a_c + (1 - g_c) * q_c``.

Attention is softmax (``model.cross.kind="softmax"``) or HSTU-style pointwise SiLU
divided by the fixed normaliser ("silu"); the paper does not say which. In both blocks
the history keys/values ``U W_k``, ``U W_v`` are computed once per request, [B, N, H, dh],
and every query attends to them through an einsum: no history tensor is repeated per
candidate.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from gesr_jax.layers.core import MLP, Dense, LayerNorm, MultiInputDense, fold, make_param


def attend(
    q: jax.Array, k: jax.Array, v: jax.Array, valid: jax.Array, *, kind: str, normalizer: float
) -> jax.Array:
    """Multi-head attention of queries into one request's history keys.

    ``q`` is [B, M, H, dh] (per-request queries) or [M, H, dh] (shared by all requests);
    ``k``, ``v`` [B, N, H, dh]; ``valid`` [B, N]. Returns [B, M, H, dh]. A request with no
    valid history gets zeros (never NaN).

    Per-request queries run head-major ([B, H, M, dh] x [B, H, N, dh]): with the heads axis
    between M and dh, XLA on CPU computes the value product as ``v^T w^T`` and writes the
    whole [B, H, M, N] weight matrix transposed (measured ~2.5x slower per score entry;
    experiments/results/serving_cpu.md). Only the small q, k, v, output move, not the scores.
    Softmax: see :func:`_softmax_attend`.
    """
    if q.ndim == 3:
        qh = jnp.broadcast_to(jnp.swapaxes(q, 0, 1)[None], (k.shape[0], q.shape[1], q.shape[0], q.shape[2]))
    else:
        qh = jnp.swapaxes(q, 1, 2)  # [B, H, M, dh]
    qh = qh * (q.shape[-1] ** -0.5)  # the score scale on the [.., M, dh] queries, not the [.., M, N] scores
    if kind == "softmax":
        return jnp.swapaxes(_softmax_attend(qh, k, v, valid), 1, 2)
    if kind != "silu":
        raise ValueError(f"model.cross.kind must be 'softmax' or 'silu', got {kind!r}")
    kh, vh = jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2)  # [B, H, N, dh]
    scores = jnp.einsum("bhmd,bhnd->bhmn", qh, kh)
    # The mask stays a select on the weights: in the same SiLU attention form (the HSTU cached rows, [2, 2, 256,
    # 1024] in isolation), moving it onto the values made XLA on CPU emit a slower SiLU loop (0.76x overall).
    weights = jnp.where(valid[:, None, None, :], jax.nn.silu(scores), 0.0)
    return jnp.swapaxes(jnp.einsum("bhmn,bhnd->bhmd", weights, vh) / normalizer, 1, 2)


def _softmax_attend(qh: jax.Array, k: jax.Array, v: jax.Array, valid: jax.Array) -> jax.Array:
    """Softmax attention of scaled head-major queries [B, H, M, dh] -> [B, H, M, dh], masked on O(N) tensors.

    The [B, H, M, N] scores get no select: each invalid key is replaced by a copy of the request's first
    valid key, so the row max over all N scores is the max over the valid ones (the softmax shift, a
    constant: the normalised result does not depend on it), and an invalid key's weight reaches neither
    the values (zeroed there) nor the row sum (a product with the valid mask). Scores pass the largest
    tensor twice (max, exp) instead of four times; 1.22-1.31x the forward speed at B=2, M=256, N=1024 and
    B=32, M=64, N=256 on CPU, gradients ~1.0x. A request with no valid key: weight sums 0, output 0.
    Keys are transposed to [B, H, dh, N]: in a trace of the Scorer's score call on CPU, the product with keys as
    [N, dh] took 2.2 ms per call, the [dh, N]-form products of the same size 1.0-1.1 ms.
    """
    mask = valid[:, :, None, None]
    first = jnp.argmax(valid, axis=1)[:, None, None, None]  # a valid key of each request (0 when none)
    k_filled = jnp.where(mask, k, jnp.take_along_axis(k, first, axis=1))
    scores = jnp.einsum("bhmd,bhdn->bhmn", qh, jnp.transpose(k_filled, (0, 2, 3, 1)))
    weights = jnp.exp(scores - jax.lax.stop_gradient(jnp.max(scores, axis=-1, keepdims=True)))
    values = jnp.einsum("bhmn,bhnd->bhmd", weights, jnp.swapaxes(jnp.where(mask, v, 0.0), 1, 2))
    total = jnp.einsum("bhmn,bn->bhm", weights, valid.astype(weights.dtype))[..., None]
    return values / jnp.where(total > 0, total, 1.0)


def attend_literal(
    q: jax.Array, k: jax.Array, v: jax.Array, valid: jax.Array, *, kind: str, normalizer: float
) -> jax.Array:
    """:func:`attend` as the formula is written (token-major einsums): the oracle of its layout, and
    experiments/bench_serving.py's ablation row. Same arguments and result."""
    spec = "mhd,bnhd->bhmn" if q.ndim == 3 else "bmhd,bnhd->bhmn"
    scores = jnp.einsum(spec, q, k) * (q.shape[-1] ** -0.5)
    return jnp.einsum("bhmn,bnhd->bmhd", _weights(scores, valid, kind, normalizer), v)


def _weights(scores: jax.Array, valid: jax.Array, kind: str, normalizer: float) -> jax.Array:
    """[B, H, M, N] attention weights; invalid keys (and rows with none) weigh exactly 0."""
    mask = valid[:, None, None, :]
    if kind == "softmax":
        weights = jax.nn.softmax(jnp.where(mask, scores, -1e30), axis=-1)
        return jnp.where(mask, weights, 0.0)
    if kind == "silu":
        return jnp.where(mask, jax.nn.silu(scores), 0.0) / normalizer
    raise ValueError(f"model.cross.kind must be 'softmax' or 'silu', got {kind!r}")


class HistoryKV(nnx.Module):
    """Key and value projections of the history tokens: RO, once per request."""

    def __init__(self, dim: int, heads: int, head_dim: int, *, rngs: nnx.Rngs):
        self.heads, self.head_dim = heads, head_dim
        self.k = Dense(dim, heads * head_dim, rngs=rngs, names=("embed", "heads"), use_bias=False)
        self.v = Dense(dim, heads * head_dim, rngs=rngs, names=("embed", "heads"), use_bias=False)

    def __call__(self, history: jax.Array) -> tuple[jax.Array, jax.Array]:
        b, n, _ = history.shape
        shape = (b, n, self.heads, self.head_dim)
        return self.k(history).reshape(shape), self.v(history).reshape(shape)


class _CrossBase(nnx.Module):
    def __init__(self, dim: int, *, heads: int, head_dim: int, kind: str, normalizer: float, rngs: nnx.Rngs):
        d, h, dh = dim, heads, head_dim
        self.heads, self.head_dim = h, dh
        self.kv = HistoryKV(d, h, dh, rngs=rngs)
        self.q = Dense(d, h * dh, rngs=rngs, names=("embed", "heads"), use_bias=False)
        self.o = Dense(h * dh, d, rngs=rngs, names=("heads", "embed"))
        self.kind = kind
        self.normalizer = float(normalizer)

    def _attend(self, queries: jax.Array, k: jax.Array, v: jax.Array, valid: jax.Array) -> jax.Array:
        q = self.q(queries)
        q = q.reshape(*q.shape[:-1], self.heads, self.head_dim)
        out = attend(q, k, v, valid, kind=self.kind, normalizer=self.normalizer)
        return self.o(out.reshape(*out.shape[:-2], self.heads * self.head_dim))


class ROCrossAttention(_CrossBase):
    """Learnable seeds (and optionally the user profile) attend into the history: RO outputs."""

    def __init__(
        self,
        dim: int,
        *,
        num_seeds: int,
        profile_query: bool,
        dropout_rate: float,
        rngs: nnx.Rngs,
        **attention_args,
    ):
        super().__init__(dim, rngs=rngs, **attention_args)
        d = dim
        self.num_seeds = num_seeds
        self.seeds = make_param(rngs, nnx.initializers.normal(1.0), (num_seeds, d), (None, "embed"))
        self.norm = LayerNorm(d, rngs=rngs)
        self.ffn = MLP(d, (2 * d, d), rngs=rngs, in_name="embed", out_name="embed", dropout_rate=dropout_rate)
        self.profile_query = profile_query

    def __call__(
        self,
        history: jax.Array,
        valid: jax.Array,
        profile: jax.Array | None,
        *,
        key: jax.Array | None = None,
    ) -> tuple[jax.Array, jax.Array | None]:
        """(summary [B, k * D], profile embedding [B, D] or None) from history [B, N, D] and profile [B, D]."""
        k, v = self.kv(history)
        seeds = self.seeds[...]
        summary = self._block(seeds + self._attend(seeds, k, v, valid), fold(key, 0))
        summary = summary.reshape(summary.shape[0], -1)
        if not self.profile_query:
            return summary, None
        if profile is None:
            raise ValueError("RO cross attention was built with a profile query but got no profile embedding")
        query = profile[:, None, :]
        prof = self._block(query + self._attend(query, k, v, valid), fold(key, 1))
        return summary, prof[:, 0]

    def _block(self, h: jax.Array, key: jax.Array | None) -> jax.Array:
        return h + self.ffn(self.norm(h), key=key)


class NROCrossAttention(_CrossBase):
    """Per-candidate queries attend into the request's history; gated update. Output [B, C, D]."""

    def __init__(self, dim: int, *, rngs: nnx.Rngs, **attention_args):
        super().__init__(dim, rngs=rngs, **attention_args)
        self.gate = MultiInputDense((dim, dim), dim, rngs=rngs, out_name="embed")

    def encode(self, history: jax.Array) -> tuple[jax.Array, jax.Array]:
        """History keys and values [B, N, H, dh]: once per request, shared by all its candidates."""
        return self.kv(history)

    def score(self, query: jax.Array, kv: tuple[jax.Array, jax.Array], valid: jax.Array) -> jax.Array:
        """Gated cross attention of candidate queries [B, C, D] into the cached history K/V."""
        a = self._attend(query, kv[0], kv[1], valid)
        g = jax.nn.sigmoid(self.gate([query, a]))
        return g * a + (1.0 - g) * query

    def __call__(self, query: jax.Array, history: jax.Array, valid: jax.Array) -> jax.Array:
        return self.score(query, self.encode(history), valid)

"""HSTU layers (spec §2.2, §2.7) and the target-aware stack over [history ; candidates] (spec §1.6).

One layer (HSTU paper eq. 1-3, research-code form with a learnable input LayerNorm)::

    u, v, q, k = split(silu(W_uvqk LayerNorm(x)))       fused projection, SiLU on all four
    a          = attention(q, k, v)                      pointwise silu(alpha q.k) / normalizer, target-aware mask
    x         <- x + W_o dropout(LayerNorm(a) * u)

With the target-aware mask, history rows never attend to candidates, so the history half of every layer is
candidate-independent. :class:`HSTUStack` therefore runs in two stages:

* :meth:`HSTUStack.encode` (once per request): causal self attention over the history alone, keeping each
  layer's history keys/values -- O(N^2);
* :meth:`HSTUStack.score` (per candidate chunk): each candidate row attends to the cached history K/V of its
  layer and to itself (the kernels' cached-prefix mode) -- O(C N).

The candidate rows equal those of one pass over the packed [history ; candidates] sequence (tested), which
:meth:`HSTUStack.sequence` still computes for inspection. All attention goes through ``kernels.hstu_attention``;
the normaliser is fixed, so outputs never depend on padding. Position and time are in the input tokens, so
there is no attention bias.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from gesr_jax.data.batch import lengths_mask
from gesr_jax.layers.core import Dense, LayerNorm, dropout, fold, matmul_last_axis
from gesr_jax.layers.sequence import HistoryKV, encode_prefix, last_history, pack, run_packed, score_against_prefix
from kernels.hstu_attention import hstu_attention, hstu_attention_cached

class HSTULayer(nnx.Module):
    """One HSTU layer: fused UVQK projection, U-gated and LayerNorm'd pointwise attention, residual."""

    def __init__(
        self,
        dim: int,
        *,
        heads: int,
        qk_dim: int,
        v_dim: int,
        normalizer: float,
        alpha: float | None,
        attention_impl: str | None,
        dropout_rate: float,
        rngs: nnx.Rngs,
    ):
        self.heads, self.qk_dim, self.v_dim = heads, qk_dim, v_dim
        self.norm_in = LayerNorm(dim, rngs=rngs)
        self.uvqk = Dense(dim, 2 * heads * (v_dim + qk_dim), rngs=rngs, names=("embed", "heads"))
        self.norm_attn = LayerNorm(heads * v_dim, rngs=rngs, name="heads")
        self.out = Dense(heads * v_dim, dim, rngs=rngs, names=("heads", "embed"))
        self.normalizer = float(normalizer)
        self.alpha = alpha
        self.implementation = attention_impl
        self.dropout_rate = dropout_rate

    def project(self, x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
        """(u [B, L, H*Dv], v [B, L, H, Dv], q, k [B, L, H, Dqk]) of tokens x [B, L, D]."""
        b, length, _ = x.shape
        h, dqk, dv = self.heads, self.qk_dim, self.v_dim
        uvqk = jax.nn.silu(self.uvqk(self.norm_in(x)))
        u, v, q, k = jnp.split(uvqk, [h * dv, 2 * h * dv, 2 * h * dv + h * dqk], axis=-1)
        return u, v.reshape(b, length, h, dv), q.reshape(b, length, h, dqk), k.reshape(b, length, h, dqk)

    def _residual(self, x: jax.Array, attn: jax.Array, u: jax.Array, key: jax.Array | None) -> jax.Array:
        attn = attn.reshape(*attn.shape[:2], self.heads * self.v_dim)
        return x + self.out(dropout(self.norm_attn(attn) * u, self.dropout_rate, key))

    def _kernel_args(self) -> dict[str, Any]:
        return dict(normalizer=self.normalizer, alpha=self.alpha, implementation=self.implementation)

    def full(
        self, x: jax.Array, lengths: jax.Array, num_targets: jax.Array, *, key: jax.Array | None = None, **bias: Any
    ) -> jax.Array:
        """The layer over a packed [history ; candidates] sequence (target-aware mask)."""
        u, v, q, k = self.project(x)
        attn = hstu_attention(q, k, v, lengths, num_targets, **self._kernel_args(), **bias)
        return self._residual(x, attn, u, key)

    def history(
        self, x: jax.Array, lengths: jax.Array, *, key: jax.Array | None = None, **bias: Any
    ) -> tuple[jax.Array, HistoryKV]:
        """Causal self attention over history tokens alone: (next tokens, this layer's (k, v) for candidates)."""
        u, v, q, k = self.project(x)
        attn = hstu_attention(q, k, v, lengths, None, **self._kernel_args(), **bias)
        return self._residual(x, attn, u, key), (k, v)

    def history_kv(self, x: jax.Array) -> HistoryKV:
        """Only the (k, v) of history tokens: the last layer's history outputs are never read.

        Projects onto the k and v columns of ``uvqk`` alone (the same dot products as :meth:`project`): the
        u and q columns of every history row were computed and dropped before, half of this projection's
        FLOPs and most of its memory traffic in the train step's backward pass.
        """
        b, length, _ = x.shape
        h, dqk, dv = self.heads, self.qk_dim, self.v_dim
        xn = self.norm_in(x)
        kernel, bias = self.uvqk.kernel[...].astype(xn.dtype), self.uvqk.bias[...].astype(xn.dtype)
        if self.uvqk.kernel_scale is not None:  # a float8 kernel (layers/quantize.py), as Dense applies it
            kernel = kernel * self.uvqk.kernel_scale[...].astype(xn.dtype)
        v_cols = slice(h * dv, 2 * h * dv)
        k_cols = slice(2 * h * dv + h * dqk, 2 * h * (dv + dqk))
        v = jax.nn.silu(matmul_last_axis(xn, kernel[:, v_cols]) + bias[v_cols])
        k = jax.nn.silu(matmul_last_axis(xn, kernel[:, k_cols]) + bias[k_cols])
        return k.reshape(b, length, h, dqk), v.reshape(b, length, h, dv)

    def candidates(
        self, x: jax.Array, kv: HistoryKV, history_len: jax.Array, num_candidates: jax.Array, *,
        key: jax.Array | None = None, **bias: Any,
    ) -> jax.Array:  # fmt: skip
        """Candidate tokens [B, C, D] through the layer: each attends to the cached history (k, v) and itself."""
        u, v, q, k = self.project(x)
        attn = hstu_attention_cached(
            q, k, v, kv[0], kv[1], history_len, num_candidates, self_term=True, score_fn="silu",
            **self._kernel_args(), **bias,
        )  # fmt: skip
        return self._residual(x, attn, u, key)


class HSTUStack(nnx.Module):
    """``num_layers`` HSTU layers and a final LayerNorm; rows at or beyond the valid length are zero."""

    def __init__(self, dim: int, *, num_layers: int, compute_dtype: str = "float32", rngs: nnx.Rngs, **layer_args):
        self.layers = nnx.List([HSTULayer(dim, rngs=rngs, **layer_args) for _ in range(num_layers)])
        self.norm_out = LayerNorm(dim, rngs=rngs)
        self.dtype = jnp.dtype(compute_dtype)

    def _finish(self, x: jax.Array, lengths: jax.Array) -> jax.Array:
        valid = lengths_mask(lengths, x.shape[1])[..., None]
        return jnp.where(valid, self.norm_out(x), 0.0).astype(jnp.float32)

    def sequence(
        self, x: jax.Array, lengths: jax.Array, num_targets: jax.Array, *, key: jax.Array | None = None
    ) -> jax.Array:
        """The stack over a packed sequence [B, L, D] in one pass (inspection and tests)."""
        x = run_packed(self.layers, x, lengths, num_targets, dtype=self.dtype, key=key)
        return self._finish(x, lengths)

    def encode(
        self, history: jax.Array, history_len: jax.Array, *, need_outputs: bool, key: jax.Array | None = None
    ) -> tuple[jax.Array | None, list[HistoryKV]]:
        """(history outputs [B, N, D] or None, per-layer history (k, v)). Once per request.

        Without ``need_outputs`` the last layer computes only its (k, v), the part candidates read.
        """
        x, cache = encode_prefix(
            self.layers, history, history_len, dtype=self.dtype, need_outputs=need_outputs, key=key
        )
        return (None if x is None else self._finish(x, history_len)), cache

    def score(
        self,
        candidates: jax.Array,
        cache: list[HistoryKV],
        history_len: jax.Array,
        num_candidates: jax.Array,
        *,
        key: jax.Array | None = None,
    ) -> jax.Array:
        """Candidate rows [B, C, D] of the stack, from the cached history K/V of every layer."""
        x = score_against_prefix(
            self.layers, cache, candidates, history_len, num_candidates, dtype=self.dtype, key=key
        )
        return self._finish(x, num_candidates)


class TargetAwareHSTU(nnx.Module):
    """Target-aware user embeddings: candidate rows of HSTU([history ; candidates]), or, as the paper's
    ablation (``target_aware=False``), the last history output broadcast to every candidate."""

    def __init__(self, dim: int, *, target_aware: bool, rngs: nnx.Rngs, **stack_args):
        self.stack = HSTUStack(dim, rngs=rngs, **stack_args)
        self.target_aware = target_aware

    def encode(self, history: jax.Array, history_len: jax.Array, *, key: jax.Array | None = None) -> dict:
        """Request-only part: per-layer history K/V (target-aware) or the last history output [B, 1, D]."""
        # Distinct streams for the history rows here and the candidate rows in score().
        outputs, cache = self.stack.encode(
            history, history_len, need_outputs=not self.target_aware, key=fold(key, 0)
        )
        if not self.target_aware:
            return {"last": last_history(outputs, history_len)[:, None, :]}
        return {"kv": cache}

    def score(
        self,
        cache: dict,
        candidates: jax.Array,
        history_len: jax.Array,
        num_candidates: jax.Array,
        *,
        key: jax.Array | None = None,
    ) -> jax.Array:
        """[B, C, D] target-aware user embeddings, or [B, 1, D] (one per request) in the ablation."""
        if not self.target_aware:
            return cache["last"]
        return self.stack.score(candidates, cache["kv"], history_len, num_candidates, key=fold(key, 1))

    def __call__(self, history, candidates, history_len, num_candidates, *, key=None) -> jax.Array:
        """``score(encode(history), candidates)``: the target-aware user embeddings of a whole batch."""
        cache = self.encode(history, history_len, key=key)
        return self.score(cache, candidates, history_len, num_candidates, key=key)

    def sequence(self, history, candidates, history_len, num_candidates, *, key=None) -> jax.Array:
        """The packed one-pass output [B, N + C, D] (target-aware) or [B, N, D] over history (ablation)."""
        if not self.target_aware:
            return self.stack.sequence(history, history_len, jnp.zeros_like(history_len), key=key)
        seq = pack(history, candidates, history_len, num_candidates)
        return self.stack.sequence(seq, history_len + num_candidates, num_candidates, key=key)

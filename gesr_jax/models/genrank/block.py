"""One GenRank decoder block: pre-norm attention then a pre-norm MLP, both residual (spec §3.3, Fig. 2).

::

    q, k, v = split(W_qkv LayerNorm(x))                     linear projections (no activation)
    x      <- x + dropout(W_o attention(q, k, v))           target-aware mask, ALiBi biases (kernels)
    x      <- x + dropout(MLP(LayerNorm(x)))                SwiGLU: W_2 (silu(W_g x) * W_u x); or GELU

The attention is ``kernels.hstu_attention``: softmax (default) or HSTU's pointwise SiLU (``score_fn="silu"``),
with position ALiBi and/or time biases passed through as kernel arguments. Like ``gesr_jax/layers/hstu.py``'s
``HSTULayer`` it implements ``layers/sequence.CachedPrefixBlock``, three forms that give the same candidate rows:

* :meth:`full`: one pass over a packed [history ; candidates] sequence (``hstu_attention`` with
  ``num_targets``): history causal, each candidate sees the whole history and itself;
* :meth:`history`: causal attention over the history alone, returning this block's history (k, v);
* :meth:`candidates`: candidate rows against a cached history (k, v) (``hstu_attention_cached``, self term on),
  O(C N). :meth:`history_kv` is the last block's history work: only its (k, v), its outputs are never read.

Generic (no GenRank-specific input): a candidate for ``gesr_jax/layers/`` if another model wants it.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from gesr_jax.layers.core import Dense, LayerNorm, dropout, fold
from gesr_jax.layers.sequence import HistoryKV
from kernels.hstu_attention import hstu_attention, hstu_attention_cached


class DecoderBlock(nnx.Module):
    """Pre-norm transformer decoder block over the kernels' target-aware attention."""

    def __init__(
        self,
        dim: int,
        *,
        heads: int,
        head_dim: int,
        mlp: str,
        mlp_dim: int,
        score_fn: str,
        normalizer: float | None,
        implementation: str | None,
        dropout_rate: float,
        rngs: nnx.Rngs,
    ):
        if mlp not in ("swiglu", "gelu"):
            raise ValueError(f"DecoderBlock mlp must be 'swiglu' or 'gelu', got {mlp!r}")
        self.heads, self.head_dim = heads, head_dim
        self.norm_attn = LayerNorm(dim, rngs=rngs)
        self.qkv = Dense(dim, 3 * heads * head_dim, rngs=rngs, names=("embed", "heads"))
        self.out = Dense(heads * head_dim, dim, rngs=rngs, names=("heads", "embed"))
        self.norm_mlp = LayerNorm(dim, rngs=rngs)
        self.mlp_kind = mlp
        self.mlp_in = Dense(dim, (2 if mlp == "swiglu" else 1) * mlp_dim, rngs=rngs, names=("embed", "mlp"))
        self.mlp_out = Dense(mlp_dim, dim, rngs=rngs, names=("mlp", "embed"))
        self.score_fn = score_fn
        self.normalizer = None if score_fn == "softmax" else float(normalizer)
        self.implementation = implementation
        self.dropout_rate = dropout_rate

    def project(self, x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """(q, k, v), each [B, L, H, Dh], of tokens x [B, L, D]."""
        b, length, _ = x.shape
        q, k, v = jnp.split(self.qkv(self.norm_attn(x)), 3, axis=-1)
        shape = (b, length, self.heads, self.head_dim)
        return q.reshape(shape), k.reshape(shape), v.reshape(shape)

    def _kernel_args(self) -> dict[str, Any]:
        return dict(score_fn=self.score_fn, normalizer=self.normalizer, implementation=self.implementation)

    def _mlp(self, x: jax.Array) -> jax.Array:
        h = self.mlp_in(self.norm_mlp(x))
        if self.mlp_kind == "swiglu":
            gate, up = jnp.split(h, 2, axis=-1)
            h = jax.nn.silu(gate) * up
        else:
            h = jax.nn.gelu(h)
        return self.mlp_out(h)

    def finish(self, x: jax.Array, attn: jax.Array, key: jax.Array | None) -> jax.Array:
        """Both residual branches after the attention output attn [B, L, H, Dh]."""
        attn = attn.reshape(*attn.shape[:2], self.heads * self.head_dim)
        x = x + dropout(self.out(attn), self.dropout_rate, fold(key, 0))
        return x + dropout(self._mlp(x), self.dropout_rate, fold(key, 1))

    def attention_full(
        self, x: jax.Array, lengths: jax.Array, num_targets: jax.Array | None, **bias: Any
    ) -> jax.Array:
        """The attention output [B, L, H, Dh] over a packed sequence (``bias``: kernel bias arguments)."""
        q, k, v = self.project(x)
        return hstu_attention(q, k, v, lengths, num_targets, **self._kernel_args(), **bias)

    def full(
        self, x: jax.Array, lengths: jax.Array, num_targets: jax.Array, *, key: jax.Array | None = None, **bias: Any
    ) -> jax.Array:
        """The block over a packed [history ; candidates] sequence [B, L, D]."""
        return self.finish(x, self.attention_full(x, lengths, num_targets, **bias), key)

    def history(
        self, x: jax.Array, lengths: jax.Array, *, key: jax.Array | None = None, **bias: Any
    ) -> tuple[jax.Array, HistoryKV]:
        """Causal attention over history tokens alone: (next tokens, this block's (k, v) for the candidates)."""
        q, k, v = self.project(x)
        attn = hstu_attention(q, k, v, lengths, None, **self._kernel_args(), **bias)
        return self.finish(x, attn, key), (k, v)

    def history_kv(self, x: jax.Array) -> HistoryKV:
        """Only the (k, v) of history tokens (the last block: its history outputs are never read)."""
        _, k, v = self.project(x)
        return k, v

    def candidates(
        self, x: jax.Array, kv: HistoryKV, history_len: jax.Array, num_candidates: jax.Array, *,
        key: jax.Array | None = None, **bias: Any,
    ) -> jax.Array:  # fmt: skip
        """Candidate tokens [B, C, D] through the block: each sees the cached history (k, v) and itself."""
        q, k, v = self.project(x)
        attn = hstu_attention_cached(
            q, k, v, kv[0], kv[1], history_len, num_candidates, self_term=True, **self._kernel_args(), **bias
        )
        return self.finish(x, attn, key)

"""Building blocks: parameters with logical axis names, Dense, MLP, Embed, field tables, LayerNorm, dropout.

Every parameter carries logical axis names (``out_sharding`` metadata read by
``nnx.get_partition_spec``): "vocab" for embedding rows, "embed" for the model width,
"mlp" for hidden widths, "heads" for concatenated head dims, None otherwise.
``train/sharding.py`` maps these names to mesh axes; nothing here knows the mesh.

Modules hold only ``nnx.Param`` variables. Randomness (dropout) arrives as a
``key`` argument, so ``apply`` stays a pure function of (params, batch, key).
"""

from __future__ import annotations

import functools
import math
import zlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from gesr_jax.layers import sharded_lookup

Names = tuple[str | None, ...]
Initializer = Callable[..., jax.Array]

# Truncated at +-2 std; dividing by this restores the requested std (as in variance_scaling).
_TRUNC_STD = 0.87962566103423978


@functools.partial(jax.jit, static_argnames=("shape", "stddev", "dtype"))
def _truncated_normal(key: jax.Array, shape: tuple[int, ...], stddev: float, dtype: Any) -> jax.Array:
    # One fused program per shape: eager initialisation otherwise compiles the sample and the scale separately.
    return (stddev / _TRUNC_STD * jax.random.truncated_normal(key, -2.0, 2.0, shape)).astype(dtype)


def embed_init(key: jax.Array, shape: tuple[int, ...], dtype: Any = jnp.float32) -> jax.Array:
    """Truncated normal, std 0.02 (HSTU/BERT-style embedding init)."""
    return _truncated_normal(key, tuple(shape), 0.02, dtype)


def dense_init(key: jax.Array, shape: tuple[int, ...], dtype: Any = jnp.float32) -> jax.Array:
    """LeCun normal: truncated normal with variance 1 / fan_in (fan_in = all but the last dim)."""
    fan_in = math.prod(shape[:-1]) or 1
    return _truncated_normal(key, tuple(shape), math.sqrt(1.0 / fan_in), dtype)


def make_param(rngs: nnx.Rngs, init: Initializer, shape: Sequence[int], names: Names) -> nnx.Param:
    """A float32 ``nnx.Param`` annotated with logical axis ``names`` (one per dim).

    Eager sharding is off: models are built outside any mesh (tests, ``nnx.eval_shape``)
    and the trainer places parameters itself from ``nnx.get_partition_spec``.
    """
    if len(names) != len(shape):
        raise ValueError(f"logical names {names} do not match parameter shape {tuple(shape)}")
    value = init(rngs.params(), tuple(shape), jnp.float32)
    return nnx.Param(value, out_sharding=names, eager_sharding=False)


def _dedupe(names: Names) -> Names:
    """Drop repeated logical names: one mesh axis cannot shard two dims of the same array."""
    seen: set[str] = set()
    out: list[str | None] = []
    for n in names:
        out.append(None if n is not None and n in seen else n)
        if n is not None:
            seen.add(n)
    return tuple(out)


def matmul_last_axis(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """``x @ kernel`` over x's last axis, as one 2-D GEMM over x's leading axes flattened.

    Why flattened: differentiating ``einsum("...i,io->...o")`` with two or more leading axes, XLA on CPU
    computes the kernel gradient as a transposed copy of dy plus a dot that is not a GEMM. That made this
    layer's whole backward 4.6x slower at [32, 256, 32] x [32, 128] on the 2-core CPU box. The GESR train step
    ran 1.19x slower with the einsum (the ``einsum projections`` row of experiments/results/roofline_cpu.md).
    """
    rows = math.prod(x.shape[:-1])
    return (x.reshape(rows, x.shape[-1]) @ kernel).reshape(*x.shape[:-1], kernel.shape[-1])


class Dense(nnx.Module):
    """y = x @ kernel (+ bias); kernel logical names ``names`` = (input axis, output axis)."""

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        *,
        rngs: nnx.Rngs,
        names: tuple[str | None, str | None] = (None, None),
        use_bias: bool = True,
        kernel_init: Initializer = dense_init,
    ):
        names = _dedupe(names)
        self.kernel = make_param(rngs, kernel_init, (in_dim, out_dim), names)
        self.bias = make_param(rngs, nnx.initializers.zeros, (out_dim,), (names[1],)) if use_bias else None
        self.kernel_scale = None  # per-output-column scale of a float8 kernel (set by quantize.quantize_fp8)

    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.kernel[...].astype(x.dtype)
        if self.kernel_scale is not None:
            kernel = kernel * self.kernel_scale[...].astype(x.dtype)
        y = matmul_last_axis(x, kernel)
        if self.bias is not None:
            y = y + self.bias[...].astype(x.dtype)
        return y


class MultiInputDense(nnx.Module):
    """Dense over a concatenation whose parts may have different leading shapes.

    ``sum_i x_i @ W_i`` with broadcasting equals ``concat([broadcast(x_i)]) @ W`` but never
    materialises the broadcast: an RO part shaped [B, 1, D] is projected once per request
    and only its [B, 1, out] projection is broadcast against the [B, C, out] NRO parts.
    """

    def __init__(
        self,
        in_dims: Sequence[int],
        out_dim: int,
        *,
        rngs: nnx.Rngs,
        out_name: str | None = "mlp",
        use_bias: bool = True,
    ):
        base = rngs.params()  # part i draws from stream i: appending an input leaves the others' values unchanged
        self.parts = nnx.List([
            Dense(d, out_dim, rngs=named_rngs(base, i), names=(None, out_name), use_bias=False)
            for i, d in enumerate(in_dims)
        ])
        self.bias = make_param(rngs, nnx.initializers.zeros, (out_dim,), (out_name,)) if use_bias else None

    def __call__(self, xs: Sequence[jax.Array]) -> jax.Array:
        if len(xs) != len(self.parts):
            raise ValueError(f"MultiInputDense expects {len(self.parts)} inputs, got {len(xs)}")
        y = sum(part(x) for part, x in zip(self.parts, xs, strict=True))
        if self.bias is not None:
            y = y + self.bias[...]
        return y


def dropout(x: jax.Array, rate: float, key: jax.Array | None) -> jax.Array:
    """Inverted dropout; identity when ``key`` is None (eval) or ``rate`` is 0."""
    if key is None or rate == 0.0:
        return x
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), 0.0).astype(x.dtype)


def stream_id(name: str) -> int:
    """A stable 31-bit number for a stream name (crc32): the same name gives the same key in every process."""
    return zlib.crc32(name.encode()) & 0x7FFFFFFF


def fold(key: jax.Array | None, stream: str | int) -> jax.Array | None:
    """The key of sub-stream ``stream`` of ``key``: a part's name, or the index of a repeated layer.

    Named streams make a part's randomness a function of its name alone, so adding, removing or
    reordering other parts never changes it; indices are only for the layers of one stack.
    """
    if key is None:
        return None
    return jax.random.fold_in(key, stream_id(stream) if isinstance(stream, str) else stream)


def named_rngs(base: jax.Array, stream: str | int) -> nnx.Rngs:
    """The ``Rngs`` a named part is built from: its initial values depend on ``base`` and its name only.

    A module with named parts draws one ``base = rngs.params()`` and builds each part from
    ``named_rngs(base, name)``, so a part's initial values never depend on which other parts exist or
    in which order they are built.
    """
    return nnx.Rngs(params=fold(base, stream))


class MLP(nnx.Module):
    """Dense layers with SiLU between them (none after the last), dropout on hidden activations.

    Hidden widths get the logical name "mlp"; the input and output axes get
    ``in_name`` / ``out_name`` (e.g. "embed" when they have the model width).
    """

    def __init__(
        self,
        in_dim: int,
        widths: Sequence[int],
        *,
        rngs: nnx.Rngs,
        in_name: str | None = None,
        out_name: str | None = None,
        dropout_rate: float = 0.0,
    ):
        if not widths:
            raise ValueError("MLP needs at least one width")
        dims = [in_dim, *widths]
        layers = []
        for i, (d_in, d_out) in enumerate(zip(dims[:-1], dims[1:], strict=True)):
            first, last = i == 0, i == len(widths) - 1
            names = (in_name if first else "mlp", out_name if last else "mlp")
            layers.append(Dense(d_in, d_out, rngs=rngs, names=names))
        self.layers = nnx.List(layers)
        self.dropout_rate = dropout_rate
        self.out_dim = dims[-1]

    def __call__(self, x: jax.Array, *, key: jax.Array | None = None) -> jax.Array:
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = dropout(jax.nn.silu(x), self.dropout_rate, fold(key, i))
        return x


class Embed(nnx.Module):
    """An embedding table [vocab (+ hash_buckets), dim]; ids outside [0, vocab) are clipped (the batch
    validator rejects them), or, with ``hash_buckets > 0``, ids past the vocabulary go to that many extra rows
    (``data.hash_buckets``; :meth:`rows`). Collisions cost accuracy, not memory: two ids in one row share one
    embedding and their gradients mix there; ``k`` ids hashed into ``b`` rows give about ``k**2 / (2 b)``
    colliding pairs (``sharded_lookup.hash_ids``). Lookups follow the table's layout on the mesh
    (``sharded_lookup``); the table may hold zero padding rows past its real size.
    """

    def __init__(self, vocab: int, dim: int, *, rngs: nnx.Rngs, init: Initializer = embed_init, hash_buckets: int = 0):
        if vocab < 1:
            raise ValueError(f"embedding vocabulary must be >= 1, got {vocab}")
        if hash_buckets < 0:
            raise ValueError(f"hash_buckets must be >= 0, got {hash_buckets}")
        self.table = make_param(rngs, init, (vocab + hash_buckets, dim), ("vocab", "embed"))
        self.vocab = vocab
        self.hash_buckets = hash_buckets

    def rows(self, ids: jax.Array) -> jax.Array:
        """The table row each id reads (ids past the vocabulary hashed when ``hash_buckets > 0``)."""
        return sharded_lookup.hash_ids(ids, self.vocab, self.hash_buckets)

    def __call__(self, ids: jax.Array) -> jax.Array:
        return sharded_lookup.sharded_lookup(self.table[...], self.rows(ids), self.vocab + self.hash_buckets)


class LayerNorm(nnx.Module):
    """LayerNorm over the last axis with learnable scale and bias (eps 1e-6), computed in float32."""

    def __init__(self, dim: int, *, rngs: nnx.Rngs, name: str | None = "embed", affine: bool = True):
        del rngs  # deterministic init; kept for a uniform constructor signature
        self.scale = nnx.Param(jnp.ones((dim,)), out_sharding=(name,), eager_sharding=False) if affine else None
        self.bias = nnx.Param(jnp.zeros((dim,)), out_sharding=(name,), eager_sharding=False) if affine else None

    def __call__(self, x: jax.Array) -> jax.Array:
        xf = x.astype(jnp.float32)
        mean = xf.mean(-1, keepdims=True)
        var = jnp.square(xf - mean).mean(-1, keepdims=True)
        y = (xf - mean) * jax.lax.rsqrt(var + 1e-6)
        if self.scale is not None:
            y = y * self.scale[...] + self.bias[...]
        return y.astype(x.dtype)


def masked_mean(x: jax.Array, mask: jax.Array, axis: int) -> jax.Array:
    """Mean of ``x`` over ``axis`` where ``mask`` is true; 0 for an all-false row (never NaN)."""
    m = mask.astype(x.dtype)
    total = jnp.sum(x * jnp.expand_dims(m, -1), axis=axis)
    count = jnp.sum(m, axis=axis)[..., None]
    return total / jnp.maximum(count, 1.0)


class FieldTables(nnx.Module):
    """One embedding table per item field (``vocabs``: field -> vocabulary incl. id 0), in the given order.

    Shared by the history (RO) and candidate (NRO) sides, so a history event and a candidate with the same
    id get the same embedding.
    """

    def __init__(
        self, vocabs: Mapping[str, int], dim: int, *, rngs: nnx.Rngs, hash_buckets: Mapping[str, int] | None = None
    ):
        """``hash_buckets``: field -> extra hashed rows for ids past its vocabulary (absent = 0)."""
        self.fields = tuple(vocabs)
        base = rngs.params()  # one stream per field name: a new field leaves the other tables unchanged
        extra = dict(hash_buckets or {})
        self.tables = nnx.Dict({
            f: Embed(vocab, dim, rngs=named_rngs(base, f), hash_buckets=extra.get(f, 0)) for f, vocab in vocabs.items()
        })  # fmt: skip

    def sum(self, batch: Mapping[str, jax.Array], fields: tuple[str, ...], prefix: str) -> jax.Array:
        """Sum of the embeddings of ``fields`` read from ``batch[prefix + field]``."""
        return sum(self.tables[f](batch[prefix + f]) for f in fields)

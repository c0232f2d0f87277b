"""Ranking attention: the one attention entry point of gesr_jax (HSTU SiLU attention and GenRank softmax).

Full sequence: `hstu_attention`
-------------------------------
For q, k: [B, L, H, Dqk], v: [B, L, H, Dv], right-padded rows with `lengths[b]` valid tokens of which the last
`num_targets[b]` are candidates, and z[b, h, i, j] = alpha q[b, i, h] . k[b, j, h] + bias[b, h, i, j]::

    silu:    out[b, i, h] = sum_j valid(b, i, j) * silu(z) / normalizer * v[b, j, h]
    softmax: out[b, i, h] = sum_j softmax_j(z over the valid keys of row i) * v[b, j, h]

`alpha` defaults to 1/sqrt(Dqk) for both. `normalizer` is a static positive number chosen by the model (HSTU
divides by a fixed maximum length, never by the padded L); it is required for silu and ignored for softmax. A
softmax row with no valid key outputs exactly 0.

The mask. With hist = lengths - num_targets and c(x) = min(x, hist), the pair (i, j) is valid iff i < lengths,
j < lengths and (i == j or c(i) > c(j)):
  * history tokens attend causally to history (diagonal included) and never to candidates;
  * each candidate attends to the whole history and to itself, never to another candidate, so scoring C
    candidates together equals scoring each alone (M-FALCON);
  * `contextual_len` = n > 0: every valid row also sees keys j < n, and rows i < n see every j < hist;
  * `max_attn_len` = w: a non-contextual pair additionally needs c(i) - c(j) <= w (sliding window).
Rows i >= lengths[b] are exactly zero. Lengths are clipped to [0, L] and num_targets to [0, lengths].

Biases (computed inside the kernels from O(L) inputs, see `scores.py`):
  * `alibi_slopes` [H]: -slope[h] * (c(i) - c(j)); every candidate is at distance hist - j from history key j
    and 0 from itself, so scores do not depend on candidate order. `geometric_alibi_slopes(H)` gives 2^(-8h/H).
  * `timestamps` [B, L] (int or float) with `time_slopes` [H]: -time_slope[h] * log1p(|t_i - t_j|).
Slopes are differentiable (learnable); timestamps are not (zero cotangent).

Cached prefix: `hstu_attention_cached`
--------------------------------------
Candidate rows q, k [B, C, H, Dqk], v [B, C, H, Dv] against a cached history k_prefix [B, N, H, Dqk],
v_prefix [B, N, H, Dv] of valid length prefix_len [B]: row c attends to prefix keys j < prefix_len and, when
`self_term`, to its own k[b, c], v[b, c], never to another row (self_term=False: plain cross attention).
ALiBi distance is prefix_len - j for prefix keys and 0 for the self key; the time bias compares the rows'
`timestamps` [B, C] with `prefix_timestamps` [B, N]; `max_attn_len` w keeps prefix keys with
prefix_len - j <= w (plus j < contextual_len). Rows c >= num_queries are exactly 0. It equals the candidate rows
of `hstu_attention` on [history ; candidates] with lengths = prefix_len + num_queries and num_targets =
num_queries (when prefix_len >= contextual_len), at O(C * N) cost.

Backends (`implementation=`), one module or package each under `backends/`, listed in `registry.py`
------------------------------------------------------------------------------------------------------
  * "xla": pure jnp, materialises the dense scores; every feature; the fallback everywhere and the test oracle.
  * "xla_blocked" (CPU, picked by None there): the "xla" formulas over blocks of examples (`lax.map`), so one
    block's scores stay in cache; same formulas, every feature.
  * "pallas_triton" (any CUDA GPU), "pallas_mosaic_gpu" (Hopper), "pallas_tpu": see each declaration for the
    dtypes, score functions, biases and modes it runs (`registry.capability_table()`, docs/kernels.md).
  * None: the highest-priority backend for this platform that declares support for the request, else "xla".
    A backend that declares the request unsupported is passed over silently; one that raises
    NotImplementedError (e.g. tiles over the shared-memory budget) falls back with one warning per
    (backend, reason). A named backend that does not support the request raises NotImplementedError.
`interpret=True` runs a Pallas backend in its CPU interpreter; `block_sizes` overrides its default tiles.
"""

from __future__ import annotations

import warnings

import jax
import jax.experimental.pallas.fuser  # noqa: F401  (see below)
import jax.numpy as jnp

from kernels.hstu_attention import registry, validation as val
from kernels.hstu_attention.base import Backend, Request, dtype_name
from kernels.hstu_attention.config import BlockSizes
from kernels.hstu_attention.scores import ScoreSpec

# The fuser import registers a config that is part of every jit cache key. Pallas imports it lazily in the
# first pallas_call, which changes the key after that first trace and makes every jitted caller of a Pallas
# backend compile twice; importing it when this module loads keeps the key stable from the start.

IMPLEMENTATIONS = registry.IMPLEMENTATIONS
_warned: set[tuple[str, str]] = set()


def _auto_candidates(request: Request) -> list[Backend]:
    return registry.auto_candidates(request)


def _dispatch(request: Request, implementation: str | None, call):
    """Run `call(backend)` on the named backend, or on the best one that runs `request` (see module doc)."""
    if implementation is not None:
        backend = registry.BACKENDS[implementation]
        reason = backend.unsupported_reason(request)
        if reason is not None:
            raise NotImplementedError(reason)
        return call(backend)
    for backend in _auto_candidates(request):
        if backend.name == "xla":
            return call(backend)
        try:
            return call(backend)
        except NotImplementedError as err:
            key = (backend.name, str(err))
            if key not in _warned:
                _warned.add(key)
                warnings.warn(f"hstu_attention: {backend.name} unavailable ({err}); falling back", RuntimeWarning,
                              stacklevel=3)
    raise AssertionError("unreachable: 'xla' is always the last candidate")


def _common_checks(fn, q, score_fn, normalizer, alpha, alibi_slopes, time_slopes, contextual_len, max_attn_len,
                   implementation):
    val.check_score(fn, score_fn, normalizer, alpha)
    val.check_slopes(fn, "alibi_slopes", alibi_slopes, q.shape[2])
    val.check_slopes(fn, "time_slopes", time_slopes, q.shape[2])
    val.check_static_int(fn, "contextual_len", contextual_len, allow_none=False, minimum=0)
    val.check_static_int(fn, "max_attn_len", max_attn_len, allow_none=True, minimum=0)
    if implementation is not None and implementation not in IMPLEMENTATIONS:
        raise ValueError(f"{fn}: implementation must be None or one of {IMPLEMENTATIONS}, got {implementation!r}")


def _statics(q, score_fn, normalizer, alpha, alibi_slopes, time_slopes):
    spec = ScoreSpec(score_fn, alibi_slopes is not None, time_slopes is not None)
    return dict(
        spec=spec,
        normalizer=float(normalizer) if score_fn == "silu" else None,
        alpha=float(q.shape[-1] ** -0.5 if alpha is None else alpha),
    )


def hstu_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    lengths: jax.Array,
    num_targets: jax.Array | None = None,
    *,
    score_fn: str = "silu",
    normalizer: float | None = None,
    alpha: float | None = None,
    alibi_slopes: jax.Array | None = None,
    timestamps: jax.Array | None = None,
    time_slopes: jax.Array | None = None,
    contextual_len: int = 0,
    max_attn_len: int | None = None,
    implementation: str | None = None,
    interpret: bool = False,
    block_sizes: BlockSizes | None = None,
) -> jax.Array:
    """Target-aware ranking attention over [history ; candidates], [B, L, H, Dv] in q's dtype (module doc).

    `normalizer` is required for score_fn="silu" and ignored for "softmax". `block_sizes` overrides a Pallas
    backend's default tiles (benchmark tuning); "xla" ignores it.
    """
    fn = "hstu_attention"
    val.check_qkv(fn, q, k, v)
    val.check_int_vector(fn, "lengths", lengths, q.shape[0], required=True)
    val.check_int_vector(fn, "num_targets", num_targets, q.shape[0], required=False)
    _common_checks(fn, q, score_fn, normalizer, alpha, alibi_slopes, time_slopes, contextual_len, max_attn_len,
                   implementation)
    val.check_timestamps(fn, "timestamps", timestamps, q.shape[:2], time_slopes)
    seq_len = q.shape[1]
    lengths = jnp.clip(lengths.astype(jnp.int32), 0, seq_len)
    num_targets = jnp.zeros_like(lengths) if num_targets is None else num_targets
    num_targets = jnp.clip(num_targets.astype(jnp.int32), 0, lengths)
    kwargs = dict(
        _statics(q, score_fn, normalizer, alpha, alibi_slopes, time_slopes),
        alibi_slopes=alibi_slopes, timestamps=val.normalize_timestamps(timestamps), time_slopes=time_slopes,
        contextual_len=contextual_len, max_attn_len=max_attn_len, interpret=interpret, block_sizes=block_sizes,
    )
    request = Request("full", dtype_name(q), score_fn, kwargs["spec"].biases, q.shape[-1], v.shape[-1],
                      contextual_len, max_attn_len)
    return _dispatch(request, implementation, lambda b: b.attention(q, k, v, lengths, num_targets, **kwargs))


def hstu_attention_cached(
    q, k, v, k_prefix, v_prefix, prefix_len, num_queries=None, *, self_term=True, score_fn="silu",
    normalizer=None, alpha=None, alibi_slopes=None, timestamps=None, prefix_timestamps=None, time_slopes=None,
    contextual_len=0, max_attn_len=None, implementation=None, interpret=False, block_sizes=None,
) -> jax.Array:
    """Candidate rows against a cached history prefix, [B, C, H, Dv] in q's dtype (module doc, "Cached prefix").

    q, k: [B, C, H, Dqk], v: [B, C, H, Dv]; k_prefix: [B, N, H, Dqk], v_prefix: [B, N, H, Dv]; prefix_len [B]
    (clipped to [0, N]); num_queries [B] (None = all C; clipped to [0, C]). `normalizer` is required for silu
    (a static positive number) and ignored for softmax. Differentiable in q, k, v, k_prefix, v_prefix and the
    slopes.
    """
    fn = "hstu_attention_cached"
    val.check_qkv(fn, q, k, v)
    val.check_qkv(fn, k_prefix, k_prefix, v_prefix, names=("k_prefix", "k_prefix", "v_prefix"))
    if k_prefix.shape[0] != q.shape[0] or k_prefix.shape[2:] != q.shape[2:] or v_prefix.shape[-1] != v.shape[-1]:
        raise ValueError(f"{fn}: k_prefix/v_prefix must be [B, N, H, D] matching q, k, v; got {k_prefix.shape}, "
                         f"{v_prefix.shape} for q {q.shape}, v {v.shape}")
    if k_prefix.dtype != q.dtype:
        raise ValueError(f"{fn}: k_prefix, v_prefix must share q's dtype {q.dtype}, got {k_prefix.dtype}")
    val.check_int_vector(fn, "prefix_len", prefix_len, q.shape[0], required=True)
    val.check_int_vector(fn, "num_queries", num_queries, q.shape[0], required=False)
    if not isinstance(self_term, bool):
        raise ValueError(f"{fn}: self_term must be a Python bool, got {self_term!r}")
    _common_checks(fn, q, score_fn, normalizer, alpha, alibi_slopes, time_slopes, contextual_len, max_attn_len,
                   implementation)
    val.check_timestamps(fn, "timestamps", timestamps, q.shape[:2], time_slopes)
    val.check_timestamps(fn, "prefix_timestamps", prefix_timestamps, k_prefix.shape[:2], time_slopes)
    batch, rows = q.shape[:2]
    prefix_len = jnp.clip(prefix_len.astype(jnp.int32), 0, k_prefix.shape[1])
    num_queries = jnp.full((batch,), rows, jnp.int32) if num_queries is None else num_queries
    num_queries = jnp.clip(num_queries.astype(jnp.int32), 0, rows)
    timestamps, prefix_timestamps = val.normalize_timestamps(timestamps), val.normalize_timestamps(prefix_timestamps)
    if timestamps is not None and timestamps.dtype != prefix_timestamps.dtype:
        timestamps, prefix_timestamps = timestamps.astype(jnp.float32), prefix_timestamps.astype(jnp.float32)
    kwargs = dict(
        _statics(q, score_fn, normalizer, alpha, alibi_slopes, time_slopes), self_term=self_term,
        alibi_slopes=alibi_slopes, timestamps=timestamps, prefix_timestamps=prefix_timestamps,
        time_slopes=time_slopes, contextual_len=contextual_len, max_attn_len=max_attn_len, interpret=interpret,
        block_sizes=block_sizes,
    )
    request = Request("cached", dtype_name(q), score_fn, kwargs["spec"].biases, q.shape[-1], v.shape[-1],
                      contextual_len, max_attn_len)
    return _dispatch(request, implementation, lambda b: b.attention_cached(
        q, k, v, k_prefix, v_prefix, prefix_len, num_queries, **kwargs))

"""The Scorer ablations of experiments/bench_serving.py: each undoes one of issue 23's serving fixes.

A row either builds the Scorer with other arguments (``ABLATIONS[mode]``) or traces it under a context that
puts the earlier formula back (``CONTEXTS[mode]``); the earlier formulas live here, not in the package. Each
computes the same numbers as the code it replaces (tests/layers/test_cross_attention_layout.py,
tests/kernels/ and tests/serving/ check the package's forms against their oracles).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from bench_common import patched

from gesr_jax.layers import cross_attention
from kernels.hstu_attention import reference as hstu_reference
from kernels.hstu_attention import scores as hstu_scores
from kernels.hstu_attention.backends.xla import dense as xla_backend

# Ablations (GESR, at the run's last (N, C) only: (1024, 2000) by default), each the scorer with one fix undone:
ABLATIONS = {
    "scorer, unblocked": dict(score_block=None),  # one [R, C] batch per chunk (per-call page faults)
    "scorer, 1-row blocks": dict(score_group=1),  # blocks request by request: XLA's single-row layout
    "scorer, literal NRO layout": dict(),  # NRO cross attention as first written ("bmhd,bnhd", normalised weights)
    "scorer, concatenated cached forward": dict(),  # cached HSTU forward on the [.., N + 1] concatenation
    "scorer, token-major value product": dict(),  # the attention's p @ v with v as [B, N, H, D] (transposed GEMM)
    "scorer, selected NRO softmax": dict(),  # NRO softmax masked by selects on the [.., C, N] scores
}


def _concatenated_cached_fwd(q, k, v, k_prefix, v_prefix, prefix_len, nq, alibi_slopes, timestamps,
                             prefix_timestamps, time_slopes, cfg):
    """The xla backend's cached forward before the split (scores concatenated with the self key, then sliced)."""
    rows, n = q.shape[1], k_prefix.shape[1]
    mask = hstu_reference.cached_mask(prefix_len, nq, n, rows, self_term=cfg.self_term,
                                      contextual_len=cfg.contextual_len, max_attn_len=cfg.max_attn_len)[:, None]
    bias = hstu_reference.cached_bias(cfg.spec, prefix_len, n, rows, alibi_slopes, timestamps, prefix_timestamps,
                                      time_slopes)  # fmt: skip
    z = hstu_scores.add_bias(hstu_reference.cached_scores(q, k, k_prefix, cfg.alpha), bias)
    p, _ = xla_backend._forward_weights(cfg, z, mask)
    out = xla_backend._weighted_values(p[..., :-1], v_prefix) + jnp.swapaxes(p[..., -1], 1, 2)[..., None] * v
    return out.astype(q.dtype), None


def _token_major_values(p, v):
    """The value product as the formula is written: v [B, N, H, D] as it comes (XLA: v^T p^T, p transposed)."""
    return jnp.einsum("bhij,bjhd->bihd", p, v.astype(jnp.float32), precision=jax.lax.Precision.HIGHEST)


_ATTEND = cross_attention.attend


def _selected_softmax_attend(q, k, v, valid, *, kind, normalizer):
    """`cross_attention.attend` before its softmax lost the selects: the [B, H, M, N] scores scaled, masked
    for the row max and again for exp, the row sum a reduction over them (4 passes instead of 2)."""
    if kind != "softmax" or q.ndim != 4:
        return _ATTEND(q, k, v, valid, kind=kind, normalizer=normalizer)  # the package's (this patches it)
    qh, kh, vh = (jnp.swapaxes(x, 1, 2) for x in (q, k, v))
    scores = jnp.einsum("bhmd,bhnd->bhmn", qh, kh) * (q.shape[-1] ** -0.5)
    mask = valid[:, None, None, :]
    shift = jax.lax.stop_gradient(jnp.max(jnp.where(mask, scores, -jnp.inf), axis=-1, keepdims=True))
    shift = jnp.where(jnp.isfinite(shift), shift, 0.0)
    weights = jnp.exp(jnp.where(mask, scores - shift, -jnp.inf))
    total = jnp.sum(weights, axis=-1, keepdims=True)
    return jnp.swapaxes(jnp.einsum("bhmn,bhnd->bhmd", weights, vh) / jnp.where(total > 0, total, 1.0), 1, 2)


# The ablations that change what the Scorer traces, not its arguments: each runs under its context manager.
# Serving never differentiates, so the primal (`_cached_fwd`) is what the cached-forward ablation replaces.
CONTEXTS = {
    "scorer, literal NRO layout": lambda: patched(cross_attention, "attend", cross_attention.attend_literal),
    "scorer, concatenated cached forward": lambda: patched(xla_backend, "_cached_fwd", _concatenated_cached_fwd),
    "scorer, token-major value product": lambda: patched(xla_backend, "_weighted_values", _token_major_values),
    "scorer, selected NRO softmax": lambda: patched(cross_attention, "attend", _selected_softmax_attend),
}

"""Argument checks of the public entry points: every error names the offending field."""

from __future__ import annotations

import numbers

import jax
import jax.numpy as jnp

from kernels.hstu_attention.scores import SCORE_FNS


def check_static_int(fn: str, name: str, value: object, *, allow_none: bool, minimum: int) -> None:
    if value is None and allow_none:
        return
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        kind = "None or " if allow_none else ""
        raise ValueError(f"{fn}: {name} must be {kind}a Python int >= {minimum}, got {value!r}")


def check_qkv(fn: str, q, k, v, names=("q", "k", "v")) -> None:
    for name, x in zip(names, (q, k, v)):
        if x.ndim != 4:
            raise ValueError(f"{fn}: {name} must be [B, L, H, D], got shape {x.shape}")
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise ValueError(f"{fn}: {name} must be floating point, got {x.dtype}")
    if q.shape != k.shape:
        raise ValueError(f"{fn}: {names[0]} and {names[1]} must have the same shape, got {q.shape} and {k.shape}")
    if v.shape[:3] != q.shape[:3]:
        raise ValueError(f"{fn}: {names[2]} must be [B, L, H, Dv] matching {names[0]}'s {q.shape[:3]}, got {v.shape}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"{fn}: {', '.join(names)} must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")


def check_int_vector(fn: str, name: str, x, batch: int, *, required: bool) -> None:
    if x is None:
        if required:
            raise ValueError(f"{fn}: {name} is required (int32 [B])")
        return
    if x.shape != (batch,) or not jnp.issubdtype(x.dtype, jnp.integer):
        raise ValueError(f"{fn}: {name} must be an integer [B={batch}] array, got {x.dtype}{list(x.shape)}")


def check_score(fn: str, score_fn, normalizer, alpha) -> None:
    if score_fn not in SCORE_FNS:
        raise ValueError(f"{fn}: score_fn must be one of {SCORE_FNS}, got {score_fn!r}")
    if score_fn == "silu" and (
        isinstance(normalizer, jax.core.Tracer) or not isinstance(normalizer, numbers.Real) or not normalizer > 0
    ):
        raise ValueError(f"{fn}: normalizer must be a static positive number, got {normalizer!r}")
    if alpha is not None and (isinstance(alpha, jax.core.Tracer) or not isinstance(alpha, numbers.Real)):
        raise ValueError(f"{fn}: alpha must be None or a static number, got {alpha!r}")


def check_slopes(fn: str, name: str, slopes, heads: int) -> None:
    if slopes is None:
        return
    if slopes.shape != (heads,) or not jnp.issubdtype(slopes.dtype, jnp.floating):
        raise ValueError(f"{fn}: {name} must be a floating [H={heads}] array, got {slopes.dtype}{list(slopes.shape)}")


def check_timestamps(fn: str, name: str, ts, shape: tuple[int, int], time_slopes) -> None:
    if (ts is None) != (time_slopes is None):
        raise ValueError(f"{fn}: {name} and time_slopes go together (both None or both given)")
    if ts is None:
        return
    if ts.shape != shape or not (jnp.issubdtype(ts.dtype, jnp.integer) or jnp.issubdtype(ts.dtype, jnp.floating)):
        raise ValueError(f"{fn}: {name} must be a numeric [B, L]={list(shape)} array, got {ts.dtype}{list(ts.shape)}")


def normalize_timestamps(ts):
    """int32 for integer timestamps (differences stay exact), float32 otherwise; never differentiated."""
    if ts is None:
        return None
    ts = jax.lax.stop_gradient(ts)
    return ts.astype(jnp.int32 if jnp.issubdtype(ts.dtype, jnp.integer) else jnp.float32)

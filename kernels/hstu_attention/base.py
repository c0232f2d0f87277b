"""The backend contract: what a request needs (`Request`) and what a backend declares it supports (`Backend`).

Each backend (a module or package under `backends/`) ends with one `BACKEND = Backend(...)` declaration;
`registry.py` collects them, `api.py` selects from them and the benchmarks and docs read the same table. A backend
declares the dtypes, score functions, biases and modes ("full" = `hstu_attention`, "cached" =
`hstu_attention_cached`) it runs, its default tiles and the tiles the benchmark sweeps. Anything finer (head
dims against a shared-memory budget, combinations it lacks) goes in `check`, which returns a reason string.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp

from kernels.hstu_attention.config import BlockSizes

MODES = ("full", "cached")
BIASES = frozenset({"alibi", "time"})


@dataclasses.dataclass(frozen=True)
class Request:
    """The static facts of one call that decide which backends can run it."""

    mode: str
    dtype: str
    score_fn: str
    biases: frozenset[str]
    dqk: int
    dv: int
    contextual_len: int = 0
    max_attn_len: int | None = None


@dataclasses.dataclass(frozen=True)
class Backend:
    """One attention backend: its capabilities, tiles, and entry points.

    `attention(q, k, v, lengths, num_targets, *, spec, normalizer, alpha, alibi_slopes, timestamps, time_slopes,
    contextual_len, max_attn_len, interpret, block_sizes)` and `attention_cached(q, k, v, k_prefix, v_prefix,
    prefix_len, num_queries, *, self_term, spec, normalizer, alpha, alibi_slopes, timestamps, prefix_timestamps,
    time_slopes, contextual_len, max_attn_len, interpret, block_sizes)` take validated, clipped int32 lengths.
    `priority`: higher is tried first by implementation=None on a platform in `platforms`; `device_ok` narrows
    that to some devices (e.g. Hopper). `fit_tiles`: shrink the default tiles to short sequences.
    """

    name: str
    platforms: tuple[str, ...]
    dtypes: tuple[str, ...]
    score_fns: tuple[str, ...]
    biases: frozenset[str]
    modes: tuple[str, ...]
    priority: int
    attention: Callable[..., jax.Array]
    attention_cached: Callable[..., jax.Array] | None = None
    module: str = ""
    default_blocks: BlockSizes | None = None
    tuning: tuple[BlockSizes, ...] = ()
    fit_tiles: bool = True
    device_ok: Callable[[object], bool] | None = None
    check: Callable[[Request], str | None] | None = None

    def unsupported_reason(self, request: Request) -> str | None:
        """Why this backend cannot run `request` (a sentence naming the backend), or None."""
        if request.dtype not in self.dtypes:
            return f"{self.name} takes {'/'.join(self.dtypes)} operands, got {request.dtype}"
        if request.mode not in self.modes:
            return f"{self.name} does not implement the {request.mode!r} mode"
        if request.score_fn not in self.score_fns:
            return f"{self.name} does not implement score_fn={request.score_fn!r}"
        missing = sorted(request.biases - self.biases)
        if missing:
            return f"{self.name} does not implement the {'/'.join(missing)} bias"
        return None if self.check is None else self.check(request)

    def runs_on(self, platform: str, device) -> bool:
        """Whether implementation=None may pick this backend on `platform` / `device`."""
        return platform in self.platforms and (self.device_ok is None or self.device_ok(device))

    def default_block_sizes(self, seq_len: int) -> BlockSizes | None:
        if self.default_blocks is None:
            return None
        return self.default_blocks.fitted(seq_len, 16) if self.fit_tiles else self.default_blocks


def dtype_name(x: jax.Array) -> str:
    return jnp.dtype(x.dtype).name

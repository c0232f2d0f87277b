"""Cache-sized work inside one serving call: requests one at a time, candidates in blocks.

A chunk call of R requests x W candidates (``Engine._score``) would otherwise run the model on the whole
[R, W] chunk at once. GESR's attention rows then materialise [R, H, W, N] score tensors: at R=16, W=1024,
N=1024 that is 128 MiB per tensor, which glibc serves with fresh ``mmap`` blocks every call (page faults:
~0.5 s of system CPU per call on the 2-core box) and which no cache holds. :func:`blocked_score` runs the
same traceable ``score(consts, state, candidates)`` under ``lax.map`` over the R requests and, within a
request, over blocks of ``block`` candidates, so XLA's temporary buffers are one block's ([1, H, block, N]:
2 MiB at block 256, N=1024) and are reused from block to block. Blocks past a request's last candidate are
skipped (``lax.cond``), so a chunk padded far beyond its candidates costs almost nothing.

Numerics: every model scores each candidate independently of the other candidates and requests (the
contract chunking already relies on), so the outputs equal the unblocked call up to float reassociation
inside XLA's fusions (~1e-7).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

DEFAULT_GROUP = 2
ScoreFn = Callable[[Any, Any, dict[str, jax.Array]], jax.Array]
EncodeFn = Callable[[Any, dict[str, jax.Array]], Any]


def blocked_score(score: ScoreFn, block: int, num_tasks: int, group: int = DEFAULT_GROUP) -> ScoreFn:
    """``score`` (-> float32 probabilities [num_tasks, R, W]) run ``group`` (request, block of ``block``
    candidates) units a step."""
    if block < 1 or group < 1:
        raise ValueError(f"score_block and its group must be positive, got block={block}, group={group}")

    def run(consts: Any, state: Any, candidates: dict[str, jax.Array]) -> jax.Array:
        counts = candidates["num_candidates"]
        arrays = {k: v for k, v in candidates.items() if k != "num_candidates"}
        rows, width = next(iter(arrays.values())).shape
        size = min(block, width)
        padded = -(-width // size) * size  # a whole number of blocks; the padding blocks are skipped below
        if padded != width:
            arrays = {k: jnp.pad(v, ((0, 0), (0, padded - width))) for k, v in arrays.items()}
        while (rows * (padded // size)) % group and size % 2 == 0:
            size //= 2  # e.g. one request of one block: two half blocks make a pair
        units = rows * (padded // size)
        step = group if units % group == 0 else 1
        if units == step:
            return score(consts, state, candidates)
        blocks = padded // size
        unit_row = jnp.arange(units, dtype=jnp.int32) // blocks  # unit u = (request u // blocks, block u % blocks)
        unit_live = jnp.clip(counts[unit_row] - (jnp.arange(units, dtype=jnp.int32) % blocks) * size, 0, size)
        parts = {k: v.reshape(units // step, step, size) for k, v in arrays.items()}

        def one_step(item: tuple[dict[str, jax.Array], jax.Array, jax.Array]) -> jax.Array:
            part, row, live = item

            def compute(_: Any) -> jax.Array:
                step_state = jax.tree.map(lambda x: x[row], state)  # the units' request states, [step, ...]
                return score(consts, step_state, part | {"num_candidates": live.astype(jnp.int32)})

            skipped = jnp.zeros((num_tasks, step, size), jnp.float32)  # every unit of the step is padding
            return jax.lax.cond(jnp.any(live > 0), compute, lambda _: skipped, None)

        out = jax.lax.map(one_step, (parts, unit_row.reshape(-1, step), unit_live.reshape(-1, step)))
        # [units / step, T, step, size] -> [T, units, size] -> [T, R, W]
        return jnp.moveaxis(out, 1, 0).reshape(num_tasks, rows, padded)[:, :, :width]

    return run


def rowwise_encode(encode: EncodeFn, group: int = DEFAULT_GROUP) -> EncodeFn:
    """``encode`` run ``group`` requests a step under ``lax.map`` (request-side attention [group, H, N, N])."""

    def run(consts: Any, request: dict[str, jax.Array]) -> Any:
        rows = next(iter(request.values())).shape[0]
        step = group if rows % group == 0 else 1
        if rows == step:
            return encode(consts, request)
        steps = jax.tree.map(lambda x: x.reshape(rows // step, step, *x.shape[1:]), request)
        out = jax.lax.map(lambda part: encode(consts, part), steps)
        return jax.tree.map(lambda x: x.reshape(rows, *x.shape[2:]), out)

    return run

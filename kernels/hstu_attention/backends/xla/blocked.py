"""The "xla_blocked" backend: the "xla" backend's formulas, run a few examples at a time on CPU.

The dense backend materialises [B, H, rows, keys] scores for the whole batch at once: at a GESR train step
(B=32, H=2, N=256) each such tensor is 16 MiB, so every elementwise pass over it (mask, SiLU, its gradient)
streams from main memory. Here `jax.lax.map` runs the same custom-vjp forward and backward over blocks of
`examples` examples, so one block's scores (about `SCORE_BLOCK_BYTES`) stay in the core's cache between the
passes. Same formulas (a block's backward recomputes its scores, which XLA may share with the forward in one
dense call); the batch is padded to a multiple of the block with length-0 examples
(exact zeros, cut off again). Picked by `implementation=None` on CPU only: on accelerators a sequential map
over the batch would waste the device (the Pallas kernels block inside one launch).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from kernels.hstu_attention.backends.xla import dense as xla

# Bytes of one float32 [examples, H, rows, keys] score block; a core's L2 on the CPUs we measured
# (experiments/results/roofline_cpu.md) is 0.5-1 MiB. `BlockSizes.examples` overrides the choice.
SCORE_BLOCK_BYTES = 1 << 20


def examples_per_block(batch: int, heads: int, rows: int, keys: int, block_sizes=None) -> int:
    """Examples per block: `block_sizes.examples` if given, else as many as fit SCORE_BLOCK_BYTES, at least 2.

    At least 2: the train step ran 1.15-1.18x slower with 1-example blocks than with 2 (measured before the
    value product ran head-major, `dense._weighted_values`, which removed most of the single-row penalty in the
    Scorer; not remeasured). Preferably a divisor of the batch, which needs no padding: padding copies q, k, v
    and the residuals (~3 % of a GESR train step with 7-example blocks of a 32-example batch).
    """
    if block_sizes is not None:
        return max(1, min(batch, block_sizes.examples))
    target = min(batch, max(2, SCORE_BLOCK_BYTES // max(1, 4 * heads * rows * keys)))
    divisor = next(e for e in range(target, 0, -1) if batch % e == 0)
    return divisor if divisor > 1 else target


def _blocked(fn, per_example, shared, examples: int):
    """`fn(*per_example, *shared)` over blocks of `examples` along axis 0 of every per-example array.

    None entries pass through; the batch is padded with zeros (length-0 examples, whose rows are exactly
    zero) to a multiple of `examples`, and the padding is cut off again.
    """
    batch = next(x for x in per_example if x is not None).shape[0]
    if examples >= batch:
        return fn(*per_example, *shared)
    blocks = -(-batch // examples)
    pad = blocks * examples - batch

    def split(x):
        if x is None:
            return None
        x = jnp.pad(x, [(0, pad)] + [(0, 0)] * (x.ndim - 1)) if pad else x
        return x.reshape(blocks, examples, *x.shape[1:])

    out = jax.lax.map(lambda xs: fn(*xs, *shared), tuple(split(x) for x in per_example))
    return out.reshape(blocks * examples, *out.shape[2:])[:batch]


def attention(q, k, v, lengths, num_targets, *, spec, normalizer, alpha, alibi_slopes, timestamps, time_slopes,
              contextual_len, max_attn_len, interpret=False, block_sizes=None):
    """Full-sequence call: `xla.attention` over blocks of examples."""
    batch, seq_len, heads = q.shape[:3]
    examples = examples_per_block(batch, heads, seq_len, seq_len, block_sizes)
    statics = dict(spec=spec, normalizer=normalizer, alpha=alpha, contextual_len=contextual_len,
                   max_attn_len=max_attn_len)

    def run(q, k, v, lengths, num_targets, timestamps, alibi_slopes, time_slopes):
        return xla.attention(q, k, v, lengths, num_targets, alibi_slopes=alibi_slopes, timestamps=timestamps,
                             time_slopes=time_slopes, **statics)

    return _blocked(run, (q, k, v, lengths, num_targets, timestamps), (alibi_slopes, time_slopes), examples)


def attention_cached(q, k, v, k_prefix, v_prefix, prefix_len, num_queries, *, self_term, spec, normalizer, alpha,
                     alibi_slopes, timestamps, prefix_timestamps, time_slopes, contextual_len, max_attn_len,
                     interpret=False, block_sizes=None):
    """Cached-prefix call: `xla.attention_cached` over blocks of examples."""
    batch, rows, heads = q.shape[:3]
    examples = examples_per_block(batch, heads, rows, k_prefix.shape[1] + 1, block_sizes)
    statics = dict(self_term=self_term, spec=spec, normalizer=normalizer, alpha=alpha,
                   contextual_len=contextual_len, max_attn_len=max_attn_len)

    def run(q, k, v, k_prefix, v_prefix, prefix_len, num_queries, timestamps, prefix_timestamps, alibi_slopes,
            time_slopes):
        return xla.attention_cached(q, k, v, k_prefix, v_prefix, prefix_len, num_queries,
                                    alibi_slopes=alibi_slopes, timestamps=timestamps,
                                    prefix_timestamps=prefix_timestamps, time_slopes=time_slopes, **statics)

    per_example = (q, k, v, k_prefix, v_prefix, prefix_len, num_queries, timestamps, prefix_timestamps)
    return _blocked(run, per_example, (alibi_slopes, time_slopes), examples)


# Runs every dtype, score function, bias and mode the dense backend does (it calls the dense backend's functions).
BACKEND = dataclasses.replace(
    xla.BACKEND,
    name="xla_blocked",
    module=__name__,
    platforms=("cpu",),
    priority=1,
    attention=attention,
    attention_cached=attention_cached,
    fit_tiles=False,
)

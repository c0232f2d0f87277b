"""The "pallas_triton" backend: target-aware ranking attention in Pallas lowered through Triton (any CUDA GPU;
interpretable on CPU). Full mode: `full.py` (kernels `full_fwd.py`, `full_bwd.py`); cached-prefix mode:
`cached.py` (kernels `cached_fwd.py`, `cached_bwd.py`); what they share: `_common.py`."""

from __future__ import annotations

import functools

from kernels.hstu_attention.backends.triton import cached, full
from kernels.hstu_attention.base import Backend
from kernels.hstu_attention.config import BlockSizes

DEFAULT_BLOCKS = BlockSizes(block_q=64, block_k=64, block_q_bwd=64, block_k_bwd=64, num_warps=4, num_stages=3)
# What `experiments/bench_hstu_attention.py --sweep` times: the defaults first, then tiles that trade registers
# and shared memory for fewer steps. Every candidate must lower for its target (tests export each one).
TUNING = (
    DEFAULT_BLOCKS,
    BlockSizes(block_q=128, block_k=64, block_q_bwd=64, block_k_bwd=128, num_warps=8, num_stages=3),
    BlockSizes(block_q=128, block_k=128, block_q_bwd=64, block_k_bwd=128, num_warps=8, num_stages=2),
    BlockSizes(block_q=64, block_k=128, block_q_bwd=64, block_k_bwd=64, num_warps=4, num_stages=2),
    BlockSizes(block_q=128, block_k=64, block_q_bwd=128, block_k_bwd=64, num_warps=8, num_stages=2),
    BlockSizes(block_q=64, block_k=64, block_q_bwd=32, block_k_bwd=64, num_warps=4, num_stages=2),
)


BACKEND = Backend(
    name="pallas_triton",
    module=__name__,
    platforms=("gpu",),
    dtypes=("float32", "bfloat16", "float16"),
    priority=10,
    score_fns=("silu", "softmax"),
    biases=frozenset({"alibi", "time"}),
    modes=("full", "cached"),
    default_blocks=DEFAULT_BLOCKS,
    tuning=TUNING,
    attention=functools.partial(full.attention, default_blocks=DEFAULT_BLOCKS),
    attention_cached=functools.partial(cached.attention_cached, default_blocks=DEFAULT_BLOCKS),
)

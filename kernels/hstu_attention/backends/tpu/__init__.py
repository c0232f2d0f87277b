"""The "pallas_tpu" backend: target-aware ranking attention in Pallas for TPU (Mosaic TPU; interpretable on CPU
with the TPU interpreter). Full mode: `full.py` (kernels `full_fwd.py`, `full_bwd.py`); cached-prefix mode:
`cached.py` (kernels `cached_fwd.py`, `cached_bwd.py`); what they share: `_common.py`."""

from __future__ import annotations

import functools

from kernels.hstu_attention.backends.tpu import cached, full
from kernels.hstu_attention.base import Backend
from kernels.hstu_attention.config import BlockSizes

DEFAULT_BLOCKS = BlockSizes(block_q=128, block_k=128, block_q_bwd=128, block_k_bwd=128)
TUNING = (
    DEFAULT_BLOCKS,
    BlockSizes(block_q=256, block_k=128, block_q_bwd=128, block_k_bwd=256),
    BlockSizes(block_q=256, block_k=256, block_q_bwd=256, block_k_bwd=256),
)


BACKEND = Backend(
    name="pallas_tpu",
    module=__name__,
    platforms=("tpu",),
    dtypes=("float32", "bfloat16"),
    priority=10,
    score_fns=("silu", "softmax"),
    biases=frozenset({"alibi", "time"}),
    modes=("full", "cached"),
    default_blocks=DEFAULT_BLOCKS,
    tuning=TUNING,
    attention=functools.partial(full.attention, default_blocks=DEFAULT_BLOCKS),
    attention_cached=functools.partial(cached.attention_cached, default_blocks=DEFAULT_BLOCKS),
)

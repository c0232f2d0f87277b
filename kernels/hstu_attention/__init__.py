"""Target-aware ranking attention (HSTU SiLU or softmax, ALiBi / time biases, cached-prefix mode); see `api`."""

from kernels.hstu_attention.api import IMPLEMENTATIONS, hstu_attention, hstu_attention_cached
from kernels.hstu_attention.config import BlockSizes
from kernels.hstu_attention.registry import default_block_sizes
from kernels.hstu_attention.reference import (
    attention_mask,
    hstu_attention_cached_reference,
    hstu_attention_reference,
)
from kernels.hstu_attention.scores import geometric_alibi_slopes

__all__ = [
    "IMPLEMENTATIONS",
    "BlockSizes",
    "attention_mask",
    "default_block_sizes",
    "geometric_alibi_slopes",
    "hstu_attention",
    "hstu_attention_cached",
    "hstu_attention_cached_reference",
    "hstu_attention_reference",
]

"""Target-aware HSTU attention (pointwise SiLU attention with the candidate mask); see `api` for the contract."""

from kernels.hstu_attention.api import IMPLEMENTATIONS, hstu_attention
from kernels.hstu_attention.config import BlockSizes, default_block_sizes
from kernels.hstu_attention.reference import attention_mask, hstu_attention_reference

__all__ = [
    "IMPLEMENTATIONS",
    "BlockSizes",
    "attention_mask",
    "default_block_sizes",
    "hstu_attention",
    "hstu_attention_reference",
]

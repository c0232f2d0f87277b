"""Block sizes for the Pallas backends: one small frozen dataclass per call, defaults per backend."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tile shape and launch knobs of one Pallas backend.

    block_q / block_k tile the forward (and the dq pass of the backward); block_q_bwd / block_k_bwd tile the
    dk/dv pass, where the key block is the resident one. num_warps / num_stages only matter to Triton.
    """

    block_q: int = 64
    block_k: int = 64
    block_q_bwd: int = 64
    block_k_bwd: int = 64
    num_warps: int = 4
    num_stages: int = 2

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"BlockSizes.{field.name} must be a positive int, got {value!r}")
        for name in ("block_q", "block_k", "block_q_bwd", "block_k_bwd"):
            value = getattr(self, name)
            if value & (value - 1):
                raise ValueError(f"BlockSizes.{name} must be a power of two, got {value}")

    def fitted(self, seq_len: int, minimum: int = 16) -> "BlockSizes":
        """Blocks no larger than needed for `seq_len` (power of two >= minimum): tiny test shapes stay tiny."""
        cap = max(minimum, 1 << max(0, (seq_len - 1).bit_length()))
        return dataclasses.replace(
            self,
            block_q=min(self.block_q, cap),
            block_k=min(self.block_k, cap),
            block_q_bwd=min(self.block_q_bwd, cap),
            block_k_bwd=min(self.block_k_bwd, cap),
        )


# Starting points picked from the head dims GESR uses (64-128); the benchmark is where they get tuned.
DEFAULT_BLOCK_SIZES: dict[str, BlockSizes] = {
    "pallas_triton": BlockSizes(block_q=64, block_k=64, block_q_bwd=64, block_k_bwd=64, num_warps=4, num_stages=3),
    "pallas_mosaic_gpu": BlockSizes(block_q=64, block_k=128, block_q_bwd=64, block_k_bwd=64),
    "pallas_tpu": BlockSizes(block_q=128, block_k=128, block_q_bwd=128, block_k_bwd=128),
}


# What `experiments/bench_hstu_attention.py --sweep` times: the defaults first, then tiles that trade registers
# and shared memory for fewer steps. Every candidate must lower for its target (tests export each one).
TUNING_CANDIDATES: dict[str, list[BlockSizes]] = {
    "pallas_triton": [
        DEFAULT_BLOCK_SIZES["pallas_triton"],
        BlockSizes(block_q=128, block_k=64, block_q_bwd=64, block_k_bwd=128, num_warps=8, num_stages=3),
        BlockSizes(block_q=128, block_k=128, block_q_bwd=64, block_k_bwd=128, num_warps=8, num_stages=2),
        BlockSizes(block_q=64, block_k=128, block_q_bwd=64, block_k_bwd=64, num_warps=4, num_stages=2),
        BlockSizes(block_q=128, block_k=64, block_q_bwd=128, block_k_bwd=64, num_warps=8, num_stages=2),
        BlockSizes(block_q=64, block_k=64, block_q_bwd=32, block_k_bwd=64, num_warps=4, num_stages=2),
    ],
    "pallas_mosaic_gpu": [
        DEFAULT_BLOCK_SIZES["pallas_mosaic_gpu"],
        BlockSizes(block_q=64, block_k=64, block_q_bwd=64, block_k_bwd=64),
        BlockSizes(block_q=64, block_k=128, block_q_bwd=128, block_k_bwd=64),
        BlockSizes(block_q=64, block_k=64, block_q_bwd=128, block_k_bwd=64),
    ],
    "pallas_tpu": [
        DEFAULT_BLOCK_SIZES["pallas_tpu"],
        BlockSizes(block_q=256, block_k=128, block_q_bwd=128, block_k_bwd=256),
        BlockSizes(block_q=256, block_k=256, block_q_bwd=256, block_k_bwd=256),
    ],
}


def default_block_sizes(implementation: str, seq_len: int) -> BlockSizes:
    """The default tiles of `implementation`, shrunk to fit `seq_len`."""
    if implementation not in DEFAULT_BLOCK_SIZES:
        raise ValueError(f"no block sizes for implementation {implementation!r}; known: {sorted(DEFAULT_BLOCK_SIZES)}")
    if implementation == "pallas_mosaic_gpu":
        # Its tiles are the warpgroup/wgmma shapes, not free parameters; L is padded to them instead.
        return DEFAULT_BLOCK_SIZES[implementation]
    return DEFAULT_BLOCK_SIZES[implementation].fitted(seq_len, 16)

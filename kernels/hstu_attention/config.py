"""Block sizes for the Pallas backends: one small frozen dataclass per call. Each backend declares its default
tiles and tuning list in its `Backend` declaration (`base.py`); `registry.default_block_sizes` looks them up."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tile shape and launch knobs of one Pallas backend.

    block_q / block_k tile the forward (and the dq pass of the backward); block_q_bwd / block_k_bwd tile the
    dk/dv pass, where the key block is the resident one. num_warps / num_stages only matter to Triton.
    examples: batch examples per block of the CPU "xla_blocked" backend (the Pallas grids run one example per
    program and ignore it).
    """

    block_q: int = 64
    block_k: int = 64
    block_q_bwd: int = 64
    block_k_bwd: int = 64
    num_warps: int = 4
    num_stages: int = 2
    examples: int = 1

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

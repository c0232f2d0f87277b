"""ModelConfig: the two-tower backbone, the Mixture-of-Attention (MoA) config and MLPG.

Every MoA component has a switch; with all of them off the model is exactly the
two-tower baseline (``ModelConfig.two_tower()``). Choices the GESR paper leaves
unconfirmed (see ../shared/spec/PAPERS_SPEC.md) are fields here, with the spec's
proposal as the default, and each is marked UNCONFIRMED below.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    # --- two-tower backbone (the paper's baseline and GESR's primary path) ---
    embed_dim: int = 32  # width of every embedding table and tower output
    tower_mlp: tuple[int, ...] = (64, 32)  # hidden widths of the user and item tower MLPs
    interaction_mlp: tuple[int, ...] = (32,)  # MLP over [u*i, hma] next to the dot product; UNCONFIRMED form
    # --- MoA switches ---
    use_hma: bool = True  # hard matching attention (explicit match counts)
    use_hstu: bool = True  # HSTU self-attention over [history ; candidates]
    target_aware: bool = True  # False = the paper's ablation: last history output for every candidate
    use_ro_cross: bool = True  # RO cross attention with learnable seeds
    use_nro_cross: bool = True  # NRO cross attention with gated update
    use_mlpg: bool = True  # multi-logit parameterized gating branches
    # --- MoA config: which inputs feed which module ---
    history_fields: tuple[str, ...] = ("item", "category", "creator", "action")  # summed into a history token
    candidate_fields: tuple[str, ...] = ("item", "category", "creator")  # summed into a candidate token / NRO query
    hma_pairs: tuple[tuple[str, str], ...] = (("item", "item"), ("category", "category"), ("creator", "creator"))
    hma_max_count: int = 8  # M: counts are capped at M; table stride M+1 (UNCONFIRMED: paper shows stride M)
    hma_mlp: tuple[int, ...] = (32,)  # MLP over the flattened per-pair count embeddings
    # --- target-aware HSTU ---
    hstu_layers: int = 2  # stacked HSTU layers
    hstu_heads: int = 2  # attention heads
    hstu_qk_dim: int = 16  # per-head query/key width
    hstu_v_dim: int = 16  # per-head value width
    hstu_normalizer: float = 64.0  # fixed attention normaliser (not the padded length)
    attention_impl: str | None = None  # kernels.hstu_attention implementation; None = best for platform
    # --- cross attention (formulas are spec proposals, UNCONFIRMED) ---
    ro_num_seeds: int = 4  # k learnable query seeds for RO cross attention
    cross_heads: int = 2  # heads in RO/NRO cross attention
    # --- MLPG ---
    mlpg_branches: int = 2  # K parallel logit branches; branch 0 is parameterized-gated
    mlpg_hidden: int = 32  # hidden width inside each branch
    # --- training-time efficiency ---
    stochastic_length: bool = False  # HSTU stochastic-length history subsampling during training
    sl_alpha: float = 1.6  # SL exponent: keep full history if len <= N^(alpha/2)
    dropout: float = 0.0  # dropout rate on MLP hidden layers (keys passed in, never stored)

    def two_tower(self) -> "ModelConfig":
        """The same backbone with every MoA component off: the two-tower baseline."""
        return dataclasses.replace(
            self, use_hma=False, use_hstu=False, use_ro_cross=False, use_nro_cross=False, use_mlpg=False
        )

    def validate(self) -> None:
        if self.hma_max_count < 1:
            raise ValueError(f"model.hma_max_count must be >= 1, got {self.hma_max_count}")
        if self.hstu_normalizer <= 0:
            raise ValueError(f"model.hstu_normalizer must be > 0, got {self.hstu_normalizer}")

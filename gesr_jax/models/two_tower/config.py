"""TwoTowerConfig: the classic early-stage ranker, the paper's baseline and GESR's primary path.

GESR's config (``gesr_jax/models/gesr/config.py``) extends this one, so a GESR config converts to a two-tower
config by dropping its MoA fields (``registry.convert``), and both models build the same tower module.
"""

from __future__ import annotations

import dataclasses

from gesr_jax.models.config_base import ModelConfigBase


@dataclasses.dataclass(frozen=True)
class TwoTowerConfig(ModelConfigBase):
    kind: str = "two_tower"  # registry key
    embed_dim: int = 32  # width of every embedding table (and of GESR's MoA token stream)
    tower_mlp: tuple[int, ...] = (64, 32)  # user and item tower MLP widths; the last is the tower output width
    # user tower embeds user_id. Off by default, chosen on valid (experiments/results/valid_checks_*.md, 5 paired
    # seeds): on ML-1M (user-holdout split, valid users unseen in training) the two-tower's valid NE is
    # +2.6 % / +3.9 % worse with it and its AUC 3.6 / 4.0 points lower ("worse"); on the synthetic log, whose
    # test users are its training users, the two-tower is "better" with it (-0.36 % / -0.31 %, AUC +0.15 /
    # +0.17) and GESR n.s. The default follows ML-1M, where serving meets users the model has not seen.
    use_user_id: bool = False
    tower_history_pool: bool = True  # user tower also sees the mean of its history token embeddings
    # > 0: both tower outputs are L2-normalised and rescaled to this norm before they meet, so the dot
    # product starts at a useful scale. Raw tower outputs start near 0 and the product u.i sits at a saddle:
    # on ML-1M with popularity-matched negatives (item bias useless) the raw two-tower learned nothing in 400
    # steps (consume AUC 0.54) and the normalised one reached AUC 0.78. 0 = raw outputs.
    tower_norm_scale: float = 3.0
    interaction_mlp: tuple[int, ...] = (32,)  # MLP over [u*i, main-path MoA outputs] next to the dot product; UNCONFIRMED
    dropout: float = 0.1  # dropout on MLP hidden layers (and HSTU outputs) when apply(train=True, key=...)

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first bad field."""
        super().validate()
        if self.embed_dim < 1:
            raise ValueError(f"model.embed_dim must be >= 1, got {self.embed_dim}")
        if not self.tower_mlp or min(self.tower_mlp) < 1:
            raise ValueError(f"model.tower_mlp needs at least one width and all >= 1, got {self.tower_mlp}")
        if any(w < 1 for w in self.interaction_mlp):
            raise ValueError(f"model.interaction_mlp widths must be >= 1, got {self.interaction_mlp}")
        if not self.tower_norm_scale >= 0 or self.tower_norm_scale == float("inf"):
            raise ValueError(f"model.tower_norm_scale must be finite and >= 0, got {self.tower_norm_scale}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"model.dropout must be in [0, 1), got {self.dropout}")

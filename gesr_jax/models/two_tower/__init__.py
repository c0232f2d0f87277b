"""The two-tower baseline (``model.kind = "two_tower"``); registers itself on import."""

from gesr_jax.models import registry
from gesr_jax.models.two_tower.config import TwoTowerConfig

registry.register_model(
    "two_tower", TwoTowerConfig, "gesr_jax.models.two_tower.model:TwoTowerModel",
    description="user tower x item tower, meeting in a dot product + small MLP (the ESR baseline)",
)  # fmt: skip

__all__ = ["TwoTowerConfig"]

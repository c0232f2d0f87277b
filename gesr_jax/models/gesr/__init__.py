"""GESR (``model.kind = "gesr"``): two-tower + Mixture of Attention + MLPG; registers itself on import."""

from gesr_jax.models import registry
from gesr_jax.models.gesr.config import GESRConfig

registry.register_model(
    "gesr", GESRConfig, "gesr_jax.models.gesr.model:GESR",
    description="two-tower + Mixture of Attention (HMA, target-aware HSTU, RO/NRO cross attention) + MLPG",
)  # fmt: skip

__all__ = ["GESRConfig"]

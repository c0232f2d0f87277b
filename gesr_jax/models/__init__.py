"""GESR model: two-tower backbone, Mixture of Attention (HMA, target-aware HSTU, RO/NRO cross attention), MLPG.

``GESR`` is imported lazily so that ``gesr_jax.config`` (which needs only ``ModelConfig``) stays free of JAX.
"""

from typing import Any

from gesr_jax.models.config import ModelConfig

__all__ = ["GESR", "ModelConfig"]


def __getattr__(name: str) -> Any:
    if name == "GESR":
        from gesr_jax.models.gesr import GESR

        return GESR
    raise AttributeError(f"module 'gesr_jax.models' has no attribute {name!r}")

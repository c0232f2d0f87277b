"""GenRank (``model.kind = "genrank"``): action-oriented causal decoder with a candidate mask; registers on import."""

from gesr_jax.models import registry
from gesr_jax.models.genrank.config import GenRankConfig

registry.register_model(
    "genrank", GenRankConfig, "gesr_jax.models.genrank.model:GenRank",
    description="GenRank: action-oriented tokens, causal decoder with candidate mask and ALiBi, loss on candidates",
)  # fmt: skip

__all__ = ["GenRankConfig"]

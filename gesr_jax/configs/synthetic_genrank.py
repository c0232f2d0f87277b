"""synthetic_genrank: GenRank (action-oriented tokens, causal decoder with candidate mask, ALiBi) on the synthetic log.

Same data and training settings as synthetic_base (the GESR demo run), so the NE tables compare directly.

Launch:   gesr train --config synthetic_genrank --workdir /tmp/gesr_synth_genrank
Baseline: gesr train --config synthetic_genrank_interleaved --workdir /tmp/gesr_synth_genrank_il  (HSTU-style
          item/action interleaving, same backbone; the paper's efficiency and quality comparison)
Expected: not yet measured.
"""

from gesr_jax.config import Config
from gesr_jax.data.config import DataConfig, SyntheticConfig
from gesr_jax.models.genrank.config import GenRankConfig
from gesr_jax.train.config import TrainConfig


def get_config() -> Config:
    return Config(
        name="synthetic_genrank",
        data=DataConfig(
            source="synthetic", history_len=32, synthetic=SyntheticConfig(num_users=4000, requests_per_user=12)
        ),
        model=GenRankConfig(),  # history/candidate fields: item, category, creator (the defaults)
        train=TrainConfig(
            batch_size=64, num_steps=600, learning_rate=2e-3, warmup_steps=50, log_every=50, eval_every=300,
            checkpoint_every=300,
        ),
    )

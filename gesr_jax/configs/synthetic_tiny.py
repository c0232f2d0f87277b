"""synthetic_tiny: the smallest end-to-end run, for tests, notebooks and a first look (CPU seconds).

Launch:   gesr train --config synthetic_tiny --workdir /tmp/gesr_tiny
Baseline: gesr train --config synthetic_tiny_two_tower --workdir /tmp/gesr_tiny_tt
Expected: finishes in well under a minute on a 2-core CPU; NE is noisy at this size (a smoke run, not a study).
"""

from gesr_jax.config import Config
from gesr_jax.data.config import DataConfig, SyntheticConfig
from gesr_jax.models.config_sections import HSTUSection
from gesr_jax.models.gesr.config import GESRConfig
from gesr_jax.train.config import TrainConfig


def get_config() -> Config:
    return Config(
        name="synthetic_tiny",
        data=DataConfig(
            source="synthetic",
            history_len=16,
            synthetic=SyntheticConfig(num_users=200, num_items=400, num_creators=40, num_categories=10),
        ),
        model=GESRConfig(
            embed_dim=16, tower_mlp=(32, 16), hstu=HSTUSection(layers=1, qk_dim=8, v_dim=8, normalizer=32.0)
        ),
        train=TrainConfig(batch_size=32, num_steps=60, warmup_steps=10, log_every=20, eval_every=0, checkpoint_every=30),
    )

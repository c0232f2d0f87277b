"""ml100k_base: GESR on MovieLens-100K (no director metadata: genre and year pairs only).

Launch:   gesr train --config ml100k_base --workdir /tmp/gesr_ml100k --set data.movielens.path=/path/to/ml-100k
Baseline: gesr train --config ml100k_base_two_tower --workdir /tmp/gesr_ml100k_tt --set data.movielens.path=/path/to/ml-100k
Data:     `gesr data download ml-100k --to ~/data`; the default path is ../shared/data/ml-100k.
Expected: a CPU run of a few minutes; compare NE per task against the two-tower variant.
"""

import pathlib

from gesr_jax.config import Config
from gesr_jax.data.config import DataConfig, MovieLensConfig
from gesr_jax.models.config_sections import HMASection
from gesr_jax.models.gesr.config import GESRConfig
from gesr_jax.train.config import TrainConfig

DEFAULT_PATH = str(pathlib.Path(__file__).resolve().parents[2].parent / "shared" / "data" / "ml-100k")


def get_config() -> Config:
    return Config(
        name="ml100k_base",
        data=DataConfig(
            source="movielens", movielens=MovieLensConfig(path=DEFAULT_PATH), history_len=50, num_positives=4,
            num_negatives=12, min_history=5, max_requests_per_user=16,
        ),
        model=GESRConfig(
            history_fields=("item", "genre", "year", "action"),
            candidate_fields=("item", "genre", "year"),
            # No ("item", "item") pair: it is 0 in every split on MovieLens (see ml1m_base).
            hma=HMASection(pairs=(("genre", "genre"), ("year", "year"))),
        ),
        train=TrainConfig(
            batch_size=64, num_steps=600, learning_rate=2e-3, warmup_steps=50, log_every=100, eval_every=300,
            checkpoint_every=300,
        ),
    )

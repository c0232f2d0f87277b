"""ml_latest_small_base: GESR on MovieLens latest-small (100k ratings, 610 users, 9.7k movies).

The CSV format: no director, no user features (gesr_jax/configs/_movielens_csv.py).

Launch:   gesr train --config ml_latest_small_base --workdir /tmp/gesr_mlsmall --set data.movielens.path=/path/to/ml-latest-small
Baseline: gesr train --config ml_latest_small_base_two_tower --workdir /tmp/gesr_mlsmall_tt \
              --set data.movielens.path=/path/to/ml-latest-small
Data:     `gesr data download ml-latest-small --to ~/data`; the default path is ../shared/data/ml-latest-small.
Expected: a CPU run of a few minutes, like ml100k_base (not yet measured here).
"""

from gesr_jax.config import Config
from gesr_jax.configs._movielens_csv import csv_config
from gesr_jax.train.config import TrainConfig


def get_config() -> Config:
    train = TrainConfig(
        batch_size=64, num_steps=600, learning_rate=2e-3, warmup_steps=50, log_every=100,
        eval_every=300, checkpoint_every=300,
    )
    return csv_config("ml_latest_small_base", "ml-latest-small", train)

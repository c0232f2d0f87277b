"""ml20m_base: GESR on MovieLens-20M (20M ratings, 138k users, 27k movies).

The CSV format: no director, no user features (gesr_jax/configs/_movielens_csv.py).

Launch:   gesr train --config ml20m_base --workdir /tmp/gesr_ml20m_base --set data.movielens.path=/path/to/ml-20m
Baseline: gesr train --config ml20m_base_two_tower --workdir /tmp/gesr_ml20m_base_tt --set data.movielens.path=/path/to/ml-20m
Data:     `gesr data download ml-20m --to ~/data`; the default path is ../shared/data/ml-20m.
Large:    `gesr data prepare --config ml20m_base --out DIR --set data.movielens.path=...` once, then train with
          `--set data.prepared=DIR` (docs/scaling.md).
Expected: not measured here (the data is not on this box); the train settings are UNCONFIRMED starting points.
"""

from gesr_jax.config import Config
from gesr_jax.configs._movielens_csv import csv_config
from gesr_jax.train.config import TrainConfig


def get_config() -> Config:
    train = TrainConfig(
        batch_size=512, num_steps=20000, learning_rate=2e-3, warmup_steps=200, log_every=500,
        eval_every=2000, checkpoint_every=2000, patience=2,
    )
    return csv_config("ml20m_base", "ml-20m", train)

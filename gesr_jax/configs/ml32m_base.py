"""ml32m_base: GESR on MovieLens-32M (32M ratings, 201k users, 87k movies).

The CSV format: no director, no user features (gesr_jax/configs/_movielens_csv.py).

Launch:   gesr train --config ml32m_base --workdir /tmp/gesr_ml32m_base --set data.movielens.path=/path/to/ml-32m
Baseline: gesr train --config ml32m_base_two_tower --workdir /tmp/gesr_ml32m_base_tt --set data.movielens.path=/path/to/ml-32m
Data:     `gesr data download ml-32m --to ~/data`; the default path is ../shared/data/ml-32m.
Large:    `gesr data prepare --config ml32m_base --out DIR --set data.movielens.path=...` once, then train with
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
    return csv_config("ml32m_base", "ml-32m", train)

"""The shared settings of the MovieLens CSV-family presets (ml-latest-small, ml-20m, ml-25m, ml-32m).

The CSV family has no user file and no director file: item features are genre and year only, and the
model names only those (``ml1m_base`` names ``director``, which these folders lack). Ratings are half
stars; actions round them up (gesr_jax/data/movielens_dataset.py), ``engage`` is rating >= 4.
"""

import dataclasses
import pathlib

from gesr_jax.config import Config
from gesr_jax.configs import ml100k_base
from gesr_jax.data.config import DataConfig, MovieLensConfig
from gesr_jax.train.config import TrainConfig

SHARED_DATA = pathlib.Path(__file__).resolve().parents[2].parent / "shared" / "data"


def csv_config(name: str, folder: str, train: TrainConfig, max_requests_per_user: int = 16) -> Config:
    """A GESR preset on the CSV folder ``folder`` (default path ../shared/data/FOLDER; set data.movielens.path)."""
    return Config(
        name=name,
        data=DataConfig(
            source="movielens", movielens=MovieLensConfig(path=str(SHARED_DATA / folder)), history_len=50,
            num_positives=4, num_negatives=12, min_history=5, max_requests_per_user=max_requests_per_user,
        ),
        # ml100k_base's model: item, genre, year (and action) only, HMA on genre and year -- no director, which
        # the CSV family lacks, and no ("item", "item") pair (always 0 on MovieLens). With no user features,
        # the user id embedding is the user profile (the RO cross's profile query needs one).
        model=dataclasses.replace(ml100k_base.get_config().model, use_user_id=True),
        train=train,
    )

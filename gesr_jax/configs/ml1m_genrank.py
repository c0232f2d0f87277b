"""ml1m_genrank: GenRank on MovieLens-1M, with ml1m_base's temporal ESR protocol and training settings.

History and candidate tokens carry the item id and its side features (genre, year, director; director needs
extra/movies_extrainfos.dat, as for ml1m_base).

Launch:   gesr train --config ml1m_genrank --workdir /tmp/gesr_ml1m_genrank --set data.path=/path/to/ml-1m
Baseline: gesr train --config ml1m_genrank_interleaved --workdir /tmp/gesr_ml1m_gr_il --set data.path=/path/to/ml-1m
Data:     `gesr data download ml-1m --to ~/data` on your machine (the licence forbids redistribution);
          the default path is ../shared/data/ml-1m relative to the repository.
Expected: not yet measured.
"""

from gesr_jax.config import Config
from gesr_jax.configs.ml1m_base import DEFAULT_PATH
from gesr_jax.data.config import DataConfig
from gesr_jax.models.genrank.config import GenRankConfig
from gesr_jax.train.config import TrainConfig


def get_config() -> Config:
    return Config(
        name="ml1m_genrank",
        data=DataConfig(
            source="movielens", path=DEFAULT_PATH, history_len=50, num_positives=4, num_negatives=12,
            min_history=5, max_requests_per_user=16,
        ),
        model=GenRankConfig(
            history_fields=("item", "genre", "year", "director"),
            candidate_fields=("item", "genre", "year", "director"),
        ),
        train=TrainConfig(
            batch_size=128, num_steps=800, learning_rate=2e-3, warmup_steps=50, log_every=100, eval_every=400,
            checkpoint_every=400,
        ),
    )

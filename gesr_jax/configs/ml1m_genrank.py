"""ml1m_genrank: GenRank on MovieLens-1M, with ml1m_base's temporal ESR protocol and training settings.

History and candidate tokens carry the item id and its side features (genre, year, director; director needs
extra/movies_extrainfos.dat, as for ml1m_base).

Launch:   gesr train --config ml1m_genrank --workdir /tmp/gesr_ml1m_genrank --set data.path=/path/to/ml-1m
Baseline: gesr train --config ml1m_genrank_interleaved --workdir /tmp/gesr_ml1m_gr_il --set data.path=/path/to/ml-1m
Data:     `gesr data download ml-1m --to ~/data` on your machine (the licence forbids redistribution);
          the default path is ../shared/data/ml-1m relative to the repository.
Expected: test NE at the best valid step, 5 paired seeds (experiments/results/models_ml1m.md): consume
          0.8441 ± 0.0127, engage 0.8481 ± 0.0102; vs the two-tower -10.88 ± 2.42 % / -6.91 ± 1.31 %, and better
          than GESR (ml1m_base) on consume (GESR is +3.25 ± 1.90 % against it; engage n.s.).
"""

from gesr_jax.config import Config
from gesr_jax.configs import ml1m_base
from gesr_jax.models.genrank.config import GenRankConfig


def get_config() -> Config:
    base = ml1m_base.get_config()  # data and training (incl. model selection) are ml1m_base's, by construction
    return Config(
        name="ml1m_genrank",
        data=base.data,
        model=GenRankConfig(
            history_fields=("item", "genre", "year", "director"),
            candidate_fields=("item", "genre", "year", "director"),
        ),
        train=base.train,
    )

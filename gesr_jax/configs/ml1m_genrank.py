"""ml1m_genrank: GenRank on MovieLens-1M, with ml1m_base's temporal ESR protocol and training settings.

History and candidate tokens carry the item id and its side features (genre, year, director; director needs
extra/movies_extrainfos.dat, as for ml1m_base).

Launch:   gesr train --config ml1m_genrank --workdir /tmp/gesr_ml1m_genrank --set data.movielens.path=/path/to/ml-1m
Baseline: gesr train --config ml1m_genrank_interleaved --workdir /tmp/gesr_ml1m_gr_il --set data.movielens.path=/path/to/ml-1m
Data:     `gesr data download ml-1m --to ~/data` on your machine (the licence forbids redistribution);
          the default path is ../shared/data/ml-1m relative to the repository.
Expected: test NE at the best valid step, 5 paired seeds (experiments/results/models_ml1m.md): consume
          0.8441 ± 0.0127, engage 0.8481 ± 0.0102; vs the two-tower -10.88 ± 2.42 % / -6.91 ± 1.31 %. Lower NE
          than GESR (ml1m_base) on consume (GESR is +3.25 ± 1.90 % against it; engage n.s.), but NOT a better
          model on that evidence: its consume AUC is not higher (0.7763 vs 0.7776) and on seed 0 the NE gap
          goes once each model's intercept is fitted on valid (issue 22; redo with the verdict column).
          All on "ML-1M (users 1–2999)": 2,999 users, 487,650 ratings (the default ../shared/data/ml-1m copy).
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

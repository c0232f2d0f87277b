"""ml1m_genrank: GenRank on MovieLens-1M, with ml1m_base's temporal ESR protocol and training settings.

History and candidate tokens carry the item id and its side features (genre, year, director; director needs
extra/movies_extrainfos.dat, as for ml1m_base).

Launch:   gesr train --config ml1m_genrank --workdir /tmp/gesr_ml1m_genrank --set data.movielens.path=/path/to/ml-1m
Baseline: gesr train --config ml1m_genrank_interleaved --workdir /tmp/gesr_ml1m_gr_il --set data.movielens.path=/path/to/ml-1m
Data:     `gesr data download ml-1m --to ~/data` on your machine (the licence forbids redistribution);
          the default path is ../shared/data/ml-1m relative to the repository.
Expected: test NE at the best valid step (mostly step 800), 5 paired seeds, split global_time_user_holdout
          (experiments/results/models_ml1m.md): consume 0.8227 ± 0.0058, engage 0.8390 ± 0.0052; vs the
          two-tower -9.33 ± 0.63 % / -5.80 ± 0.54 % with ΔAUC +5.62 / +3.58 points ("better" on every column).
          Against GESR (ml1m_base) no difference is shown: GESR's paired ΔNE vs this model is +1.75 ± 2.14 %
          (consume) and -0.17 ± 1.30 % (engage), its paired ΔAUC -0.17 ± 0.85 / +0.54 ± 0.64 points: n.s. on
          every measure. All on "ML-1M (users 1–2999)": 2,999 users, 487,650 ratings (the default
          ../shared/data/ml-1m copy).
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

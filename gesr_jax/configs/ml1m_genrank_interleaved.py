"""ml1m_genrank_interleaved: the item-action interleaved baseline of ml1m_genrank (2N history tokens).

Only ``model.tokens.layout`` differs from ml1m_genrank (spec §3.3: the action-oriented organisation halves the
sequence; the paper reports ~75% less attention and ~50% less projection cost at equal quality).

Launch:   gesr train --config ml1m_genrank_interleaved --workdir /tmp/gesr_ml1m_gr_il --set data.movielens.path=/path/to/ml-1m
Compare:  gesr train --config ml1m_genrank --workdir /tmp/gesr_ml1m_genrank --set data.movielens.path=/path/to/ml-1m
Expected: test NE consume 0.8266 ± 0.0126, engage 0.8430 ± 0.0085 (5 paired seeds, split
          global_time_user_holdout, experiments/results/models_ml1m.md): vs action-oriented GenRank
          +0.47 ± 1.30 % and +0.47 ± 0.93 %, both n.s., so the paper's "equal quality at half the tokens" is
          consistent with this run; the cost side is experiments/results/genrank_efficiency_cpu.md. All on
          "ML-1M (users 1–2999)": 2,999 users, 487,650 ratings (the default ../shared/data/ml-1m copy).
"""

import dataclasses

from gesr_jax.config import Config
from gesr_jax.configs import ml1m_genrank


def get_config() -> Config:
    base = ml1m_genrank.get_config()
    model = dataclasses.replace(base.model, tokens=dataclasses.replace(base.model.tokens, layout="interleaved"))
    return dataclasses.replace(base, name="ml1m_genrank_interleaved", model=model)

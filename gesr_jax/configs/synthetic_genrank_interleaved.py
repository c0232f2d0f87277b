"""synthetic_genrank_interleaved: the item-action interleaved baseline of synthetic_genrank (2N history tokens).

Everything else (data, training, backbone, embeddings, ALiBi) is synthetic_genrank's; only
``model.tokens.layout`` differs, so the pair isolates the action-oriented organisation (spec §3.3, Table 1).

Launch:   gesr train --config synthetic_genrank_interleaved --workdir /tmp/gesr_synth_genrank_il
Compare:  gesr train --config synthetic_genrank --workdir /tmp/gesr_synth_genrank
Expected: test NE consume 0.7349 ± 0.0023, engage 0.7785 ± 0.0023 (5 paired seeds,
          experiments/results/models_synthetic.md): vs action-oriented GenRank +0.11 ± 0.38 % (n.s.) on consume,
          +0.34 ± 0.25 % (worse) on engage, at about twice the train time.
"""

import dataclasses

from gesr_jax.config import Config
from gesr_jax.configs import synthetic_genrank


def get_config() -> Config:
    base = synthetic_genrank.get_config()
    model = dataclasses.replace(base.model, tokens=dataclasses.replace(base.model.tokens, layout="interleaved"))
    return dataclasses.replace(base, name="synthetic_genrank_interleaved", model=model)

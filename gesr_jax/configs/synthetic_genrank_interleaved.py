"""synthetic_genrank_interleaved: the item-action interleaved baseline of synthetic_genrank (2N history tokens).

Everything else (data, training, backbone, embeddings, ALiBi) is synthetic_genrank's; only
``model.genrank_tokens`` differs, so the pair isolates the action-oriented organisation (spec §3.3, Table 1).

Launch:   gesr train --config synthetic_genrank_interleaved --workdir /tmp/gesr_synth_genrank_il
Compare:  gesr train --config synthetic_genrank --workdir /tmp/gesr_synth_genrank
Expected: not yet measured.
"""

import dataclasses

from gesr_jax.config import Config
from gesr_jax.configs import synthetic_genrank


def get_config() -> Config:
    base = synthetic_genrank.get_config()
    model = dataclasses.replace(base.model, genrank_tokens="interleaved")
    return dataclasses.replace(base, name="synthetic_genrank_interleaved", model=model)

"""synthetic_genrank: GenRank (action-oriented tokens, causal decoder with candidate mask, ALiBi) on the synthetic log.

Same data and training settings as synthetic_base (the GESR demo run), so the NE tables compare directly.

Launch:   gesr train --config synthetic_genrank --workdir /tmp/gesr_synth_genrank
Baseline: gesr train --config synthetic_genrank_interleaved --workdir /tmp/gesr_synth_genrank_il  (HSTU-style
          item/action interleaving, same backbone; the paper's efficiency and quality comparison)
Expected: test NE at the best valid step, 5 paired seeds (experiments/results/models_synthetic.md): consume
          0.7341 ± 0.0029, engage 0.7759 ± 0.0018; vs the two-tower +0.73 ± 0.32 % (worse) on consume and
          -0.33 ± 0.26 % on engage, well behind GESR (-5.25 % / -3.65 %), whose HMA carries the planted counts.
"""

from gesr_jax.config import Config
from gesr_jax.configs import synthetic_base
from gesr_jax.models.genrank.config import GenRankConfig


def get_config() -> Config:
    base = synthetic_base.get_config()  # data and training (incl. model selection) are synthetic_base's
    return Config(
        name="synthetic_genrank",
        data=base.data,
        model=GenRankConfig(),  # history/candidate fields: item, category, creator (the defaults)
        train=base.train,
    )

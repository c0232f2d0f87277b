"""synthetic_base: the demo run on the embedded synthetic ESR log (the default dataset).

Launch:   gesr train --config synthetic_base --workdir /tmp/gesr_synth
Baseline: gesr train --config synthetic_base_two_tower --workdir /tmp/gesr_synth_tt
Demo:     make demo   (trains both and prints the NE table next to the oracle NE)
Expected: test NE consume ~0.744 (GESR) vs ~0.760 (two-tower), engage ~0.768 vs ~0.786, oracle ~0.70 / ~0.73
          (seed 0; experiments/results/ablation_synthetic.md has 3 seeds); ~50 s for both on an idle 2-core CPU.
"""

from gesr_jax.config import Config
from gesr_jax.data.config import DataConfig, SyntheticConfig
from gesr_jax.models.gesr.config import GESRConfig
from gesr_jax.train.config import TrainConfig


def get_config() -> Config:
    return Config(
        name="synthetic_base",
        data=DataConfig(
            source="synthetic", history_len=32, synthetic=SyntheticConfig(num_users=4000, requests_per_user=12)
        ),
        model=GESRConfig(),
        # Model selection: valid every 100 steps, the best kept, stop after 3 passes without improvement.
        train=TrainConfig(
            batch_size=64, num_steps=1200, learning_rate=2e-3, warmup_steps=50, log_every=50, eval_every=100,
            checkpoint_every=100, patience=3,
        ),
    )

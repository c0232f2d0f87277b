"""synthetic_base: the demo run on the embedded synthetic ESR log (the default dataset).

Launch:   gesr train --config synthetic_base --workdir /tmp/gesr_synth
Baseline: gesr train --config synthetic_base_two_tower --workdir /tmp/gesr_synth_tt
Demo:     make demo   (trains both and prints the NE table next to the oracle NE)
Expected: test NE at the best valid step, 5 paired seeds: consume 0.6905 ± 0.0032 (GESR) vs 0.7288 ± 0.0015
          (two-tower), engage 0.7500 ± 0.0024 vs 0.7784 ± 0.0008; oracle 0.654 / 0.713, decoupled ceiling
          0.708 / 0.757 (experiments/results/ablation_synthetic.md, demo_synthetic.md). About 75 s per GESR run
          and 15 s per two-tower run on a 2-core CPU shared with a second run.
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

"""ml1m_base: GESR on MovieLens-1M, the temporal ESR protocol of gesr_jax/data/requests.py.

Data:     the default copy is "ML-1M (users 1–2999)": 2,999 users, 487,650 of ML-1M's 1,000,209 ratings;
          every numbered result below and in experiments/results/*ml1m*.md is on that half.

Launch:   gesr train --config ml1m_base --workdir /tmp/gesr_ml1m --set data.movielens.path=/path/to/ml-1m
Baseline: gesr train --config ml1m_base_two_tower --workdir /tmp/gesr_ml1m_tt --set data.movielens.path=/path/to/ml-1m
Data:     `gesr data download ml-1m --to ~/data` on your machine (the licence forbids redistribution);
          the default path is ../shared/data/ml-1m relative to the repository.
Expected: test NE at the best valid step (mostly step 500), 5 paired seeds, split global_time_user_holdout
          (experiments/results/models_ml1m.md): consume 0.8371 ± 0.0176, engage 0.8376 ± 0.0109; vs the
          two-tower ΔNE -7.74 ± 2.05 % / -5.97 ± 0.88 %, ΔAUC +5.45 / +4.11 points, -7.20 / -5.63 % once each
          model's intercept is fitted on valid, user bootstrap [-8.76, -6.60] / [-6.85, -4.95] %: "better" on
          every column. Ablations (experiments/results/ablation_ml1m.md): removing target-awareness is worse
          on every measure; HMA, cross attention and MLPG show no NE effect. About 8 min of training per GESR
          run (460 ± 190 s) on a 2-core CPU shared with other runs.
"""

import pathlib

from gesr_jax.config import Config
from gesr_jax.data.config import DataConfig, MovieLensConfig
from gesr_jax.models.config_sections import HMASection, HSTUSection
from gesr_jax.models.gesr.config import GESRConfig
from gesr_jax.train.config import TrainConfig

DEFAULT_PATH = str(pathlib.Path(__file__).resolve().parents[2].parent / "shared" / "data" / "ml-1m")


def get_config() -> Config:
    return Config(
        name="ml1m_base",
        data=DataConfig(
            # Split (issue 22 item 2), chosen on label-free evidence only: the tenure mix of each split's requests
            # (days since the user's first rating; no label or prediction read). Under "global_time" valid is
            # 38 % <1 day and 51 % 1-60 days while test is 50 % 60-365 days and 49 % >=365 days (median tenure
            # 21.7 vs 358.8 days), so selecting on valid optimises for a population test barely holds. Under
            # "global_time_user_holdout" valid and test are disjoint user halves of the same post-cut-2 population:
            # <1d/1-60d/60-365d/>=365d = 0.3/0.5/49.8/49.5 % vs 1.1/1.0/49.2/48.7 %, median 363 vs 352 days
            # (2,629 vs 2,730 requests, 267 vs 268 users). `--set data.movielens.split=global_time` gives the old split.
            source="movielens", movielens=MovieLensConfig(path=DEFAULT_PATH, split="global_time_user_holdout"),
            history_len=50, num_positives=4,
            num_negatives=12, min_history=5, max_requests_per_user=16,
        ),
        model=GESRConfig(
            history_fields=("item", "genre", "year", "director", "action"),
            candidate_fields=("item", "genre", "year", "director"),
            # No ("item", "item") pair: a user rates a movie once and negatives exclude rated movies, so that
            # count is 0 in every split (`gesr data inspect --config ml1m_base` reports each pair's nonzero rate).
            hma=HMASection(pairs=(("genre", "genre"), ("director", "director"), ("year", "year"))),
            hstu=HSTUSection(normalizer=64.0),
        ),
        # Model selection: valid every 100 steps (issue 22 item 8: test NE moved several % between evaluations 200
        # steps apart around the optimum, 400-1000), the best kept, stop after 4 passes (400 steps, as before)
        # without improvement. Test NE drifts at flat AUC (calibration), so the step is chosen on valid. Every
        # experiments/results/*ml1m*.md table was redone with these settings (2026-12-07).
        train=TrainConfig(
            batch_size=128, num_steps=1600, learning_rate=2e-3, warmup_steps=50, log_every=100, eval_every=100,
            checkpoint_every=100, patience=4,
        ),
    )

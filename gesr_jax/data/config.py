"""DataConfig: which dataset, how ESR requests are built from it, and the synthetic generator's sizes."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class SyntheticConfig:
    """Sizes of the embedded synthetic ESR log (see gesr_jax/data/synthetic.py for the generative story)."""

    num_users: int = 2000  # users; each yields several chronological requests
    num_items: int = 5000  # item catalogue size
    num_creators: int = 300  # distinct creators; each item has one
    num_categories: int = 40  # distinct categories; each item has one
    requests_per_user: int = 6  # requests per user (last = test, second-to-last = valid)
    seed: int = 0  # generator seed; same seed, same data


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Dataset choice and the temporal request protocol (the MoA Config's truncation part)."""

    source: str = "synthetic"  # "synthetic" (embedded default) or "movielens"
    path: str = ""  # MovieLens folder (ml-1m, ml-100k, ml-latest-small, ...), read when source="movielens"
    history_len: int = 32  # N: most recent events strictly before the request
    num_positives: int = 4  # P: next real events per request, the positive candidates
    num_negatives: int = 12  # Q: popularity-sampled unseen items per request
    min_history: int = 4  # a request needs at least this many past events
    max_requests_per_user: int = 0  # 0 = every request a user's timeline allows; else the most recent ones
    engage_threshold: int = 4  # engage = rating >= this (MovieLens)
    director_vocab: int = 2000  # most frequent directors kept; the rest map to id 1 ("other")
    seed: int = 0  # negatives and splits are fixed by this seed
    synthetic: SyntheticConfig = SyntheticConfig()  # generator sizes when source="synthetic"

    @property
    def num_candidates(self) -> int:
        return self.num_positives + self.num_negatives

    def validate(self) -> None:
        if self.source not in ("synthetic", "movielens"):
            raise ValueError(f"data.source must be 'synthetic' or 'movielens', got {self.source!r}")
        for name in ("history_len", "num_positives", "min_history"):
            if getattr(self, name) < 1:
                raise ValueError(f"data.{name} must be >= 1, got {getattr(self, name)}")
        if self.num_negatives < 0:
            raise ValueError(f"data.num_negatives must be >= 0, got {self.num_negatives}")

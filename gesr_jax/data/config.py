"""DataConfig: which dataset, how ESR requests are built from it, and the synthetic generator's sizes."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class SyntheticConfig:
    """Sizes and signal strengths of the embedded synthetic ESR log (story: gesr_jax/data/synthetic.py)."""

    num_users: int = 2000  # users; each yields several chronological requests
    num_items: int = 5000  # item catalogue size
    num_creators: int = 300  # distinct creators; each item has one
    num_categories: int = 40  # distinct categories; each item has one
    num_segments: int = 8  # user segments (the "segment" user feature); users in a segment share a taste centre
    latent_dim: int = 8  # width of the user-taste / item-latent vectors behind the two-tower part of the logit
    requests_per_user: int = 6  # requests per user (last = test, second-to-last = valid)
    cross_weight: float = 1.0  # scale of the explicit cross terms (creator / category match counts); 0 removes them
    target_aware_weight: float = 1.0  # scale of the recency-weighted target-aware term; 0 removes it
    seed: int = 0  # generator seed; same seed, same data

    def validate(self) -> None:
        for name in ("num_users", "num_items", "num_creators", "num_categories", "num_segments", "latent_dim"):
            if getattr(self, name) < 1:
                raise ValueError(f"data.synthetic.{name} must be >= 1, got {getattr(self, name)}")
        if self.requests_per_user < 1:
            raise ValueError(f"data.synthetic.requests_per_user must be >= 1, got {self.requests_per_user}")
        if self.num_creators > self.num_items or self.num_categories > self.num_items:
            raise ValueError(
                "data.synthetic.num_creators and num_categories must not exceed num_items "
                f"({self.num_creators}, {self.num_categories} > {self.num_items})"
            )
        for name in ("cross_weight", "target_aware_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"data.synthetic.{name} must be >= 0, got {getattr(self, name)}")


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
    engage_threshold: float = 4.0  # engage = rating >= this (MovieLens; half stars count as they are)
    director_vocab: int = 2000  # most frequent directors kept; the rest map to id 1 ("other")
    cache: bool = True  # keep built MovieLens splits in ~/.cache/gesr_jax (or $GESR_CACHE_DIR)
    seed: int = 0  # negatives and splits are fixed by this seed
    synthetic: SyntheticConfig = SyntheticConfig()  # generator sizes when source="synthetic"

    @property
    def num_candidates(self) -> int:
        """C: candidate slots per request (P positives + Q negatives; impressions per request for synthetic)."""
        return self.num_positives + self.num_negatives

    def validate(self) -> None:
        if self.source not in ("synthetic", "movielens"):
            raise ValueError(f"data.source must be 'synthetic' or 'movielens', got {self.source!r}")
        for name in ("history_len", "num_positives", "min_history"):
            if getattr(self, name) < 1:
                raise ValueError(f"data.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("num_negatives", "max_requests_per_user", "director_vocab"):
            if getattr(self, name) < 0:
                raise ValueError(f"data.{name} must be >= 0, got {getattr(self, name)}")
        if self.min_history > self.history_len:
            raise ValueError(
                f"data.min_history ({self.min_history}) must not exceed data.history_len ({self.history_len})"
            )
        self.synthetic.validate()

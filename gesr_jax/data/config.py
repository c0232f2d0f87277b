"""DataConfig: which dataset and how ESR requests are built from it; each dataset's own settings are a section.

The fields every source reads (``history_len``, ``num_positives``, ...) are top-level. A dataset's own settings
are a sub-section named after its source: ``data.synthetic.*`` (:class:`SyntheticConfig`), ``data.movielens.*``
(:class:`MovieLensConfig`), and for a registered dataset whatever dataclass it brought
(``gesr_jax.data.datasets.register_dataset(source, dataset, settings=MySettings)``), held in ``sections`` and read
as ``data_config.<source>``. So a new dataset with settings needs no edit of this file; ``--set
data.<source>.<field>=...``, ``gesr config show`` and ``config.json`` handle its section like the built-in ones.
"""

from __future__ import annotations

import dataclasses
import typing
from typing import Any, Literal

# data.movielens.split values (gesr_jax/data/requests.py, point 5)
Split = Literal["global_time", "global_time_user_holdout", "per_user_last"]
SPLITS = typing.get_args(Split)


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
    # Planted signals (story: gesr_jax/data/synthetic.py); each knob scales one, 0 removes it.
    cross_weight: float = 1.0  # scale of both explicit cross signals below together
    capped_count_weight: float = 1.0  # capped count of history items by the candidate's creator
    last_engaged_weight: float = 1.0  # candidate's creator == creator of the most recent engaged history event
    target_aware_weight: float = 1.0  # recency-weighted (sharply decaying) category matches
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
        for name in ("cross_weight", "capped_count_weight", "last_engaged_weight", "target_aware_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"data.synthetic.{name} must be >= 0, got {getattr(self, name)}")


@dataclasses.dataclass(frozen=True)
class MovieLensConfig:
    """How the MovieLens reader finds, splits, labels and caches a folder (gesr_jax/data/movielens_dataset.py)."""

    path: str = ""  # MovieLens folder (ml-1m, ml-100k, ml-latest-small, ...)
    # How requests are split (gesr_jax/data/requests.py, point 5): "global_time" cuts all requests at two
    # times so train < valid < test in time; "global_time_user_holdout" keeps those cuts but draws valid and test from
    # the same (post-cut-2) users, half each, held out by user (ml1m_base's choice: see its docstring);
    # "per_user_last" is each user's last request = test, second-to-last = valid.
    # The synthetic log always uses its own per-user split (its generator is stationary: no trend can leak).
    split: Split = "global_time"
    split_quantiles: tuple[float, float] = (0.8, 0.9)  # global_time: cut times = these quantiles of request times
    # global_time_user_holdout: the seed that halves the post-cut-2 users into valid and test. Its own seed, not
    # data.seed, so every comparison seed is scored on the same test users (paired); data.seed still varies negatives.
    holdout_seed: int = 0
    engage_threshold: float = 4.0  # engage = rating >= this (half stars count as they are)
    director_vocab: int = 2000  # most frequent directors kept; the rest map to id 1 ("other")
    cache: bool = True  # keep built MovieLens splits in ~/.cache/gesr_jax (or $GESR_CACHE_DIR)

    def validate(self) -> None:
        if self.director_vocab < 0:
            raise ValueError(f"data.movielens.director_vocab must be >= 0, got {self.director_vocab}")
        if self.split not in SPLITS:
            raise ValueError(f"data.movielens.split must be one of {list(SPLITS)}, got {self.split!r}")
        q1, q2 = self.split_quantiles
        if not 0.0 < q1 < q2 < 1.0:
            raise ValueError(
                f"data.movielens.split_quantiles must satisfy 0 < q1 < q2 < 1, got {self.split_quantiles}"
            )


# source -> the settings dataclass a registered dataset brought (filled by gesr_jax.data.datasets.register_dataset).
_SETTINGS: dict[str, type] = {}


def register_settings(source: str, settings: type) -> None:
    """Make ``settings`` (a frozen dataclass, defaults for every field) the ``data.<source>`` section."""
    if not (isinstance(settings, type) and dataclasses.is_dataclass(settings)):
        raise TypeError(f"the settings of dataset {source!r} must be a dataclass, got {settings!r}")
    if not settings.__dataclass_params__.frozen:  # type: ignore[attr-defined]
        # DataConfig is frozen and hashable; a mutable section would make it neither.
        raise TypeError(f"the settings of dataset {source!r} must be a frozen dataclass (@dataclass(frozen=True))")
    if source in {f.name for f in dataclasses.fields(DataConfig)}:
        raise ValueError(f"dataset {source!r} cannot bring settings: data.{source} is already a field of DataConfig")
    _SETTINGS[source] = settings


def unregister_settings(source: str) -> None:
    _SETTINGS.pop(source, None)


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Dataset choice and the temporal request protocol (the MoA Config's truncation part)."""

    source: str = "synthetic"  # registered dataset: "synthetic" (embedded default), "movielens", or your own
    history_len: int = 32  # N: most recent events strictly before the request
    num_positives: int = 4  # P: next real events per request, the positive candidates
    num_negatives: int = 12  # Q: popularity-sampled unseen items per request
    min_history: int = 4  # a request needs at least this many past events
    # 0 = every request a user's timeline allows; else each user's most recent ones (within each split under global_time)
    max_requests_per_user: int = 0
    seed: int = 0  # negatives and splits are fixed by this seed
    prepared: str | None = None  # folder written by `gesr data prepare`; train/eval read it instead of the source
    # 0 = off (item ids past the vocabulary are refused); else the item tables get this many extra rows and ids
    # past the vocabulary are hashed into them. A collision costs accuracy: ids in one row share one embedding
    # and their gradients mix; k ids hashed into b rows give about k**2 / (2 b) colliding pairs (layers/core.Embed).
    hash_buckets: int = 0
    synthetic: SyntheticConfig = SyntheticConfig()  # generator sizes when source="synthetic"
    movielens: MovieLensConfig = MovieLensConfig()  # folder, split and labels when source="movielens"
    # The sections of registered datasets' own settings, as (source, settings) pairs sorted by source; read one as
    # data_config.<source> (its defaults when absent). Saved and shown as data.<source>, not under this name.
    sections: tuple[tuple[str, Any], ...] = ()

    # Fields of config.json files written before the movielens section (gesr_jax/config.py: move_old_fields).
    moved_fields = {name: f"movielens.{name}" for name in
                    ("path", "split", "split_quantiles", "engage_threshold", "director_vocab", "cache")}  # fmt: skip

    def __post_init__(self) -> None:
        # One spelling per value: sorted, and a section at its defaults is the same as an absent one.
        kept = []
        for source, value in self.sections:
            cls = _SETTINGS.get(source)
            if cls is None:
                raise ValueError(f"data.{source}: no dataset registered under {source!r} brought settings")
            if not isinstance(value, cls):
                raise TypeError(f"data.{source} must be a {cls.__name__}, got {type(value).__name__}")
            if value != cls():
                kept.append((source, value))
        object.__setattr__(self, "sections", tuple(sorted(kept, key=lambda item: item[0])))

    def __getattr__(self, name: str) -> Any:
        # Only called when ``name`` is no field: data_config.<source> of a registered dataset with settings.
        cls = _SETTINGS.get(name) if not name.startswith("_") else None
        if cls is None:
            raise AttributeError(f"{type(self).__name__} has no attribute {name!r}")
        return dict(self.__dict__.get("sections", ())).get(name, cls())

    def extra_sections(self) -> dict[str, Any]:
        """``{source: settings}`` of the registered sections that are set, and of ``source``'s own if it has one."""
        out = dict(self.sections)
        if self.source in _SETTINGS:
            out.setdefault(self.source, getattr(self, self.source))
        return dict(sorted(out.items()))

    @staticmethod
    def extra_section_class(name: str) -> type | None:
        """The settings dataclass a registered dataset brought for ``data.<name>``, or None."""
        return _SETTINGS.get(name)

    def with_extra_section(self, name: str, value: Any) -> DataConfig:
        return dataclasses.replace(self, sections=tuple({**dict(self.sections), name: value}.items()))

    @property
    def num_candidates(self) -> int:
        """C: candidate slots per request (P positives + Q negatives; impressions per request for synthetic)."""
        return self.num_positives + self.num_negatives

    def validate(self) -> None:
        # Which sources exist is the dataset registry's business (gesr_jax/data/datasets.py): it names them
        # when a config asks for one it does not know, and a registered user dataset needs no edit here.
        if not self.source:
            raise ValueError("data.source must name a dataset, e.g. 'synthetic' or 'movielens'")
        for name in ("history_len", "num_positives", "min_history"):
            if getattr(self, name) < 1:
                raise ValueError(f"data.{name} must be >= 1, got {getattr(self, name)}")
        if self.prepared is not None and not self.prepared.strip():
            raise ValueError("data.prepared must be a folder written by `gesr data prepare`, or None")
        for name in ("num_negatives", "max_requests_per_user", "hash_buckets"):
            if getattr(self, name) < 0:
                raise ValueError(f"data.{name} must be >= 0, got {getattr(self, name)}")
        if self.min_history > self.history_len:
            raise ValueError(
                f"data.min_history ({self.min_history}) must not exceed data.history_len ({self.history_len})"
            )
        self.synthetic.validate()
        self.movielens.validate()
        for section in self.extra_sections().values():
            validate = getattr(section, "validate", None)
            if validate is not None:
                validate()

"""Which item ids a ranking or cascade evaluation ranks a positive against: the catalogue protocol.

Two protocols (issue 22 item 6):

* ``"all"`` (the original one, kept so old tables stay comparable): every id 1..V-1 is a competitor;
  only the padding id 0 and the request's other positives are left out (evaluators.catalogue_ranks).
* ``"clean"``: also left out, per request, are

  - the items this user rated strictly before ``request_time`` (they can never be a positive of the
    request, so ranking them only measures whether the model re-recommends history),
  - ids that are not items (gaps in the id range: ``item_known`` False),
  - items no one rated strictly before ``request_time`` (the model could not know them at that time).

  The request's own positives are never left out by these rules (a positive may be a brand-new item
  rated first by this user at ``request_time``): they stay the targets.

"Before" is strictly earlier, as in gesr_jax/data/requests.py. :class:`CleanCatalogue` holds the log once,
by user (CSR) and the first time each item was rated, and builds ``[B, V]`` exclusion masks per batch.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

CATALOGUES = ("all", "clean")


@dataclasses.dataclass(frozen=True)
class CleanCatalogue:
    """The event log in the layout the clean exclusions need (build with :meth:`from_events`)."""

    user_start: np.ndarray  # [U + 2] int64: events of user u are rows user_start[u] : user_start[u + 1]
    item: np.ndarray  # [E] int32 item ids, sorted by (user, time)
    time: np.ndarray  # [E] int64 unix seconds, same order
    item_known: np.ndarray  # [V] bool: the id is an item
    item_first_time: np.ndarray  # [V] int64: earliest event time of the item, int64 max if never rated

    @classmethod
    def from_events(cls, user: Any, item: Any, time: Any, item_known: Any) -> CleanCatalogue:
        """``user``, ``item``, ``time``: one entry per event (any order); ``item_known`` [V] bool over ids 0..V-1."""
        user, item, time = (np.asarray(a).astype(np.int64) for a in (user, item, time))
        known = np.asarray(item_known, bool)
        if not (user.shape == item.shape == time.shape) or user.ndim != 1:
            raise ValueError(f"user, item and time must be 1-D of one length, got {user.shape}, {item.shape}, {time.shape}")
        if item.size and (item.min() < 0 or item.max() >= known.size):
            raise ValueError(f"event item ids must lie in [0, {known.size}) (item_known's length), got {item.min()}..{item.max()}")
        if user.size and user.min() < 0:
            raise ValueError(f"event user ids must be >= 0, got {user.min()}")
        order = np.lexsort((time, user))
        num_users = int(user.max()) + 1 if user.size else 0
        start = np.zeros(num_users + 2, np.int64)
        np.cumsum(np.bincount(user, minlength=num_users + 1), out=start[1:])
        first = np.full(known.size, np.iinfo(np.int64).max, np.int64)
        np.minimum.at(first, item, time)
        return cls(start, item[order].astype(np.int32), time[order], known, first)

    @property
    def num_ids(self) -> int:
        return int(self.item_known.size)

    def exclusions(self, user: Any, request_time: Any, keep: Any | None = None) -> np.ndarray:
        """``[B, V]`` bool: True where id v is not a competitor of request b under the clean protocol.

        ``user`` / ``request_time`` are [B]; ``keep`` [B, C] ids never excluded (the request's positives;
        0 entries are ignored). Id 0 (padding) is always excluded. A user id outside the log has no history.
        """
        user = np.asarray(user, np.int64)
        t = np.asarray(request_time, np.int64)
        if user.shape != t.shape or user.ndim != 1:
            raise ValueError(f"user and request_time must be [B], got {user.shape} and {t.shape}")
        out = (~self.item_known)[None, :] | (self.item_first_time[None, :] >= t[:, None])
        out[:, 0] = True
        in_log = (user >= 0) & (user + 1 < self.user_start.size)
        for b in np.flatnonzero(in_log):  # B is an eval batch (<= a few hundred rows)
            lo, hi = self.user_start[user[b]], self.user_start[user[b] + 1]
            before = lo + np.searchsorted(self.time[lo:hi], t[b], side="left")
            out[b, self.item[lo:before]] = True
        if keep is not None:
            keep = np.asarray(keep)
            rows, cols = np.nonzero(keep > 0)
            out[rows, keep[rows, cols]] = False
        return out


def from_data_config(data_config: Any) -> CleanCatalogue:
    """The clean catalogue of a config's data; MovieLens only for now (the synthetic log has no rating history).

    Raises ValueError naming ``data.source`` for any other source.
    """
    if data_config.source != "movielens":
        raise ValueError(
            f"catalogue='clean' needs the rating log of data.source='movielens'; data.source is {data_config.source!r}"
        )
    from gesr_jax.data import movielens_dataset

    inter = movielens_dataset.load_interactions_cached(data_config)
    return CleanCatalogue.from_events(inter.user, inter.item, inter.timestamp, inter.item_known)


def default_for(data_config: Any) -> str:
    """The catalogue a cascade uses unless told: "clean" where the data has a rating log (MovieLens), else "all"
    (the synthetic log has none). "all" is the protocol of the tables before issue 22, kept behind the flag."""
    return "clean" if data_config.source == "movielens" else "all"


def check_catalogue(name: str) -> str:
    if name not in CATALOGUES:
        raise ValueError(f"catalogue must be one of {CATALOGUES}, got {name!r}")
    return name

"""User-state reuse: an LRU of encoded request states, bounded by the bytes of the arrays it holds.

The key is ``(user id, fingerprint)`` where the fingerprint hashes the history arrays, request_time and
user features (``ParsedRequest.fingerprint``): a repeated request for the same user with the same history
reuses the encoded history (the paper's user-side caching); any change to the history misses.
"""

from __future__ import annotations

import collections
import dataclasses
import threading
from collections.abc import Hashable
from typing import Any

import jax

DEFAULT_MAX_BYTES = 256 * 2**20


def state_nbytes(state: Any) -> int:
    """Bytes of every array leaf of a state pytree."""
    return int(sum(getattr(x, "nbytes", 0) for x in jax.tree.leaves(state)))


@dataclasses.dataclass
class CacheStats:
    """Counters of a :class:`UserStateCache` since it was built (or last ``reset_stats``)."""

    hits: int = 0
    misses: int = 0
    evictions: int = 0
    entries: int = 0
    bytes: int = 0
    max_bytes: int = 0

    @property
    def hit_rate(self) -> float:
        total = self.hits + self.misses
        return self.hits / total if total else 0.0


class UserStateCache:
    """LRU of one-row request states (pytrees of [1, ...] arrays) keyed by ``(user_id, fingerprint)``.

    ``max_bytes`` bounds the summed ``nbytes`` of the cached arrays; inserting past it evicts the least
    recently used entries. A state larger than ``max_bytes`` on its own is not cached. ``max_entries``
    (optional) bounds the count as well. Thread-safe.
    """

    def __init__(self, max_bytes: int = DEFAULT_MAX_BYTES, *, max_entries: int | None = None):
        if max_bytes < 0:
            raise ValueError(f"max_bytes must be >= 0, got {max_bytes}")
        if max_entries is not None and max_entries < 1:
            raise ValueError(f"max_entries must be >= 1 or None, got {max_entries}")
        self.max_bytes, self.max_entries = int(max_bytes), max_entries
        self._entries: collections.OrderedDict[Hashable, tuple[Any, int]] = collections.OrderedDict()
        self._bytes = 0
        self._hits = self._misses = self._evictions = 0
        self._lock = threading.Lock()

    def get(self, key: Hashable) -> Any | None:
        """The cached state of ``key`` (now most recently used), or None; counts a hit or a miss."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                self._misses += 1
                return None
            self._entries.move_to_end(key)
            self._hits += 1
            return entry[0]

    def put(self, key: Hashable, state: Any) -> bool:
        """Cache ``state`` under ``key``, evicting LRU entries to stay within bounds; False if too large."""
        size = state_nbytes(state)
        with self._lock:
            if key in self._entries:
                self._bytes -= self._entries.pop(key)[1]
            if size > self.max_bytes:
                return False
            while self._entries and (
                self._bytes + size > self.max_bytes
                or (self.max_entries is not None and len(self._entries) >= self.max_entries)
            ):
                _, (_, freed) = self._entries.popitem(last=False)
                self._bytes -= freed
                self._evictions += 1
            self._entries[key] = (state, size)
            self._bytes += size
            return True

    def __contains__(self, key: Hashable) -> bool:
        with self._lock:
            return key in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._bytes = 0

    def reset_stats(self) -> None:
        with self._lock:
            self._hits = self._misses = self._evictions = 0

    @property
    def stats(self) -> CacheStats:
        with self._lock:
            return CacheStats(
                self._hits, self._misses, self._evictions, len(self._entries), self._bytes, self.max_bytes
            )

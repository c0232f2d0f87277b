"""Requests by reference: one event log, and requests that point into it.

A materialised split holds every history field as a ``[num_requests, N]`` array, so its memory is
O(requests x N): a MovieLens-20M-sized log (about 5M requests at P=4, N=200) needs over 20 GiB for the
histories alone. Here the log is kept once, as columns sorted by (user, time, file order)
(:class:`EventLog`), and a request (:class:`RequestSplit`) stores only

* its request-level fields (``user_id``, ``user_<f>``, ``history_len``, ``request_time``),
* ``history_end``: the index in the log one past its last history event (its window is the
  ``history_len`` events before it, all of one user),
* its candidates and labels (``cand_item``, ``num_candidates``, ``label_<task>``),

so memory is O(events + requests x (P + Q)). Item features (``history_<f>``, ``cand_<f>``) come from
the item table (one row per item id) at batch time. :meth:`RequestSplit.gather` builds the ``[B, N]``
windows of a batch with one vectorised fancy-indexing call per column; the result is bit-identical to
the materialised split's rows (tests/data/test_requests_by_reference.py). The columns may be numpy
memmaps (gesr_jax/data/prepared.py): a batch then reads only the pages its rows and windows touch.

A :class:`RequestSplit` is also a read-only mapping from batch key to array, so code written for
materialised splits (``split["request_time"]``, ``validate_batch(split, schema)``) keeps working;
indexing a history or item-feature key builds that one key for every request (fine for reports and
tests, not for a 10^8-event log: the input pipeline calls :meth:`RequestSplit.gather` per batch).
"""

from __future__ import annotations

import dataclasses
import mmap
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np

from gesr_jax.data.batch import BatchSchema, batch_spec, lengths_mask

# Per-request columns a RequestSplit stores; everything else of a batch is gathered at batch time.
HISTORY_END = "history_end"


@dataclasses.dataclass(frozen=True)
class EventLog:
    """Every event once, sorted by (user, time, file order): the columns histories are gathered from."""

    item: np.ndarray  # [E] int32 item ids
    action: np.ndarray  # [E] uint8 action id (MovieLens: the rating rounded up to whole stars)
    time: np.ndarray  # [E] int32 unix seconds

    @property
    def num_events(self) -> int:
        return int(self.item.shape[0])

    def columns(self) -> dict[str, np.ndarray]:
        return {"item": self.item, "action": self.action, "time": self.time}


_ONE_PAD_EVENT = EventLog(np.zeros(1, np.int32), np.zeros(1, np.uint8), np.zeros(1, np.int32))


def stored_keys(schema: BatchSchema) -> list[str]:
    """The batch keys a :class:`RequestSplit` keeps per request (the rest is gathered from log and item table)."""
    gathered = {"history_item", "history_action", "history_time"}
    gathered |= {f"history_{f}" for f in schema.item_feature_names} | {f"cand_{f}" for f in schema.item_feature_names}
    return [k for k in batch_spec(schema, 1) if k not in gathered]


class RequestSplit(Mapping):
    """One split's requests by reference into an :class:`EventLog`; a read-only ``{batch key: array}`` mapping."""

    def __init__(
        self, log: EventLog, item_table: Mapping[str, np.ndarray], schema: BatchSchema, columns: Mapping[str, Any]
    ):
        want = [*stored_keys(schema), HISTORY_END]
        missing = [k for k in want if k not in columns]
        if missing:
            raise ValueError(f"request columns lack {missing}")
        extra = sorted(set(columns) - set(want))
        if extra:
            raise ValueError(f"request columns have unknown keys {extra}")
        absent = [f for f in schema.item_feature_names if f not in item_table]
        if absent:
            raise ValueError(f"the item table lacks the features {absent} of the schema")
        self.log, self.schema = log, schema
        self.item_table = {f: item_table[f] for f in schema.item_feature_names}
        self.columns = {k: columns[k] for k in want}
        self._num_requests = int(np.shape(self.columns["user_id"])[0])
        for key, value in self.columns.items():
            if np.shape(value)[0] != self._num_requests:
                raise ValueError(f"request column {key!r} has {np.shape(value)[0]} rows, expected {self._num_requests}")
        self._keys = list(batch_spec(schema, 1))

    @property
    def num_requests(self) -> int:
        return self._num_requests

    def __len__(self) -> int:
        return len(self._keys)

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __contains__(self, key: object) -> bool:
        return key in self._keys

    def __getitem__(self, key: str) -> np.ndarray:
        if key not in self._keys:
            raise KeyError(key)
        if key in self.columns:
            return np.asarray(self.columns[key])
        return self.gather(slice(None), keys=(key,))[key]

    def __repr__(self) -> str:
        return f"RequestSplit({self._num_requests} requests by reference into {self.log.num_events} events)"

    def gather(self, rows: Any, keys: tuple[str, ...] | None = None) -> dict[str, np.ndarray]:
        """The batch of requests ``rows`` (an index array or a slice), in the batch layout (or only ``keys``)."""
        keys = tuple(self._keys) if keys is None else keys
        out: dict[str, np.ndarray] = {}
        stored = {k: np.asarray(self.columns[k][rows]) for k in keys if k in self.columns}
        if any(k.startswith("history_") and k != "history_len" for k in keys):
            self._gather_history(rows, keys, out)
        if any(k.startswith("cand_") and k != "cand_item" for k in keys):
            cand = stored["cand_item"] if "cand_item" in stored else np.asarray(self.columns["cand_item"][rows])
            valid = cand > 0
            for name in self.schema.item_feature_names:
                if f"cand_{name}" in keys:
                    out[f"cand_{name}"] = np.where(valid, self.item_table[name][cand], 0).astype(np.int32)
        result = {k: stored[k] if k in stored else out[k] for k in keys}
        self.release_pages()
        return result

    def release_pages(self) -> None:
        """Unmap the pages of memmapped columns from this process (``MADV_DONTNEED``); no-op for arrays in RAM.

        :meth:`gather` calls it after every batch. Without it the file-backed pages a process touches stay
        mapped and count in its RSS: a sequential pass (the data fingerprint, an eval pass) maps every page
        of the files (5.7 GB of a 10^8-event log), and random training batches map the kernel's fault-around
        block (64 KiB) around every row they read (3.4 GB after 40 steps of 128 requests there). The page
        cache keeps the pages; the next read maps them back with a minor fault.
        """
        arrays = [*self.columns.values(), *self.log.columns().values(), *self.item_table.values()]
        for mapping in {id(m): m for m in (getattr(a, "_mmap", None) for a in arrays) if m is not None}.values():
            try:
                mapping.madvise(mmap.MADV_DONTNEED)
            except (AttributeError, OSError, ValueError):  # no madvise on this OS, or the map is closed
                return

    def _gather_history(self, rows: Any, keys: tuple[str, ...], out: dict[str, np.ndarray]) -> None:
        end = np.asarray(self.columns[HISTORY_END][rows]).astype(np.int64)
        length = np.asarray(self.columns["history_len"][rows]).astype(np.int64)
        slots = np.arange(self.schema.history_len)
        valid = lengths_mask(length, slots.size)
        idx = np.where(valid, end[:, None] - length[:, None] + slots[None, :], 0)
        log = self.log if self.log.num_events else _ONE_PAD_EVENT  # idx 0 must exist even in an empty log
        item = np.where(valid, log.item[idx], 0).astype(np.int32)
        out["history_item"] = item
        if "history_action" in keys:
            out["history_action"] = np.where(valid, log.action[idx], 0).astype(np.int32)
        if "history_time" in keys:
            out["history_time"] = np.where(valid, log.time[idx], 0).astype(np.int32)
        for name in self.schema.item_feature_names:
            if f"history_{name}" in keys:
                out[f"history_{name}"] = np.where(valid, self.item_table[name][item], 0).astype(np.int32)

    def materialise(self) -> dict[str, np.ndarray]:
        """Every request as plain arrays (the materialised layout; memory O(requests x N))."""
        return self.gather(slice(None))


def num_requests(split: Mapping[str, Any]) -> int:
    """Requests in a split, without gathering anything from a :class:`RequestSplit`."""
    if isinstance(split, RequestSplit):
        return split.num_requests
    return int(np.shape(split["user_id"])[0])


SPLIT_NAMES = ("train", "valid", "test")


def flatten_splits(parts: Mapping[str, RequestSplit]) -> dict[str, np.ndarray]:
    """``log/<column>``, ``item_table/<feature>`` and ``<split>/<column>`` arrays of splits sharing one log."""
    first = parts[SPLIT_NAMES[0]]
    if any(parts[name].log is not first.log for name in SPLIT_NAMES):
        raise ValueError("the splits do not share one event log")
    flat = {f"log/{k}": v for k, v in first.log.columns().items()}
    flat |= {f"item_table/{k}": v for k, v in first.item_table.items()}
    for name in SPLIT_NAMES:
        flat |= {f"{name}/{k}": v for k, v in parts[name].columns.items()}
    return flat


def unflatten_splits(flat: Mapping[str, np.ndarray], schema: BatchSchema) -> dict[str, RequestSplit]:
    """The inverse of :func:`flatten_splits` (the arrays may be memmaps; nothing is copied)."""
    def group(prefix: str) -> dict[str, np.ndarray]:
        return {k[len(prefix) + 1 :]: v for k, v in flat.items() if k.startswith(prefix + "/")}

    log = EventLog(**group("log"))
    table = group("item_table")
    return {name: RequestSplit(log, table, schema, group(name)) for name in SPLIT_NAMES}

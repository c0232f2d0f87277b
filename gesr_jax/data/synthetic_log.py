"""A synthetic rating log of any size, written straight to a prepared folder in chunks of users.

For scale tests and benchmarks (experiments/bench_scale.py): the whole log is never in memory. Users and
items grow with the log (``num_users = events / 100``, ``num_items = min(events / 10, 10^7)`` by default).
Sizes are drawn first (events per user: 1 + Poisson(99)), so every ``.npy`` column is created at its
final shape (a ``.npy`` header) and filled by appending chunk after chunk (every column is written in
order); only the per-user counts (``num_users`` integers) and one chunk are in memory. Plain appends,
not memory maps: pages written through a memmap stay mapped and count in the process's RSS.

Per user: strictly increasing timestamps, items from a power law (``1 + floor(num_items * u^3)``,
popular ids first), ratings 1..5. Requests follow gesr_jax/data/requests.py's ``per_user_last``
protocol for blocks of P events from the end with at least ``min_history`` earlier events (no
same-second ties here, so ``history_end`` is the block's first event). Negatives are Q draws from the
same power law that are not among the request's positives; unlike the MovieLens protocol they are not
checked against the user's whole history, which would need a per-user set -- this log measures cost,
not model quality. Item features (ml100k_base's and ml32m_base's models fit them): ``genre`` = ``2 + item % 18`` and
``year`` = ``2 + (7 item) % 16``.
"""

from __future__ import annotations

import dataclasses
import pathlib
import time
from collections.abc import Callable

import numpy as np

from gesr_jax.data import prepared
from gesr_jax.data.batch import BatchSchema
from gesr_jax.data.config import DataConfig, MovieLensConfig
from gesr_jax.data.event_log import HISTORY_END, SPLIT_NAMES, stored_keys

NUM_GENRES, NUM_YEARS = 18, 16


def sizes(events: int, seed: int = 0, num_items: int | None = None) -> tuple[np.ndarray, int]:
    """(events per user, num_items): about 100 events per user, the counts summing to ``events`` exactly."""
    rng = np.random.default_rng([seed, 0])
    counts = rng.poisson(99, size=events // 50 + 2) + 1
    total = np.cumsum(counts)
    n = int(np.searchsorted(total, events))
    counts = counts[: n + 1].astype(np.int64)
    counts[-1] -= total[n] - events
    return counts, int(num_items or min(max(events // 10, 100), 10_000_000))


def write_prepared_log(events: int, out: str | pathlib.Path, data_config: DataConfig, *, seed: int = 0,
                       users_per_chunk: int = 5_000, log: Callable[[str], None] = print) -> dict:  # fmt: skip
    """Generate ``events`` events and their requests into the new prepared folder ``out``; returns the manifest."""
    dc = data_config
    if dc.movielens.split != "per_user_last" or dc.max_requests_per_user:
        raise ValueError(
            "the synthetic log implements data.movielens.split='per_user_last' with max_requests_per_user=0"
        )
    out = pathlib.Path(out)
    if out.exists():
        raise prepared.PreparedError(f"{out} already exists")
    start = time.perf_counter()
    counts, num_items = sizes(events, seed)
    p, q, n_hist = dc.num_positives, dc.num_negatives, dc.history_len
    blocks = np.where(counts >= dc.min_history + p, (counts - dc.min_history) // p, 0)
    schema = BatchSchema(
        num_users=int(counts.size), num_items=num_items, user_features=(),
        item_features=(("genre", NUM_GENRES + 2), ("year", NUM_YEARS + 2)), num_actions=6, history_len=n_hist,
        num_candidates=p + q,
    )  # fmt: skip
    # Split of each user's k-th request (k = 0 oldest): the last is test, the one before valid.
    per_split = {"train": int(np.maximum(blocks - 2, 0).sum()), "valid": int((blocks >= 2).sum()),
                 "test": int((blocks >= 1).sum())}  # fmt: skip
    out.mkdir(parents=True)
    columns: dict[str, _AppendColumn] = {}

    def column(name: str, dtype: type, shape: tuple[int, ...]) -> None:
        columns[name] = _AppendColumn(out / f"{name}.npy", dtype, shape)

    column("log/item", np.int32, (events,))
    column("log/action", np.uint8, (events,))
    column("log/time", np.int32, (events,))
    column("item_table/genre", np.int32, (num_items + 1,))
    column("item_table/year", np.int32, (num_items + 1,))
    ids = np.arange(1, num_items + 1)
    columns["item_table/genre"].append(np.r_[0, 2 + ids % NUM_GENRES])
    columns["item_table/year"].append(np.r_[0, 2 + (7 * ids) % NUM_YEARS])
    dtypes = {"cand_item": np.int32, "label_consume": np.float32, "label_engage": np.float32, HISTORY_END: np.int64}
    for split, rows in per_split.items():
        for key in [*stored_keys(schema), HISTORY_END]:
            wide = key in ("cand_item", "label_consume", "label_engage")
            column(f"{split}/{key}", dtypes.get(key, np.int32), (rows, p + q) if wide else (rows,))
    event_at = np.r_[0, np.cumsum(counts)]
    rng = np.random.default_rng([seed, 1])
    shown = time.perf_counter()
    for lo in range(0, counts.size, users_per_chunk):
        hi = min(lo + users_per_chunk, counts.size)
        _write_chunk(rng, columns, counts[lo:hi], blocks[lo:hi], lo, int(event_at[lo]), num_items, dc)
        if time.perf_counter() - shown > 5 or hi == counts.size:
            shown = time.perf_counter()
            log(f"generated {int(event_at[hi]):,} / {events:,} events ({time.perf_counter() - start:.0f} s)")
    for array in columns.values():
        array.close()
    phases = {"generate_s": time.perf_counter() - start}
    start = time.perf_counter()
    written = {f"{name}.npy": prepared.file_entry(out / f"{name}.npy", array) for name, array in columns.items()}
    phases["checksum_s"] = time.perf_counter() - start
    columns.clear()
    stats = {"events": events, "users": int(counts.size), "items": num_items,
             **{f"requests_{s}": n for s, n in per_split.items()}}  # fmt: skip
    return prepared.write_folder(out, {}, schema, dc, prepared.BY_REFERENCE, stats, phases, log, written=written)


def _write_chunk(rng: np.random.Generator, columns: dict[str, _AppendColumn], counts: np.ndarray, blocks: np.ndarray,
                 first_user: int, first_event: int, num_items: int, dc: DataConfig) -> None:  # fmt: skip
    p, q = dc.num_positives, dc.num_negatives
    e = int(counts.sum())
    user_start = np.cumsum(counts) - counts  # within the chunk
    day0 = rng.integers(1_000_000_000, 1_300_000_000, size=counts.size)
    gaps = rng.integers(1, 86_400, size=e)
    gaps[user_start] = 0
    cum = np.cumsum(gaps)
    time_ = np.repeat(day0, counts) + cum - np.repeat(cum[user_start], counts)
    item = 1 + np.minimum((num_items * rng.random(e) ** 3).astype(np.int64), num_items - 1)
    rating = rng.integers(1, 6, size=e)
    for name, values in (("log/item", item), ("log/action", rating), ("log/time", time_)):
        columns[name].append(values)
    # Requests: user u's k-th block from the end starts at counts - P (k + 1); k = 0 is its test request.
    owner = np.repeat(np.arange(counts.size), blocks)
    back = np.arange(owner.size) - np.repeat(np.cumsum(blocks) - blocks, blocks)
    start = user_start[owner] + counts[owner] - p * (back + 1)
    order = np.lexsort((-back, owner))  # oldest request first within a user, as build_requests orders them
    owner, back, start = owner[order], back[order], start[order]
    pos = item[start[:, None] + np.arange(p)]
    neg = 1 + np.minimum((num_items * rng.random((owner.size, 2 * q)) ** 3).astype(np.int64), num_items - 1)
    neg = _first_distinct(neg, pos, q)
    cand = np.concatenate([pos, neg], axis=1)
    engage = np.concatenate([rating[start[:, None] + np.arange(p)] >= dc.movielens.engage_threshold,
                             np.zeros(neg.shape, bool)], axis=1)  # fmt: skip
    consume = np.concatenate([np.ones(pos.shape), np.zeros(neg.shape)], axis=1)
    valid = cand > 0
    perm = np.argsort(rng.random(cand.shape) + (~valid) * 2.0, axis=1)
    cand, engage, consume, valid = (np.take_along_axis(a, perm, axis=1) for a in (cand, engage, consume, valid))
    values = {
        "user_id": first_user + owner + 1, "history_len": np.minimum(start - user_start[owner], dc.history_len),
        "request_time": time_[start], HISTORY_END: first_event + start, "cand_item": cand,
        "num_candidates": valid.sum(axis=1), "label_consume": consume, "label_engage": engage,
    }  # fmt: skip
    split_of = np.where(back == 0, 2, np.where(back == 1, 1, 0))
    for code, split in enumerate(SPLIT_NAMES):
        rows = split_of == code
        for key, value in values.items():
            columns[f"{split}/{key}"].append(value[rows])


class _AppendColumn:
    """A ``.npy`` file of known dtype and shape, written by appending rows in order."""

    def __init__(self, path: pathlib.Path, dtype: type, shape: tuple[int, ...]):
        self.path, self.dtype, self.shape = path, np.dtype(dtype), shape
        path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(path, "wb")  # noqa: SIM115 -- closed by close(), after the last chunk
        header = {"descr": np.lib.format.dtype_to_descr(self.dtype), "fortran_order": False, "shape": shape}
        np.lib.format.write_array_header_1_0(self._file, header)
        self._rows = 0

    def append(self, values: np.ndarray) -> None:
        values = np.ascontiguousarray(values, dtype=self.dtype)
        self._file.write(values.tobytes())
        self._rows += values.shape[0]

    def close(self) -> None:
        self._file.close()
        if self._rows != self.shape[0]:
            raise AssertionError(f"{self.path}: wrote {self._rows} rows, expected {self.shape[0]}")


def _first_distinct(draws: np.ndarray, exclude: np.ndarray, q: int) -> np.ndarray:
    """The first ``q`` draws per row that are distinct and not in ``exclude`` (0-padded when too few)."""
    order = np.argsort(draws, axis=1, kind="stable")
    srt = np.take_along_axis(draws, order, axis=1)
    first = np.ones(draws.shape, bool)
    first[:, 1:] = srt[:, 1:] != srt[:, :-1]
    ok = np.empty(draws.shape, bool)
    np.put_along_axis(ok, order, first, axis=1)
    ok &= ~(draws[:, :, None] == exclude[:, None, :]).any(-1)
    rank = np.cumsum(ok, axis=1) - 1
    out = np.zeros((draws.shape[0], q), np.int64)
    rows, cols = np.nonzero(ok & (rank < q))
    out[rows, rank[rows, cols]] = draws[rows, cols]
    return out


def scale_config(history_len: int = 32, **kw) -> DataConfig:
    """The data config a synthetic prepared log is built for (``data.source='movielens'`` + ``data.prepared``)."""
    settings = MovieLensConfig(path="", split="per_user_last", cache=False)
    base = dict(source="movielens", movielens=settings, history_len=history_len, num_positives=4, num_negatives=12,
                min_history=4)  # fmt: skip
    return dataclasses.replace(DataConfig(**base), **kw)

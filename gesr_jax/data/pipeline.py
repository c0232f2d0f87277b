"""The input pipeline: grain ``MapDataset`` over batch-level sources, host sharding, checkpointable iterators.

A split is a dict of numpy arrays in the batch layout (``gesr_jax/data/batch.py``) whose leading
dimension counts requests, or a :class:`~gesr_jax.data.event_log.RequestSplit` (requests by reference
into one event log, whose history windows are gathered per batch). Element ``i`` of a
:class:`RequestBatchSource` is a whole batch gathered with one fancy-indexing call per key, so Python
runs once per batch, never once per request.

* Training (:func:`train_dataset`): endless; every epoch draws a fresh permutation of *requests*
  (not just of batch order), determined by ``(seed, epoch)``; the ``num_requests % batch_size``
  requests left over by an epoch's permutation are skipped for that epoch only.
* Evaluation (:func:`eval_dataset`): one ordered pass that covers every request exactly once; the
  last batch is padded with empty rows (``batch.pad_rows``), which losses and metrics ignore.

Multi-host: each host reads ``ds[jax.process_index()::jax.process_count()]`` of a dataset whose
batches are ``global_batch_size // process_count`` rows, so hosts see disjoint requests and the
global batch of a step is the concatenation of the hosts' local batches.

The iterator from :func:`make_iterator` is a grain ``DatasetIterator``; its state (``next_index``)
is saved in the same Orbax checkpoint step as the parameters by ``gesr_jax.train.checkpoint``.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Mapping

import grain
import jax
import numpy as np

from gesr_jax.data import batch as batch_lib
from gesr_jax.data.event_log import RequestSplit

Arrays = Mapping[str, np.ndarray]


def check_split(arrays: Arrays, name: str = "split") -> int:
    """Return the number of requests in ``arrays``, raising if its keys disagree on it."""
    if isinstance(arrays, RequestSplit):  # checked when built; its keys would otherwise be gathered here
        return arrays.num_requests
    if "user_id" not in arrays:
        raise ValueError(f"{name} has no 'user_id' array; the layout is documented in gesr_jax/data/batch.py")
    n = int(np.shape(arrays["user_id"])[0])
    for key, value in arrays.items():
        if np.ndim(value) == 0 or np.shape(value)[0] != n:
            raise ValueError(f"{name}[{key!r}] has leading dimension {np.shape(value)[:1]}, expected ({n},) requests")
    return n


class RequestBatchSource:
    """A grain random-access source whose element ``i`` is one batch of requests.

    With ``shuffle=True`` the source is endless: index ``i`` falls in epoch ``i // batches_per_epoch``
    whose request order is a permutation seeded by ``(seed, epoch)``. With ``shuffle=False`` it is one
    ordered pass of ``ceil(num_requests / batch_size)`` batches (rounded up to ``min_batches``), the
    last partial batch and any extra batches padded with empty rows.
    """

    def __init__(
        self, arrays: Arrays, batch_size: int, *, shuffle: bool, seed: int = 0, min_batches: int = 0, name: str = ""
    ):
        if batch_size < 1:
            raise ValueError(f"batch size must be >= 1, got {batch_size}")
        self._name = name or ("train split" if shuffle else "eval split")
        self._num_requests = check_split(arrays, self._name)
        # A split by reference (gesr_jax/data/event_log.py) gathers each batch's history windows itself.
        self._split = arrays if isinstance(arrays, RequestSplit) else None
        self._arrays = {} if self._split is not None else {k: np.asarray(v) for k, v in arrays.items()}
        self._batch_size = batch_size
        self._shuffle = shuffle
        self._seed = seed
        self._lock = threading.Lock()
        self._permutations: dict[int, np.ndarray] = {}
        if shuffle:
            if self._num_requests < batch_size:
                raise ValueError(
                    f"{self._name} has {self._num_requests} requests, fewer than one batch of {batch_size} "
                    "(lower train.batch_size)"
                )
            self.batches_per_epoch = self._num_requests // batch_size
            # grain takes indices modulo len(); sys.maxsize makes the endless stream never wrap.
            self._length = sys.maxsize
        else:
            self.batches_per_epoch = -(-self._num_requests // batch_size)
            self._length = max(self.batches_per_epoch, min_batches)

    @property
    def num_requests(self) -> int:
        return self._num_requests

    def __len__(self) -> int:
        return self._length

    def _permutation(self, epoch: int) -> np.ndarray:
        # Prefetch threads read around an epoch boundary concurrently, so keep the last two epochs.
        with self._lock:
            perm = self._permutations.get(epoch)
            if perm is None:
                rng = np.random.default_rng(np.random.SeedSequence([self._seed, epoch]))
                perm = rng.permutation(self._num_requests)
                self._permutations[epoch] = perm
                while len(self._permutations) > 2:
                    self._permutations.pop(min(self._permutations))
            return perm

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        index = int(index)
        if not 0 <= index < self._length:
            raise IndexError(f"batch index {index} out of range for {self._length} batches of {self._name}")
        b = self._batch_size
        if self._shuffle:
            epoch, j = divmod(index, self.batches_per_epoch)
            rows = self._permutation(epoch)[j * b : (j + 1) * b]
            return self._rows(rows)
        lo, hi = min(index * b, self._num_requests), min((index + 1) * b, self._num_requests)
        return batch_lib.pad_rows(self._rows(slice(lo, hi)), b)

    def _rows(self, rows: np.ndarray | slice) -> dict[str, np.ndarray]:
        if self._split is not None:
            return self._split.gather(rows)
        return {k: v[rows] for k, v in self._arrays.items()}

    def __repr__(self) -> str:
        return (
            f"RequestBatchSource({self._name}: {self._num_requests} requests, batch_size={self._batch_size}, "
            f"shuffle={self._shuffle})"
        )


def _host(process_index: int | None, process_count: int | None) -> tuple[int, int]:
    index = jax.process_index() if process_index is None else process_index
    count = jax.process_count() if process_count is None else process_count
    if not 0 <= index < count:
        raise ValueError(f"process_index {index} is not in [0, {count})")
    return index, count


def local_batch_size(global_batch_size: int, process_count: int, field: str = "train.batch_size") -> int:
    """Rows each host loads per step; the global batch must split evenly across hosts."""
    if global_batch_size % process_count:
        raise ValueError(f"{field}={global_batch_size} must be divisible by the number of hosts ({process_count})")
    return global_batch_size // process_count


def train_dataset(
    arrays: Arrays,
    global_batch_size: int,
    *,
    seed: int,
    process_index: int | None = None,
    process_count: int | None = None,
) -> grain.MapDataset:
    """Endless, per-epoch reshuffled batches of this host's share of ``global_batch_size``."""
    index, count = _host(process_index, process_count)
    source = RequestBatchSource(
        arrays, local_batch_size(global_batch_size, count), shuffle=True, seed=seed, name="train split"
    )
    return grain.MapDataset.source(source)[index::count]


def eval_dataset(
    arrays: Arrays,
    global_batch_size: int,
    *,
    process_index: int | None = None,
    process_count: int | None = None,
    name: str = "eval split",
) -> grain.MapDataset:
    """One ordered pass over every request; every host gets the same number of (padded) batches."""
    index, count = _host(process_index, process_count)
    local = local_batch_size(global_batch_size, count, field="train.eval_batch_size")
    n = check_split(arrays, name)
    batches = -(-n // local)
    # Pad the pass with empty batches so the host slices below are equally long: every host must
    # run the same number of (collective) eval steps.
    source = RequestBatchSource(arrays, local, shuffle=False, min_batches=-(-batches // count) * count, name=name)
    return grain.MapDataset.source(source)[index::count]


def make_iterator(dataset: grain.MapDataset, *, prefetch: int = 2) -> grain.DatasetIterator:
    """A checkpointable iterator with ``prefetch`` batches gathered ahead on one background thread."""
    options = grain.ReadOptions(num_threads=1 if prefetch > 0 else 0, prefetch_buffer_size=prefetch)
    return iter(dataset.to_iter_dataset(options))

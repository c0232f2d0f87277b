"""The batch layout: the one place that names keys, shapes, dtypes and padding.

A batch is a flat ``dict[str, np.ndarray | jax.Array]`` holding B requests. Every
producer (synthetic generator, MovieLens request builder, ``api.example_batch``)
emits exactly these keys, and every consumer (models, metrics, trainer) reads them.

Request-only (RO) keys, one row per request:

=====================  ==========  =======  =============================================
key                    shape       dtype    meaning
=====================  ==========  =======  =============================================
``user_id``            [B]         int32    1..num_users; 0 marks a batch-padding row
``user_<f>``           [B]         int32    one per user feature ``f`` in the schema
``history_item``       [B, N]      int32    item ids, oldest first; 0 = padding
``history_<f>``        [B, N]      int32    one per item feature ``f`` (feature of that event's item)
``history_action``     [B, N]      int32    rating / action id of the event, 1..num_actions-1
``history_time``       [B, N]      int32    unix seconds of the event
``history_len``        [B]         int32    valid history slots; slots >= history_len are padding
``request_time``       [B]         int32    unix seconds of the request (> every valid history_time)
=====================  ==========  =======  =============================================

Per-candidate (NRO) keys:

=====================  ==========  =======  =============================================
``cand_item``          [B, C]      int32    candidate item ids; 0 = padding
``cand_<f>``           [B, C]      int32    one per item feature ``f``
``num_candidates``     [B]         int32    valid candidate slots; slots >= num_candidates are padding
``label_<task>``       [B, C]      float32  0/1 label per task (0 in padding slots)
``prob_<task>``        [B, C]      float32  true probability per task; only when ``schema.has_true_probs``
=====================  ==========  =======  =============================================

Conventions: id 0 is reserved for padding and out-of-vocabulary in every id space, so
every vocabulary size counts id 0. All padding is on the right and every padded slot
holds zeros. A row with ``history_len == 0`` and ``num_candidates == 0`` is an empty
row (used to pad the last eval batch) and contributes nothing to losses or metrics.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import numpy as np

TASKS: tuple[str, ...] = ("consume", "engage")

# The three groups of a batch. Models read the request part once per request and the candidate part per
# candidate chunk; targets are only read by losses and metrics. ``batch_groups`` is the one place that assigns
# keys to groups: code must never find a group by key prefixes.
REQUEST, CANDIDATES, TARGETS = "request", "candidates", "targets"


@dataclasses.dataclass(frozen=True)
class BatchSchema:
    """Static description of a dataset's batches: feature names and vocabulary sizes."""

    num_users: int  # user ids live in [1, num_users]; vocabulary size is num_users + 1
    num_items: int  # item ids live in [1, num_items]; vocabulary size is num_items + 1
    user_features: tuple[tuple[str, int], ...]  # (name, vocab incl. 0) for each categorical user feature
    item_features: tuple[tuple[str, int], ...]  # (name, vocab incl. 0) for each categorical item feature
    num_actions: int  # vocabulary of history_action incl. 0 (e.g. 6 for ratings 1..5)
    history_len: int  # N, history slots per request
    num_candidates: int  # C, candidate slots per request
    tasks: tuple[str, ...] = TASKS  # label names; one logit per task
    has_true_probs: bool = False  # synthetic data carries prob_<task>, the oracle probabilities

    @property
    def user_feature_names(self) -> tuple[str, ...]:
        return tuple(n for n, _ in self.user_features)

    @property
    def item_feature_names(self) -> tuple[str, ...]:
        return tuple(n for n, _ in self.item_features)

    def item_vocab(self, name: str) -> int:
        """Vocabulary size of a history/candidate field: ``item``, ``action`` or an item feature."""
        if name == "item":
            return self.num_items + 1
        if name == "action":
            return self.num_actions
        for n, v in self.item_features:
            if n == name:
                return v
        raise KeyError(
            f"unknown item field {name!r}; this dataset has 'item', 'action' and item features "
            f"{list(self.item_feature_names)}"
        )


def batch_layout(schema: BatchSchema, batch_size: int) -> dict[str, tuple[tuple[int, ...], np.dtype, str]]:
    """Every key of a batch with its shape, dtype and group (REQUEST, CANDIDATES or TARGETS)."""
    b, n, c = batch_size, schema.history_len, schema.num_candidates
    i32, f32 = np.dtype(np.int32), np.dtype(np.float32)
    spec: dict[str, tuple[tuple[int, ...], np.dtype, str]] = {"user_id": ((b,), i32, REQUEST)}
    for name in schema.user_feature_names:
        spec[f"user_{name}"] = ((b,), i32, REQUEST)
    spec["history_item"] = ((b, n), i32, REQUEST)
    for name in schema.item_feature_names:
        spec[f"history_{name}"] = ((b, n), i32, REQUEST)
    spec["history_action"] = ((b, n), i32, REQUEST)
    spec["history_time"] = ((b, n), i32, REQUEST)
    spec["history_len"] = ((b,), i32, REQUEST)
    spec["request_time"] = ((b,), i32, REQUEST)
    spec["cand_item"] = ((b, c), i32, CANDIDATES)
    for name in schema.item_feature_names:
        spec[f"cand_{name}"] = ((b, c), i32, CANDIDATES)
    spec["num_candidates"] = ((b,), i32, CANDIDATES)
    for task in schema.tasks:
        spec[f"label_{task}"] = ((b, c), f32, TARGETS)
        if schema.has_true_probs:
            spec[f"prob_{task}"] = ((b, c), f32, TARGETS)
    return spec


def batch_spec(schema: BatchSchema, batch_size: int) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """Every key of a batch with its shape and dtype."""
    return {k: (shape, dtype) for k, (shape, dtype, _) in batch_layout(schema, batch_size).items()}


def batch_groups(schema: BatchSchema) -> dict[str, str]:
    """Group (REQUEST, CANDIDATES, TARGETS) of every batch key of ``schema``."""
    return {k: group for k, (_, _, group) in batch_layout(schema, 1).items()}


def split_batch(batch: Mapping[str, Any], schema: BatchSchema) -> tuple[dict[str, Any], dict[str, Any]]:
    """(request part, candidate part) of a flat batch; targets and unknown keys are left out.

    Only keys present in ``batch`` are returned, so a batch may omit features a model does not read.
    """
    groups = batch_groups(schema)
    request = {k: v for k, v in batch.items() if groups.get(k) == REQUEST}
    candidates = {k: v for k, v in batch.items() if groups.get(k) == CANDIDATES}
    return request, candidates


def validate_batch(batch: Mapping[str, Any], schema: BatchSchema, *, check_values: bool = True) -> None:
    """Raise ``ValueError`` naming the first offending key if ``batch`` breaks the layout.

    Shapes and dtypes are always checked; ``check_values`` also checks id ranges,
    lengths and zeroed padding (host-side numpy, so call it on data, not in jit).
    """
    keys = set(batch)
    if "user_id" not in batch:
        raise ValueError("batch has no 'user_id'")
    b = int(np.shape(batch["user_id"])[0])
    spec = batch_spec(schema, b)
    missing = sorted(set(spec) - keys)
    if missing:
        raise ValueError(f"batch is missing keys {missing}")
    extra = sorted(keys - set(spec))
    if extra:
        raise ValueError(f"batch has unknown keys {extra}; the layout is documented in gesr_jax/data/batch.py")
    for key, (shape, dtype) in spec.items():
        arr = batch[key]
        if tuple(np.shape(arr)) != shape:
            raise ValueError(f"batch[{key!r}] has shape {tuple(np.shape(arr))}, expected {shape}")
        if np.dtype(arr.dtype) != dtype:
            raise ValueError(f"batch[{key!r}] has dtype {arr.dtype}, expected {dtype}")
    if not check_values:
        return
    arr = {k: np.asarray(v) for k, v in batch.items()}
    n, c = schema.history_len, schema.num_candidates
    _check_range(arr, "history_len", 0, n)
    _check_range(arr, "num_candidates", 0, c)
    _check_range(arr, "user_id", 0, schema.num_users)
    for name, vocab in schema.user_features:
        _check_range(arr, f"user_{name}", 0, vocab - 1)
    hist_valid = np.arange(n)[None, :] < arr["history_len"][:, None]
    cand_valid = np.arange(c)[None, :] < arr["num_candidates"][:, None]
    fields = [("item", schema.num_items + 1), ("action", schema.num_actions), *schema.item_features]
    for name, vocab in fields:
        _check_range(arr, f"history_{name}", 0, vocab - 1)
        _check_padding(arr, f"history_{name}", hist_valid)
        if name != "action":
            _check_range(arr, f"cand_{name}", 0, vocab - 1)
            _check_padding(arr, f"cand_{name}", cand_valid)
    if np.any(hist_valid & (arr["history_item"] == 0)):
        raise ValueError("batch['history_item'] holds padding id 0 inside history_len")
    if np.any(cand_valid & (arr["cand_item"] == 0)):
        raise ValueError("batch['cand_item'] holds padding id 0 inside num_candidates")
    late = hist_valid & (arr["history_time"] >= arr["request_time"][:, None])
    if np.any(late):
        row = int(np.argwhere(late)[0][0])
        raise ValueError(f"batch['history_time'] row {row} has an event at or after its request_time")
    for task in schema.tasks:
        for prefix in ("label", "prob") if schema.has_true_probs else ("label",):
            key = f"{prefix}_{task}"
            _check_range(arr, key, 0.0, 1.0)
            _check_padding(arr, key, cand_valid)


def validate_inputs(batch: Mapping[str, Any], schema: BatchSchema) -> None:
    """Check the model inputs of a (host-side) batch: what ``api.apply`` and the Scorer run by default.

    Only the request and candidate keys present are checked (targets are ignored), so a batch may omit
    features a model does not read. Raises ``ValueError`` naming the key and the first offending row: a
    batch of no rows, a non-integer dtype, lengths outside [0, slots], ids outside the vocabulary.
    """
    layout = batch_layout(schema, 1)
    groups = {k: g for k, (_, _, g) in layout.items()}
    present = {k: np.asarray(v) for k, v in batch.items() if groups.get(k) in (REQUEST, CANDIDATES)}
    for anchor in ("history_item", "cand_item", "history_len", "num_candidates"):
        if anchor not in present:
            raise ValueError(f"batch has no {anchor!r}; the layout is documented in gesr_jax/data/batch.py")
    b = present["history_item"].shape[0] if present["history_item"].ndim == 2 else -1
    if b < 1:
        raise ValueError(f"batch['history_item'] must be [B >= 1, N], got shape {present['history_item'].shape}")
    width = {REQUEST: present["history_item"].shape[1], CANDIDATES: np.shape(present["cand_item"])[-1]}
    for key, arr in present.items():
        ndim = len(layout[key][0])
        expected = (b,) if ndim == 1 else (b, width[groups[key]])
        if arr.shape != expected:
            raise ValueError(f"batch[{key!r}] has shape {arr.shape}, expected {expected}")
        if not np.issubdtype(arr.dtype, np.integer):
            raise ValueError(f"batch[{key!r}] has dtype {arr.dtype}, expected an integer type (int32)")
    _check_rows(present, "history_len", 0, width[REQUEST])
    _check_rows(present, "num_candidates", 0, width[CANDIDATES])
    vocab = {"user_id": schema.num_users + 1, **{f"user_{n}": v for n, v in schema.user_features}}
    for name, v in [("item", schema.num_items + 1), ("action", schema.num_actions), *schema.item_features]:
        vocab[f"history_{name}"] = v
        if name != "action":
            vocab[f"cand_{name}"] = v
    for key, v in vocab.items():
        if key in present:
            _check_rows(present, key, 0, v - 1)


def _check_rows(arr: Mapping[str, np.ndarray], key: str, lo: int, hi: int) -> None:
    bad = (arr[key] < lo) | (arr[key] > hi)
    if np.any(bad):
        where = tuple(int(i) for i in np.argwhere(bad)[0])
        raise ValueError(
            f"batch[{key!r}] row {where[0]} holds {arr[key][where]} (at index {where}), outside [{lo}, {hi}] "
            "for this schema"
        )


def _check_range(arr: Mapping[str, np.ndarray], key: str, lo: float, hi: float) -> None:
    x = arr[key]
    if x.size and (x.min() < lo or x.max() > hi or not np.all(np.isfinite(x))):
        raise ValueError(f"batch[{key!r}] has values in [{x.min()}, {x.max()}], expected within [{lo}, {hi}]")


def _check_padding(arr: Mapping[str, np.ndarray], key: str, valid: np.ndarray) -> None:
    if np.any(arr[key][~valid] != 0):
        raise ValueError(f"batch[{key!r}] has non-zero values in padding slots")


def empty_batch(schema: BatchSchema, batch_size: int) -> dict[str, np.ndarray]:
    """A batch of empty rows (all zeros): padding for the last eval batch."""
    return {k: np.zeros(shape, dtype) for k, (shape, dtype) in batch_spec(schema, batch_size).items()}


def num_rows(batch: Mapping[str, Any]) -> int:
    return int(np.shape(batch["user_id"])[0])


def slice_rows(batch: Mapping[str, np.ndarray], start: int, stop: int) -> dict[str, np.ndarray]:
    return {k: v[start:stop] for k, v in batch.items()}


def pad_rows(batch: Mapping[str, np.ndarray], batch_size: int) -> dict[str, np.ndarray]:
    """Append empty rows so the batch has exactly ``batch_size`` rows."""
    b = num_rows(batch)
    if b > batch_size:
        raise ValueError(f"batch has {b} rows, more than batch_size={batch_size}")
    if b == batch_size:
        return dict(batch)
    return {k: np.concatenate([v, np.zeros((batch_size - b, *v.shape[1:]), v.dtype)]) for k, v in batch.items()}


def concat_rows(batches: list[Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
    if not batches:
        raise ValueError("concat_rows needs at least one batch")
    return {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}


def random_batch(schema: BatchSchema, batch_size: int, seed: int = 0) -> dict[str, np.ndarray]:
    """A valid batch with random ids, lengths, times and labels: for tests and shape tracing.

    Lengths cover the edge cases (a full history, a one-event history, all and one
    candidate) whenever ``batch_size`` allows; the values carry no signal.
    """
    rng = np.random.default_rng(seed)
    b, n, c = batch_size, schema.history_len, schema.num_candidates
    batch = empty_batch(schema, b)
    hist_len = rng.integers(1, n + 1, size=b)
    num_cand = rng.integers(1, c + 1, size=b)
    hist_len[: min(b, 2)] = [n, 1][: min(b, 2)]
    num_cand[: min(b, 2)] = [c, 1][: min(b, 2)]
    hist_valid = np.arange(n)[None, :] < hist_len[:, None]
    cand_valid = np.arange(c)[None, :] < num_cand[:, None]
    batch["user_id"] = rng.integers(1, schema.num_users + 1, size=b).astype(np.int32)
    for name, vocab in schema.user_features:
        batch[f"user_{name}"] = rng.integers(1, vocab, size=b).astype(np.int32)
    for name, vocab in [("item", schema.num_items + 1), *schema.item_features]:
        batch[f"history_{name}"] = np.where(hist_valid, rng.integers(1, vocab, size=(b, n)), 0).astype(np.int32)
        batch[f"cand_{name}"] = np.where(cand_valid, rng.integers(1, vocab, size=(b, c)), 0).astype(np.int32)
    batch["history_action"] = np.where(hist_valid, rng.integers(1, schema.num_actions, size=(b, n)), 0).astype(
        np.int32
    )
    start = 1_000_000_000
    gaps = rng.integers(60, 86_400, size=(b, n)).cumsum(axis=1)
    batch["history_time"] = np.where(hist_valid, start + gaps, 0).astype(np.int32)
    batch["history_len"] = hist_len.astype(np.int32)
    last = np.take_along_axis(gaps, (hist_len - 1)[:, None], axis=1)[:, 0]
    batch["request_time"] = (start + last + rng.integers(1, 3600, size=b)).astype(np.int32)
    batch["num_candidates"] = num_cand.astype(np.int32)
    for task in schema.tasks:
        prob = rng.uniform(0.05, 0.95, size=(b, c))
        batch[f"label_{task}"] = np.where(cand_valid, rng.uniform(size=(b, c)) < prob, 0).astype(np.float32)
        if schema.has_true_probs:
            batch[f"prob_{task}"] = np.where(cand_valid, prob, 0).astype(np.float32)
    return batch

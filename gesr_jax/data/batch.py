"""The batch layout: the one place that names keys, groups, shapes, dtypes, value ranges and padding.

A batch is a flat ``dict[str, np.ndarray | jax.Array]`` holding B requests. Every producer (synthetic generator,
MovieLens request builder, ``api.example_batch``) emits exactly these keys, every consumer (models, metrics,
trainer) reads them, and :meth:`BatchSchema.fields` states them once. Everything else is derived from it:
:func:`validate_batch` (one function, three levels), :func:`check_part` (the models' shape check),
:func:`random_batch`, :func:`empty_batch` and the serving request checks (``gesr_jax/serving/requests.py``).

Request-only keys, one row per request (group ``request``):

=====================  ==========  =======  =============================================
key                    shape       dtype    values
=====================  ==========  =======  =============================================
``user_id``            [B]         int32    1..num_users; 0 marks a batch-padding row
``user_<f>``           [B]         int32    0..vocab-1, one per user feature ``f`` in the schema
``history_item``       [B, N]      int32    item ids 1..num_items, oldest first; 0 = padding
``history_<f>``        [B, N]      int32    0..vocab-1, one per item feature ``f`` (of that event's item)
``history_action``     [B, N]      int32    rating / action id of the event, 0..num_actions-1
``history_time``       [B, N]      int32    unix seconds of the event, >= 0 and < request_time
``history_len``        [B]         int32    0..N valid history slots; slots >= history_len are padding
``request_time``       [B]         int32    unix seconds of the request, >= 0
=====================  ==========  =======  =============================================

Per-candidate keys (group ``candidates``) and targets (group ``targets``):

=====================  ==========  =======  =============================================
``cand_item``          [B, C]      int32    candidate item ids 1..num_items; 0 = padding
``cand_<f>``           [B, C]      int32    0..vocab-1, one per item feature ``f``
``num_candidates``     [B]         int32    0..C valid candidate slots; slots >= num_candidates are padding
``label_<task>``       [B, C]      float32  0/1 label per task (0 in padding slots)
``prob_<task>``        [B, C]      float32  true probability per task; only when ``schema.has_true_probs``
=====================  ==========  =======  =============================================

Item ids (``history_item``, ``cand_item``) may exceed ``num_items`` when ``schema.hash_buckets > 0``
(``data.hash_buckets``): the item tables hash them into that many extra rows (``layers/core.Embed``).

Conventions: id 0 is reserved for padding and out-of-vocabulary in every id space, so every vocabulary size
counts id 0. All padding is on the right and every padded slot holds zeros. A row with ``history_len == 0`` and
``num_candidates == 0`` is an empty row (used to pad the last eval batch) and contributes nothing to losses or
metrics. A serving request (one row) carries 0..N history events and 1..``MAX_REQUEST_CANDIDATES`` candidates.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np

TASKS: tuple[str, ...] = ("consume", "engage")

# The three groups of a batch. Models read the request part once per request and the candidate part per
# candidate chunk; targets are only read by losses and metrics. ``BatchSchema.fields`` is the one place that
# assigns keys to groups: code must never find a group by key prefixes.
REQUEST, CANDIDATES, TARGETS = "request", "candidates", "targets"
# The slot axis of a field: one value per row [B], per history slot [B, N] or per candidate slot [B, C].
ROW, HISTORY, CANDIDATE = "row", "history", "candidate"
# The length key that marks the valid slots of each slot axis.
LENGTH_KEY = {HISTORY: "history_len", CANDIDATE: "num_candidates"}
# The most candidates one serving request may carry (README, docs/serving.md); the Scorer refuses more.
MAX_REQUEST_CANDIDATES = 10_000
INT32_MAX = int(np.iinfo(np.int32).max)


@dataclasses.dataclass(frozen=True)
class Field:
    """One batch key: its group, slot axis, dtype and the range of its values."""

    key: str
    group: str  # REQUEST, CANDIDATES or TARGETS
    slots: str  # ROW, HISTORY or CANDIDATE
    dtype: np.dtype
    lo: float  # every value (padding zeros included) lies in [lo, hi]
    hi: float
    real_lo: float | None = None  # the smallest value of a real entry (a valid slot, a serving request); None = lo
    what: str = "id"  # the kind of value, for error messages: "id", "user id", "time", "length", "target"
    draw_hi: float | None = None  # random_batch's upper bound where ``hi`` is open-ended (hashed ids); None = hi

    @property
    def real_min(self) -> float:
        return self.lo if self.real_lo is None else self.real_lo

    def shape(self, batch_size: int, history_len: int, num_candidates: int) -> tuple[int, ...]:
        width = {ROW: None, HISTORY: history_len, CANDIDATE: num_candidates}[self.slots]
        return (batch_size,) if width is None else (batch_size, width)


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
    # data.hash_buckets: > 0 lets item ids exceed num_items; the item tables hash them into this many extra rows
    hash_buckets: int = 0

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

    def item_hash_buckets(self, name: str) -> int:
        """Extra hashed rows of a history/candidate field's table: ``hash_buckets`` for ``item``, else 0."""
        return self.hash_buckets if name == "item" else 0

    def fields(self) -> tuple[Field, ...]:
        """Every key of a batch of this schema, in the layout's order."""
        i32, f32 = np.dtype(np.int32), np.dtype(np.float32)
        n, c, items = self.history_len, self.num_candidates, self.num_items
        # With hashing, any non-negative item id is valid: ids past num_items go to the hashed rows.
        item_hi, item_draw = (INT32_MAX, items) if self.hash_buckets > 0 else (items, None)
        out = [Field("user_id", REQUEST, ROW, i32, 0, self.num_users, real_lo=1, what="user id")]
        out += [Field(f"user_{name}", REQUEST, ROW, i32, 0, vocab - 1) for name, vocab in self.user_features]
        out.append(Field("history_item", REQUEST, HISTORY, i32, 0, item_hi, real_lo=1, draw_hi=item_draw))
        out += [Field(f"history_{name}", REQUEST, HISTORY, i32, 0, v - 1) for name, v in self.item_features]
        out.append(Field("history_action", REQUEST, HISTORY, i32, 0, self.num_actions - 1))
        out.append(Field("history_time", REQUEST, HISTORY, i32, 0, INT32_MAX, what="time"))
        out.append(Field("history_len", REQUEST, ROW, i32, 0, n, what="length"))
        out.append(Field("request_time", REQUEST, ROW, i32, 0, INT32_MAX, what="time"))
        out.append(Field("cand_item", CANDIDATES, CANDIDATE, i32, 0, item_hi, real_lo=1, draw_hi=item_draw))
        out += [Field(f"cand_{name}", CANDIDATES, CANDIDATE, i32, 0, v - 1) for name, v in self.item_features]
        out.append(Field("num_candidates", CANDIDATES, ROW, i32, 0, c, what="length"))
        for task in self.tasks:
            out.append(Field(f"label_{task}", TARGETS, CANDIDATE, f32, 0.0, 1.0, what="target"))
            if self.has_true_probs:
                out.append(Field(f"prob_{task}", TARGETS, CANDIDATE, f32, 0.0, 1.0, what="target"))
        return tuple(out)

    def field_map(self) -> dict[str, Field]:
        return {f.key: f for f in self.fields()}

    def request_counts(self) -> dict[str, tuple[int, int]]:
        """How many valid slots one serving request may fill, per slot axis: (fewest, most)."""
        return {HISTORY: (0, self.history_len), CANDIDATE: (1, MAX_REQUEST_CANDIDATES)}


def batch_spec(schema: BatchSchema, batch_size: int) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """Every key of a batch with its shape and dtype."""
    n, c = schema.history_len, schema.num_candidates
    return {f.key: (f.shape(batch_size, n, c), f.dtype) for f in schema.fields()}


def batch_groups(schema: BatchSchema) -> dict[str, str]:
    """Group (REQUEST, CANDIDATES, TARGETS) of every batch key of ``schema``."""
    return {f.key: f.group for f in schema.fields()}


def split_batch(batch: Mapping[str, Any], schema: BatchSchema) -> tuple[dict[str, Any], dict[str, Any]]:
    """(request part, candidate part) of a flat batch; targets and unknown keys are left out.

    Only keys present in ``batch`` are returned, so a batch may omit features a model does not read.
    """
    groups = batch_groups(schema)
    request = {k: v for k, v in batch.items() if groups.get(k) == REQUEST}
    candidates = {k: v for k, v in batch.items() if groups.get(k) == CANDIDATES}
    return request, candidates


def lengths_mask(lengths: Any, n: int) -> Any:
    """``[..., n]`` bool mask of the slots below ``lengths`` (the valid slots of a right-padded axis).

    numpy in, numpy out (host-side data code); a jax array or tracer in, a jax array out (models).
    """
    if isinstance(lengths, jax.Array):
        return jnp.arange(n) < lengths[..., None]
    return np.arange(n) < np.asarray(lengths)[..., None]


Level = Literal["layout", "full", "inputs"]


def validate_batch(batch: Mapping[str, Any], schema: BatchSchema, *, level: Level = "full") -> None:
    """Raise ``ValueError`` naming the key (and row) of the first problem; host-side numpy, never in jit.

    ``level``:

    * ``"layout"``: exactly the schema's keys, each with its shape and dtype;
    * ``"full"`` (data producers): the layout, every value in its field's range, zeroed padding slots, no
      padding id inside a valid slot, history strictly before its request;
    * ``"inputs"`` (``api.apply``): only the request and candidate keys present are checked (targets are
      ignored, features a model does not read may be left out); any B >= 1, any history / candidate width,
      any integer dtype; lengths within the width, every value in its field's range, history strictly before
      its request.
    """
    if level not in ("layout", "full", "inputs"):
        raise ValueError(f"validate_batch level must be 'layout', 'full' or 'inputs', got {level!r}")
    if level == "inputs":
        fields, arr, width = _input_fields(batch, schema)
    else:
        fields, arr, width = _layout_fields(batch, schema)
        if level == "layout":
            return
    # Lengths first: the other checks read the valid slots they mark.
    for f in sorted(fields, key=lambda f: f.what != "length"):
        _check_rows(arr, f.key, f.lo, width[f.key] if f.what == "length" else f.hi)
    valid = {slots: lengths_mask(arr[key], width[key]) for slots, key in LENGTH_KEY.items()}
    for f in fields:
        if f.slots == ROW:
            continue
        if level == "full":
            _check_padding(arr, f.key, valid[f.slots])
        if f.real_lo is not None and np.any(valid[f.slots] & (arr[f.key] < f.real_lo)):
            row = int(np.argwhere(valid[f.slots] & (arr[f.key] < f.real_lo))[0][0])
            raise ValueError(f"batch[{f.key!r}] row {row} holds padding id 0 inside {LENGTH_KEY[f.slots]}")
    if "history_time" in arr and "request_time" in arr:
        late = valid[HISTORY] & (arr["history_time"] >= arr["request_time"][:, None])
        if np.any(late):
            row = int(np.argwhere(late)[0][0])
            raise ValueError(f"batch['history_time'] row {row} has an event at or after its request_time")


def _layout_fields(batch: Mapping[str, Any], schema: BatchSchema):
    """(fields, numpy arrays, slot widths) of a batch that must match the schema's layout exactly."""
    if "user_id" not in batch:
        raise ValueError("batch has no 'user_id'")
    spec = batch_spec(schema, int(np.shape(batch["user_id"])[0]))
    missing = sorted(set(spec) - set(batch))
    if missing:
        raise ValueError(f"batch is missing keys {missing}")
    extra = sorted(set(batch) - set(spec))
    if extra:
        raise ValueError(f"batch has unknown keys {extra}; the layout is documented in gesr_jax/data/batch.py")
    for key, (shape, dtype) in spec.items():
        if tuple(np.shape(batch[key])) != shape:
            raise ValueError(f"batch[{key!r}] has shape {tuple(np.shape(batch[key]))}, expected {shape}")
        if np.dtype(batch[key].dtype) != dtype:
            raise ValueError(f"batch[{key!r}] has dtype {batch[key].dtype}, expected {dtype}")
    width = {"history_len": schema.history_len, "num_candidates": schema.num_candidates}
    return schema.fields(), {k: np.asarray(v) for k, v in batch.items()}, width


def _input_fields(batch: Mapping[str, Any], schema: BatchSchema):
    """(present model-input fields, numpy arrays, slot widths) for the ``inputs`` level."""
    present = [f for f in schema.fields() if f.group != TARGETS and f.key in batch]
    arr = {f.key: np.asarray(batch[f.key]) for f in present}
    for anchor in ("history_item", "cand_item", "history_len", "num_candidates"):
        if anchor not in arr:
            raise ValueError(f"batch has no {anchor!r}; the layout is documented in gesr_jax/data/batch.py")
    b = arr["history_item"].shape[0] if arr["history_item"].ndim == 2 else -1
    if b < 1:
        raise ValueError(f"batch['history_item'] must be [B >= 1, N], got shape {arr['history_item'].shape}")
    width = {"history_len": arr["history_item"].shape[1], "num_candidates": np.shape(arr["cand_item"])[-1]}
    for f in present:
        expected = f.shape(b, width["history_len"], width["num_candidates"])
        if arr[f.key].shape != expected:
            raise ValueError(f"batch[{f.key!r}] has shape {arr[f.key].shape}, expected {expected}")
        if not np.issubdtype(arr[f.key].dtype, np.integer):
            raise ValueError(f"batch[{f.key!r}] has dtype {arr[f.key].dtype}, expected an integer type (int32)")
    return present, arr, width


def _check_rows(arr: Mapping[str, np.ndarray], key: str, lo: float, hi: float) -> None:
    x = arr[key]
    bad = (x < lo) | (x > hi) | ~np.isfinite(x)
    if np.any(bad):
        where = tuple(int(i) for i in np.argwhere(bad)[0])
        past = key.endswith("_item") and x[where] > hi
        hint = " (data.hash_buckets > 0 hashes item ids past the vocabulary)" if past else ""
        raise ValueError(
            f"batch[{key!r}] row {where[0]} holds {x[where]} (at index {where}), outside [{lo}, {hi}] "
            f"for this schema{hint}"
        )


def _check_padding(arr: Mapping[str, np.ndarray], key: str, valid: np.ndarray) -> None:
    bad = ~valid & (arr[key] != 0)
    if np.any(bad):
        row, slot = (int(i) for i in np.argwhere(bad)[0])
        raise ValueError(f"batch[{key!r}] row {row} has a non-zero value in padding slot {slot}")


def check_part(part: Mapping[str, Any], keys: tuple[str, ...], schema: BatchSchema, group: str) -> tuple[int, int]:
    """Check that the ``group`` part (REQUEST or CANDIDATES) has ``keys`` with consistent shapes; (B, N or C).

    Shape and dtype only (works on tracers: the models call it); values are :func:`validate_batch`'s job.
    The slot width may differ from the schema's N / C (serving scores chunks of any size).
    """
    by_key = schema.field_map()
    anchor = "history_item" if group == REQUEST else "cand_item"
    lengths = "history_len" if group == REQUEST else "num_candidates"
    for key in dict.fromkeys((anchor, lengths, *keys)):
        if key not in part:
            raise ValueError(f"the {group} part of the batch has no {key!r}; the layout is in gesr_jax/data/batch.py")
    if len(np.shape(part[anchor])) != 2:
        raise ValueError(f"batch[{anchor!r}] must be 2-D [B, N or C], got shape {tuple(np.shape(part[anchor]))}")
    b, width = np.shape(part[anchor])
    for key in dict.fromkeys((lengths, *keys)):
        if key not in by_key or by_key[key].group != group:
            raise ValueError(f"batch key {key!r} is not in the {group} group of this schema")
        expected = by_key[key].shape(b, width, width)
        shape = tuple(np.shape(part[key]))
        if shape != expected:
            raise ValueError(f"batch[{key!r}] has shape {shape}, expected {expected}")
        if not jnp.issubdtype(part[key].dtype, jnp.integer):
            raise ValueError(f"batch[{key!r}] has dtype {part[key].dtype}, expected an integer type")
    return int(b), int(width)


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

    Ids are drawn from each field's real range (``BatchSchema.fields``). Lengths cover the edge cases (a full
    history, a one-event history, all and one candidate) whenever ``batch_size`` allows; the values carry no
    signal. The draw order is fixed, so a seed gives the same batch on every version.
    """
    rng = np.random.default_rng(seed)
    b, n, c = batch_size, schema.history_len, schema.num_candidates
    by_key = schema.field_map()
    batch = empty_batch(schema, b)

    def ids(key: str, shape: tuple[int, ...]) -> np.ndarray:
        f = by_key[key]
        return rng.integers(max(f.real_min, 1), (f.hi if f.draw_hi is None else f.draw_hi) + 1, size=shape)

    hist_len = rng.integers(1, n + 1, size=b)
    num_cand = rng.integers(1, c + 1, size=b)
    hist_len[: min(b, 2)] = [n, 1][: min(b, 2)]
    num_cand[: min(b, 2)] = [c, 1][: min(b, 2)]
    hist_valid, cand_valid = lengths_mask(hist_len, n), lengths_mask(num_cand, c)
    batch["user_id"] = ids("user_id", (b,)).astype(np.int32)
    for name in schema.user_feature_names:
        batch[f"user_{name}"] = ids(f"user_{name}", (b,)).astype(np.int32)
    for name in ("item", *schema.item_feature_names):
        batch[f"history_{name}"] = np.where(hist_valid, ids(f"history_{name}", (b, n)), 0).astype(np.int32)
        batch[f"cand_{name}"] = np.where(cand_valid, ids(f"cand_{name}", (b, c)), 0).astype(np.int32)
    batch["history_action"] = np.where(hist_valid, ids("history_action", (b, n)), 0).astype(np.int32)
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

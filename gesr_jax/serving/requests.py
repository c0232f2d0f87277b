"""Serving requests: validation of one request, its cache fingerprint, and packing into batch arrays.

A serving request is a dict (all ids 1-based; 0 is padding / out-of-vocabulary as in ``data/batch.py``)::

    {"user_id": 17, "user_<f>": ...,                              # one int per user feature of the schema
     "history_item": [...], "history_<f>": [...],                 # L <= N events, oldest first; <f> = every
     "history_action": [...], "history_time": [...],              #   item feature, action and time
     "request_time": 1_700_000_000,                               # > every history_time
     "cand_item": [...], "cand_<f>": [...]}                       # 1 <= C <= 10,000 candidates, one <f> per
                                                                  #   item feature

``history_<f>`` / ``cand_<f>`` of an item feature may be left out when the scorer holds an item table (the
feature is then looked up by item id). ``history_len`` / ``num_candidates`` may be given and must equal the
array lengths; ``label_*`` / ``prob_*`` keys are ignored. Anything else is a :class:`RequestError` naming the
field. Every key, its value range and the counts (``BatchSchema.request_counts``: L <= N events, 1 ..
``MAX_REQUEST_CANDIDATES`` candidates) come from ``BatchSchema.fields`` (``data/batch.py``), the one statement of the
batch layout. This module needs only numpy and the batch schema, so exported artifacts load without the models.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from gesr_jax.data.batch import CANDIDATE, CANDIDATES, HISTORY, REQUEST, ROW, TARGETS, BatchSchema, Field

_INT32 = np.iinfo(np.int32)


class RequestError(ValueError):
    """One request is malformed; ``field`` names the offending key and ``index`` its position in the call."""

    def __init__(self, message: str, *, field: str | None = None, index: int | None = None):
        self.message, self.field, self.index = message, field, index
        where = f"request {index}: " if index is not None else ""
        what = f"field {field!r}: " if field is not None else ""
        super().__init__(f"{where}{what}{message}")

    def with_index(self, index: int) -> RequestError:
        return RequestError(self.message, field=self.field, index=index)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, RequestError) and str(self) == str(other)

    def __hash__(self) -> int:
        return hash(str(self))


@dataclasses.dataclass
class ParsedRequest:
    """A validated request: int32 arrays keyed by batch key (history and candidates 1-D, user scalars)."""

    user: dict[str, int]  # user_id and user_<f>
    history: dict[str, np.ndarray]  # history_<field> [L]
    request_time: int
    candidates: dict[str, np.ndarray]  # cand_<field> [C]

    @property
    def user_id(self) -> int:
        return self.user["user_id"]

    @property
    def num_history(self) -> int:
        return int(self.history["history_item"].shape[0])

    @property
    def num_candidates(self) -> int:
        return int(self.candidates["cand_item"].shape[0])

    def fingerprint(self) -> str:
        """A hash of everything the request state depends on besides the user id.

        The history arrays and request_time (the paper's cache key), and also the user features: they
        enter the user tower, so a changed feature must not reuse a stale state.
        """
        h = hashlib.blake2b(digest_size=16)
        for key in sorted(self.user):
            h.update(f"{key}={self.user[key]};".encode())
        h.update(f"request_time={self.request_time};".encode())
        for key in sorted(self.history):
            arr = np.ascontiguousarray(self.history[key], np.int32)
            h.update(f"{key}[{arr.shape[0]}]".encode())
            h.update(arr.tobytes())
        return h.hexdigest()

    def cache_key(self) -> tuple[int, str]:
        return (self.user_id, self.fingerprint())


@functools.lru_cache(maxsize=64)
def _fields(schema: BatchSchema, slots: str) -> tuple[Field, ...]:
    """The model-input fields of one slot axis (HISTORY, CANDIDATE) or the request's own row fields (ROW).

    Cached per schema (a frozen dataclass): ``schema.fields()`` rebuilt per request was a third of a
    small model's serving call."""
    group = CANDIDATES if slots == CANDIDATE else REQUEST
    return tuple(f for f in schema.fields() if f.slots == slots and f.group == group)


@functools.lru_cache(maxsize=64)
def _known_keys(schema: BatchSchema) -> frozenset[str]:
    """Every batch key a request may carry (targets excluded)."""
    return frozenset(f.key for f in schema.fields() if f.group != TARGETS)


def _keys(schema: BatchSchema, slots: str) -> list[str]:
    return [f.key for f in _fields(schema, slots)]


def _ints(value: Any, field: str, ndim: int) -> np.ndarray:
    """``value`` as int32 with ``ndim`` dims (0: a scalar, also accepted as shape (1,)), or a RequestError."""
    try:
        arr = np.asarray(value)
    except (ValueError, TypeError) as err:  # ragged nested lists
        raise RequestError(f"cannot be read as an array ({err})", field=field) from None
    if arr.dtype.kind == "f":
        if not np.all(np.isfinite(arr)):
            raise RequestError("holds NaN or inf; ids and times must be finite integers", field=field)
        raise RequestError(f"has dtype {arr.dtype}; ids and times must be integers", field=field)
    if arr.dtype.kind not in "iu":
        raise RequestError(f"has dtype {arr.dtype}, expected integers", field=field)
    if ndim == 0 and arr.shape == (1,):
        arr = arr.reshape(())
    if arr.ndim != ndim:
        want = "a scalar" if ndim == 0 else "a 1-D array"
        raise RequestError(f"must be {want}, got shape {arr.shape}", field=field)
    if arr.dtype != np.int32 and arr.size and (arr.min() < _INT32.min or arr.max() > _INT32.max):
        raise RequestError("holds values outside int32", field=field)
    return arr.astype(np.int32)


def _check_field(arr: np.ndarray, field: Field) -> None:
    """Every value of a real entry lies in the field's range (padding ids are no request's values)."""
    _check_range(arr, field.key, int(field.real_min), int(field.hi), field.what)


def _check_range(arr: np.ndarray, field: str, lo: int, hi: int, what: str = "id") -> None:
    if arr.size == 0 or (arr.min() >= lo and arr.max() <= hi):  # two reductions; no mask unless one is bad
        return
    bad = (arr < lo) | (arr > hi)
    if np.any(bad):
        pos = int(np.argmax(bad)) if arr.ndim else None
        value = int(arr[pos]) if pos is not None else int(arr)
        at = f" at position {pos}" if pos is not None else ""
        kind = "negative" if value < 0 else ("unknown" if value > hi else "invalid")
        raise RequestError(f"{kind} {what} {value}{at}; this model knows {lo}..{hi}", field=field)


def parse_request(
    request: Any,
    schema: BatchSchema,
    *,
    item_table: Mapping[str, np.ndarray] | None = None,
    max_candidates: int | None = None,
) -> ParsedRequest:
    """Validate one serving request against ``schema``; raises :class:`RequestError` naming the field."""
    if not isinstance(request, Mapping):
        raise RequestError(f"a request must be a dict, got {type(request).__name__}")
    row_fields = {f.key: f for f in _fields(schema, ROW) if f.what != "length"}
    known = _known_keys(schema)
    for key in request:
        if not isinstance(key, str):
            raise RequestError(f"keys must be strings, got {key!r}")
        if key not in known and not key.startswith(("label_", "prob_")):
            raise RequestError("is not a request field of this model (see gesr_jax/serving/requests.py)", field=key)
    item_table = item_table or {}

    values: dict[str, int] = {}
    for key, field in row_fields.items():
        if key not in request:
            raise RequestError("is missing", field=key)
        value = _ints(request[key], key, 0)
        _check_field(value, field)
        values[key] = int(value)
    request_time = values.pop("request_time")
    user = values  # user_id and user_<f>
    counts = schema.request_counts()

    history = _group(request, _fields(schema, HISTORY), "history_item", item_table)
    length = history["history_item"].shape[0]
    if length > counts[HISTORY][1]:
        raise RequestError(
            f"history has {length} events, more than this model's history_len N={schema.history_len}; "
            "send the most recent N",
            field="history_item",
        )
    if length and history["history_time"].max() >= request_time:
        pos = int(np.argmax(history["history_time"] >= request_time))
        raise RequestError(
            f"event {pos} is at or after request_time {request_time}; history must be strictly earlier",
            field="history_time",
        )
    candidates = _group(request, _fields(schema, CANDIDATE), "cand_item", item_table)
    fewest, most = counts[CANDIDATE]
    count = candidates["cand_item"].shape[0]
    if count < fewest:
        raise RequestError(f"has {count} candidates; a request scores {fewest} to {most}", field="cand_item")
    if count > most:
        raise RequestError(f"{count} candidates, more than the {most} one request may carry", field="cand_item")
    if max_candidates is not None and count > max_candidates:
        raise RequestError(f"{count} candidates, more than max_candidates={max_candidates}", field="cand_item")
    for key, arr in (("history_len", history["history_item"]), ("num_candidates", candidates["cand_item"])):
        if key in request and int(_ints(request[key], key, 0)) != arr.shape[0]:
            raise RequestError(f"is {int(np.asarray(request[key]))} but the arrays hold {arr.shape[0]}", field=key)
    return ParsedRequest(user, history, request_time, candidates)


def _group(
    request: Mapping[str, Any], fields: Sequence[Field], anchor: str, item_table: Mapping[str, np.ndarray]
) -> dict[str, np.ndarray]:
    """The 1-D arrays of one group (history or candidates), equal lengths, ids in range."""
    if anchor not in request:
        raise RequestError("is missing", field=anchor)
    items = _ints(request[anchor], anchor, 1)
    out: dict[str, np.ndarray] = {}
    prefix = anchor.split("_")[0] + "_"
    for field in fields:
        key = field.key
        feature = key[len(prefix) :]
        if key in request:
            arr = _ints(request[key], key, 1)
        elif feature in item_table and key != anchor:
            # Item features are a function of the item: a scorer with the item table looks them up.
            _check_range(items, anchor, 1, len(item_table[feature]) - 1, "item id")
            arr = np.asarray(item_table[feature], np.int32)[items]
        else:
            raise RequestError("is missing", field=key)
        if arr.shape != items.shape:
            raise RequestError(f"has length {arr.shape[0]} but {anchor!r} has {items.shape[0]}", field=key)
        _check_field(arr, field)
        out[key] = arr
    return out


def pack_requests(parsed: Sequence[ParsedRequest], schema: BatchSchema, rows: int) -> dict[str, np.ndarray]:
    """The request part of a batch with ``rows`` rows (``len(parsed)`` requests, then empty rows)."""
    n = schema.history_len
    out = {k: np.zeros(rows, np.int32) for k in _keys(schema, ROW)}
    history_keys = _keys(schema, HISTORY)
    out |= {k: np.zeros((rows, n), np.int32) for k in history_keys}
    for row, p in enumerate(parsed):
        for key, value in p.user.items():
            out[key][row] = value
        out["request_time"][row] = p.request_time
        out["history_len"][row] = p.num_history
        for key in history_keys:
            out[key][row, : p.num_history] = p.history[key]
    return out


def pack_candidates(
    parsed: Sequence[ParsedRequest], schema: BatchSchema, rows: int, width: int
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """``(cand_<field> [rows, width], num_candidates [rows])`` for the requests, zero-padded."""
    keys = _keys(schema, CANDIDATE)
    out = {k: np.zeros((rows, width), np.int32) for k in keys}
    counts = np.zeros(rows, np.int32)
    for row, p in enumerate(parsed):
        counts[row] = c = p.num_candidates
        for key in keys:
            out[key][row, :c] = p.candidates[key]
    return out, counts


def request_keys(schema: BatchSchema) -> list[str]:
    """The batch keys :func:`pack_requests` writes, in a fixed order."""
    return sorted(pack_requests([], schema, 1))


def candidate_keys(schema: BatchSchema) -> list[str]:
    """The batch keys of one candidate chunk (``cand_<field>`` and ``num_candidates``), sorted."""
    return sorted([*_keys(schema, CANDIDATE), "num_candidates"])


def requests_from_batch(batch: Mapping[str, np.ndarray], schema: BatchSchema) -> list[dict[str, np.ndarray]]:
    """The serving requests of a batch in the ``data/batch.py`` layout (one per row, padding cut off).

    Empty rows (``history_len == 0`` and ``num_candidates == 0``) are kept, so row i is request i.
    """
    history_keys, cand_keys = _keys(schema, HISTORY), _keys(schema, CANDIDATE)
    row_keys = [k for k in _keys(schema, ROW) if k != "history_len"]
    out = []
    for row in range(int(np.shape(batch["user_id"])[0])):
        n, c = int(batch["history_len"][row]), int(batch["num_candidates"][row])
        request: dict[str, Any] = {k: int(batch[k][row]) for k in row_keys}
        request |= {k: np.asarray(batch[k][row, :n], np.int32) for k in history_keys}
        request |= {k: np.asarray(batch[k][row, :c], np.int32) for k in cand_keys}
        out.append(request)
    return out

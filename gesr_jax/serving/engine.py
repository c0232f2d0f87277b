"""The serving loop shared by the live :class:`~gesr_jax.serving.scorer.Scorer` and exported artifacts.

An :class:`Engine` is given two traceable functions, ``encode(consts, request) -> state`` and
``score(consts, state, candidates) -> probabilities [T, R, C]``, and runs a call's requests through them:
validate each request (a bad one becomes a :class:`RequestError` in its slot), group the good ones into
request batches of a bucket size, encode each batch once (or take its rows from the user-state cache), and
score the candidates in chunks of bucket sizes. Everything it jits is compiled once per bucket shape;
``trace_counts`` counts the traces (one per compile), so tests can check nothing recompiles after
:meth:`Engine.warmup`. The engine uses only jax and numpy: no model code.
"""

from __future__ import annotations

import collections
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from gesr_jax.data.batch import BatchSchema
from gesr_jax.serving.artifact import ArtifactUnavailable, ExportError
from gesr_jax.serving.blocking import DEFAULT_GROUP, blocked_score, rowwise_encode
from gesr_jax.serving.buckets import Buckets
from gesr_jax.serving.requests import ParsedRequest, RequestError, pack_candidates, pack_requests, parse_request
from gesr_jax.serving.user_cache import UserStateCache

EncodeFn = Callable[[Any, dict[str, jax.Array]], Any]
ScoreFn = Callable[[Any, Any, dict[str, jax.Array]], jax.Array]
Result = dict[str, np.ndarray] | RequestError


class Engine:
    """Bucketed, chunked, cached scoring of serving requests with a given encode/score pair."""

    def __init__(
        self,
        schema: BatchSchema,
        consts: Any,
        encode: EncodeFn,
        score: ScoreFn,
        *,
        buckets: Buckets | None = None,
        item_table: Mapping[str, np.ndarray] | None = None,
        user_cache: UserStateCache | None = None,
        max_candidates: int | None = None,
        score_block: int | None = None,
        score_group: int = DEFAULT_GROUP,
        fuse_encode: bool = False,
        coarse_chunks: bool = False,
    ):
        self.schema, self.tasks = schema, tuple(schema.tasks)
        # Arrays passed to every call (params, item cache): arguments, not constants. Flattened once here: a
        # call then hands jax a flat list of arrays, not the params' nested pytree to flatten again per call.
        leaves, treedef = jax.tree.flatten(consts)
        self.consts = leaves
        self.score_block = score_block
        # coarse_chunks: padding is cheap (blocked scoring skips padding blocks), so fewer, larger chunks.
        self.fuse_encode, self.coarse_chunks = fuse_encode, coarse_chunks
        if score_block is not None:  # request by request, candidate blocks: see serving/blocking.py
            encode = rowwise_encode(encode, score_group)
            score = blocked_score(score, score_block, len(self.tasks), score_group)
        encode, score = _unflattening(encode, treedef), _unflattening(score, treedef)
        self.buckets = buckets or Buckets()
        self.item_table = {k: np.asarray(v, np.int32) for k, v in (item_table or {}).items()}
        self.user_cache = user_cache
        self.max_candidates = max_candidates
        self.trace_counts: collections.Counter[str] = collections.Counter()
        self._encode = jax.jit(self._counted("encode", encode))
        self._score = jax.jit(self._counted("score", score))

        def encode_score(consts: Any, request: dict[str, jax.Array], candidates: dict[str, jax.Array]) -> Any:
            state = encode(consts, request)
            return state, score(consts, state, candidates)

        # fuse_encode: without a user-state cache, a group's first chunk encodes and scores in one call.
        self._encode_score = jax.jit(self._counted("encode_score", encode_score))
        self._split = jax.jit(self._counted("split", _split_rows))
        self._stack = jax.jit(self._counted("stack", _stack_rows))

    def _counted(self, name: str, fn: Callable) -> Callable:
        def traced(*args: Any) -> Any:
            # Runs only while jax traces, i.e. once per compiled shape.
            self.trace_counts[name] += 1
            return fn(*args)

        return traced

    @property
    def num_compiles(self) -> int:
        """Traces of every jitted serving function so far (one per compiled shape)."""
        return sum(self.trace_counts.values())

    # ------------------------------------------------------------------------------------------ public

    def parse(self, request: Any, index: int | None = None) -> ParsedRequest:
        """Validate one request (raises :class:`RequestError`)."""
        try:
            return parse_request(request, self.schema, item_table=self.item_table, max_candidates=self.max_candidates)
        except RequestError as err:
            raise err.with_index(index) if index is not None else err from None

    def score(self, requests: Sequence[Any]) -> list[Result]:
        """Per request, in input order: ``{task: probabilities [C]}`` or the :class:`RequestError` it raised."""
        if isinstance(requests, Mapping):
            raise TypeError("score takes a list of requests; wrap a single request as [request]")
        results: list[Result | None] = [None] * len(requests)
        good: list[tuple[int, ParsedRequest]] = []
        for i, request in enumerate(requests):
            try:
                good.append((i, self.parse(request, i)))
            except RequestError as err:
                results[i] = err
        # Requests with similar candidate counts share a batch, so short lists are not padded to long ones.
        good.sort(key=lambda item: -item[1].num_candidates)
        step = self.buckets.max_requests
        for start in range(0, len(good), step):
            group = good[start : start + step]
            try:
                probs = self._score_group([p for _, p in group])
            except ExportError as err:  # a damaged bucket artifact (lazy loading): fails this batch only
                for i, _ in group:
                    results[i] = ArtifactUnavailable(f"not scored: {err}", path=err.path, index=i)
                continue
            for row, (i, p) in enumerate(group):
                c = p.num_candidates
                results[i] = {t: probs[k, row, :c].copy() for k, t in enumerate(self.tasks)}
        return results  # type: ignore[return-value]

    def score_one(self, request: Any) -> dict[str, np.ndarray]:
        """Probabilities of one request; raises its :class:`RequestError`."""
        (result,) = self.score([request])
        if isinstance(result, RequestError):
            raise result
        return result

    def warmup(self) -> int:
        """Compile every bucket shape now (encode per request size, score per (request, chunk) size).

        Without a user-state cache (and with ``fuse_encode``) it also compiles the fused encode-and-score call
        per (request, chunk) size; set ``user_cache`` before warming up. Returns how many traces it added;
        afterwards no request shape compiles anything. A bucket whose
        artifact is damaged (an export loaded with ``verify="lazy"``) is skipped with a warning naming the
        file; its requests then get that error, and every other bucket serves.
        """
        before = self.num_compiles
        for rows in self.buckets.request_sizes:
            try:
                state = self._encode(self.consts, pack_requests([], self.schema, rows))
            except ExportError as err:
                warnings.warn(f"warmup skips request size {rows}: {err}", stacklevel=2)
                continue
            if self.user_cache is not None and rows > 1:
                state = self._stack(list(self._split(state)))
            for width in self.buckets.chunk_sizes:
                cands, counts = pack_candidates([], self.schema, rows, width)
                cands["num_candidates"] = counts
                try:
                    jax.block_until_ready(self._score(self.consts, state, cands))
                    if self._fused:
                        request = pack_requests([], self.schema, rows)
                        jax.block_until_ready(self._encode_score(self.consts, request, cands))
                except ExportError as err:
                    warnings.warn(f"warmup skips bucket {rows}x{width}: {err}", stacklevel=2)
        return self.num_compiles - before

    # ------------------------------------------------------------------------------------------ internals

    @property
    def _fused(self) -> bool:
        """Whether a group's first chunk runs as one encode-and-score call (``fuse_encode``, no user cache)."""
        return self.fuse_encode and self.user_cache is None

    def _score_group(self, group: list[ParsedRequest]) -> np.ndarray:
        """[T, rows, width] probabilities of one request batch (rows, width >= the group's real sizes)."""
        rows = self.buckets.request_bucket(len(group))
        plan = self.buckets.chunk_plan(max(p.num_candidates for p in group), coarse=self.coarse_chunks)
        if not plan:
            return np.zeros((len(self.tasks), rows, 0), np.float32)
        width = plan[-1][0] + plan[-1][1]
        cands, counts = pack_candidates(group, self.schema, rows, width)
        # Dispatch every chunk before reading any back: jax runs them asynchronously.
        outs, state = [], None
        for start, size in plan:
            part = {k: v[:, start : start + size] for k, v in cands.items()}
            part["num_candidates"] = np.clip(counts - start, 0, size).astype(np.int32)
            if state is None and self._fused:
                state, out = self._encode_score(self.consts, pack_requests(group, self.schema, rows), part)
            else:
                state = self._states(group, rows) if state is None else state
                out = self._score(self.consts, state, part)
            outs.append(out)
        if len(outs) == 1:
            return np.asarray(outs[0])
        return np.concatenate([np.asarray(o) for o in outs], axis=2)

    def _states(self, group: list[ParsedRequest], rows: int) -> Any:
        """The request state of a batch of ``rows`` rows whose first ``len(group)`` rows are ``group``."""
        if self.user_cache is None:
            return self._encode(self.consts, pack_requests(group, self.schema, rows))
        keys = [p.cache_key() for p in group]
        found: dict[Any, Any] = {}
        for key in dict.fromkeys(keys):
            state = self.user_cache.get(key)
            if state is not None:
                found[key] = state
        missing = [(k, p) for k, p in dict(zip(keys, group, strict=True)).items() if k not in found]
        step = self.buckets.max_requests
        for start in range(0, len(missing), step):
            part = missing[start : start + step]
            batch_rows = self.buckets.request_bucket(len(part))
            state = self._encode(self.consts, pack_requests([p for _, p in part], self.schema, batch_rows))
            split = (state,) if batch_rows == 1 else self._split(state)
            for (key, _), row_state in zip(part, split, strict=False):
                found[key] = row_state
                self.user_cache.put(key, row_state)
        row_states = [found[k] for k in keys]
        if rows == 1:
            return row_states[0]
        # Padding rows repeat row 0: their candidates are all padding, so their outputs are dropped.
        return self._stack(row_states + [row_states[0]] * (rows - len(row_states)))


def _unflattening(fn: Callable, treedef: Any) -> Callable:
    """``fn(consts, *args)`` taking the flat list of the consts' leaves instead of the consts pytree."""

    def call(leaves: list, *args: Any) -> Any:
        return fn(jax.tree.unflatten(treedef, leaves), *args)

    return call


def _split_rows(state: Any) -> tuple[Any, ...]:
    """A [R, ...] state pytree as R one-row ([1, ...]) pytrees."""
    rows = jax.tree.leaves(state)[0].shape[0]
    return tuple(jax.tree.map(lambda x, i=i: x[i : i + 1], state) for i in range(rows))


def _stack_rows(rows: list[Any]) -> Any:
    """One-row state pytrees concatenated into a [R, ...] pytree."""
    return jax.tree.map(lambda *xs: jnp.concatenate(xs, axis=0), *rows)


def sigmoid_stack(logits: Mapping[str, jax.Array], tasks: Sequence[str]) -> jax.Array:
    """[T, R, C] float32 probabilities from ``{task: logits [R, C]}``."""
    return jnp.stack([jax.nn.sigmoid(logits[t].astype(jnp.float32)) for t in tasks])

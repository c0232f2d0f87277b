"""Evaluators, registered by name and picked by ``train.evaluators``.

An evaluator factory takes the run's :class:`EvalContext` and returns a callable
``evaluator(params, split_arrays, split_name) -> {metric: float}``; it is built once per run, so its
jitted steps compile once and evaluate any split. Built in:

* ``candidate``: per-task NE / AUC / gAUC / logloss (+ oracle NE when the data has true probabilities)
  over each request's own candidates (:class:`gesr_jax.metrics.CandidateMetrics`); keys ``<task>/ne``, ...
* ``ranking``: each positive candidate of each request (``label_<first task> == 1``) ranked against the
  whole catalogue by the model's retrieval score, the other positives of its request and the padding
  item 0 left out; keys ``ranking/hr@K``, ``ranking/ndcg@K``, ``ranking/mrr``, ``ranking/num_targets``.
  It needs ``model_api.item_cache(graphdef, params, item_table) -> [V, Dt]`` and
  ``model_api.retrieval_scores(graphdef, params, request, item_cache) -> [B, V]``.
* ``ranking_clean``: ``ranking`` against the clean catalogue (gesr_jax/catalogue.py; keys ``ranking_clean/...``):
  list both ``ranking`` and ``ranking_clean`` to report the old and the new protocol side by side.

Register another with ``register_evaluator("name", factory)``; keys of all chosen evaluators are merged.
A candidate evaluation whose logits are NaN/Inf raises :class:`NonFinitePredictionsError`, and
:class:`FiniteProbe` is the trainer's "last good" check of a step before it is saved.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils

from gesr_jax import catalogue as catalogue_lib
from gesr_jax import metrics as metrics_lib
from gesr_jax.config import ConfigError
from gesr_jax.data import batch as batch_lib
from gesr_jax.data import datasets, pipeline
from gesr_jax.train import sharding as sharding_lib
from gesr_jax.train import step as step_lib

EvalFn = Callable[[Any, Mapping[str, np.ndarray], str], dict[str, float]]


@dataclasses.dataclass(frozen=True)
class EvalContext:
    """What an evaluator factory may use; ``params`` is the initial (placed) parameters, for shapes."""

    config: Any  # gesr_jax.config.Config
    model_api: Any
    graphdef: Any
    params: Any
    schema: batch_lib.BatchSchema
    tasks: tuple[str, ...]
    task_weights: tuple[float, ...]
    mesh: jax.sharding.Mesh
    params_sharding: Any
    splits: Any = None  # the run's splits (for an item table); None for a bare evaluate()


_REGISTRY: dict[str, Callable[[EvalContext], EvalFn]] = {}


class NonFinitePredictionsError(ValueError):
    """A model's logits on a split (or the probe batch) hold NaN/Inf: those params are unusable."""


def _valid_logits(host: Mapping[str, np.ndarray]) -> list[np.ndarray]:
    """The ``logit_<task>`` entries of real candidates (padding slots and padding rows left out)."""
    counts = np.asarray(host["num_candidates"])
    return [np.asarray(v)[batch_lib.lengths_mask(counts, v.shape[1])]
            for k, v in host.items() if k.startswith("logit_")]  # fmt: skip


def _require_finite(host: Mapping[str, np.ndarray], name: str) -> None:
    bad = sum(int(np.sum(~np.isfinite(v))) for v in _valid_logits(host))
    if bad:
        raise NonFinitePredictionsError(f"the model's logits on the {name} split hold {bad} NaN/Inf values")


class FiniteProbe:
    """``probe(params) -> bool``: finite logits on a fixed batch (the first ``batch_size`` valid requests)?

    A step's params can be finite and still overflow every prediction (a huge learning rate); the trainer
    saves a step only when this holds, so every step on disk is usable ("last good" means usable).
    """

    def __init__(self, ctx: EvalContext, arrays: Mapping[str, np.ndarray]):
        local = pipeline.eval_dataset(arrays, ctx.config.train.eval_batch_size, name="valid split (probe batch)")[0]
        self._counts = _gather({"num_candidates": local["num_candidates"]})["num_candidates"]
        self._batch = sharding_lib.shard_batch(local, ctx.mesh)
        self._step = step_lib.make_eval_step(
            ctx.model_api, ctx.graphdef, ctx.tasks, mesh=ctx.mesh, params_sharding=ctx.params_sharding,
            batch_sharding=sharding_lib.batch_shardings(dict.fromkeys(local), ctx.mesh),
        )  # fmt: skip

    def __call__(self, params: Any) -> bool:
        host = {"num_candidates": self._counts, **jax.device_get(self._step(params, self._batch))}
        return all(bool(np.isfinite(v).all()) for v in _valid_logits(host))


def register_evaluator(name: str, factory: Callable[[EvalContext], EvalFn], *, replace: bool = False) -> None:
    """Make ``name`` usable in ``train.evaluators``; ``factory(context)`` builds the evaluator once per run."""
    if name in _REGISTRY and not replace and _REGISTRY[name] is not factory:
        raise ValueError(f"evaluator {name!r} is already registered (pass replace=True to override it)")
    _REGISTRY[name] = factory


def get_evaluator(name: str) -> Callable[[EvalContext], EvalFn]:
    if name not in _REGISTRY:
        raise ConfigError(
            f"train.evaluators names {name!r}, which is not a registered evaluator; known: {sorted(_REGISTRY)}"
        )
    return _REGISTRY[name]


class Evaluators:
    """Several evaluators run one after the other on a split; their metric dicts are merged."""

    def __init__(self, named: Sequence[tuple[str, EvalFn]]):
        self.named = tuple(named)

    def __call__(self, params: Any, arrays: Mapping[str, np.ndarray], name: str = "eval") -> dict[str, float]:
        merged: dict[str, float] = {}
        for evaluator_name, evaluator in self.named:
            result = evaluator(params, arrays, name)
            clash = sorted(set(result) & set(merged))
            if clash:
                raise ValueError(f"evaluator {evaluator_name!r} reports keys {clash} that an earlier one already did")
            merged.update(result)
        return merged


def build_evaluators(names: Sequence[str], context: EvalContext) -> Evaluators:
    return Evaluators([(name, get_evaluator(name)(context)) for name in names])


def _gather(host: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    # Model outputs come back replicated for the global batch; gather the other hosts' rows to match.
    return multihost_utils.process_allgather(host, tiled=True) if jax.process_count() > 1 else host


class CandidateEvaluator:
    """Runs the jitted eval step over a split and computes :class:`~gesr_jax.metrics.CandidateMetrics`."""

    def __init__(
        self,
        model_api: Any,
        graphdef: Any,
        tasks: Sequence[str],
        task_weights: Sequence[float],
        batch_size: int,
        mesh: jax.sharding.Mesh,
        params_sharding: Any,
    ):
        self._model_api, self._graphdef, self._mesh = model_api, graphdef, mesh
        self._tasks, self._weights = tuple(tasks), tuple(task_weights)
        self._batch_size, self._params_sharding = batch_size, params_sharding
        self._steps: dict[tuple[str, ...], Callable[..., Any]] = {}
        self._warm: set[tuple[str, ...]] = set()  # key sets whose eval step has run (compiled) once

    @classmethod
    def from_context(cls, ctx: EvalContext) -> CandidateEvaluator:
        return cls(ctx.model_api, ctx.graphdef, ctx.tasks, ctx.task_weights, ctx.config.train.eval_batch_size,
                   ctx.mesh, ctx.params_sharding)  # fmt: skip

    def _step(self, keys: tuple[str, ...]) -> Callable[..., Any]:
        if keys not in self._steps:
            self._steps[keys] = step_lib.make_eval_step(
                self._model_api, self._graphdef, self._tasks, mesh=self._mesh, params_sharding=self._params_sharding,
                batch_sharding=sharding_lib.batch_shardings(dict.fromkeys(keys), self._mesh),
            )  # fmt: skip
        return self._steps[keys]

    def __call__(self, params: Any, arrays: Mapping[str, np.ndarray], name: str = "eval") -> dict[str, float]:
        """Metrics of ``params`` on every request of ``arrays`` (one split in the batch layout)."""
        keys = tuple(arrays)
        eval_step = self._step(keys)
        accumulator = metrics_lib.CandidateMetrics(self._tasks, self._weights)
        keep = ["user_id", "num_candidates", *(k for k in arrays if k.startswith(("label_", "prob_")))]
        start = time.perf_counter()
        pending = None
        for local in pipeline.make_iterator(pipeline.eval_dataset(arrays, self._batch_size, name=f"{name} split")):
            if keys not in self._warm:  # compile on the first batch, outside the timed throughput
                jax.block_until_ready(eval_step(params, sharding_lib.shard_batch(local, self._mesh)))
                self._warm.add(keys)
                start = time.perf_counter()
            # Dispatch this batch before pulling the previous one's logits, so host and device overlap.
            outputs = eval_step(params, sharding_lib.shard_batch(local, self._mesh))
            if pending is not None:
                accumulator.update(self._host_outputs(*pending, keep, name))
            pending = (local, outputs)
        if pending is not None:
            accumulator.update(self._host_outputs(*pending, keep, name))
        result = accumulator.compute()
        seconds = max(time.perf_counter() - start, 1e-9)  # without the first call's compilation
        result["requests_per_sec"] = pipeline.check_split(arrays, name) / seconds
        result["candidates_per_sec"] = float(np.sum(arrays["num_candidates"])) / seconds
        return result

    @staticmethod
    def _host_outputs(local: Mapping[str, np.ndarray], outputs: Any, keep: Sequence[str], name: str) -> dict[str, np.ndarray]:
        host = {**_gather({k: local[k] for k in keep}), **jax.device_get(outputs)}
        _require_finite(host, name)
        return host


class RankingEvaluator:
    """HR@K / NDCG@K / MRR of each request's positives against the whole catalogue, via the item cache."""

    _prefix, _extra_keys = "ranking", ()

    def __init__(self, ctx: EvalContext):
        api, self._graphdef, self._mesh, self._schema = ctx.model_api, ctx.graphdef, ctx.mesh, ctx.schema
        self._task, self._ks = ctx.tasks[0], tuple(ctx.config.train.ranking_ks)
        self._batch_size = ctx.config.train.eval_batch_size
        missing = [f for f in ("item_cache", "retrieval_scores") if not callable(getattr(api, f, None))]
        if missing:
            raise ConfigError(
                f"train.evaluators has 'ranking', but the model API {getattr(api, '__name__', api)!r} lacks {missing} "
                "(item_cache(graphdef, params, item_table) and retrieval_scores(graphdef, params, request, item_cache))"
            )
        table = getattr(ctx.splits, "item_table", None)
        if table is None:
            table = datasets.item_table(ctx.config.data)
        sizes = {k: len(v) for k, v in table.items()}
        if any(n != self._schema.num_items + 1 for n in sizes.values()):
            raise datasets.DataError(
                f"the item table has rows {sizes}, expected num_items + 1 = {self._schema.num_items + 1}"
            )
        self._table = {k: np.asarray(v, np.int32) for k, v in table.items()}
        graphdef, replicated = self._graphdef, sharding_lib.replicated(self._mesh)

        def cache_fn(params: Any) -> jax.Array:
            return api.item_cache(graphdef, params, self._table)

        def scores_fn(params: Any, request: Mapping[str, Any], cache: jax.Array) -> jax.Array:
            return api.retrieval_scores(graphdef, params, request, cache)

        # Trace both once now: a model without an item cache should fail before training, not after it.
        request, _ = batch_lib.split_batch(batch_lib.random_batch(self._schema, 1, seed=0), self._schema)
        try:
            jax.eval_shape(scores_fn, ctx.params, request, jax.eval_shape(cache_fn, ctx.params))
        except NotImplementedError as err:
            kind = ctx.config.model.kind
            raise ConfigError(
                f"train.evaluators has 'ranking', but model.kind {kind!r} cannot rank the catalogue ({err})"
            ) from None
        self._cache = jax.jit(cache_fn, in_shardings=(ctx.params_sharding,), out_shardings=replicated)
        self._scores = jax.jit(scores_fn, out_shardings=replicated)

    def __call__(self, params: Any, arrays: Mapping[str, np.ndarray], name: str = "eval") -> dict[str, float]:
        cache = self._cache(params)
        ranks = []
        for local in pipeline.make_iterator(pipeline.eval_dataset(arrays, self._batch_size, name=f"{name} split")):
            request, _ = batch_lib.split_batch(local, self._schema)
            scores = np.asarray(self._scores(params, sharding_lib.shard_batch(request, self._mesh), cache))
            keys = ("cand_item", "num_candidates", f"label_{self._task}", *self._extra_keys)
            host = _gather({k: local[k] for k in keys})
            ranks.append(self._ranks(scores, host))
        all_ranks = np.concatenate(ranks) if ranks else np.zeros(0)
        out: dict[str, float] = {f"{self._prefix}/num_targets": float(all_ranks.size)}
        if all_ranks.size:
            out |= {f"{self._prefix}/{k}": v for k, v in metrics_lib.ranking_metrics(all_ranks, self._ks).items()}
        return out

    def _ranks(self, scores: np.ndarray, host: Mapping[str, np.ndarray]) -> np.ndarray:
        """1-based catalogue rank of every positive of the batch (one row per positive)."""
        items = host["cand_item"]
        valid = batch_lib.lengths_mask(np.asarray(host["num_candidates"]), items.shape[1])
        return catalogue_ranks(scores, items, valid & (host[f"label_{self._task}"] == 1))


class CleanRankingEvaluator(RankingEvaluator):
    """``ranking_clean``: as ``ranking``, against the clean catalogue (gesr_jax/catalogue.py): the user's
    already-rated items, non-item ids and items never rated before the request are left out too."""

    _prefix, _extra_keys = "ranking_clean", ("user_id", "request_time")

    def __init__(self, ctx: EvalContext):
        super().__init__(ctx)
        try:
            self._catalogue = catalogue_lib.from_data_config(ctx.config.data)
        except ValueError as err:
            raise ConfigError(f"train.evaluators has 'ranking_clean': {err}") from None

    def _ranks(self, scores: np.ndarray, host: Mapping[str, np.ndarray]) -> np.ndarray:
        items = host["cand_item"]
        valid = batch_lib.lengths_mask(np.asarray(host["num_candidates"]), items.shape[1])
        positive = valid & (host[f"label_{self._task}"] == 1)
        exclude = self._catalogue.exclusions(host["user_id"], host["request_time"], np.where(positive, items, 0))
        return catalogue_ranks(scores, items, positive, exclude)


def catalogue_ranks(
    scores: np.ndarray, items: np.ndarray, positive: np.ndarray, exclude_ids: np.ndarray | None = None
) -> np.ndarray:
    """1-based rank of each positive candidate among the whole catalogue, in ``np.nonzero(positive)`` order.

    ``scores`` [B, V] scores every item id per request, ``items`` [B, C] the candidates' ids and
    ``positive`` [B, C] marks the positives. The padding item 0 and the request's other positives are
    left out, so each positive competes with non-positives only; ties count against it. ``exclude_ids``
    [B, V] (optional) leaves more ids out per request (the clean catalogue, gesr_jax/catalogue.py).
    """
    rows, cols = np.nonzero(positive)
    if rows.size == 0:
        return np.zeros(0)
    exclude = np.zeros((rows.size, scores.shape[1]), bool)
    if exclude_ids is not None:
        exclude |= np.asarray(exclude_ids, bool)[rows]
    exclude[:, 0] = True  # the padding item is not in the catalogue
    # Leave the request's other positives out, so each positive competes with non-positives only.
    for j in range(items.shape[1]):
        other = positive[rows, j] & (items[rows, j] != items[rows, cols])
        exclude[np.flatnonzero(other), items[rows[other], j]] = True
    return metrics_lib.target_ranks(scores[rows], items[rows, cols], exclude)


register_evaluator("candidate", CandidateEvaluator.from_context)
register_evaluator("ranking", RankingEvaluator)
register_evaluator("ranking_clean", CleanRankingEvaluator)

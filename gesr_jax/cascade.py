"""A two-stage cascade over the whole catalogue: a retriever's top K, re-ranked by a ranking model.

This is how an early-stage ranker is used: retrieval (here a trained two-tower, through its item
cache) narrows the catalogue to K items per request, and the ranker (GESR, or any registered kind)
orders those K. For every positive candidate of a request (``label_<task> == 1``, ``task`` = the
first task unless told) it reports the positive's rank

* ``retrieval``: among the whole catalogue by the retriever's dot product (what the ``ranking``
  evaluator reports), and
* ``cascade``: among the retriever's top K by the ranker's ``task`` logit, or a miss (rank = inf,
  so HR and NDCG count 0) when the positive is not in the top K.

As in the ``ranking`` evaluator, the padding item 0 is never ranked, and the request's other positives
are left out of each positive's list, so a positive competes with non-positives only: for a request
with P positives the retriever takes its top K + P - 1 items, and each positive's list is the first
K of them that are not another positive. Ties count against the positive (metrics.target_ranks).

Both runs must share the data section (the same test requests and item table); the retriever needs
``item_cache`` and ``retrieval_scores``, which every kind with towers has. Each run is restored at its
best valid step (:class:`gesr_jax.workdir.Workdir`) unless a step is given. ``experiments/cascade.py`` tabulates
this over paired seeds.
"""

from __future__ import annotations

import dataclasses
import math
import pathlib
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from gesr_jax import api, metrics as metrics_lib
from gesr_jax.data import batch as batch_lib
from gesr_jax.data import datasets
from gesr_jax.train import evaluators
from gesr_jax.workdir import StepChoice, Workdir


class CascadeError(ValueError):
    """The two runs cannot form a cascade (different data, a retriever without towers, ...)."""


@dataclasses.dataclass(frozen=True)
class Run:
    """A restored model: what :func:`cascade_ranks` needs of each stage."""

    graphdef: Any
    params: Any
    schema: batch_lib.BatchSchema
    config: Any  # gesr_jax.config.Config
    step: int
    workdir: pathlib.Path | None = None


def load_run(workdir: str | pathlib.Path, step: StepChoice = None, *, strict: bool = False) -> Run:
    """A ``gesr train`` workdir restored at ``step`` (default: its best valid step; see :class:`Workdir`)."""
    restored = Workdir(workdir).restore_model(step, strict=strict)
    return Run(restored.graphdef, restored.params, restored.schema, restored.config, restored.step,
               pathlib.Path(workdir))  # fmt: skip


def _check_pair(retriever: Run, ranker: Run, table: Mapping[str, np.ndarray]) -> None:
    if retriever.config.data != ranker.config.data:
        raise CascadeError(
            "the retriever and the ranker were trained on different data sections "
            f"({_where(retriever)} vs {_where(ranker)}); a cascade needs the same requests and item table"
        )
    missing = [name for name in ranker.schema.item_feature_names if name not in table]
    if missing:
        raise CascadeError(f"the item table lacks {missing}, which the ranker {_where(ranker)} reads per candidate")
    request, _ = batch_lib.split_batch(batch_lib.random_batch(retriever.schema, 1, seed=0), retriever.schema)
    try:
        jax.eval_shape(lambda p: api.retrieval_scores(retriever.graphdef, p, request, api.item_cache(
            retriever.graphdef, p, table)), retriever.params)  # fmt: skip
    except NotImplementedError as err:
        raise CascadeError(f"the retriever {_where(retriever)} cannot rank the catalogue ({err})") from None


def _where(run: Run) -> str:
    return str(run.workdir) if run.workdir is not None else f"model.kind={run.config.model.kind}"


def cascade_ranks(
    retriever: Run,
    ranker: Run,
    arrays: Mapping[str, np.ndarray],
    *,
    k: int = 200,
    task: str | None = None,
    batch_size: int = 64,
    item_table: Mapping[str, np.ndarray] | None = None,
    catalogue: Any | None = None,
) -> dict[str, np.ndarray]:
    """Per positive of ``arrays`` (one split, batch layout): ``{"retrieval": ranks, "cascade": ranks, "row": rows}``
    (``row``: the positive's request row in ``arrays``, for per-user or per-stratum breakdowns).

    ``catalogue``: None ranks against every id (the original protocol, "all"); a
    :class:`gesr_jax.catalogue.CleanCatalogue` leaves its exclusions out of both the retrieval ranks and the
    retriever's top-``k`` list ("clean").

    ``cascade`` ranks are inf where the positive is not in the retriever's top ``k``. ``task`` picks
    the label that marks positives and the ranker logit that orders the list (default: the first task).
    """
    table = dict(item_table) if item_table is not None else datasets.item_table(retriever.config.data)
    _check_pair(retriever, ranker, table)
    tasks = retriever.schema.tasks
    task = tasks[0] if task is None else task
    if task not in tasks:
        raise CascadeError(f"task {task!r} is not one of the data's tasks {list(tasks)}")
    if k < 1:
        raise CascadeError(f"k must be >= 1, got {k}")
    num_items = retriever.schema.num_items + 1
    if k > num_items - 1:
        raise CascadeError(f"k = {k} exceeds the catalogue's {num_items - 1} items")
    label = np.asarray(arrays[f"label_{task}"])
    valid = batch_lib.lengths_mask(np.asarray(arrays["num_candidates"]), label.shape[1])
    positives = valid & (label == 1)
    max_pos = int(positives.sum(axis=1).max()) if positives.size else 0
    width = min(k + max(max_pos - 1, 0), num_items - 1)  # the retriever's list per request

    cache = jax.jit(lambda p: api.item_cache(retriever.graphdef, p, table))(retriever.params)
    retrieve = jax.jit(lambda p, req, c, x: _top_items(api.retrieval_scores(retriever.graphdef, p, req, c), width, x))
    rerank = jax.jit(lambda p, req, cand: _ranker_logits(ranker.graphdef, p, req, cand, task))
    candidate_fields = ranker.schema.item_feature_names

    out: dict[str, list[np.ndarray]] = {"retrieval": [], "cascade": [], "row": []}
    items = np.asarray(arrays["cand_item"])
    for start in range(0, label.shape[0], batch_size):
        rows = slice(start, start + batch_size)
        pos = positives[rows]
        if not pos.any():
            continue
        batch = {key: np.asarray(v)[rows] for key, v in arrays.items()}
        request, _ = batch_lib.split_batch(batch, retriever.schema)
        exclude = np.zeros((pos.shape[0], num_items), bool)
        if catalogue is not None:
            keep = np.where(pos, items[rows], 0)
            exclude = catalogue.exclusions(batch["user_id"], batch["request_time"], keep)
        scores, top = (np.asarray(x) for x in retrieve(retriever.params, request, cache, exclude))
        cand = {"cand_item": top, "num_candidates": np.full(top.shape[0], top.shape[1], np.int32)}
        cand |= {f"cand_{name}": np.asarray(table[name])[top] for name in candidate_fields}
        ranker_request, _ = batch_lib.split_batch(batch, ranker.schema)
        logits = np.asarray(rerank(ranker.params, ranker_request, cand))
        # Whole catalogue: the ranking evaluator's own ranks (padding item and other positives left out).
        out["retrieval"].append(evaluators.catalogue_ranks(scores, items[rows], pos, exclude))
        # Where fewer ids than the list's width remain, top_k pads with excluded ids: never list them.
        listed = np.where(np.take_along_axis(exclude, top, axis=1), -1, top)
        out["cascade"].append(_list_ranks(listed, logits, items[rows], pos, k))
        out["row"].append(start + np.nonzero(pos)[0])  # np.nonzero order, as the ranks
    return {key: np.concatenate(v) if v else np.zeros(0) for key, v in out.items()}


def _top_items(scores: jax.Array, width: int, exclude: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(scores [B, V], the top ``width`` item ids [B, width] without the padding item and ``exclude``d ids, best first)."""
    masked = jnp.where(exclude, -jnp.inf, scores.at[:, 0].set(-jnp.inf))
    return scores, jax.lax.top_k(masked, width)[1].astype(jnp.int32)


def _ranker_logits(graphdef: Any, params: Any, request: Any, candidates: Any, task: str) -> jax.Array:
    state = api.encode_request(graphdef, params, request)
    return api.score(graphdef, params, state, candidates)[task]


def _list_ranks(top: np.ndarray, logits: np.ndarray, items: np.ndarray, positives: np.ndarray, k: int) -> np.ndarray:
    """Rank of every positive (``np.nonzero`` order) within its top-``k`` list by the ranker, inf if not listed.

    ``top`` entries of -1 are excluded ids (the clean catalogue) and are skipped."""
    rows, cols = np.nonzero(positives)
    ranks = np.full(rows.size, math.inf)
    for i, (row, target) in enumerate(zip(rows, items[rows, cols])):
        others = items[row][positives[row] & (items[row] != target)]
        listed = np.flatnonzero(~np.isin(top[row], others) & (top[row] >= 0))[:k]  # first k: no other positive, no -1
        hit = listed[top[row, listed] == target]
        if hit.size:  # ties count against the positive, as in metrics.target_ranks
            ranks[i] = np.count_nonzero(logits[row, listed] >= logits[row, hit[0]])
    return ranks


def cascade_metrics(ranks: Mapping[str, np.ndarray], ks: Sequence[int] = (10,)) -> dict[str, float]:
    """HR@K / NDCG@K / MRR of both stages (keys ``<stage>/hr@K``, ...), ``num_targets``, and ``retrieved_share``
    (the share of positives inside the retriever's top K: its recall@K, the ceiling of the cascade's HR)."""
    out: dict[str, float] = {"num_targets": float(len(ranks["cascade"]))}
    for stage in ("retrieval", "cascade"):
        out |= {f"{stage}/{key}": value for key, value in metrics_lib.ranking_metrics(ranks[stage], ks).items()}
    out["retrieved_share"] = float(np.mean(np.isfinite(ranks["cascade"])))
    return out

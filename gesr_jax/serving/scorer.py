"""The live serving scorer: any registered ranking model, one request encoded once, candidates in chunks.

::

    scorer = Scorer.from_workdir("runs/synth")                  # config.json + the best valid step
    scorer = Scorer(graphdef, params, schema, item_table=table, fp8=False, user_cache=UserStateCache())
    scorer.warmup()                                            # compile every bucket shape once
    results = scorer.score([request, ...])                     # [{task: probs [C]} | RequestError, ...]

The model enters only through ``api.encode_request`` / ``api.score`` / ``api.item_cache`` (the
``RankingModel`` contract), so every kind (``gesr``, ``two_tower``, ``genrank``, a user's own) serves the
same way. Request layout and errors: ``serving/requests.py``; buckets: ``serving/buckets.py``.
"""

from __future__ import annotations

import pathlib
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from flax import nnx

from gesr_jax import api
from gesr_jax.data import datasets
from gesr_jax.data.batch import BatchSchema
from gesr_jax.serving.blocking import DEFAULT_GROUP
from gesr_jax.serving.buckets import Buckets
from gesr_jax.serving.engine import Engine, sigmoid_stack
from gesr_jax.serving.requests import pack_requests
from gesr_jax.serving.user_cache import UserStateCache
from gesr_jax.workdir import StepChoice, Workdir

# Candidates per block inside a chunk call ([1, H, 256, N] f32 scores: 2 MiB at H=2, N=1024). On the 2-core
# benchmark box 256 beat 128 and 512 at N = 256, 1024 and 2048 once the attention's value product ran
# head-major (128 was best before; experiments/results/serving_cpu.md).
DEFAULT_SCORE_BLOCK = 256


def _state_has_history_axis(encode: Any, params: Any, schema: BatchSchema) -> bool:
    """Whether the encoded state of one request holds a [1, N, ...] tensor (traced shapes only, nothing runs)."""
    request = pack_requests([], schema, 1)
    shapes = jax.eval_shape(encode, {"params": params}, request)
    return any(x.ndim >= 3 and x.shape[1] == schema.history_len for x in jax.tree.leaves(shapes))


class Scorer(Engine):
    """Serves ``(graphdef, params)`` for ``schema``; see the module docstring.

    ``item_table`` (item feature name -> [V] ids, as ``data.datasets.item_table`` returns) builds the item
    cache when the model has one and fills item features a request leaves out; without it the cache is
    built only when the item tower reads the item id alone. ``use_item_cache=False`` never builds one. ``fp8=True`` serves
    ``api.quantize_fp8`` weights (kernels with at least ``fp8_min_elements`` entries). ``user_cache``
    enables user-state reuse. ``score_block`` (candidates) runs each chunk request by request in blocks of that
    many candidates inside one compiled call (``serving/blocking.py``: cache-sized buffers, no per-call page
    faults); ``None`` runs a chunk as one [R, C] batch; ``"auto"`` blocks (``DEFAULT_SCORE_BLOCK``) only when
    candidates attend over the history, i.e. the request state holds per-event tensors ([R, N, ...], e.g. K/V
    caches): a model whose state is a user vector (the two-tower) has no [C, N] work to block and would pay
    the loop for nothing. Without a user cache a request group's first chunk encodes and scores in one
    call; chunks are the largest buckets (then the smallest that holds the tail) when padding is cheap (blocked,
    or no history attention), else ``Buckets.chunk_plan``. ``score_group`` (request, block) units run per step (2:
    XLA on CPU picks a ~3x slower layout for the attention of a single row).
    """

    def __init__(
        self,
        graphdef: Any,
        params: Any,
        schema: BatchSchema,
        item_table: Mapping[str, np.ndarray] | None = None,
        *,
        buckets: Buckets | None = None,
        fp8: bool = False,
        fp8_min_elements: int = 4096,
        user_cache: UserStateCache | None = None,
        max_candidates: int | None = None,
        use_item_cache: bool = True,
        score_block: int | str | None = "auto",
        score_group: int = DEFAULT_GROUP,
    ):
        if fp8:
            graphdef, params = api.quantize_fp8(graphdef, params, min_elements=fp8_min_elements)
        self.graphdef, self.params, self.fp8 = graphdef, params, fp8
        model = nnx.merge(graphdef, params)
        self.kind = str(getattr(getattr(model, "config", None), "kind", type(model).__name__))
        cache = None
        if use_item_cache:
            try:
                cache = api.item_cache(graphdef, params, dict(item_table or {}))
            except NotImplementedError:
                cache = None  # the model has no item-side table: score runs its item side per chunk
            except ValueError:
                if item_table is not None:
                    raise
                cache = None  # the item tower reads item features and no table was given to look them up
        self.item_cache = cache
        tasks = tuple(schema.tasks)

        def encode(consts: Any, request: dict[str, jax.Array]) -> Any:
            return api.encode_request(graphdef, consts["params"], request)

        def score(consts: Any, state: Any, candidates: dict[str, jax.Array]) -> jax.Array:
            logits = api.score(graphdef, consts["params"], state, candidates, item_cache=consts["item_cache"])
            return sigmoid_stack(logits, tasks)

        attends = _state_has_history_axis(encode, params, schema)
        if score_block == "auto":
            score_block = DEFAULT_SCORE_BLOCK if attends else None
        elif score_block is not None and not isinstance(score_block, int):
            raise ValueError(f"score_block must be 'auto', None or a positive int, got {score_block!r}")
        super().__init__(
            schema, {"params": params, "item_cache": cache}, encode, score, buckets=buckets,
            item_table=item_table, user_cache=user_cache, max_candidates=max_candidates, score_block=score_block,
            score_group=score_group, fuse_encode=True, coarse_chunks=score_block is not None or not attends,
        )  # fmt: skip

    @classmethod
    def from_workdir(
        cls, workdir: str | pathlib.Path, step: StepChoice = None, *, strict: bool = False,
        with_item_table: bool = True, **kwargs: Any,
    ) -> Scorer:  # fmt: skip
        """A scorer for a ``gesr train`` workdir at ``step`` (default: its best valid step; see :class:`Workdir`).

        Refuses a workdir whose ``model.json`` names a model API other than the default ``gesr_jax.api``
        (this scorer drives only that API). ``kwargs`` go to :class:`Scorer` (buckets, fp8, user_cache, ...).
        """
        restored = Workdir(workdir).restore_model(step, strict=strict)
        table = datasets.item_table(restored.config.data) if with_item_table else None
        scorer = cls(restored.graphdef, restored.params, restored.schema, table, **kwargs)
        scorer.config, scorer.step, scorer.workdir = restored.config, restored.step, pathlib.Path(workdir)
        return scorer

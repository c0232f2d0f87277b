"""The pure-function surface of gesr_jax: build, run and feed any registered model.

::

    graphdef, params = api.init(config, seed=0, schema=schema)     # the model of config.model.kind
    batch = api.example_batch(config, seed=0, batch_size=8)
    logits = api.apply(graphdef, params, batch)                    # {"consume": [B, C], "engage": [B, C]}
    state = api.encode_request(graphdef, params, request)          # once per request
    logits = api.score(graphdef, params, state, candidates)        # per candidate chunk

``apply`` is ``score(encode_request(...))`` by construction. The batch layout (keys, shapes, dtypes,
padding, request/candidate groups) is documented in one place: ``gesr_jax/data/batch.py``. ``params``
holds only ``nnx.Param`` variables, each annotated with logical axis names; randomness for dropout and
stochastic length comes from the ``key`` argument. Every function is pure and jit-safe with ``graphdef``
static; ``validate=True`` (the default of :func:`apply`) checks concrete inputs against the schema on the
host first and is skipped for traced inputs (the jitted training step passes ``validate=False``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gesr_jax.config import Config
from gesr_jax.data.batch import BatchSchema, random_batch, split_batch, validate_batch
from gesr_jax.models import registry

GraphDef = Any  # nnx.GraphDef of a registered model; hashable, so it can be a static jit argument
Params = nnx.State


def _schema(config: Config, schema: BatchSchema | None) -> BatchSchema:
    if schema is not None:
        return schema
    from gesr_jax.data.datasets import schema_for  # lazy: dataset modules pull in file readers

    return schema_for(config.data)


def build(config: Config, seed: int, schema: BatchSchema | None = None) -> nnx.Module:
    """The model of ``config.model.kind`` as an ``nnx.Module`` (interactive use; training uses :func:`init`)."""
    _check_attention_impl(config)
    model_class = registry.get(config.model.kind).model_class()
    return model_class(config.model, _schema(config, schema), rngs=nnx.Rngs(params=seed))


def _check_attention_impl(config: Config) -> None:
    """A kernel backend named in an attention stack's ``attention_impl`` must run on this process's platform."""
    stacks = [(path, s.attention_impl) for path, s in config.model.attention_stacks() if s.attention_impl is not None]
    if not stacks:
        return
    from kernels.hstu_attention.registry import BACKENDS

    platform = "gpu" if jax.default_backend() == "cuda" else jax.default_backend()
    for path, name in stacks:
        if name in BACKENDS and platform not in BACKENDS[name].platforms:
            raise ValueError(
                f"{path}.attention_impl={name!r} runs on {list(BACKENDS[name].platforms)}, but this process runs "
                f"on {platform}; use {path}.attention_impl=None (the best backend here) or 'xla'"
            )


def init(config: Config, seed: int, schema: BatchSchema | None = None) -> tuple[GraphDef, Params]:
    """Build the model for ``config`` and split it into ``(graphdef, params)``.

    ``schema`` is the one the data gave (``splits.schema``); without it, it is derived from ``config.data``.
    """
    return nnx.split(build(config, seed, schema))


def abstract_init(config: Config, schema: BatchSchema | None = None) -> tuple[GraphDef, Params]:
    """Like :func:`init` but with ``jax.ShapeDtypeStruct`` leaves: shapes and shardings without allocating."""
    schema = _schema(config, schema)
    return nnx.split(nnx.eval_shape(lambda: build(config, 0, schema)))


def _is_concrete(tree: Any) -> bool:
    return not any(isinstance(x, jax.core.Tracer) for x in jax.tree.leaves(tree))


def apply(
    graphdef: GraphDef,
    params: Params,
    batch: Mapping[str, Any],
    *,
    key: jax.Array | None = None,
    train: bool = False,
    item_cache: jax.Array | None = None,
    validate: bool = True,
) -> dict[str, jax.Array]:
    """Final logits per task, each [B, C], for a batch in the batch.py layout.

    ``train=True`` enables dropout and stochastic length (both need ``key``). ``item_cache`` (from
    :func:`item_cache`) replaces the item tower by a lookup; logits are unchanged. Extra keys (labels,
    true probabilities) are ignored. ``validate`` checks ids, lengths, dtypes and history times (every
    event strictly before its ``request_time``: the serving Scorer's rule) of concrete inputs against the
    schema (``validate_batch(level="inputs")``, data/batch.py), naming the key and row of the first problem.
    """
    model = nnx.merge(graphdef, params)
    if validate and _is_concrete(batch):
        validate_batch(batch, model.schema, level="inputs")
    return model(batch, key=key, train=train, item_cache=item_cache)


def encode_request(
    graphdef: GraphDef,
    params: Params,
    request: Mapping[str, Any],
    *,
    key: jax.Array | None = None,
    train: bool = False,
) -> Any:
    """The request state of the model (a pytree with leading dim B) from the request part of a batch.

    A whole batch may be passed; only its request group is read.
    """
    model = nnx.merge(graphdef, params)
    request, _ = split_batch(request, model.schema)
    return model.encode_request(request, key=key, train=train)


def score(
    graphdef: GraphDef,
    params: Params,
    state: Any,
    candidates: Mapping[str, Any],
    *,
    item_cache: jax.Array | None = None,
    key: jax.Array | None = None,
    train: bool = False,
) -> dict[str, jax.Array]:
    """Logits {task: [B, C]} of a chunk of candidates (any C) against an encoded request state."""
    model = nnx.merge(graphdef, params)
    _, candidates = split_batch(candidates, model.schema)
    return model.score(state, candidates, key=key, train=train, item_cache=item_cache)


def item_cache(graphdef: GraphDef, params: Params, item_fields: Mapping[str, np.ndarray]) -> jax.Array:
    """Item-side outputs for every item id, [V, Dt] with row r = item r (row 0 = padding).

    ``item_fields`` maps each item feature name to its id per item ([V] int arrays, as
    ``data.datasets.item_table`` returns); ``"item"`` defaults to ``arange(V)``.
    """
    model = nnx.merge(graphdef, params)
    needed = model.item_cache_fields()
    missing = [f for f in needed if f != "item" and f not in item_fields]
    if missing:
        raise ValueError(f"item_cache: item_fields lacks {missing}; the item tower reads {list(needed)}")
    sizes = {f: len(item_fields[f]) for f in needed if f in item_fields}
    if len(set(sizes.values())) > 1:
        raise ValueError(f"item_cache: item_fields arrays differ in length: {sizes}")
    num = next(iter(sizes.values())) if sizes else model.schema.num_items + 1
    fields = {f: jnp.asarray(item_fields[f], jnp.int32) for f in needed if f in item_fields}
    fields.setdefault("item", jnp.arange(num, dtype=jnp.int32))
    return model.item_cache(fields)


def retrieval_scores(graphdef: GraphDef, params: Params, request: Mapping[str, Any], cache: jax.Array) -> jax.Array:
    """[B, V] two-tower dot products of each request's user vector with every item of ``cache``.

    What a retrieval stage ranks the whole catalogue by (the towers meet only in this dot product).
    """
    model = nnx.merge(graphdef, params)
    request, _ = split_batch(request, model.schema)
    state = model.encode_request(request)
    user = model.user_embedding(state)
    return user @ model.item_embedding_for_retrieval(cache).T


def example_batch(
    config: Config, seed: int, batch_size: int, schema: BatchSchema | None = None
) -> dict[str, np.ndarray]:
    """A valid random batch for ``config``'s dataset schema (values carry no signal)."""
    return random_batch(_schema(config, schema), batch_size, seed)


def num_params(params: Params) -> int:
    """Total number of scalar parameters."""
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(params)))


def quantize_fp8(graphdef: GraphDef, params: Params, *, min_elements: int = 4096) -> tuple[GraphDef, Params]:
    """Inference copy with large Dense kernels in float8_e4m3fn (per-column scales); see layers/quantize.py.

    Returns a new ``(graphdef, params)``; the inputs are not modified. For serving only.
    """
    from gesr_jax.layers.quantize import quantize_fp8 as _quantize

    model = nnx.merge(graphdef, jax.tree.map(lambda x: x, params))
    _quantize(model, min_elements=min_elements)
    return nnx.split(model)

"""The pure-function surface of gesr_jax: build, run and feed a GESR model.

::

    graphdef, params = api.init(config, seed=0)
    batch = api.example_batch(config, seed=0, batch_size=8)
    logits = api.apply(graphdef, params, batch)          # {"consume": [B, C], "engage": [B, C]}
    step_logits = jax.jit(api.apply, static_argnums=0)(graphdef, params, batch)

The batch layout (key names, shapes, dtypes, padding conventions) is documented in one
place: ``gesr_jax/data/batch.py``. ``params`` holds only ``nnx.Param`` variables, each
annotated with logical axis names (``nnx.get_partition_spec(params)``); randomness for
dropout and stochastic length comes from the ``key`` argument of :func:`apply`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gesr_jax.config import Config
from gesr_jax.data.batch import BatchSchema, random_batch
from gesr_jax.models.gesr import GESR

GraphDef = Any  # nnx.GraphDef[GESR]; hashable, so it can be a static jit argument
Params = nnx.State


def _schema(config: Config, schema: BatchSchema | None) -> BatchSchema:
    if schema is not None:
        return schema
    from gesr_jax.data.sources import schema_for  # lazy: data sources pull in file readers

    return schema_for(config.data)


def build(config: Config, seed: int, schema: BatchSchema | None = None) -> GESR:
    """The model as an ``nnx.Module`` (for interactive use; training uses :func:`init`)."""
    return GESR(config.model, _schema(config, schema), rngs=nnx.Rngs(params=seed))


def init(config: Config, seed: int, schema: BatchSchema | None = None) -> tuple[GraphDef, Params]:
    """Build the model for ``config`` (schema defaults to ``schema_for(config.data)``) and split it.

    Returns ``(graphdef, params)``: the static structure and an ``nnx.State`` of ``nnx.Param`` only.
    """
    return nnx.split(build(config, seed, schema))


def abstract_init(config: Config, schema: BatchSchema | None = None) -> tuple[GraphDef, Params]:
    """Like :func:`init` but with ``jax.ShapeDtypeStruct`` leaves: shapes and shardings without allocating."""
    schema = _schema(config, schema)
    model = nnx.eval_shape(lambda: GESR(config.model, schema, rngs=nnx.Rngs(params=0)))
    return nnx.split(model)


def apply(
    graphdef: GraphDef,
    params: Params,
    batch: Mapping[str, Any],
    *,
    key: jax.Array | None = None,
    train: bool = False,
    item_cache: jax.Array | None = None,
) -> dict[str, jax.Array]:
    """Final logits per task, each [B, C], for a batch in the batch.py layout.

    ``train=True`` enables dropout and stochastic length (both need ``key``). ``item_cache``
    (from :func:`item_cache`) replaces the item tower by a lookup; logits are unchanged.
    Extra batch keys (labels, true probabilities) are ignored. Pure: safe under ``jax.jit``
    with ``graphdef`` static.
    """
    model = nnx.merge(graphdef, params)
    arrays = {k: jnp.asarray(v) for k, v in batch.items()}
    return model(arrays, key=key, train=train, item_cache=item_cache)


def item_cache(graphdef: GraphDef, params: Params, item_fields: Mapping[str, np.ndarray]) -> jax.Array:
    """Item-tower output for every item id, [V, Dt] with row r = item r (row 0 = padding).

    ``item_fields`` maps each item feature name to its id per item ([V] int arrays, as
    ``data.sources.movielens_item_table`` returns); ``"item"`` defaults to ``arange(V)``.
    """
    model = nnx.merge(graphdef, params)
    needed = model.towers.item.fields
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


def example_batch(
    config: Config, seed: int, batch_size: int, schema: BatchSchema | None = None
) -> dict[str, np.ndarray]:
    """A valid random batch for ``config``'s dataset schema (values carry no signal)."""
    return random_batch(_schema(config, schema), batch_size, seed)


def num_params(params: Params) -> int:
    """Total number of scalar parameters."""
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(params)))


def quantize_fp8(graphdef: GraphDef, params: Params, *, min_elements: int = 4096) -> tuple[GraphDef, Params]:
    """Inference copy with large Dense kernels in float8_e4m3fn (per-column scales); see models/quantize.py.

    Returns a new ``(graphdef, params)``; the inputs are not modified. For serving only: the
    float8 kernels are not meant to be trained further.
    """
    from gesr_jax.models.quantize import quantize_fp8 as _quantize

    model = nnx.merge(graphdef, jax.tree.map(lambda x: x, params))
    _quantize(model, min_elements=min_elements)
    return nnx.split(model)

"""data.hash_buckets end to end: item ids past the vocabulary train, score and serve with hashing on, and are
refused by the batch validator (naming the field) with it off."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from gesr_jax import api
from gesr_jax import config as config_lib
from gesr_jax.config import Config
from gesr_jax.data import datasets
from gesr_jax.data.batch import validate_batch
from gesr_jax.data.config import DataConfig
from gesr_jax.layers import sharded_lookup
from gesr_jax.layers.core import FieldTables
from gesr_jax.models.config_sections import DecoderSection
from gesr_jax.models.genrank.config import GenRankConfig
from gesr_jax.models.genrank.model import GenRank
from gesr_jax.models.gesr.model import GESR
from gesr_jax.models.two_tower.config import TwoTowerConfig
from gesr_jax.models.two_tower.model import TwoTowerModel
from gesr_jax.serving.buckets import Buckets
from gesr_jax.serving.requests import requests_from_batch
from gesr_jax.serving.scorer import Scorer
from gesr_jax.train import step
from helpers.models import SCHEMA, TINY, batch_for

BUCKETS = 16
HASHED = dataclasses.replace(SCHEMA, hash_buckets=BUCKETS)
VOCAB = SCHEMA.num_items + 1
PAST = np.array([VOCAB, VOCAB + 3, 10**6, 2**31 - 1], np.int32)  # own rows, then hashed ones


def _gesr(schema):
    # One XLA attention layer keeps the compile short; the token and tower tables are what is under test.
    config = config_lib.replace(TINY, hstu={"layers": 1, "attention_impl": "xla"}, mlpg={"enabled": False})
    return GESR(config, schema, rngs=nnx.Rngs(params=0))


def _genrank(schema):
    decoder = DecoderSection(layers=1, head_dim=4, mlp_dim=8, attention_impl="xla")
    return GenRank(GenRankConfig(embed_dim=8, decoder=decoder, head_mlp=(8,)), schema, rngs=nnx.Rngs(params=0))


def _two_tower(schema):
    fields = {f: getattr(TINY, f) for f in TwoTowerConfig.__dataclass_fields__ if f != "kind"}
    return TwoTowerModel(TwoTowerConfig(**fields), schema, rngs=nnx.Rngs(params=0))


BUILDERS = {"gesr": _gesr, "genrank": _genrank, "two_tower": _two_tower}


@functools.cache
def _split(kind: str) -> tuple:
    """(graphdef, params) of a kind on HASHED, built once per session (building costs seconds of eager init)."""
    return nnx.split(BUILDERS[kind](HASHED))


def _batch_past_vocab(schema=HASHED):
    """A valid batch whose first row's history and candidates hold item ids past the vocabulary."""
    batch = batch_for(schema, batch_size=3, seed=1)
    batch["history_item"][0, :2] = PAST[2:]  # row 0 has a full history (random_batch's edge rows)
    batch["cand_item"][0, : len(PAST)] = PAST
    return batch


def _item_table(model):
    return _item_tables(model)[0]


def _item_tables(model) -> list:
    """Every item-id table of a model: the towers' and the tokens' (GESR has both)."""
    owners = [getattr(model, "towers", None), getattr(model, "tokens", None)]
    return [o.tables.tables["item"] for o in owners if o is not None and "item" in o.tables.tables]


@pytest.mark.parametrize("kind", sorted(BUILDERS))
def test_every_item_id_table_gets_the_hashed_rows(kind):
    for schema, rows in ((HASHED, VOCAB + BUCKETS), (SCHEMA, VOCAB)):
        model = nnx.eval_shape(lambda s=schema: BUILDERS[kind](s))  # shapes only: no initialisation cost
        tables = _item_tables(model)
        assert tables and all(t.table.shape[0] == rows for t in tables), kind


# GESR and GenRank compile for 30-40 s on the shared 2-core box (grad through attention): slow. The two-tower
# one runs by default; every kind's item tables are checked by the test above.
@pytest.mark.parametrize("kind", [
    pytest.param("gesr", marks=pytest.mark.slow), pytest.param("genrank", marks=pytest.mark.slow), "two_tower",
])  # fmt: skip
def test_ids_past_the_vocabulary_train_one_step_with_hashing(kind):
    graphdef, params = _split(kind)
    assert _item_table(nnx.merge(graphdef, params)).table.shape[0] == VOCAB + BUCKETS
    batch = _batch_past_vocab()
    validate_batch(batch, HASHED)
    tx = optax.sgd(0.1)

    @jax.jit
    def train_step(p, opt_state, b):
        def loss_fn(p):
            logits = nnx.merge(graphdef, p)(b, train=False)
            return step.multitask_loss(logits, b, HASHED.tasks, (1.0,) * len(HASHED.tasks))[0], logits

        (loss, logits), grads = jax.value_and_grad(loss_fn, has_aux=True)(p)
        updates, opt_state = tx.update(grads, opt_state, p)
        return optax.apply_updates(p, updates), opt_state, loss, logits, grads

    new_params, _, loss, logits, grads = train_step(params, tx.init(params), batch)
    assert np.isfinite(float(loss))
    assert all(np.all(np.isfinite(np.asarray(v))) for v in logits.values())
    assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(new_params))
    # The ids past the vocabulary reached their rows: those rows got a gradient.
    rows = np.asarray(sharded_lookup.hash_ids(jnp.asarray(PAST), VOCAB, BUCKETS))
    table_grad = np.asarray(_item_table(nnx.merge(graphdef, grads)).table[...])
    assert np.all(np.abs(table_grad[rows]).sum(axis=1) > 0)


@pytest.mark.parametrize("key", ["history_item", "cand_item"])
def test_without_hashing_the_validator_refuses_ids_past_the_vocabulary_naming_the_field(key):
    batch = batch_for(SCHEMA, batch_size=3, seed=1)
    batch[key][0, 0] = VOCAB
    with pytest.raises(ValueError, match=rf"batch\['{key}'\].*data.hash_buckets"):
        validate_batch(batch, SCHEMA)
    with pytest.raises(ValueError, match=rf"batch\['{key}'\]"):
        validate_batch(batch, SCHEMA, level="inputs")
    validate_batch(batch, HASHED)
    batch[key][0, 0] = -1  # negatives stay refused with hashing on
    with pytest.raises(ValueError, match=rf"batch\['{key}'\]"):
        validate_batch(batch, HASHED)


def test_two_ids_past_the_vocabulary_in_different_buckets_get_different_embeddings():
    # The table every model builds for its item ids (FieldTables with the schema's hashed rows).
    hashed = {"item": HASHED.item_hash_buckets("item")}
    tables = FieldTables({"item": VOCAB}, 8, rngs=nnx.Rngs(params=0), hash_buckets=hashed)
    table = tables.tables["item"]
    a, b = 10**6, 10**6 + 1
    rows = np.asarray(table.rows(jnp.array([a, b])))
    assert rows[0] != rows[1] and np.all(rows >= VOCAB + 0) and np.all(rows < VOCAB + BUCKETS)
    emb = np.asarray(table(jnp.array([a, b])))
    assert not np.allclose(emb[0], emb[1])
    np.testing.assert_array_equal(emb, np.asarray(table.table[...])[rows])


def test_data_hash_buckets_reaches_the_schema_and_the_model_tables():
    config = Config(data=DataConfig(hash_buckets=BUCKETS))
    schema = datasets.schema_for(config.data)
    assert schema.hash_buckets == BUCKETS
    assert datasets.schema_for(DataConfig()).hash_buckets == 0
    graphdef, params = api.abstract_init(config, schema)
    tables = nnx.merge(graphdef, params).towers.tables.tables
    assert tables["item"].table.shape[0] == schema.num_items + 1 + BUCKETS
    assert tables["category"].table.shape[0] == schema.item_vocab("category")  # only the item id is hashed


def test_the_serving_item_cache_scores_ids_past_the_vocabulary_like_the_uncached_model():
    graphdef, params = _split("two_tower")
    table = {n: (np.arange(VOCAB) % (v - 1) + 1).astype(np.int32) for n, v in HASHED.item_features}
    scorer = Scorer(graphdef, params, HASHED, item_table=table, buckets=Buckets((4,), (4,)))  # one compile
    assert scorer.item_cache.shape[0] == VOCAB + BUCKETS
    batch = _batch_past_vocab()
    items, valid = batch["cand_item"], np.arange(HASHED.num_candidates) < batch["num_candidates"][:, None]
    for name in HASHED.item_feature_names:  # the table's features; none for items past it (what the cache assumes)
        batch[f"cand_{name}"] = np.where(valid & (items < VOCAB), table[name][np.minimum(items, VOCAB - 1)], 0)
    served = scorer.score(requests_from_batch(batch, HASHED))
    direct = api.apply(graphdef, params, batch)  # no cache: the item tower runs on the candidates
    assert np.any(items[0] >= VOCAB + BUCKETS) and np.any(items[1:] < VOCAB)
    retrieval = api.retrieval_scores(graphdef, params, batch, scorer.item_cache)
    assert retrieval.shape == (3, VOCAB)  # the catalogue only: hashed rows are no items to retrieve
    for row, result in enumerate(served):
        c = int(batch["num_candidates"][row])
        for task in HASHED.tasks:
            want = np.asarray(jax.nn.sigmoid(direct[task]))[row, :c]
            np.testing.assert_allclose(result[task], want, atol=1e-5, rtol=0)

"""The retrieval -> re-rank cascade: ranks checked against brute force over the catalogue, misses, refusals."""

import numpy as np
import pytest

from gesr_jax import api, cascade, config as config_lib
from gesr_jax.data import batch as batch_lib
from gesr_jax.data import datasets


@pytest.fixture(scope="module")
def tiny():
    gesr_config = config_lib.load_config("synthetic_tiny")
    tt_config = config_lib.load_config("synthetic_tiny_two_tower")
    schema = datasets.schema_for(gesr_config.data)
    splits = datasets.load_splits(gesr_config.data)
    runs = {}
    for name, config in (("two_tower", tt_config), ("gesr", gesr_config)):
        graphdef, params = api.init(config, 3, schema)
        runs[name] = cascade.Run(graphdef, params, schema, config, step=0)
    test = {k: np.asarray(v)[:12] for k, v in splits.test.items()}  # 12 requests: enough positives, quick brute force
    return runs, test, datasets.item_table(gesr_config.data), schema


def _brute_force(retriever, ranker, test, table, schema, k):
    """Per positive: the whole-catalogue retrieval rank, and the re-rank rank within the first k (or inf)."""
    request, _ = batch_lib.split_batch(test, schema)
    cache = api.item_cache(retriever.graphdef, retriever.params, table)
    scores = np.asarray(api.retrieval_scores(retriever.graphdef, retriever.params, request, cache))
    v = scores.shape[1]
    everything = {"cand_item": np.tile(np.arange(v, dtype=np.int32), (len(scores), 1)),
                  "num_candidates": np.full(len(scores), v, np.int32)}  # fmt: skip
    everything |= {f"cand_{f}": np.tile(np.asarray(table[f], np.int32), (len(scores), 1)) for f in schema.item_feature_names}
    state = api.encode_request(ranker.graphdef, ranker.params, request)
    logits = np.asarray(api.score(ranker.graphdef, ranker.params, state, everything)["consume"])
    retrieval, reranked = [], []
    for b in range(len(scores)):
        n = test["num_candidates"][b]
        pos = test["cand_item"][b, :n][test["label_consume"][b, :n] == 1]
        for target in pos:
            allowed = [i for i in range(1, v) if i == target or i not in set(pos.tolist())]
            retrieval.append(sum(scores[b, i] >= scores[b, target] for i in allowed))
            order = sorted(allowed, key=lambda i: -scores[b, i])[:k]
            reranked.append(sum(logits[b, i] >= logits[b, target] for i in order) if target in order else np.inf)
    return np.array(retrieval, float), np.array(reranked, float)


@pytest.mark.parametrize("k", [1, 25, 400])  # synthetic_tiny has 400 items
def test_cascade_ranks_match_brute_force(tiny, k):
    runs, test, table, schema = tiny
    ranks = cascade.cascade_ranks(runs["two_tower"], runs["gesr"], test, k=k, batch_size=16, item_table=table)
    retrieval, reranked = _brute_force(runs["two_tower"], runs["gesr"], test, table, schema, k)
    assert retrieval.size > 0
    np.testing.assert_array_equal(ranks["retrieval"], retrieval)
    np.testing.assert_array_equal(ranks["cascade"], reranked)
    if k == schema.num_items:  # the whole catalogue: nothing is missed
        assert np.all(np.isfinite(ranks["cascade"]))
    if k == 1:  # a list of one: rank 1 exactly where retrieval put the positive first
        np.testing.assert_array_equal(ranks["cascade"] == 1, retrieval == 1)
        assert np.all((ranks["cascade"] == 1) | np.isinf(ranks["cascade"]))


def test_cascade_metrics_count_misses_as_zero(tiny):
    runs, test, table, _ = tiny
    ranks = cascade.cascade_ranks(runs["two_tower"], runs["gesr"], test, k=5, item_table=table)
    out = cascade.cascade_metrics(ranks, ks=(10,))
    assert out["num_targets"] == ranks["cascade"].size
    assert out["retrieved_share"] == pytest.approx(np.mean(ranks["retrieval"] <= 5))
    assert out["cascade/hr@10"] == pytest.approx(out["retrieved_share"])  # a list of 5 is always inside the top 10
    assert out["cascade/mrr"] == pytest.approx(np.mean(np.where(np.isfinite(ranks["cascade"]), 1 / ranks["cascade"], 0)))


def test_cascade_refuses_other_data_a_tower_free_retriever_and_bad_k(tiny):
    runs, test, table, schema = tiny
    other = config_lib.load_config("synthetic_tiny", ["data.seed=9"])
    moved = cascade.Run(runs["gesr"].graphdef, runs["gesr"].params, schema, other, step=0)
    with pytest.raises(cascade.CascadeError, match="different data sections"):
        cascade.cascade_ranks(runs["two_tower"], moved, test, item_table=table)
    genrank_config = config_lib.load_config("synthetic_tiny", ["model.kind=genrank"])
    graphdef, params = api.init(genrank_config, 0, schema)
    genrank = cascade.Run(graphdef, params, schema, genrank_config, step=0)
    with pytest.raises(cascade.CascadeError, match="cannot rank the catalogue"):
        cascade.cascade_ranks(genrank, runs["gesr"], test, item_table=table)
    cascade.cascade_ranks(runs["two_tower"], genrank, test, k=3, item_table=table)  # GenRank can re-rank
    assert schema.num_items == 400
    with pytest.raises(cascade.CascadeError, match="k = 401 exceeds the catalogue's 400 items"):
        cascade.cascade_ranks(runs["two_tower"], runs["gesr"], test, k=401, item_table=table)
    with pytest.raises(cascade.CascadeError, match="lacks \\['category'"):
        cascade.cascade_ranks(runs["two_tower"], runs["gesr"], test, item_table={})

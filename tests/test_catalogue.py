"""The clean ranking catalogue (issue 22 item 6): exclusions, catalogue ranks and cascade ranks against brute force."""

import numpy as np
import pytest

from gesr_jax import api, cascade, catalogue, config as config_lib
from gesr_jax.data import batch as batch_lib
from gesr_jax.data import datasets
from gesr_jax.train import evaluators

# A tiny log: ids 0..7, id 0 padding, id 3 is not an item, id 7 is an item nobody rated before t=50.
KNOWN = np.array([False, True, True, False, True, True, True, True])
EVENTS = [  # (user, item, time)
    (1, 1, 10), (1, 2, 20), (1, 5, 40), (1, 4, 40), (1, 6, 60),
    (2, 2, 5), (2, 6, 30), (2, 7, 55),
    (3, 4, 45),
]  # fmt: skip


def _brute_exclusions(user, time, keep=()):
    out = np.zeros(KNOWN.size, bool)
    for v in range(KNOWN.size):
        rated_by_user = any(u == user and i == v and t < time for u, i, t in EVENTS)
        rated_before = any(i == v and t < time for _, i, t in EVENTS)
        out[v] = v == 0 or not KNOWN[v] or rated_by_user or not rated_before
    out[[k for k in keep if k > 0]] = False
    return out


def _log():
    u, i, t = (np.array(c) for c in zip(*EVENTS))
    return catalogue.CleanCatalogue.from_events(u, i, t, KNOWN)


@pytest.mark.parametrize("user", [1, 2, 3, 9])  # 9: a user with no events
@pytest.mark.parametrize("time", [0, 10, 11, 40, 41, 56, 100])
def test_exclusions_match_brute_force(user, time):
    got = _log().exclusions(np.array([user]), np.array([time]))[0]
    np.testing.assert_array_equal(got, _brute_exclusions(user, time))


def test_the_request_positives_stay_in_the_catalogue():
    # User 2's request at t=55 has positive 7: first rated at 55 by them, so "not rated before" alone would drop it.
    got = _log().exclusions(np.array([2, 1]), np.array([55, 40]), keep=np.array([[7, 0], [5, 4]]))
    np.testing.assert_array_equal(got[0], _brute_exclusions(2, 55, keep=(7,)))
    np.testing.assert_array_equal(got[1], _brute_exclusions(1, 40, keep=(5, 4)))
    assert not got[0, 7] and got[0, 2] and got[0, 3] and got[0, 0]  # kept positive; user 2's item 2; non-item 3


def test_catalogue_ranks_leave_the_clean_exclusions_out():
    rng = np.random.default_rng(0)
    scores = rng.normal(size=(2, KNOWN.size))
    items = np.array([[5, 4, 1], [7, 6, 2]])
    positive = np.array([[True, True, False], [True, False, False]])
    exclude = _log().exclusions(np.array([1, 2]), np.array([40, 55]), np.where(positive, items, 0))
    ranks = evaluators.catalogue_ranks(scores, items, positive, exclude)
    expected = []
    for b, c in zip(*np.nonzero(positive)):
        target, others = items[b, c], set(items[b][positive[b]]) - {items[b, c]}
        allowed = [v for v in range(1, KNOWN.size) if v == target or (v not in others and not exclude[b, v])]
        expected.append(sum(scores[b, v] >= scores[b, target] for v in allowed))
    np.testing.assert_array_equal(ranks, expected)
    assert np.all(ranks <= evaluators.catalogue_ranks(scores, items, positive))  # fewer competitors, never worse


def test_unknown_catalogue_and_non_movielens_source_are_refused():
    with pytest.raises(ValueError, match="catalogue must be one of"):
        catalogue.check_catalogue("some")
    with pytest.raises(ValueError, match="data.source"):
        catalogue.from_data_config(config_lib.load_config("synthetic_tiny").data)


def test_the_default_catalogue_is_clean_where_the_data_has_a_rating_log():
    assert catalogue.default_for(config_lib.load_config("synthetic_tiny").data) == "all"
    assert catalogue.default_for(config_lib.load_config("ml1m_base").data) == "clean"


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
    test = {k: np.asarray(v)[:12] for k, v in splits.test.items()}
    # A random log over these users, around their request times; a quarter of the ids are not items.
    rng = np.random.default_rng(1)
    v = schema.num_items + 1
    users, t0 = test["user_id"], test["request_time"]
    n = 3000
    pick = rng.integers(0, len(users), n)
    events = (users[pick], rng.integers(1, v, n), t0[pick] + rng.integers(-5000, 5000, n))
    known = rng.random(v) > 0.25
    log = catalogue.CleanCatalogue.from_events(*events, known)
    return runs, test, datasets.item_table(gesr_config.data), schema, log


@pytest.mark.parametrize("k", [1, 25, 400])
def test_clean_cascade_ranks_match_brute_force(tiny, k):
    runs, test, table, schema, log = tiny
    retriever, ranker = runs["two_tower"], runs["gesr"]
    ranks = cascade.cascade_ranks(retriever, ranker, test, k=k, batch_size=5, item_table=table, catalogue=log)
    request, _ = batch_lib.split_batch(test, schema)
    cache = api.item_cache(retriever.graphdef, retriever.params, table)
    scores = np.asarray(api.retrieval_scores(retriever.graphdef, retriever.params, request, cache))
    v = scores.shape[1]
    everything = {"cand_item": np.tile(np.arange(v, dtype=np.int32), (len(scores), 1)),
                  "num_candidates": np.full(len(scores), v, np.int32)}  # fmt: skip
    everything |= {f"cand_{f}": np.tile(np.asarray(table[f], np.int32), (len(scores), 1)) for f in schema.item_feature_names}
    state = api.encode_request(ranker.graphdef, ranker.params, request)
    logits = np.asarray(api.score(ranker.graphdef, ranker.params, state, everything)["consume"])
    retrieval, reranked, excluded_any = [], [], 0
    for b in range(len(scores)):
        n = test["num_candidates"][b]
        pos = test["cand_item"][b, :n][test["label_consume"][b, :n] == 1]
        banned = log.exclusions(test["user_id"][b : b + 1], test["request_time"][b : b + 1], pos[None])[0]
        excluded_any += int(banned[1:].sum())
        for target in pos:
            allowed = [i for i in range(1, v) if i == target or (i not in set(pos.tolist()) and not banned[i])]
            retrieval.append(sum(scores[b, i] >= scores[b, target] for i in allowed))
            order = sorted(allowed, key=lambda i: -scores[b, i])[:k]
            reranked.append(sum(logits[b, i] >= logits[b, target] for i in order) if target in order else np.inf)
    assert retrieval and excluded_any > 0
    np.testing.assert_array_equal(ranks["retrieval"], retrieval)
    np.testing.assert_array_equal(ranks["cascade"], reranked)

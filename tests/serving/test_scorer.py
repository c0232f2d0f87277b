"""The serving Scorer (issue 12): equals api.apply for every bucket, never recompiles after warm-up,
per-request errors, user-state reuse."""

from __future__ import annotations

import dataclasses
import pathlib
import sys

import jax
import numpy as np
import pytest

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from serving_helpers import SCHEMA, consistent_batch, gesr, item_table, two_tower  # noqa: E402

from gesr_jax import api  # noqa: E402
from gesr_jax.data.batch import CANDIDATE, HISTORY, MAX_REQUEST_CANDIDATES  # noqa: E402
from gesr_jax.serving.buckets import Buckets  # noqa: E402
from gesr_jax.serving.requests import RequestError  # noqa: E402
from gesr_jax.serving.scorer import Scorer  # noqa: E402
from gesr_jax.serving.user_cache import UserStateCache  # noqa: E402
from gesr_jax.serving.requests import parse_request, requests_from_batch  # noqa: E402

TABLE = item_table()


@pytest.fixture(scope="module")
def gesr_model():
    return gesr()


def _reference(graphdef, params, batch) -> dict[str, np.ndarray]:
    logits = api.apply(graphdef, params, batch)
    return {t: np.asarray(jax.nn.sigmoid(v)) for t, v in logits.items()}


def _check_equal(results, ref, batch, atol=1e-5):
    for row, result in enumerate(results):
        c = int(batch["num_candidates"][row])
        assert set(result) == set(SCHEMA.tasks)
        for task in SCHEMA.tasks:
            assert result[task].shape == (c,)
            np.testing.assert_allclose(result[task], ref[task][row, :c], atol=atol, rtol=0)


@pytest.mark.parametrize(
    "buckets",
    [Buckets((1,), (1,)), Buckets((2,), (7,)), Buckets((1, 4), (4, 16))],
    ids=["r1_c1", "r2_c7", "r1.4_c4.16"],
)
def test_scorer_equals_apply_for_every_bucket(gesr_model, buckets):
    graphdef, params = gesr_model
    batch = consistent_batch(SCHEMA, TABLE, batch_size=5, seed=3)
    ref = _reference(graphdef, params, batch)
    scorer = Scorer(graphdef, params, SCHEMA, TABLE, buckets=buckets)
    assert scorer.item_cache is not None and scorer.kind == "gesr"
    _check_equal(scorer.score(requests_from_batch(batch, SCHEMA)), ref, batch)


def test_two_tower_scorer_equals_apply_and_shares_the_engine():
    graphdef, params = two_tower()
    batch = consistent_batch(SCHEMA, TABLE, batch_size=3, seed=4)
    scorer = Scorer(graphdef, params, SCHEMA, TABLE, buckets=Buckets((4,), (16,)), user_cache=UserStateCache())
    assert scorer.kind == "two_tower" and scorer.item_cache is not None
    _check_equal(scorer.score(requests_from_batch(batch, SCHEMA)), _reference(graphdef, params, batch), batch)


def test_item_features_come_from_the_item_table_when_left_out(gesr_model):
    graphdef, params = gesr_model
    batch = consistent_batch(SCHEMA, TABLE, batch_size=2, seed=5)
    scorer = Scorer(graphdef, params, SCHEMA, TABLE, buckets=Buckets((2,), (64,)))
    full = requests_from_batch(batch, SCHEMA)
    lean = [{k: v for k, v in r.items() if k.split("_", 1)[1] not in ("category", "creator")} for r in full]
    for a, b in zip(scorer.score(full), scorer.score(lean), strict=True):
        for task in SCHEMA.tasks:
            np.testing.assert_array_equal(a[task], b[task])


def _request(rng, num_candidates: int, history: int = 4, user: int = 3) -> dict:
    items = rng.integers(1, SCHEMA.num_items + 1, size=history)
    cands = rng.integers(1, SCHEMA.num_items + 1, size=num_candidates)
    return {
        "user_id": user, "user_segment": 1,
        "history_item": items, "history_action": np.ones(history, np.int32),
        "history_time": 1_000 + np.arange(history) * 10, "request_time": 5_000, "cand_item": cands,
    }  # fmt: skip


def test_no_recompiles_after_warmup_for_1_to_10000_candidates(gesr_model):
    graphdef, params = gesr_model
    scorer = Scorer(graphdef, params, SCHEMA, TABLE, buckets=Buckets((1, 4), (64, 1024)), user_cache=UserStateCache())
    added = scorer.warmup()
    # encode per request size, score per (request, chunk) size, row split/stack per request size > 1.
    assert dict(scorer.trace_counts) == {"encode": 2, "score": 4, "split": 1, "stack": 1}
    assert added == 8
    rng = np.random.default_rng(0)
    calls = [[1], [10_000], [1, 63, 64, 65], [2_000, 5, 1_100], [300] * 6, [999, 1]]
    for sizes in calls:
        results = scorer.score([_request(rng, c, user=1 + i) for i, c in enumerate(sizes)])
        assert [r["consume"].shape[0] for r in results] == sizes
        assert all(np.all((r["engage"] > 0) & (r["engage"] < 1)) for r in results)
    assert scorer.num_compiles == 8  # nothing traced (hence compiled) again


def test_chunk_plan_uses_only_buckets_and_covers_every_candidate():
    buckets = Buckets((1,), (64, 256, 1024))
    for c in (0, 1, 63, 64, 65, 300, 1100, 10_000):
        plan = buckets.chunk_plan(c)
        assert all(size in buckets.chunk_sizes for _, size in plan)
        assert [s for s, _ in plan] == list(np.cumsum([0] + [z for _, z in plan])[:-1])
        covered = sum(z for _, z in plan)
        assert covered >= c and covered - c < 64
    assert buckets.chunk_plan(1100) == [(0, 1024), (1024, 64), (1088, 64)]
    # coarse (blocked scoring: padding is cheap): whole largest buckets, then the smallest covering the tail
    assert buckets.chunk_plan(1100, coarse=True) == [(0, 1024), (1024, 256)]
    assert buckets.chunk_plan(2000, coarse=True) == [(0, 1024), (1024, 1024)] and buckets.chunk_plan(0, coarse=True) == []
    assert [Buckets((1, 4, 16)).request_bucket(n) for n in (1, 2, 4, 5, 16)] == [1, 4, 4, 16, 16]
    with pytest.raises(ValueError, match="chunk_sizes"):
        Buckets((1,), ())


BAD = [
    ("unknown user", {"user_id": 999}, "user_id", "unknown user id 999"),
    ("negative id", {"cand_item": np.array([3, -2])}, "cand_item", "negative id -2"),
    ("unknown item", {"history_item": np.array([1, 2, 3, 99])}, "history_item", "unknown id 99"),
    ("over-long history", {"history_item": np.arange(1, 9), "history_action": np.ones(8, np.int32),
                           "history_time": np.arange(8)}, "history_item", "more than this model's history_len"),
    ("wrong type", {"history_action": np.ones(4, np.float32)}, "history_action", "dtype float32"),
    ("NaN feature", {"history_time": np.array([1.0, np.nan, 3.0, 4.0])}, "history_time", "NaN"),
    ("string", {"user_segment": "a"}, "user_segment", "expected integers"),
    ("mismatched lengths", {"history_action": np.ones(3, np.int32)}, "history_action", "has length 3"),
    ("late event", {"history_time": np.array([1, 2, 3, 6_000])}, "history_time", "at or after request_time"),
    ("missing field", {"request_time": None}, "request_time", "is missing"),
    ("unknown field", {"cand_colour": [1]}, "cand_colour", "not a request field"),
    ("feature out of range", {"user_segment": 4}, "user_segment", "unknown id 4"),
    ("no candidates", {"cand_item": np.zeros(0, np.int32)}, "cand_item", "has 0 candidates"),
    ("too many candidates", {"cand_item": np.ones(MAX_REQUEST_CANDIDATES + 1, np.int32)}, "cand_item",
     f"more than the {MAX_REQUEST_CANDIDATES} one request may carry"),
]  # fmt: skip


def test_bad_requests_get_a_per_request_error_naming_the_field(gesr_model):
    graphdef, params = gesr_model
    scorer = Scorer(graphdef, params, SCHEMA, TABLE, buckets=Buckets((4,), (16,)))
    rng = np.random.default_rng(1)
    good = [_request(rng, 5), _request(rng, 12)]
    bad = []
    for _, patch, _, _ in BAD:
        req = _request(rng, 3) | patch
        bad.append({k: v for k, v in req.items() if v is not None})
    requests = [good[0], *bad, good[1], "not a dict"]
    results = scorer.score(requests)
    ref = scorer.score(good)
    for got, want in ((results[0], ref[0]), (results[-2], ref[1])):  # the good ones are still scored, unchanged
        np.testing.assert_allclose(got["consume"], want["consume"], atol=1e-6)
    for i, (name, _, field, text) in enumerate(BAD, start=1):
        err = results[i]
        assert isinstance(err, RequestError), name
        assert err.field == field and err.index == i, (name, str(err))
        assert text in str(err) and field in str(err), (name, str(err))
    assert isinstance(results[-1], RequestError) and "must be a dict" in str(results[-1])
    with pytest.raises(RequestError, match="user_id"):
        scorer.score_one(bad[0])


def test_request_counts_are_the_schemas_and_the_documented_range():
    """1 .. MAX_REQUEST_CANDIDATES candidates and 0 .. N events (issue 24: the Scorer took 0 and 20,000)."""
    counts = SCHEMA.request_counts()
    assert counts == {HISTORY: (0, SCHEMA.history_len), CANDIDATE: (1, MAX_REQUEST_CANDIDATES)}
    rng = np.random.default_rng(5)
    for c in counts[CANDIDATE]:
        assert parse_request(_request(rng, c), SCHEMA, item_table=TABLE).num_candidates == c
    for c in (counts[CANDIDATE][0] - 1, counts[CANDIDATE][1] + 1, 20_000):
        with pytest.raises(RequestError, match="cand_item") as info:
            parse_request(_request(rng, c), SCHEMA, item_table=TABLE)
        assert info.value.field == "cand_item" and str(c) in str(info.value)
    for n in (0, SCHEMA.history_len):
        assert parse_request(_request(rng, 3, history=n), SCHEMA, item_table=TABLE).num_history == n
    with pytest.raises(RequestError, match="more than this model's history_len"):
        parse_request(_request(rng, 3, history=SCHEMA.history_len + 1), SCHEMA, item_table=TABLE)
    # The serving guide states the same range.
    guide = (pathlib.Path(__file__).resolve().parents[2] / "docs" / "serving.md").read_text()
    assert f"1 … {MAX_REQUEST_CANDIDATES:,} candidates" in guide


def test_user_state_cache_reuses_identical_requests_and_misses_a_changed_history(gesr_model):
    graphdef, params = gesr_model
    cache = UserStateCache()
    scorer = Scorer(graphdef, params, SCHEMA, TABLE, buckets=Buckets((1, 4), (16,)), user_cache=cache)
    plain = Scorer(graphdef, params, SCHEMA, TABLE, buckets=Buckets((1, 4), (16,)))
    rng = np.random.default_rng(2)
    reqs = [_request(rng, 9, user=u) for u in (1, 2, 3)]
    first = scorer.score(reqs)
    assert (cache.stats.hits, cache.stats.misses, len(cache)) == (0, 3, 3)
    again = scorer.score(reqs)
    assert (cache.stats.hits, cache.stats.misses) == (3, 3)
    ref = plain.score(reqs)
    for a, b, c in zip(first, again, ref, strict=True):
        np.testing.assert_allclose(a["consume"], c["consume"], atol=1e-6)  # a mixed hit/miss batch is right
        np.testing.assert_allclose(b["consume"], c["consume"], atol=1e-6)
    changed = dict(reqs[0], history_item=np.asarray(reqs[0]["history_item"]).copy())
    changed["history_item"][-1] = changed["history_item"][-1] % SCHEMA.num_items + 1
    later = dict(reqs[1], request_time=reqs[1]["request_time"] + 1)
    out = scorer.score([changed, later, reqs[2]])
    assert (cache.stats.hits, cache.stats.misses) == (4, 5)  # history change and request_time change miss
    np.testing.assert_allclose(out[0]["consume"], plain.score([changed])[0]["consume"], atol=1e-6)


def test_user_state_cache_is_bounded_by_bytes_and_evicts_lru():
    row = {"k": np.zeros((1, 100), np.float32)}  # 400 bytes
    cache = UserStateCache(max_bytes=1_000)
    assert cache.put("a", row) and cache.put("b", row)
    assert cache.get("a") is row  # a is now most recent
    assert cache.put("c", row)  # 1200 > 1000: evicts b, the least recently used
    assert "b" not in cache and "a" in cache and "c" in cache
    stats = cache.stats
    assert (stats.entries, stats.bytes, stats.evictions, stats.hits) == (2, 800, 1, 1)
    assert not cache.put("huge", {"k": np.zeros((1, 1_000), np.float32)})  # larger than the bound: not cached
    capped = UserStateCache(max_entries=1)
    capped.put("a", row), capped.put("b", row)
    assert len(capped) == 1 and "b" in capped


def test_fp8_scorer_serves_exactly_the_quantised_model(gesr_model):
    graphdef, params = gesr_model
    batch = consistent_batch(SCHEMA, TABLE, batch_size=4, seed=8)
    fp8 = Scorer(graphdef, params, SCHEMA, TABLE, buckets=Buckets((4,), (64,)), fp8=True, fp8_min_elements=32)
    assert any(x.dtype == jax.numpy.float8_e4m3fn for x in jax.tree.leaves(fp8.params))
    qgraph, qparams = api.quantize_fp8(graphdef, params, min_elements=32)
    _check_equal(fp8.score(requests_from_batch(batch, SCHEMA)), _reference(qgraph, qparams, batch), batch)
    # (How much FP8 moves NE on a trained model is test_fp8_delta_ne_on_a_trained_model, in test_scorer_workdir.py.)


def test_schema_with_no_item_table_serves_without_an_item_cache(gesr_model):
    graphdef, params = gesr_model
    batch = consistent_batch(dataclasses.replace(SCHEMA), TABLE, batch_size=2, seed=9)
    scorer = Scorer(graphdef, params, SCHEMA, buckets=Buckets((2,), (64,)))
    assert scorer.item_cache is None  # the item tower reads item features: no table, no cache
    _check_equal(scorer.score(requests_from_batch(batch, SCHEMA)), _reference(graphdef, params, batch), batch)

"""Blocked scoring (serving/blocking.py): request-by-request candidate blocks inside one call equal api.apply,
padding blocks and odd widths included; the fused encode-and-score path never recompiles after warm-up."""

from __future__ import annotations

import sys

import jax
import numpy as np
import pytest

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from serving_helpers import SCHEMA, consistent_batch, gesr, item_table, two_tower  # noqa: E402

from gesr_jax import api  # noqa: E402
from gesr_jax.serving.blocking import blocked_score  # noqa: E402
from gesr_jax.serving.buckets import Buckets  # noqa: E402
from gesr_jax.serving.requests import requests_from_batch  # noqa: E402
from gesr_jax.serving.scorer import Scorer  # noqa: E402
from gesr_jax.serving.user_cache import UserStateCache  # noqa: E402

TABLE = item_table()


def _check_against_apply(graphdef, params, scorer, batch):
    logits = api.apply(graphdef, params, batch)
    results = scorer.score(requests_from_batch(batch, SCHEMA))
    for row, result in enumerate(results):
        c = int(batch["num_candidates"][row])
        for task in SCHEMA.tasks:
            want = np.asarray(jax.nn.sigmoid(logits[task]))[row, :c]
            np.testing.assert_allclose(result[task], want, atol=1e-5, rtol=0)


# block 4 divides the chunk of 16 (pairs of (request, block) units); block 5 pads 16 to 20 (a padding block);
# block 16 with one request splits the one block into a pair of halves.
# Compile-bound (tens of seconds per case on the loaded box): block 5 (padding block, (request, block) pairs,
# skipped blocks) without a user cache runs by default, the rest with `make test-slow`.
@pytest.mark.parametrize(
    "block, reuse",
    [(5, False), pytest.param(5, True, marks=pytest.mark.slow), pytest.param(4, False, marks=pytest.mark.slow),
     pytest.param(16, False, marks=pytest.mark.slow)],
)  # fmt: skip
def test_blocked_gesr_scorer_equals_apply(block, reuse):
    graphdef, params = gesr()
    batch = consistent_batch(SCHEMA, TABLE, batch_size=4, seed=11)
    assert batch["num_candidates"].min() < 12  # a request whose later blocks hold no candidate (skipped)
    scorer = Scorer(graphdef, params, SCHEMA, TABLE, buckets=Buckets((4,), (16,)), score_block=block,
                    user_cache=UserStateCache() if reuse else None)  # fmt: skip
    _check_against_apply(graphdef, params, scorer, batch)


@pytest.mark.slow
def test_blocked_two_tower_scorer_equals_apply():
    graphdef, params = two_tower()
    batch = consistent_batch(SCHEMA, TABLE, batch_size=3, seed=12)
    scorer = Scorer(graphdef, params, SCHEMA, TABLE, buckets=Buckets((4,), (16,)), score_block=4)
    _check_against_apply(graphdef, params, scorer, batch)


def test_blocked_score_runs_only_live_blocks_and_rejects_a_bad_block():
    calls = []

    def score(consts, state, cands):  # probabilities = the candidate ids + the request's state, [T=1, R, W]
        calls.append(cands["cand_item"].shape)
        live = np.arange(cands["cand_item"].shape[1])[None, :] < cands["num_candidates"][:, None]
        return ((cands["cand_item"] + state[:, None]) * live)[None].astype(np.float32)

    cands = {"cand_item": np.arange(2 * 12, dtype=np.int32).reshape(2, 12), "num_candidates": np.array([12, 5])}
    state = np.array([100, 200], np.int32)
    out = jax.jit(blocked_score(score, 4, num_tasks=1))(None, state, cands)
    assert calls == [(2, 4)]  # traced once: two (request, block) units per step
    want = score(None, state, cands)
    np.testing.assert_array_equal(np.asarray(out), want)
    with pytest.raises(ValueError, match="score_block"):
        blocked_score(score, 0, num_tasks=1)


@pytest.mark.slow
def test_no_recompiles_after_warmup_without_a_user_cache():
    graphdef, params = gesr()
    scorer = Scorer(graphdef, params, SCHEMA, TABLE, buckets=Buckets((1, 4), (8, 32)), score_block=8)
    added = scorer.warmup()
    # encode per request size (warm-up's state), score and the fused encode+score per (request, chunk) size.
    assert dict(scorer.trace_counts) == {"encode": 2, "score": 4, "encode_score": 4} and added == 10
    rng = np.random.default_rng(1)
    for sizes in ([1], [70], [3, 9, 33], [5] * 6):
        reqs = []
        for i, c in enumerate(sizes):
            items = rng.integers(1, SCHEMA.num_items + 1, size=4)
            reqs.append({"user_id": 1 + i, "user_segment": 1, "history_item": items, "history_action": np.ones(4, np.int32),
                         "history_time": 1_000 + np.arange(4) * 10, "request_time": 5_000,
                         "cand_item": rng.integers(1, SCHEMA.num_items + 1, size=c)})  # fmt: skip
        results = scorer.score(reqs)
        assert [r["consume"].shape[0] for r in results] == sizes
    assert scorer.num_compiles == 10

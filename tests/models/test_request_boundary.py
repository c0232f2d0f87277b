"""The request/candidate boundary (issue 9): apply == score(encode_request), chunking, history work once."""

from __future__ import annotations

from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from gesr_jax.data.batch import split_batch
from gesr_jax.layers.hstu import HSTULayer
from gesr_jax.layers.sequence import unpack_candidates
from gesr_jax.models.two_tower.config import TwoTowerConfig
from gesr_jax.models.two_tower.model import TwoTowerModel
from helpers.models import SCHEMA, TINY, batch_for, candidate_chunks, make_model, tiny_config


_chunks = candidate_chunks


def _score_in_chunks(model, batch, size: int) -> dict[str, np.ndarray]:
    request, candidates = split_batch(batch, model.schema)
    state = model.encode_request(request)
    out = {t: np.zeros(batch["cand_item"].shape, np.float32) for t in model.schema.tasks}
    for start, part in _chunks(candidates, size):
        logits = model.score(state, part)
        for t in out:
            out[t][:, start : start + part["cand_item"].shape[1]] = np.asarray(logits[t])
    return out


@pytest.mark.parametrize(
    "overrides",
    [{}, {"hstu": {"target_aware": False}}, {"mlpg": {"enabled": False}}, {"hma": {"enabled": False}, "hstu": {"enabled": False}}],
    ids=["all_on", "no_target_aware", "no_mlpg", "cross_only"],
)
@pytest.mark.parametrize("size", [1, 3, 4])
def test_scoring_in_chunks_equals_apply(overrides, size):
    model = make_model(tiny_config(**overrides))
    batch = batch_for(batch_size=4, seed=11)
    full = model(batch)
    chunked = _score_in_chunks(model, batch, size)
    for task in SCHEMA.tasks:
        np.testing.assert_allclose(chunked[task], np.asarray(full[task]), atol=1e-5, rtol=1e-5)


def test_chunks_of_1_7_and_c_on_a_long_candidate_list():
    schema = SCHEMA.__class__(**{**SCHEMA.__dict__, "num_candidates": 23})
    model = make_model(TINY, schema=schema)
    batch = batch_for(schema=schema, batch_size=3, seed=2)
    full = model(batch)
    for size in (1, 7, 23):
        chunked = _score_in_chunks(model, batch, size)
        for task in schema.tasks:
            np.testing.assert_allclose(chunked[task], np.asarray(full[task]), atol=1e-5, rtol=1e-5)


def test_history_side_runs_once_per_request_however_many_chunks():
    model = make_model()
    batch = batch_for(batch_size=3, seed=4)
    request, candidates = split_batch(batch, model.schema)
    with mock.patch.object(HSTULayer, "history", autospec=True, side_effect=HSTULayer.history) as history, \
         mock.patch.object(HSTULayer, "history_kv", autospec=True, side_effect=HSTULayer.history_kv) as kv:
        state = model.encode_request(request)
        assert (history.call_count, kv.call_count) == (TINY.hstu.layers - 1, 1)
        for _, part in _chunks(candidates, 1):
            model.score(state, part)
        # Four chunks later, no history layer has run again.
        assert (history.call_count, kv.call_count) == (TINY.hstu.layers - 1, 1)


def test_candidate_rows_of_the_cached_path_equal_the_one_pass_sequence():
    model = make_model()
    batch = {k: jnp.asarray(v) for k, v in batch_for(batch_size=3, seed=9).items()}
    hstu, tokens = model.moa["hstu"], model.tokens
    hist, cand = tokens.history(batch), tokens.candidates(batch)
    seq = hstu.sequence(hist, cand, batch["history_len"], batch["num_candidates"])
    one_pass = unpack_candidates(seq, batch["history_len"], batch["num_candidates"], cand.shape[1])
    cached = hstu(hist, cand, batch["history_len"], batch["num_candidates"])
    np.testing.assert_allclose(np.asarray(cached), np.asarray(one_pass), atol=1e-6)


def test_gesr_with_every_moa_switch_off_equals_the_two_tower_model():
    config = TINY.moa_off()
    gesr = make_model(config, seed=5)
    two_tower = TwoTowerModel(TwoTowerConfig(**{f: getattr(config, f) for f in TwoTowerConfig.__dataclass_fields__
                                                if f != "kind"}), SCHEMA, rngs=nnx.Rngs(params=5))  # fmt: skip
    batch = batch_for(seed=3)
    a, b = gesr(batch), two_tower(batch)
    for task in SCHEMA.tasks:
        np.testing.assert_array_equal(np.asarray(a[task]), np.asarray(b[task]))
    # Training-mode dropout draws the same streams too.
    key = jax.random.key(1)
    a, b = gesr(batch, key=key, train=True), two_tower(batch, key=key, train=True)
    for task in SCHEMA.tasks:
        np.testing.assert_array_equal(np.asarray(a[task]), np.asarray(b[task]))


def test_full_sequence_scoring_equals_the_cached_path_with_the_same_params():
    cached_model = make_model(TINY)
    full_model = make_model(tiny_config(hstu={"scoring": "full"}))
    batch = batch_for(batch_size=3, seed=8)
    a, b = cached_model(batch), full_model(batch)
    for task in SCHEMA.tasks:
        np.testing.assert_allclose(np.asarray(a[task]), np.asarray(b[task]), atol=1e-5, rtol=1e-5)

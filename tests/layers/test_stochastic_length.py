"""Stochastic length: the HSTU SL rule, chronological subsequences, layout kept, keep-full probability."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gesr_jax.data.batch import BatchSchema, random_batch, split_batch, validate_batch
from gesr_jax.layers.stochastic_length import kept_length
from gesr_jax.layers.stochastic_length import stochastic_length as _stochastic_length


def stochastic_length(batch, key, **kwargs):
    """The transform on the request part of ``batch``, the rest passed through (as the model uses it)."""
    request, _ = split_batch(batch, SCHEMA)
    return {**batch, **_stochastic_length(request, key, **kwargs)}

SCHEMA = BatchSchema(
    num_users=50, num_items=10_000, user_features=(), item_features=(("category", 5),),
    num_actions=3, history_len=16, num_candidates=2,
)


def test_kept_length():
    assert kept_length(16, 1.6) == 9  # 16^0.8 = 9.19
    assert kept_length(4096, 1.6) == 776  # the HSTU paper's example
    assert kept_length(1, 2.0) == 1


@pytest.mark.parametrize("sampling", ["recency", "uniform", "recent"])
def test_subsequences_are_chronological_and_keep_the_layout(sampling):
    batch = random_batch(SCHEMA, 64, seed=1)
    # Truncate the first rows to short histories (<= L = 9): those are never touched.
    batch["history_len"][:8] = np.minimum(batch["history_len"][:8], np.arange(1, 9))
    for key in ("history_item", "history_category", "history_action", "history_time"):
        batch[key][:8] = np.where(np.arange(16)[None] < batch["history_len"][:8, None], batch[key][:8], 0)
    fn = jax.jit(lambda b, k: stochastic_length(b, k, alpha=1.6, sampling=sampling))
    out = {k: np.asarray(v) for k, v in fn(batch, jax.random.key(0)).items()}
    validate_batch(out, SCHEMA)
    keep = kept_length(16, 1.6)
    n_old, n_new = batch["history_len"], out["history_len"]
    assert np.all((n_new == n_old) | (n_new == keep))
    np.testing.assert_array_equal(n_new[:8], n_old[:8])
    assert np.any(n_new < n_old)
    for r in range(64):
        old_t = list(batch["history_time"][r, : n_old[r]])
        new_t = list(out["history_time"][r, : n_new[r]])
        assert new_t == sorted(new_t)
        idx = [old_t.index(t) for t in new_t]  # times are strictly increasing, so unique
        for key in ("history_item", "history_category", "history_action"):
            np.testing.assert_array_equal(out[key][r, : n_new[r]], batch[key][r, idx])
        if sampling == "recent" and n_new[r] < n_old[r]:
            assert new_t == old_t[-keep:]
    np.testing.assert_array_equal(out["cand_item"], batch["cand_item"])


def test_keep_full_probability_follows_the_rule():
    b = 4000
    batch = {
        "history_item": jnp.ones((b, 16), jnp.int32),
        "history_len": jnp.full((b,), 12, jnp.int32),
    }
    out = jax.jit(lambda bt, k: stochastic_length(bt, k, alpha=1.6, sampling="uniform"))(batch, jax.random.key(3))
    frac_full = float(np.mean(np.asarray(out["history_len"]) == 12))
    expected = 16**1.6 / 12**2  # 0.586
    assert abs(frac_full - expected) < 0.03


def test_recency_sampling_prefers_recent_events():
    b = 2000
    n = 16
    batch = {
        "history_item": jnp.tile(jnp.arange(1, n + 1, dtype=jnp.int32), (b, 1)),
        "history_len": jnp.full((b,), n, jnp.int32),
    }
    run = jax.jit(lambda bt, k, s: stochastic_length(bt, k, alpha=1.6, sampling=s), static_argnums=2)
    rec = np.asarray(run(batch, jax.random.key(4), "recency")["history_item"])
    uni = np.asarray(run(batch, jax.random.key(4), "uniform")["history_item"])
    rows = np.asarray(run(batch, jax.random.key(4), "recency")["history_len"]) < n
    assert np.mean(np.any(rec[rows] == n, axis=1)) > 0.9  # the most recent event nearly always survives
    assert np.mean(rec[rows][rec[rows] > 0]) > np.mean(uni[rows][uni[rows] > 0]) + 1.0

"""Target-aware HSTU: packing, causality over history, candidate isolation, padding invariance, ablation."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gesr_jax.layers.sequence import last_history, pack, unpack_candidates
from gesr_jax.models.gesr.moa import HSTUComponent
from helpers.models import SCHEMA, tiny_config

B, N, C, D = 3, 6, 4, 8
HLEN = jnp.array([6, 1, 3], jnp.int32)
NC = jnp.array([4, 1, 2], jnp.int32)


def _tokens(seed: int = 0):
    k1, k2 = jax.random.split(jax.random.key(seed))
    hist = jax.random.normal(k1, (B, N, D))
    cand = jax.random.normal(k2, (B, C, D))
    hist = jnp.where((jnp.arange(N)[None] < HLEN[:, None])[..., None], hist, 0.0)
    cand = jnp.where((jnp.arange(C)[None] < NC[:, None])[..., None], cand, 0.0)
    return hist, cand


def test_pack_layout_and_round_trip():
    hist, cand = _tokens()
    seq = np.asarray(pack(hist, cand, HLEN, NC))
    assert seq.shape == (B, N + C, D)
    for b in range(B):
        h, c = int(HLEN[b]), int(NC[b])
        np.testing.assert_array_equal(seq[b, :h], hist[b, :h])
        np.testing.assert_array_equal(seq[b, h : h + c], cand[b, :c])
        assert not seq[b, h + c :].any()
    back = np.asarray(unpack_candidates(jnp.asarray(seq), HLEN, NC, C))
    np.testing.assert_array_equal(back, np.asarray(cand))
    np.testing.assert_array_equal(np.asarray(last_history(jnp.asarray(seq), HLEN)), hist[jnp.arange(B), HLEN - 1])


def _model(**kw):
    return HSTUComponent.from_config(tiny_config(**kw), SCHEMA, rngs=nnx.Rngs(1))


def test_changing_history_event_t_leaves_earlier_positions_unchanged():
    model = _model()
    hist, cand = _tokens()
    seq = model.sequence(hist, cand, HLEN, NC)
    t = 3  # row 0 has a full history
    changed = hist.at[0, t].add(jax.random.normal(jax.random.key(9), (D,)))
    seq2 = model.sequence(changed, cand, HLEN, NC)
    np.testing.assert_allclose(seq2[0, :t], seq[0, :t], atol=1e-6)
    assert not np.allclose(seq2[0, t:N], seq[0, t:N], atol=1e-4)  # position t and later do see it
    assert not np.allclose(seq2[0, N:], seq[0, N:], atol=1e-4)  # so do all candidates
    np.testing.assert_allclose(seq2[1:], seq[1:], atol=1e-6)  # other requests untouched


def test_history_rows_never_see_candidates_and_candidates_never_see_each_other():
    model = _model()
    hist, cand = _tokens()
    out = model(hist, cand, HLEN, NC)
    seq = model.sequence(hist, cand, HLEN, NC)
    changed = cand.at[0, 1].add(jax.random.normal(jax.random.key(9), (D,)))
    out2 = model(hist, changed, HLEN, NC)
    seq2 = model.sequence(hist, changed, HLEN, NC)
    np.testing.assert_allclose(seq2[0, :N], seq[0, :N], atol=1e-6)
    np.testing.assert_allclose(np.delete(np.asarray(out2[0]), 1, 0), np.delete(np.asarray(out[0]), 1, 0), atol=1e-6)
    assert not np.allclose(out2[0, 1], out[0, 1], atol=1e-4)


def test_scoring_together_equals_scoring_alone():
    model = _model()
    hist, cand = _tokens()
    out = model(hist, cand, HLEN, NC)
    for c in range(int(NC[0])):
        alone = model(hist[:1], cand[:1, c : c + 1], HLEN[:1], jnp.ones((1,), jnp.int32))
        np.testing.assert_allclose(alone[0, 0], out[0, c], atol=1e-5)


def test_extra_padding_changes_no_valid_output():
    model = _model()
    hist, cand = _tokens()
    out = model(hist, cand, HLEN, NC)
    hist_p = jnp.pad(hist, ((0, 0), (0, 5), (0, 0)))
    cand_p = jnp.pad(cand, ((0, 0), (0, 3), (0, 0)))
    out_p = model(hist_p, cand_p, HLEN, NC)
    np.testing.assert_allclose(out_p[:, :C], out, atol=1e-5)
    assert not np.asarray(out_p[:, C:]).any()


def test_non_target_aware_uses_last_history_output_for_every_candidate():
    model = _model(hstu={"target_aware": False})
    hist, cand = _tokens()
    out = model(hist, cand, HLEN, NC)
    assert out.shape == (B, 1, D)  # one RO vector per request, broadcast by the consumer
    hist_only = model.stack.sequence(hist, HLEN, jnp.zeros_like(HLEN))
    np.testing.assert_allclose(out[:, 0], hist_only[jnp.arange(B), HLEN - 1], atol=1e-6)
    np.testing.assert_allclose(model(hist, cand * 3.0, HLEN, NC), out, atol=1e-6)  # candidates do not matter

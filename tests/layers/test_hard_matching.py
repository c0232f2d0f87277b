"""HMA: searchsorted counting equals the brute-force [B, C, N] comparison; caps, offsets, padding."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st

from gesr_jax.layers.hard_matching import brute_force_counts, match_counts, sorted_history
from gesr_jax.models.gesr.moa import HMAComponent
from helpers.models import SCHEMA, batch_for, tiny_config


def _numpy_counts(history, hist_len, cands):
    b, n = history.shape
    out = np.zeros(cands.shape, np.int32)
    for r in range(b):
        valid = history[r, : hist_len[r]]
        for c, cid in enumerate(cands[r]):
            out[r, c] = 0 if cid == 0 else int(np.sum((valid == cid) & (valid != 0)))
    return out


@jax.jit
def _both(history, valid, cands):
    return match_counts(sorted_history(history, valid), cands), brute_force_counts(history, valid, cands)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), vocab=st.integers(1, 5))
def test_searchsorted_counts_match_brute_force(seed, vocab):
    b, n, c = 4, 9, 5  # fixed shapes: one compile; lengths and ids vary
    rng = np.random.default_rng(seed)
    hist_len = rng.integers(0, n + 1, size=b)
    # Small vocabularies force repeats; id 0 inside the valid history (OOV) must never match.
    history = rng.integers(0, vocab + 1, size=(b, n)).astype(np.int32)
    history = np.where(np.arange(n)[None] < hist_len[:, None], history, 0)
    cands = rng.integers(0, vocab + 1, size=(b, c)).astype(np.int32)
    valid = np.arange(n)[None] < hist_len[:, None]
    fast, brute = _both(history, valid, cands)
    expected = _numpy_counts(history, hist_len, cands)
    np.testing.assert_array_equal(np.asarray(fast), expected)
    np.testing.assert_array_equal(np.asarray(brute), expected)


def test_padding_values_never_match():
    # Garbage in padding slots (the layout says zeros, but counting must not rely on it).
    history = jnp.array([[3, 3, 3, 3]], jnp.int32)
    valid = jnp.array([[True, False, False, False]])
    counts = match_counts(sorted_history(history, valid), jnp.array([[3, 0]], jnp.int32))
    np.testing.assert_array_equal(np.asarray(counts), [[1, 0]])


def test_counts_capped_and_offset_per_pair():
    config = tiny_config(hma={"max_count": 2, "pairs": (("item", "item"), ("creator", "creator"))})
    hma = HMAComponent.from_config(config, SCHEMA, rngs=nnx.Rngs(0))
    batch = {k: jnp.asarray(v) for k, v in batch_for().items()}
    n = SCHEMA.history_len
    batch["history_len"] = jnp.array([n, n, 0], jnp.int32)
    batch["history_item"] = jnp.array([[7] * n, [7, 8, 9, 10, 11, 12], [0] * n], jnp.int32)
    batch["history_creator"] = jnp.array([[2] * n, [1, 2, 3, 4, 5, 1], [0] * n], jnp.int32)
    batch["cand_item"] = jnp.array([[7, 8, 1, 1], [7, 13, 1, 1], [7, 1, 1, 1]], jnp.int32)
    batch["cand_creator"] = jnp.array([[2, 3, 1, 1], [1, 2, 1, 1], [2, 1, 1, 1]], jnp.int32)
    counts = np.asarray(hma.counts(batch))
    np.testing.assert_array_equal(counts[0, :2], [[2, 2], [0, 0]])  # 6 matches capped at M=2
    np.testing.assert_array_equal(counts[1, :2], [[1, 2], [0, 1]])
    np.testing.assert_array_equal(counts[2], np.zeros((4, 2)))  # empty history
    # Stride M+1: pair 0 at count M and pair 1 at count 0 use different table rows.
    table = np.asarray(hma.table.table[...])
    assert table.shape[0] == 2 * (2 + 1)
    assert not np.allclose(table[2], table[3])


def test_output_shape_and_finite():
    hma = HMAComponent.from_config(tiny_config(), SCHEMA, rngs=nnx.Rngs(0))
    batch = {k: jnp.asarray(v) for k, v in batch_for().items()}
    out = hma(batch)
    assert out.shape == (3, SCHEMA.num_candidates, 8)
    assert np.all(np.isfinite(np.asarray(out)))


def test_unknown_pair_field_is_named():
    from gesr_jax.models.gesr.model import GESR

    with pytest.raises(ValueError, match=r"model.hma.pairs names 'genre'.*available"):
        GESR(tiny_config(hma={"pairs": (("genre", "genre"),)}), SCHEMA, rngs=nnx.Rngs(0))


def test_every_pair_and_count_has_its_own_table_row():
    # Stride M + 1: count M of pair p and count 0 of pair p + 1 must not share a row (stride M would).
    config = tiny_config(hma={"pairs": (("item", "item"), ("category", "category"), ("creator", "creator"))})
    hma = HMAComponent.from_config(config, SCHEMA, rngs=nnx.Rngs(0))
    m, p = config.hma.max_count, 3
    counts = np.array(np.meshgrid(*[np.arange(m + 1)] * p, indexing="ij")).reshape(p, -1).T  # every combination
    rows = np.asarray(hma.table_rows(jnp.asarray(counts, jnp.int32)))
    pairs_and_counts = {(pair, int(c)) for row in counts for pair, c in enumerate(row)}
    row_of = {(pair, int(c)): int(r) for crow, rrow in zip(counts, rows) for pair, (c, r) in enumerate(zip(crow, rrow))}
    assert len(set(row_of.values())) == len(pairs_and_counts) == p * (m + 1)
    assert sorted(row_of.values()) == list(range(hma.table.vocab))

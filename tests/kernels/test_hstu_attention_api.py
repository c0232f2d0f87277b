"""The public entry point: the mask definition, block-skipping ranges, validation, backend selection."""

import itertools
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels.hstu_attention import api, attention_mask, hstu_attention, hstu_attention_reference
from kernels.hstu_attention.masks import MaskSpec, key_blocks_for_rows, row_blocks_for_keys, tile_mask


def literal_mask(length, targets, seq_len, contextual_len, max_attn_len):
    """The mask exactly as the issue words it, one pair at a time."""
    hist = length - targets
    c = lambda x: min(x, hist)
    mask = np.zeros((seq_len, seq_len), bool)
    for i, j in itertools.product(range(seq_len), repeat=2):
        if not (i < length and j < length):
            continue
        valid = i == j or c(i) > c(j)
        if max_attn_len is not None:
            valid = valid and c(i) - c(j) <= max_attn_len
        contextual = contextual_len > 0 and (j < contextual_len or (i < contextual_len and j < hist))
        mask[i, j] = valid or contextual
    return mask


@pytest.mark.parametrize("contextual_len,max_attn_len", [(0, None), (0, 0), (0, 2), (2, None), (3, 1)])
def test_mask_matches_the_written_definition(contextual_len, max_attn_len):
    seq_len = 9
    rows = [(9, 0), (9, 3), (6, 6), (5, 1), (0, 0), (2, 0), (7, 2)]
    lengths = jnp.array([r[0] for r in rows], jnp.int32)
    targets = jnp.array([r[1] for r in rows], jnp.int32)
    got = np.asarray(attention_mask(lengths, targets, seq_len, contextual_len=contextual_len, max_attn_len=max_attn_len))
    for b, (length, t) in enumerate(rows):
        np.testing.assert_array_equal(got[b], literal_mask(length, t, seq_len, contextual_len, max_attn_len))


def test_candidates_see_history_and_themselves_only():
    mask = np.asarray(attention_mask(jnp.array([6]), jnp.array([2]), 6))[0]
    np.testing.assert_array_equal(mask[4], [1, 1, 1, 1, 1, 0])
    np.testing.assert_array_equal(mask[5], [1, 1, 1, 1, 0, 1])
    assert not mask[:4, 4:].any(), "history never attends to candidates"


@pytest.mark.parametrize("bq,bk", [(4, 4), (4, 8), (8, 4)])
@pytest.mark.parametrize("spec", [MaskSpec(), MaskSpec(0, 3), MaskSpec(2, None), MaskSpec(3, 2), MaskSpec(0, 0)])
def test_skipped_blocks_are_fully_masked_and_free_blocks_fully_valid(bq, bk, spec):
    """Brute force over every (length, targets): the kernels' block ranges against the mask itself."""
    seq_len = 16
    cases = [(n, t) for n in range(seq_len + 1) for t in sorted({0, 1, n // 2, n}) if t <= n]
    length = jnp.array([n for n, _ in cases], jnp.int32)[:, None]
    hist = length - jnp.array([t for _, t in cases], jnp.int32)[:, None]
    pos = np.arange(seq_len)
    mask = np.asarray(tile_mask(pos[None, :, None], pos[None, None, :], length[..., None], hist[..., None], spec))
    candidate_diag = (pos[:, None] == pos[None, :]) & (pos[None, :, None] >= np.asarray(hist)[..., None]) & (
        pos[None, :, None] < np.asarray(length)[..., None])
    off_diag = mask & ~candidate_diag
    row_valid = pos[None, :] < np.asarray(length)
    blocks_q, blocks_k = seq_len // bq, seq_len // bk
    lo, full_hi, hi = map(np.asarray, key_blocks_for_rows(jnp.arange(blocks_q)[None] * bq, bq, bk, length, hist, spec))
    for b, qb, kb in itertools.product(range(len(cases)), range(blocks_q), range(blocks_k)):
        tile = off_diag[b, qb * bq:(qb + 1) * bq, kb * bk:(kb + 1) * bk]
        if not lo[b, qb] <= kb < hi[b, qb]:
            assert not tile.any(), (cases[b], qb, kb)
        if lo[b, qb] <= kb < full_hi[b, qb]:
            full = mask[b, qb * bq:(qb + 1) * bq, kb * bk:(kb + 1) * bk] | ~row_valid[b, qb * bq:(qb + 1) * bq, None]
            assert full.all(), (cases[b], qb, kb)
    lo, full_lo, full_hi, hi = map(
        np.asarray, row_blocks_for_keys(jnp.arange(blocks_k)[None] * bk, bk, bq, length, hist, spec))
    assert (lo <= full_lo).all() and (full_lo <= full_hi).all() and (full_hi <= hi).all()
    for b, kb, qb in itertools.product(range(len(cases)), range(blocks_k), range(blocks_q)):
        tile = off_diag[b, qb * bq:(qb + 1) * bq, kb * bk:(kb + 1) * bk]
        if not lo[b, kb] <= qb < hi[b, kb]:
            assert not tile.any(), (cases[b], kb, qb)
        if full_lo[b, kb] <= qb < full_hi[b, kb]:
            assert mask[b, qb * bq:(qb + 1) * bq, kb * bk:(kb + 1) * bk].all(), (cases[b], kb, qb)


def _inputs(dtype=jnp.float32):
    q = jax.random.normal(jax.random.key(0), (2, 8, 1, 4), dtype)
    return q, q + 1, q - 1, jnp.array([8, 5], jnp.int32), jnp.array([2, 0], jnp.int32)


@pytest.mark.parametrize(
    "change,message",
    [
        (dict(q=jnp.zeros((2, 8, 4))), "q must be \\[B, L, H, D\\]"),
        (dict(k=jnp.zeros((2, 8, 1, 5))), "q and k must have the same shape"),
        (dict(v=jnp.zeros((2, 7, 1, 4))), "v must be"),
        (dict(lengths=jnp.array([8.0, 5.0])), "lengths must be an integer"),
        (dict(num_targets=jnp.array([1, 2, 3])), "num_targets must be an integer"),
        (dict(normalizer=0.0), "normalizer must be a static positive number"),
        (dict(contextual_len=-1), "contextual_len must be a Python int >= 0"),
        (dict(max_attn_len=1.5), "max_attn_len must be None or a Python int"),
        (dict(implementation="cuda"), "implementation must be None or one of"),
        (dict(score_fn="relu"), "score_fn must be one of"),
        (dict(normalizer=None), "normalizer must be a static positive number"),
        (dict(alibi_slopes=jnp.ones((2,))), "alibi_slopes must be a floating \\[H=1\\]"),
        (dict(time_slopes=jnp.ones((1,))), "timestamps and time_slopes go together"),
        (dict(timestamps=jnp.ones((2, 7)), time_slopes=jnp.ones((1,))), "timestamps must be a numeric"),
    ],
)
def test_bad_input_names_the_field(change, message):
    q, k, v, lengths, targets = _inputs()
    args = dict(q=q, k=k, v=v, lengths=lengths, num_targets=targets, normalizer=8.0)
    args.update(change)
    with pytest.raises(ValueError, match=message):
        hstu_attention(**args)


def test_normalizer_must_be_static():
    q, k, v, lengths, targets = _inputs()
    with pytest.raises(ValueError, match="normalizer"):
        jax.jit(lambda n: hstu_attention(q, k, v, lengths, targets, normalizer=n))(8.0)


def test_cpu_default_is_xla_without_warning():
    q, k, v, lengths, targets = _inputs()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = hstu_attention(q, k, v, lengths, targets, normalizer=8.0)
    ref = hstu_attention_reference(q, k, v, lengths, targets, normalizer=8.0)
    np.testing.assert_allclose(out, ref, rtol=1e-6, atol=1e-6)


def test_default_alpha_is_inverse_sqrt_dqk_and_lengths_are_clipped():
    q, k, v, lengths, targets = _inputs()
    a = hstu_attention(q, k, v, jnp.array([99, 5]), jnp.array([2, 9]), normalizer=8.0)
    b = hstu_attention(q, k, v, jnp.array([8, 5]), jnp.array([2, 5]), normalizer=8.0, alpha=0.5)
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)


def test_backend_raising_not_implemented_falls_back_once_per_reason(monkeypatch):
    import dataclasses

    from kernels.hstu_attention.registry import BACKENDS

    calls = []

    def refusing(*args, **kwargs):
        calls.append(1)
        raise NotImplementedError("head dim 4 is too small")

    triton = dataclasses.replace(BACKENDS["pallas_triton"], attention=refusing)
    monkeypatch.setattr(api, "_auto_candidates", lambda request: [triton, BACKENDS["xla"]])
    monkeypatch.setattr(api, "_warned", set())
    q, k, v, lengths, targets = _inputs()
    with pytest.warns(RuntimeWarning, match="pallas_triton unavailable \\(head dim 4 is too small\\)"):
        out = hstu_attention(q, k, v, lengths, targets, normalizer=8.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        again = hstu_attention(q, k, v, lengths, targets, normalizer=8.0)
    assert len(calls) == 2
    ref = hstu_attention_reference(q, k, v, lengths, targets, normalizer=8.0)
    np.testing.assert_allclose(out, ref, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(again, ref, rtol=1e-6, atol=1e-6)
    monkeypatch.setitem(BACKENDS, "pallas_triton", triton)
    with pytest.raises(NotImplementedError):
        hstu_attention(q, k, v, lengths, targets, normalizer=8.0, implementation="pallas_triton")


def test_unsupported_backends_are_skipped_silently(monkeypatch):
    """On Hopper float32 goes to Triton without a warning: Mosaic GPU declares it unsupported up front."""
    from kernels.hstu_attention import registry

    hopper = type("Device", (), {"compute_capability": "9.0"})()
    monkeypatch.setattr(api, "_auto_candidates", lambda request: registry.auto_candidates(request, "gpu", hopper))
    q, k, v, lengths, targets = _inputs(jnp.float32)
    names = [b.name for b in registry.auto_candidates(api.Request("full", "float32", "silu", frozenset(), 4, 4),
                                                          "gpu", hopper)]
    assert names == ["pallas_triton", "xla"]
    bf16 = [b.name for b in registry.auto_candidates(api.Request("full", "bfloat16", "silu", frozenset(), 4, 4),
                                                         "gpu", hopper)]
    assert bf16 == ["pallas_mosaic_gpu", "pallas_triton", "xla"]
    with pytest.raises(NotImplementedError, match="bfloat16"):
        hstu_attention(q, k, v, lengths, targets, normalizer=8.0, implementation="pallas_mosaic_gpu", interpret=True)

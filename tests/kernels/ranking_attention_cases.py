"""Shared checks of the score functions, biases and cached-prefix mode, mixed into every backend's test class.

Each check runs the backend (Pallas ones interpreted) and compares output and every gradient (q, k, v, the
prefix tensors and the slopes) with `jax.grad` of the pure-jnp reference. A combination the backend does not
declare (`registry.BACKENDS[...]`) is skipped, and the declaration itself is what the API falls back on.
"""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels.hstu_attention import (
    geometric_alibi_slopes,
    hstu_attention,
    hstu_attention_cached,
    hstu_attention_cached_reference,
    hstu_attention_reference,
)
from kernels.hstu_attention.base import Request
from kernels.hstu_attention.registry import BACKENDS

# GESR_KERNEL_TESTS=compiled (set by experiments/gpu_check.py on an accelerator host): every check runs the
# kernels compiled for the local device instead of interpreted; backends that cannot run there are skipped.
INTERPRET = os.environ.get("GESR_KERNEL_TESTS", "interpret") != "compiled"

# (score_fn, biases): one bias-free softmax, ALiBi with each activation, both biases with each activation.
COMBOS = [("softmax", ()), ("silu", ("alibi",)), ("softmax", ("alibi",)), ("silu", ("alibi", "time")),
          ("softmax", ("alibi", "time"))]
COMBO_IDS = [f"{s}-{'+'.join(b) or 'nobias'}" for s, b in COMBOS]
TOL = {jnp.dtype(jnp.float32): (2e-5, 2e-6), jnp.dtype(jnp.bfloat16): (3e-2, 1.5e-2)}


def close(actual, expected, dtype, what, rtol=None):
    actual = np.asarray(jnp.asarray(actual, jnp.float32))
    expected = np.asarray(jnp.asarray(expected, jnp.float32))
    assert np.isfinite(actual).all(), f"{what}: non-finite values"
    default_rtol, atol = TOL[jnp.dtype(dtype)]
    rtol = max(rtol or 0.0, default_rtol)
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=atol * max(float(np.abs(expected).max()), 1e-3),
                               err_msg=what)


def bias_inputs(biases, batch, rows, heads, seed, prefix=None):
    """Slopes (float32 [H]) and int32 timestamps (minutes apart, non-decreasing) for the requested biases."""
    alibi = geometric_alibi_slopes(heads) if "alibi" in biases else None
    time_slopes = ts = pts = None
    if "time" in biases:
        key = jax.random.key(seed + 100)
        time_slopes = jnp.linspace(0.3, 0.05, heads, dtype=jnp.float32)
        # Epoch seconds, so that the int32 differences (not the float32 values) carry the precision.
        ts = 1_700_000_000 + jnp.cumsum(jax.random.randint(key, (batch, rows), 0, 600), axis=1).astype(jnp.int32)
        if prefix is not None:
            # Queries happen within the prefix's time span, so buckets vary (0 .. ~9) instead of all being ~14.
            pts = 1_700_000_000 + jnp.cumsum(jax.random.randint(key, (batch, prefix), 0, 300), axis=1).astype(jnp.int32)
            ts = 1_700_000_000 + jax.random.randint(jax.random.key(seed + 101), (batch, rows), 0, 300 * prefix)
    return alibi, ts, pts, time_slopes


@functools.lru_cache(maxsize=None)
def full_fwd_bwd(impl, score_fn, normalizer, contextual_len, max_attn_len, blocks):
    """jit(forward + VJP in q, k, v and the slopes) of one backend (None = reference under autodiff)."""

    def fwd(q, k, v, lengths, targets, alibi, ts, tslopes):
        kw = dict(score_fn=score_fn, normalizer=normalizer, alibi_slopes=alibi, timestamps=ts, time_slopes=tslopes,
                  contextual_len=contextual_len, max_attn_len=max_attn_len)
        if impl is None:
            return hstu_attention_reference(q, k, v, lengths, targets, **kw)
        return hstu_attention(q, k, v, lengths, targets, implementation=impl, interpret=INTERPRET, block_sizes=blocks, **kw)

    def fwd_bwd(q, k, v, lengths, targets, alibi, ts, tslopes, d_out):
        out, vjp = jax.vjp(lambda q, k, v, a, t: fwd(q, k, v, lengths, targets, a, ts, t), q, k, v, alibi, tslopes)
        return out, vjp(d_out.astype(out.dtype))

    return jax.jit(fwd_bwd)


@functools.lru_cache(maxsize=None)
def cached_fwd_bwd(impl, score_fn, normalizer, self_term, contextual_len, max_attn_len, blocks):
    def fwd(q, k, v, kp, vp, plen, nq, alibi, ts, pts, tslopes):
        kw = dict(self_term=self_term, score_fn=score_fn, normalizer=normalizer, alibi_slopes=alibi, timestamps=ts,
                  prefix_timestamps=pts, time_slopes=tslopes, contextual_len=contextual_len, max_attn_len=max_attn_len)
        if impl is None:
            return hstu_attention_cached_reference(q, k, v, kp, vp, plen, nq, **kw)
        return hstu_attention_cached(q, k, v, kp, vp, plen, nq, implementation=impl, interpret=INTERPRET,
                                     block_sizes=blocks, **kw)

    def fwd_bwd(q, k, v, kp, vp, plen, nq, alibi, ts, pts, tslopes, d_out):
        f = lambda q, k, v, kp, vp, a, t: fwd(q, k, v, kp, vp, plen, nq, a, ts, pts, t)
        out, vjp = jax.vjp(f, q, k, v, kp, vp, alibi, tslopes)
        return out, vjp(d_out.astype(out.dtype))

    return jax.jit(fwd_bwd)


def normal(seed, shape, dtype):
    return jax.random.normal(jax.random.key(seed), shape, jnp.float32).astype(dtype)


class RankingAttentionBackendTests:
    """Mixed into HSTUAttentionBackendTests; uses its IMPLEMENTATION, DTYPES and blocks_for."""

    # (B, L, H, Dqk, Dv, lengths, targets): lengths 0 and L, all-candidate row, L a multiple of no tile.
    FULL_SHAPE = (3, 37, 2, 16, 8, (37, 20, 0), (1, 20, 0))
    # (B, C, N, H, Dqk, Dv, prefix_len, num_queries): an empty prefix, a full one, rows past num_queries.
    CACHED_SHAPE = (3, 9, 21, 2, 16, 8, (21, 0, 13), (9, 4, 0))
    FEATURE_MASKS = ((0, None), (2, 5))  # (contextual_len, max_attn_len) pairs the full-mode checks cover

    def require(self, mode, score_fn, biases, dtype):
        backend = BACKENDS[self.IMPLEMENTATION]
        request = Request(mode, jnp.dtype(dtype).name, score_fn, frozenset(biases), 16, 8)
        reason = backend.unsupported_reason(request)
        if reason is not None:
            pytest.skip(f"declared unsupported: {reason}")

    def check_full(self, score_fn, biases, dtype, contextual_len=0, max_attn_len=None, shape=None, seed=0):
        batch, seq_len, heads, dqk, dv, lengths, targets = shape or self.FULL_SHAPE
        q, k = normal(seed, (batch, seq_len, heads, dqk), dtype), normal(seed + 1, (batch, seq_len, heads, dqk), dtype)
        v = normal(seed + 2, (batch, seq_len, heads, dv), dtype)
        d_out = normal(seed + 3, (batch, seq_len, heads, dv), jnp.float32)
        alibi, ts, _, tslopes = bias_inputs(biases, batch, seq_len, heads, seed)
        ints = jnp.asarray(lengths, jnp.int32), jnp.asarray(targets, jnp.int32)
        norm = float(seq_len)
        blocks = self.blocks_for(seed)
        out, grads = full_fwd_bwd(self.IMPLEMENTATION, score_fn, norm, contextual_len, max_attn_len, blocks)(
            q, k, v, *ints, alibi, ts, tslopes, d_out)
        f32 = [x.astype(jnp.float32) for x in (q, k, v)]
        ref_out, ref_grads = full_fwd_bwd(None, score_fn, norm, contextual_len, max_attn_len, None)(
            *f32, *ints, alibi, ts, tslopes, d_out)
        close(out, ref_out, dtype, f"{score_fn} {biases} forward")
        dead = np.arange(seq_len)[None, :] >= np.asarray(lengths)[:, None]
        assert (np.asarray(out, np.float32)[dead] == 0).all(), "rows beyond lengths must be exactly zero"
        for name, g, rg in zip(("dq", "dk", "dv", "d_alibi", "d_time"), grads, ref_grads):
            if rg is not None:
                # Slope gradients sum dS * distance over every pair: with softmax's sum_j dS = 0 the sum cancels,
                # so allow more float32 rounding there.
                close(g, rg, dtype, name, rtol=2e-4 if name.startswith("d_") else None)
        return out

    def check_cached(self, score_fn, biases, dtype, self_term=True, contextual_len=0, max_attn_len=None, seed=0):
        batch, rows, n, heads, dqk, dv, plen, nq = self.CACHED_SHAPE
        q, k = normal(seed, (batch, rows, heads, dqk), dtype), normal(seed + 1, (batch, rows, heads, dqk), dtype)
        v = normal(seed + 2, (batch, rows, heads, dv), dtype)
        kp, vp = normal(seed + 4, (batch, n, heads, dqk), dtype), normal(seed + 5, (batch, n, heads, dv), dtype)
        d_out = normal(seed + 3, (batch, rows, heads, dv), jnp.float32)
        alibi, ts, pts, tslopes = bias_inputs(biases, batch, rows, heads, seed, prefix=n)
        ints = jnp.asarray(plen, jnp.int32), jnp.asarray(nq, jnp.int32)
        statics = (score_fn, float(n), self_term, contextual_len, max_attn_len)
        out, grads = cached_fwd_bwd(self.IMPLEMENTATION, *statics, self.blocks_for(seed))(
            q, k, v, kp, vp, *ints, alibi, ts, pts, tslopes, d_out)
        f32 = [x.astype(jnp.float32) for x in (q, k, v, kp, vp)]
        ref_out, ref_grads = cached_fwd_bwd(None, *statics, None)(*f32, *ints, alibi, ts, pts, tslopes, d_out)
        close(out, ref_out, dtype, f"cached {score_fn} {biases} forward")
        dead = np.arange(rows)[None, :] >= np.asarray(nq)[:, None]
        assert (np.asarray(out, np.float32)[dead] == 0).all(), "rows beyond num_queries must be exactly zero"
        names = ("dq", "dk", "dv", "dk_prefix", "dv_prefix", "d_alibi", "d_time")
        for name, g, rg in zip(names, grads, ref_grads):
            if rg is not None:
                close(g, rg, dtype, f"cached {name}", rtol=2e-4 if name.startswith("d_") else None)

    @pytest.mark.parametrize("combo", range(len(COMBOS)), ids=COMBO_IDS)
    def test_scores_and_biases_full(self, combo):
        score_fn, biases = COMBOS[combo]
        dtype = self.DTYPES[0]
        self.require("full", score_fn, biases, dtype)
        self.check_full(score_fn, biases, dtype, *self.FEATURE_MASKS[combo % len(self.FEATURE_MASKS)], seed=combo)

    @pytest.mark.parametrize("self_term", [True, False])
    @pytest.mark.parametrize("combo", range(len(COMBOS)), ids=COMBO_IDS)
    def test_scores_and_biases_cached(self, combo, self_term):
        score_fn, biases = COMBOS[combo]
        dtype = self.DTYPES[0]
        self.require("cached", score_fn, biases, dtype)
        window = (1, 6) if combo == 3 else (0, None)
        self.check_cached(score_fn, biases, dtype, self_term, *window, seed=combo)

    @pytest.mark.parametrize("self_term, contextual_len, max_attn_len", [(True, 0, None), (False, 0, None),
                                                                         (True, 1, 6)])
    def test_cached_silu(self, self_term, contextual_len, max_attn_len):
        """The serving path: SiLU without biases (empty prefix, rows past num_queries, C and N off the tiles)."""
        dtype = self.DTYPES[0]
        self.require("cached", "silu", (), dtype)
        self.check_cached("silu", (), dtype, self_term, contextual_len, max_attn_len, seed=7)

    def test_cached_silu_bfloat16(self):
        self.require("cached", "silu", (), jnp.bfloat16)
        self.check_cached("silu", (), jnp.bfloat16, seed=8)

    @pytest.mark.parametrize("score_fn", ["silu", "softmax"])
    @pytest.mark.parametrize("platform", ["tpu", "cuda"])
    def test_export_lowering_cached_no_bias(self, platform, score_fn):
        """The cached mode without biases, forward + all gradients, lowers at D = 128, N = 1024, C = 512."""
        if platform not in self.EXPORT_PLATFORMS:
            pytest.skip(f"{self.IMPLEMENTATION} does not target {platform}")
        self.require("cached", score_fn, (), jnp.bfloat16)
        export_features(self.IMPLEMENTATION, platform, "cached", score_fn=score_fn, biases=False)

    def test_softmax_alibi_bfloat16(self):
        self.require("full", "softmax", ("alibi",), jnp.bfloat16)
        self.check_full("softmax", ("alibi",), jnp.bfloat16, seed=5)
        self.require("cached", "softmax", ("alibi",), jnp.bfloat16)
        self.check_cached("softmax", ("alibi",), jnp.bfloat16, seed=5)

    @pytest.mark.parametrize("score_fn", ["silu", "softmax"])
    def test_cached_equals_full_candidate_rows(self, score_fn):
        """Cached prefix + queries == the candidate rows of the full call on [history ; candidates]."""
        biases = ("alibi", "time")
        dtype = self.DTYPES[0]
        self.require("cached", score_fn, biases, dtype)
        self.require("full", score_fn, biases, dtype)
        batch, rows, n, heads, dqk, dv = 3, 5, 12, 2, 16, 8
        plen, nq = np.array([12, 7, 3]), np.array([5, 2, 4])
        q, k, v = (normal(s, (batch, rows, heads, d), dtype) for s, d in ((1, dqk), (2, dqk), (3, dv)))
        kp, vp = normal(4, (batch, n, heads, dqk), dtype), normal(5, (batch, n, heads, dv), dtype)
        alibi, ts, pts, tslopes = bias_inputs(biases, batch, rows, heads, 0, prefix=n)
        kw = dict(score_fn=score_fn, normalizer=32.0, alibi_slopes=alibi, time_slopes=tslopes, contextual_len=2,
                  max_attn_len=9, implementation=self.IMPLEMENTATION, interpret=INTERPRET)
        cached = hstu_attention_cached(q, k, v, kp, vp, jnp.asarray(plen), jnp.asarray(nq), timestamps=ts,
                                       prefix_timestamps=pts, block_sizes=self.blocks_for(0), **kw)
        # Pack [history ; candidates] per row, then pad to one length.
        seq = n + rows
        pack = lambda hist, cand: np.stack([np.concatenate([np.asarray(hist[b, :plen[b]]), np.asarray(cand[b]),
                                                            np.zeros_like(np.asarray(hist[b, plen[b]:]))])
                                            for b in range(batch)])
        fq, fk, fv = (jnp.asarray(pack(h, c)) for h, c in ((kp, q), (kp, k), (vp, v)))
        fts = jnp.asarray(pack(pts, ts))
        full = hstu_attention(fq, fk, fv, jnp.asarray(plen + nq), jnp.asarray(nq), timestamps=fts,
                              block_sizes=self.blocks_for(0), **kw)
        assert full.shape[1] == seq
        for b in range(batch):
            close(cached[b, :nq[b]], full[b, plen[b]:plen[b] + nq[b]], dtype, f"row {b}")
            assert (np.asarray(cached[b, nq[b]:], np.float32) == 0).all()

    @pytest.mark.parametrize("mode", ["full", "cached"])
    @pytest.mark.parametrize("platform", ["tpu", "cuda"])
    def test_export_lowering_of_new_features(self, platform, mode):
        """Softmax with ALiBi and time bias, forward + all gradients, lowers at D = 128, L = 1024 (bf16)."""
        if platform not in self.EXPORT_PLATFORMS:
            pytest.skip(f"{self.IMPLEMENTATION} does not target {platform}")
        self.require(mode, "softmax", ("alibi", "time"), jnp.bfloat16)
        export_features(self.IMPLEMENTATION, platform, mode)


def export_features(implementation, platform, mode, *, seq_len=1024, head_dim=128, prefix=1024, blocks=None,
                    score_fn="softmax", biases=True):
    """jax.export of value_and_grad (q, k, v, prefixes and slopes) for `platform`, bf16; C = seq_len // 2 in the
    cached mode. biases=False: no ALiBi / time bias (and no slope gradients)."""
    from jax import export

    from hstu_attention_cases import abstract_gpu_mesh

    bf = lambda *s: jax.ShapeDtypeStruct(s, jnp.bfloat16)
    ints = jax.ShapeDtypeStruct((2,), jnp.int32)
    slopes = jax.ShapeDtypeStruct((2,), jnp.float32)
    kw = dict(score_fn=score_fn, implementation=implementation, block_sizes=blocks,
              normalizer=float(prefix) if score_fn == "silu" else None)
    if not biases:
        if mode == "full":
            raise ValueError("export_features: biases=False covers the cached mode only")
        c = seq_len // 2
        args = (bf(2, c, 2, head_dim),) * 3 + (bf(2, prefix, 2, head_dim),) * 2 + (ints, ints)

        def loss(q, k, v, kp, vp, plen, nq):
            return jnp.sum(hstu_attention_cached(q, k, v, kp, vp, plen, nq, **kw).astype(jnp.float32))

        argnums = (0, 1, 2, 3, 4)
    elif mode == "full":
        args = (bf(2, seq_len, 2, head_dim),) * 3 + (ints, ints, slopes, slopes,
                                                    jax.ShapeDtypeStruct((2, seq_len), jnp.int32))

        def loss(q, k, v, lengths, targets, alibi, tslopes, ts):
            out = hstu_attention(q, k, v, lengths, targets, alibi_slopes=alibi, time_slopes=tslopes, timestamps=ts, **kw)
            return jnp.sum(out.astype(jnp.float32))

        argnums = (0, 1, 2, 5, 6)
    else:
        c = seq_len // 2
        args = (bf(2, c, 2, head_dim),) * 3 + (bf(2, prefix, 2, head_dim),) * 2 + (
            ints, ints, slopes, slopes, jax.ShapeDtypeStruct((2, c), jnp.int32),
            jax.ShapeDtypeStruct((2, prefix), jnp.int32))

        def loss(q, k, v, kp, vp, plen, nq, alibi, tslopes, ts, pts):
            out = hstu_attention_cached(q, k, v, kp, vp, plen, nq, alibi_slopes=alibi, time_slopes=tslopes,
                                        timestamps=ts, prefix_timestamps=pts, **kw)
            return jnp.sum(out.astype(jnp.float32))

        argnums = (0, 1, 2, 3, 4, 7, 8)
    fn = jax.jit(jax.value_and_grad(loss, argnums=argnums))
    checks = [export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")]
    with abstract_gpu_mesh(implementation):
        return export.export(fn, platforms=[platform], disabled_checks=checks)(*args)

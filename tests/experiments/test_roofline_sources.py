"""experiments/roofline_sources.py: bytes and profiled time of compiled ops, split by the source file of each op."""

from __future__ import annotations

import pathlib
import sys

import jax
import jax.numpy as jnp

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2] / "experiments"))
import roofline_sources  # noqa: E402

from kernels.hstu_attention import hstu_attention  # noqa: E402


def _compiled():
    """A jitted call whose attention ops come from kernels/ and whose other ops come from this test file."""
    q = jax.random.normal(jax.random.key(0), (4, 64, 2, 16))
    lengths = jnp.array([64, 30, 0, 7])

    def f(q):
        out = hstu_attention(q, q, q, lengths, normalizer=64.0, implementation="xla")
        return jnp.tanh(out) * 3.0

    exe = jax.jit(f).lower(q).compile()
    return exe.as_text(), lambda: exe(q)


def test_bytes_and_time_are_split_by_source():
    hlo, call = _compiled()
    moved = roofline_sources.bytes_by_source(hlo)
    spent = roofline_sources.time_by_source(hlo, call, calls=2)
    label = "HSTU attention (kernels/)"
    # The [4, 2, 64, 64] scores pass through the kernel's ops: far more bytes there than in the tanh epilogue.
    assert moved[label] > 4 * 2 * 64 * 64 * 4
    assert moved[label] > moved.get("other", 0.0)
    assert spent.get(label, 0.0) > 0.0, spent  # the trace's per-op events were matched to the program's ops
    assert all(ms >= 0.0 for ms in spent.values())


def test_no_stack_frames_gives_empty_splits():
    assert roofline_sources.bytes_by_source("HloModule m\nENTRY %main {}\n") == {}
    assert roofline_sources.time_by_source("HloModule m\nENTRY %main {}\n", lambda: None) == {}

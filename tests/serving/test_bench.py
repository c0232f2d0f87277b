"""experiments/bench_serving.py --smoke runs end to end and writes its table (no duration is asserted)."""

from __future__ import annotations

import importlib.util
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]


@pytest.mark.slow  # about a minute on 2 cores (compile-bound); `make test-slow` runs it
def test_bench_serving_smoke_writes_the_table(tmp_path):
    spec = importlib.util.spec_from_file_location("bench_serving", ROOT / "experiments" / "bench_serving.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "serving.md"
    assert bench.main(["--smoke", "--repeats", "1", "--out", str(out)]) == 0
    text = out.read_text()
    assert "Machine: platform" in text and "jax " in text
    for mode in ("scorer", "scorer+reuse", "naive apply"):
        assert f"| {mode} |" in text
    # Per shape (2) and batch size (2): gesr has scorer, +reuse, parse and pack, naive and full-sequence rows;
    # two_tower the first four; the last shape adds the six GESR ablation rows, the full-sequence model on
    # the dense attention and the full-sequence model with the memory released before each call, per batch size.
    assert text.count("| gesr |") == 20 + 16 and text.count("| two_tower |") == 16
    assert "ablation: full-sequence apply, memory released / full-sequence apply" in text
    assert "GESR +reuse x naive" in text and "FLOPs: full-sequence / scorer" in text
    assert "GESR +reuse x full-sequence apply, dense attention (xla)" in text
    assert "| parse and pack only |" in text


def test_bench_serving_refuses_an_unknown_model(capsys):
    spec = importlib.util.spec_from_file_location("bench_serving", ROOT / "experiments" / "bench_serving.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    with pytest.raises(SystemExit) as exc:
        bench.main(["--smoke", "--models", "gesr,genrank"])
    assert exc.value.code == 2 and "--models takes gesr and/or two_tower" in capsys.readouterr().err


def test_selected_nro_softmax_ablation_computes_what_attend_computes():
    """The bench's "scorer, selected NRO softmax" row runs the earlier formula: same numbers as attend."""
    import sys

    import jax.numpy as jnp
    import numpy as np

    sys.path.insert(0, str(ROOT / "experiments"))
    from serving_ablations import _selected_softmax_attend

    from gesr_jax.layers.cross_attention import attend

    rng = np.random.default_rng(3)
    q, k, v = (jnp.asarray(rng.normal(size=s), jnp.float32) for s in ((3, 5, 2, 4), (3, 9, 2, 4), (3, 9, 2, 4)))
    valid = jnp.asarray(np.arange(9)[None, :] < np.array([[9], [3], [0]]))
    for kind in ("softmax", "silu"):
        got = _selected_softmax_attend(q, k, v, valid, kind=kind, normalizer=8.0)
        np.testing.assert_allclose(got, attend(q, k, v, valid, kind=kind, normalizer=8.0), atol=1e-6, rtol=0)

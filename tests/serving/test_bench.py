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
    # 2 shapes x 2 batch sizes x 2 models x 3 modes, then one ratio row per (shape, batch size).
    # Per shape and batch: gesr has scorer, +reuse, naive and full-sequence rows; two_tower the first three;
    # the last shape adds the three GESR ablation rows per batch size.
    assert text.count("| gesr |") == 16 + 6 and text.count("| two_tower |") == 12  # + 3 ablations x 2 B (last shape)
    assert "GESR +reuse x naive" in text

"""experiments/bench_genrank.py --smoke runs and writes its table (no timing is asserted)."""

from __future__ import annotations

import importlib.util
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]


@pytest.mark.slow  # about a minute on 2 cores (compile-bound); `make test-slow` runs it
def test_bench_genrank_smoke_writes_every_row(tmp_path):
    spec = importlib.util.spec_from_file_location("bench_genrank", ROOT / "experiments" / "bench_genrank.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "table.md"
    assert bench.main(["--smoke", "--out", str(out)]) == 0
    text = out.read_text()
    for label in bench.MODELS:
        assert f"| 8 | {label} |" in text
    assert "interleaved / action-oriented train step" in text

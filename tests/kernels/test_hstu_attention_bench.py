"""The benchmark script's --smoke mode runs end to end on CPU, writes its table, and survives failing backends."""

import importlib.util
import pathlib
import re
import sys

import pytest

from kernels.hstu_attention import BlockSizes

SCRIPT = pathlib.Path(__file__).resolve().parents[2] / "experiments" / "bench_hstu_attention.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_hstu_attention", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the script loads
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


def table_rows(text: str) -> list[list[str]]:
    return [[cell.strip() for cell in line.split("|")[1:-1]] for line in text.splitlines() if re.match(r"\| \(\d", line)]


def test_smoke_mode_checks_times_and_writes_the_table(bench, tmp_path):
    out = bench.main(["--smoke", "--impl", "xla,pallas_triton", "--repeats", "1", "--out", str(tmp_path / "t.md")])
    text = out.read_text()
    assert "jax " in text and "date " in text and "device: " in text
    rows = table_rows(text)
    assert [row[1] for row in rows] == ["xla", "pallas_triton"]
    assert [row[2] for row in rows] == ["-", "fwd 64x64, bwd 64x64, w4 s3"]
    assert all(row[3] == "ok" and float(row[4]) > 0 and float(row[5]) > 0 for row in rows)
    assert len(bench.SHAPES) == 4 and bench.META_H100[(32, 4, 1024, 128, 0)] == (0.232, 0.758)


def test_a_failing_backend_becomes_a_row_and_fails_the_run_after_the_table(bench, tmp_path, monkeypatch):
    real_build = bench.build

    def build(implementation, *args):
        if implementation == "pallas_triton":
            raise RuntimeError("simulated compile error\nsecond line")
        return real_build(implementation, *args)

    monkeypatch.setattr(bench, "build", build)
    out = tmp_path / "t.md"
    with pytest.raises(SystemExit, match="backends failed to run"):
        bench.main(["--smoke", "--impl", "xla,pallas_triton", "--repeats", "1", "--out", str(out)])
    rows = table_rows(out.read_text())
    assert rows[0][1] == "xla" and rows[0][3] == "ok"
    assert rows[1][1] == "pallas_triton" and rows[1][3] == "RuntimeError: simulated compile error"


def test_sweep_lists_every_candidate_and_keeps_rejected_ones(bench, tmp_path, monkeypatch):
    rejected = BlockSizes(block_q=128, block_k=64)  # Mosaic GPU's row tile is fixed at the warpgroup's 64
    monkeypatch.setitem(bench.TUNING_CANDIDATES, "pallas_triton", [BlockSizes(), BlockSizes(block_q=32, block_k=16)])
    monkeypatch.setitem(bench.TUNING_CANDIDATES, "pallas_mosaic_gpu", [rejected])
    out = bench.main(["--smoke", "--sweep", "--impl", "pallas_triton,pallas_mosaic_gpu", "--repeats", "1",
                      "--out", str(tmp_path / "s.md")])
    text = out.read_text()
    rows = table_rows(text)
    assert [(row[1], row[2]) for row in rows] == [
        ("pallas_triton", "fwd 64x64, bwd 64x64, w4 s2"),
        ("pallas_triton", "fwd 32x16, bwd 64x64, w4 s2"),
        ("pallas_mosaic_gpu", "fwd 128x64, bwd 64x64"),
    ]
    assert rows[0][3] == rows[1][3] == "ok"
    assert rows[2][3].startswith("NotImplementedError: pallas_mosaic_gpu: block_q")
    assert re.search(r"^- \(2, 2, 64, 16, 8\) pallas_triton: fwd (64x64|32x16)", text, re.M)


def test_budget_and_bad_arguments(bench, tmp_path):
    out = bench.main(["--smoke", "--impl", "xla", "--budget-minutes", "0", "--out", str(tmp_path / "b.md")])
    assert table_rows(out.read_text())[0][3] == "skipped: --budget-minutes reached"
    with pytest.raises(SystemExit, match="--shapes"):
        bench.main(["--smoke", "--shapes", "7"])
    with pytest.raises(SystemExit, match="unknown backend"):
        bench.main(["--smoke", "--impl", "cuda_magic"])


@pytest.mark.parametrize("shape", [(32, 4, 1024, 128, 0), (128, 2, 512, 64, 128), (1, 1, 5, 2, 5)])
def test_forward_flops_count_valid_pairs(bench, shape):
    batch, heads, seq_len, dim, targets = shape
    hist = seq_len - targets
    pairs = hist * (hist + 1) // 2 + targets * hist + targets  # causal history; candidates see history + self
    assert bench.forward_flops(shape) == 4 * batch * heads * dim * pairs


@pytest.mark.slow  # about a minute on 2 cores (compile-bound); `make test-slow` runs it
def test_ranking_benchmark_smoke(tmp_path):
    """bench_ranking_attention.py --smoke: softmax + ALiBi and cached-prefix tables, every row checked ok."""
    spec = importlib.util.spec_from_file_location("bench_ranking_attention", SCRIPT.parent / "bench_ranking_attention.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    try:
        spec.loader.exec_module(module)
        text = module.main(["--smoke", "--repeats", "1", "--out", str(tmp_path / "r.md")]).read_text()
    finally:
        sys.modules.pop(spec.name, None)
    assert "jax " in text and "date " in text and "device: " in text
    rows = [[c.strip() for c in line.split("|")[1:-1]] for line in text.splitlines() if line.startswith("| (")]
    calls = [row[1] for row in rows]
    assert "dot_product_attention[xla], dense bias" in calls and "xla cached" in calls and "xla full L=N+C" in calls
    assert all(row[2] == "ok" for row in rows), rows

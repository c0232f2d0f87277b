"""The benchmark script's --smoke mode runs end to end on CPU and writes its table."""

import importlib.util
import pathlib
import re

import pytest

SCRIPT = pathlib.Path(__file__).resolve().parents[2] / "experiments" / "bench_hstu_attention.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_hstu_attention", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_smoke_mode_checks_times_and_writes_the_table(bench, tmp_path):
    out = bench.main(["--smoke", "--impl", "xla,pallas_triton", "--repeats", "1", "--out", str(tmp_path / "t.md")])
    text = out.read_text()
    assert "jax " in text and "date " in text and "device: " in text
    rows = [line for line in text.splitlines() if re.match(r"\| \(\d", line)]
    assert [row.split("|")[2].strip() for row in rows] == ["xla", "pallas_triton"]
    assert all(row.split("|")[3].strip() == "ok" for row in rows)
    assert len(bench.SHAPES) == 4 and bench.META_H100[(32, 4, 1024, 128, 0)] == (0.232, 0.758)

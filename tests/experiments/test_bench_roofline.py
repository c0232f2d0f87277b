"""experiments/bench_roofline.py --smoke compiles every row, reads its cost analysis and writes the table."""

from __future__ import annotations

import importlib.util
import pathlib
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]


@pytest.mark.slow  # compiles three train steps and the serving pair: about a minute on 2 cores
def test_bench_roofline_smoke_writes_every_row(tmp_path):
    spec = importlib.util.spec_from_file_location("bench_roofline", ROOT / "experiments" / "bench_roofline.py")
    bench = importlib.util.module_from_spec(spec)
    sys.modules["bench_roofline"] = bench  # its dataclasses look their module up
    spec.loader.exec_module(bench)
    out = tmp_path / "roofline.md"
    assert bench.main(["--smoke", "--out", str(out)]) == 0
    text = out.read_text()
    assert "Load average" in text and "GFLOP per CPU-second" in text
    rows = [line for line in text.splitlines() if line.startswith("| ") and not line.startswith(("| row", "| ---"))]
    names = [r.split(" | ")[0][2:] for r in rows]
    table = names[: names.index("probe: stream") + 1]
    assert table == [f"train step {k}" for k in bench.PRESETS] + [
        f"train step gesr, {v}" for v in bench.GESR_VARIANTS] + [
        "gesr encode_request", "gesr score", "gesr score, blocked (Scorer)", "train step gesr, memory released",
        "probe: matmul", "probe: stream"]  # fmt: skip
    assert "train step gesr, before / train step gesr (CPU time)" in names  # the before/after ratio
    assert "train step gesr, memory released / train step gesr" in names  # what the host memory setting removes
    sources = [line.split(" | ")[0][2:] for line in text.splitlines() if line.startswith("| ") and " | " in line]
    assert "HSTU attention (kernels/)" in sources  # the bytes split read the HLO stack frames
    attention = next(line for line in text.splitlines() if line.startswith("| HSTU attention (kernels/) |"))
    assert float(attention.split(" | ")[3]) > 0  # the profiled time of the attention ops was found in the trace
    for row in rows[: len(table)]:
        gflop, megabytes = (float(x) for x in row.split(" | ")[1:3])
        assert gflop > 0 and megabytes > 0, row  # the cost analysis counted this row's work

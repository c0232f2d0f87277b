"""experiments/bench_serving_scaling.py: the O(N^2 + C N) fit and the exponents it predicts; the smoke run."""

from __future__ import annotations

import importlib.util
import pathlib
import sys

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def bench():
    path = ROOT / "experiments" / "bench_serving_scaling.py"
    spec = importlib.util.spec_from_file_location("bench_serving_scaling", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(spec.name, None)


def _points(a: float, b: float, c: float, noise: float = 0.0):
    rng = np.random.default_rng(0)
    sweep = [(n, 1000) for n in (128, 256, 512, 1024, 2048)] + [(512, cc) for cc in (250, 500, 1000, 2000, 4000)]
    return [(n, cc, (a * n * n + b * cc * n + c) * (1 + noise * rng.standard_normal())) for n, cc in sweep]


def test_fit_recovers_the_coefficients_of_exact_data(bench):
    points = _points(2e-5, 3e-5, 4.0)
    coef = bench.fit(points, linear=False)
    np.testing.assert_allclose(coef, [2e-5, 3e-5, 4.0], rtol=1e-6)
    r2, worst = bench.quality(coef, points)
    assert r2 > 1 - 1e-9 and worst < 1e-6


def test_fitted_model_slopes_follow_the_dominant_term(bench):
    # N^2 only: the N sweep has slope 2, the C sweep 0; C N only: 1 and 1.
    n = np.array([128.0, 256, 512, 1024, 2048])
    assert bench.slope(n, bench.model(np.array([1.0, 0.0, 0.0]), n, 1000)) == pytest.approx(2.0)
    assert bench.slope(n, bench.model(np.array([0.0, 1.0, 0.0]), n, 1000)) == pytest.approx(1.0)
    # A mix lies in between, and the measured slope of noisy data matches the fitted model's within noise.
    points = _points(2e-5, 3e-5, 4.0, noise=0.02)
    coef = bench.fit(points, linear=False)
    t = np.array([p[2] for p in points[:5]])
    predicted = bench.slope(n, bench.model(coef, n, 1000))
    assert 1.0 < predicted < 2.0
    assert abs(bench.slope(n, t) - predicted) < 0.05


def test_fit_never_returns_negative_terms(bench):
    points = _points(0.0, 5e-5, 1.0)
    points = [(n, c, t * (0.9 if n == 2048 else 1.0)) for n, c, t in points]  # bends the N sweep down
    assert (bench.fit(points, linear=False) >= 0).all() and (bench.fit(points, linear=True) >= 0).all()


@pytest.mark.slow  # compiles a Scorer per history length: about 1.5 minutes on the shared 2-core box
def test_smoke_run_writes_both_sweeps_and_the_fit(bench, tmp_path):
    out = tmp_path / "scaling.md"
    assert bench.main(["--smoke", "--out", str(out)]) == 0
    text = out.read_text()
    assert "Load average" in text and "a N^2 + b C N + c" in text
    rows = [line for line in text.splitlines() if line.startswith(("| N |", "| C |"))]
    assert len(rows) == len(bench.SMOKE.n_values) + len(bench.SMOKE.c_values)
    assert all(float(row.split(" | ")[3]) > 0 for row in rows)  # a CPU time per point
    assert "| N at C=" in text and "| C at N=" in text

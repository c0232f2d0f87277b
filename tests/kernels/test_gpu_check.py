"""experiments/gpu_check.py: its helpers, and (slow) the whole --dry-run on CPU so a GPU run does not fail on a typo."""

import pathlib
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "experiments"))
import gpu_check  # noqa: E402


def test_pins_read_every_pinned_dependency_and_test_tool():
    pins = gpu_check.pins()
    assert pins["jax"] == pins["jaxlib"]
    assert {"grain", "tensorboardX", "pytest", "hypothesis"} <= set(pins)


def test_has_wheel_normalises_names(tmp_path):
    (tmp_path / "tensorboardx-2.6.5-py3-none-any.whl").write_bytes(b"")
    (tmp_path / "pytest_xdist-3.8.0-py3-none-any.whl").write_bytes(b"")
    assert gpu_check.has_wheel(tmp_path, "tensorboardX", "2.6.5")
    assert gpu_check.has_wheel(tmp_path, "pytest-xdist", "3.8.0")
    assert not gpu_check.has_wheel(tmp_path, "tensorboardX", "2.6.4")
    assert not gpu_check.has_wheel(tmp_path / "absent", "grain", "0.2.18")


def test_kernel_test_table_counts_outcomes_and_lists_failures():
    output = "\n".join([
        "tests/kernels/test_a.py::TestA::test_x[0] PASSED [ 10%]",
        "tests/kernels/test_a.py::TestA::test_y FAILED [ 20%]",
        "tests/kernels/test_b.py::test_z SKIPPED (no) [ 30%]",
        "some other line",
        "ERROR tests/kernels/test_c.py - ImportError: no module",  # a file that failed to import
    ])
    table = gpu_check.kernel_test_table(output, "NVIDIA H100", dry_run=False)
    assert "| tests/kernels/test_a.py | 1 | 1 | 0 | 0 |" in table
    assert "| tests/kernels/test_b.py | 0 | 0 | 1 | 0 |" in table
    assert "| tests/kernels/test_c.py | 0 | 0 | 0 | 1 |" in table and "- tests/kernels/test_c.py" in table
    assert "- tests/kernels/test_a.py::TestA::test_y" in table and "NVIDIA H100" in table


def test_unknown_step_is_refused(tmp_path):
    with pytest.raises(SystemExit, match="unknown step"):
        gpu_check.main(["--out", str(tmp_path), "--dry-run", "--skip", "kernel_test"])


@pytest.mark.slow
def test_dry_run_end_to_end(tmp_path):
    """Every step on CPU (interpreted kernels, tiny shapes): all succeed and write their tables."""
    code = gpu_check.main(["--out", str(tmp_path), "--dry-run"])
    summary = (tmp_path / "summary.md").read_text()
    assert code == 0, summary
    for name in ("environment.md", "kernel_tests.md", "summary.md"):
        assert (tmp_path / name).is_file(), name
    tables = {p.name.split("_")[0] for p in tmp_path.glob("*.md")}
    assert {"hstu", "ranking", "train", "serving"} <= tables, sorted(tables)
    assert "| train_steps | ok |" in summary and "| serving | ok |" in summary
    assert "No failures." in (tmp_path / "kernel_tests.md").read_text()
    assert "| GESR | pallas | pallas_triton |" in (next(tmp_path.glob("train_step_*.md"))).read_text()


def test_install_extras_for_both_cuda_lines():
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras, jax_pin = project["optional-dependencies"], gpu_check.pins()["jax"]
    assert extras["cuda12"] == [f"jax[cuda12]=={jax_pin}"]
    assert extras["cuda13"] == [f"jax[cuda13]=={jax_pin}"]
    assert extras["cuda"] == extras["cuda12"]  # the alias, as in jax itself


@pytest.mark.parametrize("cuda", ["12", "13"])
def test_make_demo_takes_the_cuda_line(cuda):
    import shutil
    import subprocess

    if shutil.which("make") is None:
        pytest.skip("no make")
    done = subprocess.run(["make", "-n", "demo", "DEVICE=gpu", f"CUDA={cuda}"], cwd=ROOT, capture_output=True,
                          text=True)
    assert f'".[test,cuda{cuda}]"' in done.stdout, done.stdout + done.stderr
    bad = subprocess.run(["make", "-n", "demo", "DEVICE=gpu", "CUDA=11"], cwd=ROOT, capture_output=True, text=True)
    assert bad.returncode != 0 and "CUDA must be 12 or 13" in bad.stderr

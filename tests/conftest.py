"""Test-suite setup: 8 fake CPU devices so sharding tests run anywhere; XLA's CPU backend at -O0.

Most of the suite's CPU time is XLA compiling small programs, and most of a compile is LLVM optimising the
generated code. `--xla_backend_optimization_level=0` cuts a synthetic_tiny training run's CPU time by about 40 %
and gave the same test NE to 5 digits; it changes how fast the compiled code runs, not what XLA computes
(fast math stays off). A level the caller put in XLA_FLAGS wins. Subprocesses that set XLA_FLAGS="" (the
`gesr train` kill/resume and distributed tests) still compile at XLA's default level, as a user's run does.
"""

import os

# Must be set before jax initialises its backends.
_flags = os.environ.get("XLA_FLAGS", "")
if "xla_backend_optimization_level" not in _flags:
    _flags += " --xla_backend_optimization_level=0"
os.environ["XLA_FLAGS"] = (_flags + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pathlib  # noqa: E402

import pytest  # noqa: E402

SHARED_DATA = pathlib.Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture
def shared_data() -> pathlib.Path:
    """../shared/data, or skip the test when this checkout has none beside it."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"{SHARED_DATA} is absent (MovieLens files are never committed)")
    return SHARED_DATA

# `gesr train` turns JAX's persistent compilation cache on; tests that run the CLI must neither read a cache
# another run left nor fill ~/.cache (tests of the cache itself set their own folder).
os.environ.setdefault("GESR_NO_COMPILATION_CACHE", "1")

# `gesr` and the benchmarks set glibc malloc to keep freed memory (gesr_jax/host_memory.py), for the rest of the
# process: the test workers, which call them in-process, keep glibc's defaults (tests/test_host_memory.py runs
# the setting in fresh processes).
os.environ.setdefault("GESR_HOST_ALLOCATOR", "default")

# Files whose few tests each run for a minute or more (a notebook, a trained workdir, three `gesr train` runs).
# pyproject.toml adds `--no-loadscope-reorder`, so `--dist loadfile` (`make test`) hands files out in the order
# below: these first, then the files with the most tests (xdist's own rule, which put these last, so one of them
# could start when every other file was done and leave the other worker idle).
LONG_FILES = ("tests/serving/test_scorer_workdir.py", "tests/train/test_kill_resume.py")


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config, items):
    def file_of(item) -> str:
        return item.nodeid.split("::", 1)[0]

    counts: dict[str, int] = {}
    for item in items:
        counts[file_of(item)] = counts.get(file_of(item), 0) + 1

    def rank(item) -> tuple[int, int]:
        path = file_of(item)
        long_file = path.endswith(".ipynb") or path in LONG_FILES
        return (0 if long_file else 1, -counts[path])  # then xdist's own rule: the most tests first

    items.sort(key=rank)  # stable: a file's tests keep their order

"""Test-suite setup: 8 fake CPU devices so sharding tests run anywhere."""

import os

# Must be set before jax initialises its backends.
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
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

"""nbmake runs each notebook in a fresh kernel that inherits this process's environment.

tests/conftest.py gives the test process 8 fake CPU devices (for the sharding tests); a user's notebook runs on
one, so the kernel gets the caller's XLA_FLAGS without the device count. The notebooks' cells run unchanged.
"""

import os

import pytest


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item):
    saved = os.environ.get("XLA_FLAGS")
    if saved is not None:
        kept = [f for f in saved.split() if "xla_force_host_platform_device_count" not in f]
        os.environ["XLA_FLAGS"] = " ".join(kept)
    try:
        return (yield)
    finally:
        if saved is not None:
            os.environ["XLA_FLAGS"] = saved

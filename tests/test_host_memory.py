"""gesr_jax/host_memory.py: glibc malloc keeps XLA's per-call temporary buffers, so calls stop page-faulting.

The fault counts come from fresh processes (the settings must precede JAX's backend, and they last for the
process). A program whose temporary buffer is 64 MiB touches 16,384 new pages per call with glibc's defaults.
"""

import json
import logging
import os
import subprocess
import sys
import textwrap

import pytest

from gesr_jax import cli, host_memory

GLIBC = bool(getattr(os, "confstr_names", {}).get("CS_GNU_LIBC_VERSION")) and bool(
    os.confstr("CS_GNU_LIBC_VERSION"))
needs_glibc = pytest.mark.skipif(not GLIBC, reason="the settings exist in glibc only")

# Page faults per call of a jitted program with a 64 MiB temporary ([16384, 1024] float32 between two dots).
FAULTS_SCRIPT = textwrap.dedent("""
    import json, os, resource, sys, time
    from gesr_jax import host_memory
    report = host_memory.configure_from_env(warn=True)
    import jax, jax.numpy as jnp

    @jax.jit
    def program(x, w):
        return jnp.tanh(x @ w) @ w[0]

    x, w = jnp.ones((16384, 16)), jnp.full((16, 1024), 1e-3)

    def call():  # the pause lets XLA free this call's temporary buffer before the next call allocates one
        jax.block_until_ready(program(x, w))
        time.sleep(0.05)

    def faults_per_call(calls=5):  # the median call's faults: a call may still find its block taken, rarely
        for _ in range(2):
            call()
        counts = []
        for _ in range(calls):
            before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            call()
            counts.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
        return sorted(counts)[calls // 2]

    out = {"applied": report.applied, "detail": report.detail, "faults": faults_per_call()}
    released = host_memory.release_free_memory()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    call()
    out["faults_after_release"] = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    out["released"], out["faults_after"] = released, faults_per_call()
    late = host_memory.retain_host_memory()  # a second call: the first call's result
    out["second_call_same"] = late == report
    print(json.dumps(out))
""")


def _run(script: str, allocator: str) -> dict:
    env = {**os.environ, host_memory.ENV: allocator, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@needs_glibc
def test_retained_heap_stops_the_per_call_page_faults():
    default, retained = _run(FAULTS_SCRIPT, "default"), _run(FAULTS_SCRIPT, "retain")
    assert not default["applied"] and default["detail"] == "glibc malloc defaults"
    assert default["faults"] > 8000  # the 64 MiB buffer is mapped afresh on every call
    assert retained["applied"] and "one arena" in retained["detail"], retained
    assert retained["faults"] < 500, retained
    # Giving the free memory back (the benchmarks' ablation) costs the next call its page faults, once.
    assert retained["released"] and retained["faults_after_release"] > 8000, retained
    assert retained["faults_after"] < 500, retained
    assert retained["second_call_same"]


LATE_SCRIPT = textwrap.dedent("""
    import json, logging
    import jax
    jax.devices()  # the backend starts first
    logging.basicConfig()
    from gesr_jax import host_memory
    report = host_memory.retain_host_memory()
    print(json.dumps({"applied": report.applied, "detail": report.detail}))
""")


@needs_glibc
def test_after_the_backend_started_nothing_changes_and_a_warning_says_why():
    proc = subprocess.run([sys.executable, "-c", LATE_SCRIPT], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""})
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report == {"applied": False, "detail": "glibc malloc defaults (JAX's backend had started first)"}
    assert "call it before the first JAX computation" in proc.stderr


@pytest.mark.parametrize("field", ["mmap_threshold", "trim_threshold"])
@pytest.mark.parametrize("value", [0, -1, True, 1.5, 1 << 31])
def test_bad_thresholds_name_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        host_memory.retain_host_memory(**{field: value})


def test_not_glibc_changes_nothing(monkeypatch):
    monkeypatch.setattr(host_memory, "_state", None)
    monkeypatch.setattr(host_memory, "_glibc", lambda: None)
    report = host_memory.retain_host_memory()
    assert report == host_memory.HostAllocator(False, "glibc malloc defaults (the C library is not glibc)")
    assert host_memory.current() == host_memory.HostAllocator(False, "glibc malloc defaults")


def test_env_choice(monkeypatch):
    calls = []
    monkeypatch.setattr(host_memory, "retain_host_memory", lambda **kw: calls.append(kw) or "retained")
    monkeypatch.setenv(host_memory.ENV, " Retain ")
    assert host_memory.configure_from_env() == "retained" and calls == [{"warn": False}]
    monkeypatch.setenv(host_memory.ENV, "default")
    assert host_memory.configure_from_env() == host_memory.current() and len(calls) == 1
    monkeypatch.setenv(host_memory.ENV, "pooled")
    with pytest.raises(ValueError, match=r"GESR_HOST_ALLOCATOR='pooled': must be one of \['retain', 'default'\]"):
        host_memory.configure_from_env()


def test_cli_applies_it_first_and_reports_a_bad_env_value_as_a_usage_error(monkeypatch, capsys, caplog):
    seen = []
    real = host_memory.configure_from_env
    monkeypatch.setattr(host_memory, "configure_from_env", lambda: seen.append(True) or real())
    assert cli.main(["config", "list"]) == 0 and seen == [True]
    monkeypatch.setenv(host_memory.ENV, "pooled")
    with caplog.at_level(logging.WARNING):
        assert cli.main(["config", "list"]) == cli.EXIT_USAGE
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "error: GESR_HOST_ALLOCATOR='pooled': must be one of ['retain', 'default']")

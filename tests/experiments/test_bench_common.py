"""experiments/bench_common.py: interleaved rounds, per-round ratios, the machine line (no duration asserted)."""

from __future__ import annotations

import argparse
import pathlib
import sys
import time

import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2] / "experiments"))
from bench_common import (  # noqa: E402
    Ratio, Timing, add_cpus_arg, interleaved, machine_info, machine_line, patched, pin_cpus,
)
from bench_common import ratio  # noqa: E402


def test_every_variant_runs_once_per_round_in_a_rotating_order():
    calls: list[str] = []
    variants = {name: (lambda n=name: calls.append(n)) for name in "abc"}
    resets: list[str] = []
    out = interleaved(variants, rounds=4, min_call_ms=0.0, before_each={"b": lambda: resets.append("b")})
    assert calls[:3] == ["a", "b", "c"]  # the untimed warm-up calls
    timed = calls[3:]
    assert [timed[i : i + 3] for i in range(0, 12, 3)] == [list("abc"), list("bca"), list("cab"), list("abc")]
    assert len(resets) == 5  # before the warm-up call and before each of the 4 samples
    assert all(t.rounds == 4 and t.calls_per_sample == 1 for t in out.values())
    assert all(x >= 0 for t in out.values() for x in t.wall + t.cpu)


def test_a_short_variant_is_called_several_times_per_sample():
    count = [0]

    def tiny():
        count[0] += 1

    out = interleaved({"tiny": tiny}, rounds=3, min_call_ms=50.0)
    n = out["tiny"].calls_per_sample
    assert n > 1 and count[0] == 1 + 1 + 3 * n  # warm-up, the call that sizes a sample, 3 samples


def test_a_slow_first_call_does_not_size_the_samples():
    count = [0]

    def compiles_first():  # like a jitted function: the first call is long, the rest are instant
        count[0] += 1
        if count[0] == 1:
            time.sleep(0.06)

    out = interleaved({"jitted": compiles_first}, rounds=2, min_call_ms=20.0)
    assert out["jitted"].calls_per_sample > 1


def test_prime_calls_each_variant_once_untimed_right_before_its_sample():
    calls: list[str] = []
    variants = {name: (lambda n=name: calls.append(n)) for name in "ab"}
    out = interleaved(variants, rounds=2, min_call_ms=0.0, prime=True)
    assert calls == ["a", "b"] + ["a", "a", "b", "b"] + ["b", "b", "a", "a"]  # warm-up, then prime + sample
    assert all(t.rounds == 2 and t.calls_per_sample == 1 for t in out.values())


def test_ratio_is_the_median_of_per_round_ratios():
    timings = {"slow": Timing(wall=[1, 1, 1, 1], cpu=[2.0, 4.0, 9.0, 30.0], calls_per_sample=1),
               "fast": Timing(wall=[1, 2, 1, 1], cpu=[1.0, 2.0, 3.0, 10.0], calls_per_sample=1)}  # fmt: skip
    r = ratio(timings, "slow", "fast")
    assert (r.median, r.rounds) == (2.5, 4) and r.lo == pytest.approx(2.0) and r.hi == pytest.approx(3.0)
    assert ratio(timings, "slow", "fast", clock="wall").median == 1.0
    assert f"{Ratio(2.0, 1.5, 2.5, 3)}" == "2.00x (1.50-2.50)"
    with pytest.raises(ValueError, match="clock"):
        ratio(timings, "slow", "fast", clock="gpu")
    with pytest.raises(ValueError, match="rounds"):
        interleaved({"x": lambda: None}, rounds=0)


def test_machine_line_names_the_cpu_and_the_load():
    info = machine_info()
    line = machine_line(info, finished=info)
    assert info["cpu"] in line and "Load average" in line and "at end" in line and f"jax {info['jax']}" in line


@pytest.mark.skipif(not hasattr(__import__("os"), "sched_setaffinity"), reason="no CPU affinity on this OS")
def test_pin_cpus_parses_the_spec_refuses_unknown_cpus_and_the_machine_line_says_so():
    import os

    info = machine_info()  # before pinning: jax sizes its thread pool when it starts
    before = os.sched_getaffinity(0)
    first = min(before)
    try:
        assert pin_cpus(None) is None and os.sched_getaffinity(0) == before
        assert pin_cpus(f"{first}") == {first} and os.sched_getaffinity(0) == {first}
        info |= {"cores": max(len(before), 2), "pinned": sorted(os.sched_getaffinity(0))}
        assert f"pinned to CPU {first}" in machine_line(info)
        with pytest.raises(ValueError, match="--cpus must look like"):
            pin_cpus("one")
        with pytest.raises(ValueError, match="may run on CPUs"):
            pin_cpus("100000")
        assert os.sched_getaffinity(0) == {first}  # a refused spec changes nothing
    finally:
        os.sched_setaffinity(0, before)


def test_the_cpus_option_is_checked_when_parsed(capsys):
    import argparse
    import os

    parser = argparse.ArgumentParser()
    add_cpus_arg(parser)
    first = min(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 0
    assert parser.parse_args(["--cpus", str(first)]).cpus == str(first)
    assert parser.parse_args([]).cpus is None
    for bad, said in (("one", "--cpus must look like"), ("100000", "may run on CPUs")):
        with pytest.raises(SystemExit) as exc:
            parser.parse_args(["--cpus", bad])
        assert exc.value.code == 2 and said in capsys.readouterr().err


def test_patched_replaces_an_attribute_inside_the_block_only():
    class Owner:
        formula = "new"

    with patched(Owner, "formula", "old"):
        assert Owner.formula == "old"
    assert Owner.formula == "new"
    with pytest.raises(RuntimeError), patched(Owner, "formula", "old"):
        raise RuntimeError("a failed trace")
    assert Owner.formula == "new"  # restored on the way out of an error too


def test_host_allocator_option_defaults_to_the_env_and_names_a_bad_value(monkeypatch):
    monkeypatch.setenv("GESR_HOST_ALLOCATOR", "default")
    parser = argparse.ArgumentParser()
    add_cpus_arg(parser)
    assert parser.parse_args([]).host_allocator == "default"
    assert parser.parse_args(["--host-allocator", "retain"]).host_allocator == "retain"
    monkeypatch.setenv("GESR_HOST_ALLOCATOR", "pooled")
    with pytest.raises(ValueError, match="GESR_HOST_ALLOCATOR='pooled'"):
        add_cpus_arg(argparse.ArgumentParser())


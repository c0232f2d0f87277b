"""(slow) `gesr train --num-processes 2`, 4 host CPU devices each, row-sharded tables over all 8 devices.

* equals the 1-process x 8-device run (train losses and test metrics), and resumes after a kill;
* a lost process stops the survivors with one ``error:`` line naming it: through the local launcher, and through
  the watchdog when the processes were started separately (as on several hosts). The bound is the watchdog's
  configured timeout (checked as configuration); wall-time limits here only turn a hang into a failure.
"""

from __future__ import annotations

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import pytest

from gesr_jax.train import distributed, launch

pytestmark = pytest.mark.slow
RUN_TIMEOUT_S = 1500  # cross-process collectives on a loaded 2-core box are slow
STEPS = 12
LOST_BOUND_S = 60  # a survivor of a lost process exits within this (the bound)
SETTINGS = [
    "--config", "synthetic_tiny", "--set", "model.kind=two_tower", "--set", "model.embedding_sharding=row",
    "--set", "train.model_parallel=8", "--set", "train.batch_size=32", "--set", "train.eval_batch_size=64",
    "--set", "train.log_every=1", "--set", "train.eval_every=0", "--set", "train.checkpoint_every=3",
    "--set", "train.max_checkpoints=20",
]  # fmt: skip


def _env(devices: int, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_")}
    flags = [f for f in env.get("XLA_FLAGS", "").split() if "xla_force_host_platform_device_count" not in f]
    flags.append(f"--xla_force_host_platform_device_count={devices}")
    return {**env, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": " ".join(flags), "GESR_NO_COMPILATION_CACHE": "1", **extra}


def _gesr(workdir: pathlib.Path, steps: int, *launch_args: str, env: dict[str, str] | None = None) -> subprocess.Popen:
    argv = [sys.executable, "-m", "gesr_jax", "train", "--workdir", str(workdir), *SETTINGS,
            "--set", f"train.num_steps={steps}", *launch_args]  # fmt: skip
    return subprocess.Popen(argv, env=env or _env(8), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _two(workdir: pathlib.Path, steps: int) -> subprocess.Popen:
    return _gesr(workdir, steps, "--num-processes", "2", "--devices-per-process", "4", env=_env(1))


def _finish(proc: subprocess.Popen) -> str:
    out, err = proc.communicate(timeout=RUN_TIMEOUT_S)
    assert proc.returncode == 0, err[-4000:]
    return out


def _losses(workdir: pathlib.Path) -> list[tuple[int, float]]:
    rows = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in rows if r["split"] == "train"]


def _children(pid: int) -> list[int]:
    path = pathlib.Path(f"/proc/{pid}/task/{pid}/children")
    return [int(x) for x in path.read_text().split()] if path.exists() else []


def _wait_for_step(workdir: pathlib.Path, step: int, procs: list[subprocess.Popen]) -> None:
    """Until checkpoint ``step`` exists. A process that exits first fails the test with its stderr; the
    RUN_TIMEOUT_S guard only turns a hang into a failure (it checks liveness, not speed)."""
    folder, guard = workdir / "checkpoints" / str(step), time.monotonic() + RUN_TIMEOUT_S
    while not folder.is_dir():
        for p in procs:
            if p.poll() is not None:
                pytest.fail(f"a process exited ({p.returncode}) before checkpoint {step}: {p.stderr.read()[-3000:]}")
        if time.monotonic() > guard:
            for p in procs:
                p.kill()
            pytest.fail(f"hung: no checkpoint {step} after {RUN_TIMEOUT_S} s")
        time.sleep(0.05)


def _error_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("error:")]


def test_two_processes_with_row_sharded_tables_equal_one_process(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    _finish(_gesr(one, STEPS))
    _finish(_two(two, STEPS))
    a, b = _losses(one), _losses(two)
    assert [s for s, _ in b] == [s for s, _ in a] == list(range(1, STEPS + 1))  # process 0 alone logs each step
    assert [x for _, x in b] == pytest.approx([x for _, x in a], rel=1e-5)
    r1, r2 = (json.loads((w / "results.json").read_text()) for w in (one, two))
    assert r2["test"]["loss"] == pytest.approx(r1["test"]["loss"], rel=1e-5)
    states = sorted(p.name for p in (two / "checkpoints" / str(STEPS) / "data_iterator").glob("process_*"))
    assert states == ["process_0-of-2.json", "process_1-of-2.json"]  # each process's own data shard


def test_two_processes_with_row_sharded_tables_resume_after_a_kill(tmp_path):
    two, killed = tmp_path / "two", tmp_path / "killed"
    _finish(_two(two, STEPS))
    b = _losses(two)
    launcher = _two(killed, STEPS)
    _wait_for_step(killed, 3, [launcher])
    children = _children(launcher.pid)
    assert len(children) == 2
    os.kill(children[1], signal.SIGKILL)
    _, err = launcher.communicate(timeout=RUN_TIMEOUT_S)  # a hang guard; the exit reason is checked below
    assert launcher.returncode == distributed.EXIT_PEER_LOST
    assert _error_lines(err) == ["error: lost process 1 of 2 (killed by SIGKILL); stopped the others"], err[-3000:]
    assert not (killed / "results.json").exists(), "the run finished before the kill"
    _finish(_two(killed, STEPS))  # resumes from the newest intact checkpoint
    c = _losses(killed)
    assert [s for s, _ in c] == list(range(1, STEPS + 1))  # no step logged twice
    assert [x for _, x in c] == pytest.approx([x for _, x in b], rel=1e-6)


def test_a_lost_process_stops_the_survivor_within_the_bound_with_one_line(tmp_path):
    """Processes started separately (as on two hosts): the watchdog, not the launcher, stops process 0."""
    port = launch.free_port()
    procs = []
    for i in range(2):
        env = _env(4, JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(i))
        procs.append(_gesr(tmp_path / "run", 100000, env=env))
    _wait_for_step(tmp_path / "run", 3, procs)
    procs[1].send_signal(signal.SIGKILL)
    try:
        _, err = procs[0].communicate(timeout=RUN_TIMEOUT_S)  # a hang guard, not the bound (never a wall-time check)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    # The bound is the watchdog's configuration: a peer silent for PEER_TIMEOUT_S is lost, checked every beat.
    assert distributed.PEER_TIMEOUT_S + 2 * distributed.BEAT_INTERVAL_S < LOST_BOUND_S
    assert procs[0].returncode == distributed.EXIT_PEER_LOST, err[-3000:]  # the watchdog stopped it, not a collective
    lines = _error_lines(err)
    assert len(lines) == 1 and lines[0].startswith("error: lost process 1 of 2: no heartbeat for"), err[-3000:]

"""Multi-process settings, and (slow) a real 2-process CPU run on 127.0.0.1 against the 1-process run."""

from __future__ import annotations

import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time

import pytest

from gesr_jax.config import ConfigError
from gesr_jax.train import distributed

HERE = pathlib.Path(__file__).parent
DRIVER = f"""
import sys
sys.path.insert(0, {str(HERE)!r})
from gesr_jax.train import distributed
distributed.initialize(distributed.settings())
import train_fixtures as fx
from gesr_jax.train import trainer
config = fx.tiny_config(num_steps=int(sys.argv[2]), checkpoint_every=2, eval_every=4, log_every=1, max_checkpoints=3)
trainer.train_and_evaluate(config, sys.argv[1], model_api=fx.linear_api(), splits=fx.make_splits())
"""
TIMEOUT_S = 300


def test_settings_come_from_flags_or_env_and_must_be_complete():
    assert not distributed.settings(env={}).requested
    assert distributed.initialize(distributed.settings(env={})) is False  # nothing asked: nothing initialised
    env = {"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234", "JAX_NUM_PROCESSES": "4", "JAX_PROCESS_ID": "3"}
    assert distributed.settings(env=env) == distributed.DistributedSettings("10.0.0.1:1234", 4, 3)
    assert distributed.settings(process_id=1, env=env).process_id == 1  # a flag wins
    with pytest.raises(ConfigError, match=r"missing --num-processes \(or JAX_NUM_PROCESSES\)"):
        distributed.settings("127.0.0.1:1", process_id=0, env={})
    with pytest.raises(ConfigError, match="JAX_PROCESS_ID='x' is not an integer"):
        distributed.settings(env={**env, "JAX_PROCESS_ID": "x"})
    with pytest.raises(ConfigError, match=r"--process-id must be in \[0, --num-processes\)"):
        distributed.settings("h:1", 2, 2, env={})
    assert "process 0 of 1" in distributed.describe_layout()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_")}
    return {**env, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "", "CI": "true", **extra}  # one CPU device each


def _start(workdir: pathlib.Path, steps: int, n: int) -> list[subprocess.Popen]:
    port = _free_port()
    procs = []
    for i in range(n):
        extra = {"JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}", "JAX_NUM_PROCESSES": str(n),
                 "JAX_PROCESS_ID": str(i)} if n > 1 else {}  # fmt: skip
        procs.append(subprocess.Popen([sys.executable, "-c", DRIVER, str(workdir), str(steps)], env=_env(**extra),
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))  # fmt: skip
    return procs


def _finish(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        out, _ = p.communicate(timeout=TIMEOUT_S)
        assert p.returncode == 0, out[-3000:]


def _train_losses(workdir: pathlib.Path) -> list[tuple[int, float]]:
    lines = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in lines if r["split"] == "train"]


@pytest.mark.slow
def test_two_processes_match_one_and_write_every_file_once(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    _finish(_start(one, 8, 1))
    _finish(_start(two, 8, 2))
    a, b = _train_losses(one), _train_losses(two)
    assert [s for s, _ in b] == [s for s, _ in a] == list(range(1, 9))  # every line once: only process 0 logs
    assert [x for _, x in b] == pytest.approx([x for _, x in a], rel=1e-5)
    r1, r2 = (json.loads((w / "results.json").read_text()) for w in (one, two))
    assert r2["best_step"] == r1["best_step"] and r2["test"]["loss"] == pytest.approx(r1["test"]["loss"], rel=1e-5)
    names = {p.name for p in two.iterdir()}
    assert {"config.json", "model.json", "results.json", "best.json", "data_fingerprint.json", "plots"} <= names
    assert not [n for n in names if n.endswith(".tmp")]
    states = sorted(p.name for p in (two / "checkpoints" / "8" / "data_iterator").glob("process_*"))
    assert states == ["process_0-of-2.json", "process_1-of-2.json"]  # Orbax/grain: one iterator state per process


@pytest.mark.slow
def test_two_processes_resume_after_one_is_killed(tmp_path):
    full, killed = tmp_path / "full", tmp_path / "killed"
    _finish(_start(full, 40, 2))
    procs = _start(killed, 40, 2)
    deadline = time.monotonic() + TIMEOUT_S
    folder = killed / "checkpoints"
    while time.monotonic() < deadline and not (folder.is_dir() and any(p.name == "4" for p in folder.iterdir())):
        time.sleep(0.05)
    procs[1].send_signal(signal.SIGKILL)
    try:  # process 0 fails (or hangs in a collective) without its peer
        procs[0].wait(timeout=60)
    except subprocess.TimeoutExpired:
        procs[0].send_signal(signal.SIGKILL)
    for p in procs:
        p.communicate(timeout=60)
    assert not (killed / "results.json").exists(), "the run finished before the kill; raise num_steps"
    _finish(_start(killed, 40, 2))
    a_losses, b_losses = _train_losses(full), _train_losses(killed)
    assert [s for s, _ in b_losses] == [s for s, _ in a_losses] == list(range(1, 41))  # no line twice
    assert [x for _, x in b_losses] == pytest.approx([x for _, x in a_losses], rel=1e-6)
    a, b = (json.loads((w / "results.json").read_text()) for w in (full, killed))
    assert (a["best_step"], a["last_step"]) == (b["best_step"], b["last_step"])
    assert b["test"]["loss"] == pytest.approx(a["test"]["loss"], rel=1e-6)


def test_local_launcher_runs_when_a_count_is_given_without_an_id_and_strips_its_own_flags(monkeypatch):
    from gesr_jax.train import launch

    monkeypatch.delenv("JAX_PROCESS_ID", raising=False)
    assert launch.requested(2, None, None)
    assert not launch.requested(2, 0, None) and not launch.requested(2, None, "h:1")
    assert not launch.requested(None, None, None)
    monkeypatch.setenv("JAX_PROCESS_ID", "1")  # started by another launcher: this is one process, not a launcher
    assert not launch.requested(2, None, None)
    argv = ["train", "--num-processes", "2", "--workdir", "w", "--devices-per-process=4", "--set", "a=1"]
    assert launch.child_argv(argv) == ["train", "--workdir", "w", "--set", "a=1"]
    env = launch.child_env(1, 2, 1234, 4)
    settings = (env["JAX_COORDINATOR_ADDRESS"], env["JAX_NUM_PROCESSES"], env["JAX_PROCESS_ID"])
    assert settings == ("127.0.0.1:1234", "2", "1")
    assert env["XLA_FLAGS"].split().count("--xla_force_host_platform_device_count=4") == 1

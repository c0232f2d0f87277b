"""`gesr train` killed with SIGKILL mid-run and started again continues to an uninterrupted run's metrics.

The in-process resume test (test_trainer.py) stops the loop with an exception; this one kills the
real CLI process at an arbitrary moment after its first checkpoint, so a save may be cut halfway.
"""

from __future__ import annotations

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

ARGS = [
    "--config", "synthetic_tiny_two_tower",
    "--set", "data.synthetic.num_users=60",
    "--set", "train.num_steps=1500",
    "--set", "train.checkpoint_every=100",
    "--set", "train.log_every=100",
    "--set", "train.eval_every=0",
    "--set", "train.batch_size=16",
]  # fmt: skip
TIMEOUT_S = 240


def _cmd(workdir: pathlib.Path) -> list[str]:
    return [sys.executable, "-m", "gesr_jax", "train", "--workdir", str(workdir), *ARGS]


def _env(cache: pathlib.Path) -> dict[str, str]:
    env = dict(os.environ)
    env["XLA_FLAGS"] = ""  # one CPU device, like a laptop run
    env["CI"] = "true"  # no progress bar
    # `gesr train` keeps its persistent compilation cache on by default, so a user's restart reads the programs
    # the killed run compiled; here all three runs share one cache in this test's own folder (most of each
    # run's CPU time is compilation).
    env.pop("GESR_NO_COMPILATION_CACHE", None)
    env["GESR_COMPILATION_CACHE_DIR"] = str(cache)
    return env


TIMING = ("examples_per_sec", "requests_per_sec", "candidates_per_sec", "sec_per_step", "wall_time")


def _final_metrics(workdir: pathlib.Path) -> dict:
    results = json.loads((workdir / "results.json").read_text())
    metrics = [results[k] for k in ("valid", "test", "best_valid")] + [p["metrics"] for p in results["valid_curve"]]
    for m in metrics:
        for key in TIMING:
            m.pop(key, None)
    return results


def _checkpoint_steps(workdir: pathlib.Path) -> list[int]:
    folder = workdir / "checkpoints"
    return sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit()) if folder.is_dir() else []


def test_sigkill_then_restart_equals_an_uninterrupted_run(tmp_path):
    full, killed = tmp_path / "full", tmp_path / "killed"
    env = _env(tmp_path / "jax_cache")
    subprocess.run(_cmd(full), env=env, check=True, timeout=TIMEOUT_S, capture_output=True)

    proc = subprocess.Popen(_cmd(killed), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + TIMEOUT_S
    while not _checkpoint_steps(killed) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed; raise train.num_steps"
    assert not (killed / "results.json").exists()
    assert _checkpoint_steps(killed), "no checkpoint was written before the kill"

    resumed = subprocess.run(_cmd(killed), env=env, check=True, timeout=TIMEOUT_S, capture_output=True, text=True)
    assert _final_metrics(killed) == _final_metrics(full), resumed.stdout[-2000:]
    assert max(_checkpoint_steps(killed)) == 1500

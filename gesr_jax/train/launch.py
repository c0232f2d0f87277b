"""``gesr train --num-processes N`` on one machine: start the N processes of a ``jax.distributed`` run and watch them.

Without ``--process-id`` (and without ``JAX_PROCESS_ID``), ``gesr train --num-processes N`` is a local
launcher: it picks a free port on 127.0.0.1, starts N copies of the same command with process ids
0..N-1 (``--devices-per-process K`` gives each K host CPU devices), forwards their output, and waits.
Every process computes and reads only its own data shard; process 0 writes the workdir's small files.

When a process dies (killed, crashed), the launcher stops the others at once (SIGKILL: they resume
from their checkpoints), drops their dying output, prints one line ``error: lost process I of N (...)``
and exits with :data:`~gesr_jax.train.distributed.EXIT_PEER_LOST`. A process that ends with one of
the CLI's own failures (a config error, a full disk: it printed its own ``error:`` line) stops the
others the same way and its exit status is the launcher's. On several machines, start one process per
host with ``--coordinator-address``, ``--process-id`` and ``--num-processes`` instead: the watchdog of
``gesr_jax/train/distributed.py`` then stops the survivors of a lost process.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence

from gesr_jax.train.distributed import EXIT_PEER_LOST

POLL_S = 0.1
OWN_FAILURES = frozenset({1, 2, 3})  # the CLI's diverged / usage / I/O codes: the process said why itself
LAUNCH_FLAGS = ("--num-processes", "--devices-per-process")


def requested(num_processes: int | None, process_id: int | None, coordinator_address: str | None) -> bool:
    """True when ``gesr train`` should start the processes itself: a count but no id nor address anywhere."""
    return (
        num_processes is not None and process_id is None and coordinator_address is None
        and not os.environ.get("JAX_PROCESS_ID", "").strip()
    )  # fmt: skip


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def child_argv(argv: Sequence[str]) -> list[str]:
    """``argv`` without the launcher's own flags (``--flag V`` and ``--flag=V`` forms)."""
    out: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
            continue
        if arg in LAUNCH_FLAGS:
            skip = True
            continue
        if any(arg.startswith(f + "=") for f in LAUNCH_FLAGS):
            continue
        out.append(arg)
    return out


def child_env(process_id: int, num_processes: int, port: int, devices_per_process: int | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES",
                                                             "JAX_PROCESS_ID")}  # fmt: skip
    env.update(JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES=str(num_processes),
               JAX_PROCESS_ID=str(process_id))  # fmt: skip
    if devices_per_process is not None:
        flags = [f for f in env.get("XLA_FLAGS", "").split() if "xla_force_host_platform_device_count" not in f]
        env["XLA_FLAGS"] = " ".join([*flags, f"--xla_force_host_platform_device_count={devices_per_process}"])
        env.setdefault("JAX_PLATFORMS", "cpu")
    return env


class _Forward(threading.Thread):
    """Copies one child's stderr to ours line by line until muted."""

    def __init__(self, stream, muted: threading.Event):  # noqa: ANN001
        super().__init__(daemon=True)
        self.stream, self.muted = stream, muted

    def run(self) -> None:
        for line in iter(self.stream.readline, ""):
            if not self.muted.is_set():
                sys.stderr.write(line)
                sys.stderr.flush()


def _describe(code: int) -> str:
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit status {code}"


def launch_local(argv: Sequence[str], num_processes: int, devices_per_process: int | None = None) -> int:
    """Run ``python -m gesr_jax <argv>`` as ``num_processes`` local processes; the run's exit status."""
    if num_processes < 1:
        raise ValueError(f"--num-processes must be >= 1, got {num_processes}")
    port, muted = free_port(), threading.Event()
    for sig in (signal.SIGTERM, signal.SIGHUP):  # the launcher stopped: stop its processes too
        signal.signal(sig, _interrupt)
    args = [sys.executable, "-m", "gesr_jax", *child_argv(argv)]
    procs: list[subprocess.Popen] = []
    forwards = []
    try:
        for i in range(num_processes):
            p = subprocess.Popen(args, env=child_env(i, num_processes, port, devices_per_process),
                                 stderr=subprocess.PIPE, text=True)  # fmt: skip
            procs.append(p)
            forwards.append(_Forward(p.stderr, muted))
            forwards[-1].start()
        while True:
            codes = [p.poll() for p in procs]
            failed = [(i, c) for i, c in enumerate(codes) if c not in (None, 0)]
            if failed:
                i, code = failed[0]
                if code in OWN_FAILURES:  # let its own error line through, then silence the others
                    forwards[i].join(timeout=2.0)
                muted.set()
                _stop(procs)
                if code in OWN_FAILURES:
                    return code
                if code == EXIT_PEER_LOST:  # it saw a peer go first; name that one if the launcher can
                    lost = [j for j, c in enumerate(p.poll() for p in procs) if c is not None and c < 0]
                    i, code = (lost[0], procs[lost[0]].returncode) if lost else (i, code)
                print(f"error: lost process {i} of {num_processes} ({_describe(code)}); stopped the others",
                      file=sys.stderr, flush=True)  # fmt: skip
                return EXIT_PEER_LOST
            if all(c == 0 for c in codes):
                return 0
            time.sleep(POLL_S)
    except KeyboardInterrupt:
        muted.set()
        _stop(procs)
        raise
    finally:
        for f in forwards:
            f.join(timeout=1.0)


def _stop(procs: list[subprocess.Popen]) -> None:
    """SIGKILL every process still running and reap it.

    Not SIGTERM: ``jax.distributed`` takes SIGTERM as a preemption notice and keeps running. Killing is
    safe: checkpoints are written atomically and a rerun resumes from the newest intact one.
    """
    for p in procs:
        if p.poll() is None:
            p.kill()
    for p in procs:
        p.wait()


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")

"""Multi-process runs: ``jax.distributed.initialize`` when asked, the process layout, and who writes files.

A run with several processes (hosts, or several processes on one host) is started once per process with
the same command plus the standard settings: ``--coordinator-address HOST:PORT --num-processes N
--process-id I`` or the environment variables ``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES`` and
``JAX_PROCESS_ID`` (flags win). Nothing is initialised unless one of them is given. Every process
computes; only process 0 (:func:`is_primary`) writes the workdir's small files (metrics, plots,
config.json, model.json, best.json, results.json, eval.json, the data fingerprint) and holds the workdir
lock; Orbax writes checkpoints collectively.

A lost process (killed, crashed, its host gone) must not leave the others hanging in a collective until
it times out: :func:`initialize` starts a watchdog thread in every process. Each process writes a beat
into the coordinator's key-value store every :data:`BEAT_INTERVAL_S`; a peer whose beat has not moved for
:data:`PEER_TIMEOUT_S` is lost, and every survivor prints one line ``error: lost process I of N ...`` and
exits with :data:`EXIT_PEER_LOST` within about ``PEER_TIMEOUT_S + BEAT_INTERVAL_S`` seconds (JAX's own
heartbeat, 100 s, would abort later, with a stack trace). A process whose coordinator (process 0) is gone
cannot reach the store: JAX's client aborts it at once (its own message; the local launcher,
``gesr_jax/train/launch.py``, turns that into the same one line). A peer that finished cleanly marks
itself done and is not reported.
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import logging
import os
import sys
import threading
import time
from collections.abc import Iterator, Mapping

import jax

from gesr_jax.config import ConfigError

log = logging.getLogger("gesr_jax.train")

ENV = {"coordinator_address": "JAX_COORDINATOR_ADDRESS", "num_processes": "JAX_NUM_PROCESSES",
       "process_id": "JAX_PROCESS_ID"}  # fmt: skip
EXIT_PEER_LOST = 4  # a process of a multi-process run was lost; the survivors stopped
BEAT_INTERVAL_S = 2.0
PEER_TIMEOUT_S = float(os.environ.get("GESR_PEER_TIMEOUT_S", "30"))  # a beat this old = a lost process
_BEAT, _DONE = "gesr/watchdog/beat/", "gesr/watchdog/done/"


@dataclasses.dataclass(frozen=True)
class DistributedSettings:
    coordinator_address: str | None = None
    num_processes: int | None = None
    process_id: int | None = None

    @property
    def requested(self) -> bool:
        return any(v is not None for v in dataclasses.astuple(self))


def settings(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    env: Mapping[str, str] | None = None,
) -> DistributedSettings:
    """Flags, else the JAX_* environment variables; a ConfigError naming the flag when one is malformed."""
    env = os.environ if env is None else env
    given = {"coordinator_address": coordinator_address, "num_processes": num_processes, "process_id": process_id}
    out: dict[str, object] = {}
    for name, value in given.items():
        if value is None and env.get(ENV[name], "").strip():
            raw = env[ENV[name]].strip()
            if name == "coordinator_address":
                value = raw
            else:
                try:
                    value = int(raw)
                except ValueError:
                    raise ConfigError(f"{ENV[name]}={raw!r} is not an integer") from None
        out[name] = value
    s = DistributedSettings(**out)  # type: ignore[arg-type]
    if s.requested:
        missing = [f"--{k.replace('_', '-')} (or {ENV[k]})" for k, v in dataclasses.asdict(s).items() if v is None]
        if missing:
            raise ConfigError(f"a multi-process run needs all three settings; missing {', '.join(missing)}")
        if s.num_processes < 1 or not 0 <= s.process_id < s.num_processes:
            raise ConfigError(
                f"--process-id must be in [0, --num-processes), got {s.process_id} of {s.num_processes}"
            )
    return s


def initialize(s: DistributedSettings) -> bool:
    """``jax.distributed.initialize`` with ``s`` when it was requested; True when it ran."""
    if not s.requested:
        return False
    jax.distributed.initialize(
        coordinator_address=s.coordinator_address, num_processes=s.num_processes, process_id=s.process_id
    )
    if s.num_processes > 1:
        start_watchdog(s.process_id, s.num_processes)
    return True


class Watchdog:
    """Beats for this process and stops it, with one line, when a peer's beat stops (see the module docstring)."""

    def __init__(self, process_id: int, num_processes: int, client: object, timeout_s: float = PEER_TIMEOUT_S):
        self.me, self.n, self.client, self.timeout_s = process_id, num_processes, client, timeout_s
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._run, name="gesr-peer-watchdog", daemon=True)

    def start(self) -> Watchdog:
        self.thread.start()
        atexit.register(self.finish)  # after jax's own atexit shutdown is registered: runs before it
        return self

    def finish(self) -> None:
        """This process ends cleanly: tell the peers, and stop judging them."""
        if self.stopped.is_set():
            return
        self.stopped.set()
        try:
            self.client.key_value_set(f"{_DONE}{self.me}", "1", allow_overwrite=True)  # type: ignore[attr-defined]
        except Exception:  # noqa: BLE001  (the store may be gone at exit; nothing to report then)
            pass

    def _run(self) -> None:
        seen: dict[int, tuple[str, float]] = {}
        beat = 0
        while not self.stopped.wait(BEAT_INTERVAL_S if beat else 0.0):
            beat += 1
            try:
                beat_key = f"{_BEAT}{self.me}"
                self.client.key_value_set(beat_key, str(beat), allow_overwrite=True)  # type: ignore[attr-defined]
                now = time.monotonic()
                for peer in range(self.n):
                    if peer == self.me or self._try_get(f"{_DONE}{peer}"):
                        continue
                    value = self._try_get(f"{_BEAT}{peer}")
                    if peer not in seen or seen[peer][0] != value:
                        seen[peer] = (value, now)
                    elif now - seen[peer][1] > self.timeout_s and not self.stopped.is_set():
                        self._stop(f"lost process {peer} of {self.n}: no heartbeat for {now - seen[peer][1]:.0f} s")
            except Exception as err:  # noqa: BLE001  (the coordinator's store is unreachable)
                if not self.stopped.is_set():
                    self._stop(f"lost process 0 of {self.n} (the coordinator): {str(err).splitlines()[0][:200]}")

    def _try_get(self, key: str) -> str:
        try:
            return self.client.key_value_try_get(key)  # type: ignore[attr-defined]
        except Exception as err:  # noqa: BLE001
            if "NOT_FOUND" in str(err) or "not found" in str(err).lower():
                return ""
            raise

    def _stop(self, reason: str) -> None:
        print(f"error: {reason}; stopping process {self.me} (exit {EXIT_PEER_LOST})", file=sys.stderr, flush=True)
        os._exit(EXIT_PEER_LOST)


_WATCHDOG: list[Watchdog] = []


@contextlib.contextmanager
def peer_loss_explains_failures() -> Iterator[None]:
    """A failure inside this block (a collective whose peer died, say) first waits for the watchdog's verdict.

    When a peer is lost the watchdog ends the process with its one line (within ``PEER_TIMEOUT_S``); the
    original exception is raised only when every peer is still alive.
    """
    try:
        yield
    except (jax.errors.JaxRuntimeError, RuntimeError, TimeoutError, ConnectionError):  # what a dead peer causes
        if _WATCHDOG and not _WATCHDOG[0].stopped.is_set():
            time.sleep(PEER_TIMEOUT_S + 2 * BEAT_INTERVAL_S)
        raise


def start_watchdog(process_id: int, num_processes: int, timeout_s: float = PEER_TIMEOUT_S) -> Watchdog:
    """Start the lost-peer watchdog on the client ``jax.distributed.initialize`` made."""
    from jax._src import distributed as jax_distributed  # the client: JAX exposes no public handle

    _WATCHDOG[:] = [Watchdog(process_id, num_processes, jax_distributed.global_state.client, timeout_s).start()]
    return _WATCHDOG[0]


def is_primary() -> bool:
    """True on the process that writes the workdir's files (process 0)."""
    return jax.process_index() == 0


def layout() -> dict[str, int | str]:
    return {
        "process_index": jax.process_index(),
        "process_count": jax.process_count(),
        "local_devices": jax.local_device_count(),
        "global_devices": jax.device_count(),
        "platform": jax.default_backend(),
    }


def describe_layout() -> str:
    lay = layout()
    return (
        f"process {lay['process_index']} of {lay['process_count']}: {lay['local_devices']} local / "
        f"{lay['global_devices']} global {lay['platform']} devices"
    )


def log_layout() -> None:
    """Log the process layout (INFO), once per run."""
    log.info("%s", describe_layout())


def agree(flag: bool) -> bool:
    """Process 0's ``flag`` on every process (a no-op with one process)."""
    if jax.process_count() == 1:
        return flag
    import numpy as np
    from jax.experimental import multihost_utils

    return bool(multihost_utils.broadcast_one_to_all(np.asarray(flag, np.int32)))

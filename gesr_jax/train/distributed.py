"""Multi-process runs: ``jax.distributed.initialize`` when asked, the process layout, and who writes files.

A run with several processes (hosts, or several processes on one host) is started once per process with
the same command plus the standard settings: ``--coordinator-address HOST:PORT --num-processes N
--process-id I`` or the environment variables ``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES`` and
``JAX_PROCESS_ID`` (flags win). Nothing is initialised unless one of them is given. Every process
computes; only process 0 (:func:`is_primary`) writes the workdir's small files (metrics, plots,
config.json, model.json, best.json, results.json, eval.json, the data fingerprint) and holds the workdir
lock; Orbax writes checkpoints collectively.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Mapping

import jax

from gesr_jax.config import ConfigError

log = logging.getLogger("gesr_jax.train")

ENV = {"coordinator_address": "JAX_COORDINATOR_ADDRESS", "num_processes": "JAX_NUM_PROCESSES",
       "process_id": "JAX_PROCESS_ID"}  # fmt: skip


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
    return True


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

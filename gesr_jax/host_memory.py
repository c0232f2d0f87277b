"""Keep freed host memory for the next XLA call on CPU: the glibc malloc settings behind it.

Why: XLA's CPU runtime allocates each executable's temporary buffer (every intermediate of the program at
once) on each call, from one of its worker threads. With glibc's defaults a block that large comes from a fresh
``mmap``: a worker thread's arena grows only to 64 MiB, and the main arena maps anything above its threshold (at
most 32 MiB). ``free`` unmaps it again, so every call touches new pages that the kernel must fault in and zero.
The GESR train step of ``experiments/bench_roofline.py`` (B=32, N=256, C=64) has a 79 MiB temporary buffer:
20,224 page faults and 37-45 ms of system time in a step of 93-133 ms CPU time on a 2-core AMD EPYC. With
:func:`retain_host_memory` called first it had none: with glibc's thresholds put back in the same process, a
step took 1.54x the CPU time (a throwaway script, 8 interleaved rounds). In
experiments/results/roofline_cpu.md, the step given back its free memory before each call (the faults return)
took 1.96x (1.68-2.01) the time.

What it sets, with ``mallopt``: one arena for every thread (``M_ARENA_MAX``), so the workers allocate from the
main heap; blocks up to ``mmap_threshold`` bytes from that heap rather than from ``mmap``
(``M_MMAP_THRESHOLD``); and freed memory kept unless more than ``trim_threshold`` bytes sit free at the top of the
heap (``M_TRIM_THRESHOLD``). The cost: the process keeps its peak heap (as JAX on a GPU keeps its memory pool),
and every thread shares one arena's lock; XLA allocates per call, not per op, so that lock is rarely taken.

A call dispatched before XLA has freed the previous call's buffer (asynchronous dispatch) takes a second block,
which faults in once; calls then reuse the blocks the heap holds. The GESR train step above, run back to back,
had 0-112 faults per call after its first few calls.

It must run before JAX starts its CPU backend (the first computation, ``jax.devices()``, ...): a thread that
already allocated keeps its own arena, and the settings would not reach it. Importing jax is fine.
The ``gesr`` command (:func:`configure_from_env`) and the benchmarks in experiments/ (``--host-allocator``) set
it first; ``GESR_HOST_ALLOCATOR=default`` leaves glibc's defaults. In a notebook::

    from gesr_jax import host_memory
    host_memory.retain_host_memory()   # first, before any JAX computation

Only glibc (Linux) has these settings; elsewhere (macOS, musl) nothing changes and the report says why.
"""

from __future__ import annotations

import ctypes
import dataclasses
import functools
import logging
import os

ENV = "GESR_HOST_ALLOCATOR"
CHOICES = ("retain", "default")
_INT_MAX = (1 << 31) - 1  # mallopt takes an int
DEFAULT_MMAP_THRESHOLD = 1 << 30  # 1 GiB: a temporary buffer larger than this still gets its own mapping
DEFAULT_TRIM_THRESHOLD = _INT_MAX  # the largest value mallopt takes: keep what was freed

# glibc's mallopt parameter numbers (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_ARENA_MAX = -1, -3, -8

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class HostAllocator:
    """What :func:`retain_host_memory` did: whether the settings are in effect and one line saying which."""

    applied: bool
    detail: str


_state: HostAllocator | None = None  # the first call's result; mallopt settings last for the process


def current() -> HostAllocator:
    """The host allocator of this process as set here (glibc's defaults if nothing was called)."""
    return _state or HostAllocator(False, "glibc malloc defaults")


@functools.cache  # release_free_memory runs before every call of a benchmark's ablation row
def _glibc() -> ctypes.CDLL | None:
    try:
        if not os.confstr("CS_GNU_LIBC_VERSION"):
            return None
        libc = ctypes.CDLL(None)
    except (ValueError, OSError, AttributeError):  # no such confstr name (not glibc), or no libc handle
        return None
    return libc if hasattr(libc, "mallopt") else None


def _backend_started() -> bool:
    try:
        from jax._src import xla_bridge
    except ImportError:  # another jax layout: nothing to check against
        return False
    return bool(xla_bridge.backends_are_initialized())


def _mib(size: int) -> str:
    return f"{size / 2**20:.0f} MiB"


def _check_bytes(name: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 < value <= _INT_MAX:
        raise ValueError(f"host_memory: {name} must be an int in [1, {_INT_MAX}] bytes, got {value!r}")
    return value


def retain_host_memory(
    *, mmap_threshold: int = DEFAULT_MMAP_THRESHOLD, trim_threshold: int = DEFAULT_TRIM_THRESHOLD, warn: bool = True
) -> HostAllocator:
    """Set glibc malloc to keep freed memory for the next call (see the module docstring); once per process.

    Returns what happened. Nothing changes when the C library is not glibc, or when JAX's backend already runs
    (the settings would not reach its threads; ``warn`` logs a warning then). A second call returns the first
    call's result.
    """
    global _state
    mmap_threshold = _check_bytes("mmap_threshold", mmap_threshold)
    trim_threshold = _check_bytes("trim_threshold", trim_threshold)
    if _state is not None:
        return _state
    libc = _glibc()
    if libc is None:
        return HostAllocator(False, "glibc malloc defaults (the C library is not glibc)")
    if _backend_started():
        (log.warning if warn else log.debug)(
            "host_memory.retain_host_memory: JAX's backend already runs, so its threads keep glibc's defaults; "
            "call it before the first JAX computation")
        return HostAllocator(False, "glibc malloc defaults (JAX's backend had started first)")
    settings = ((_M_ARENA_MAX, 1), (_M_MMAP_THRESHOLD, mmap_threshold), (_M_TRIM_THRESHOLD, trim_threshold))
    if not all(libc.mallopt(param, value) == 1 for param, value in settings):
        raise OSError(f"host_memory: glibc mallopt refused one of {settings}")
    _state = HostAllocator(True, f"glibc malloc keeps freed memory (one arena; mmap above {_mib(mmap_threshold)}, "
                                 f"trim above {_mib(trim_threshold)})")
    return _state


def choice_from_env(default: str = "retain") -> str:
    """``$GESR_HOST_ALLOCATOR`` (else ``default``) as one of :data:`CHOICES`; ``ValueError`` naming it if not."""
    raw = os.environ.get(ENV) or default
    choice = raw.strip().lower()
    if choice not in CHOICES:
        raise ValueError(f"{ENV}={raw!r}: must be one of {list(CHOICES)}")
    return choice


def configure_from_env(default: str = "retain", *, warn: bool = False) -> HostAllocator:
    """:func:`retain_host_memory` unless ``$GESR_HOST_ALLOCATOR`` (else ``default``) is "default"."""
    return retain_host_memory(warn=warn) if choice_from_env(default) == "retain" else current()


def release_free_memory() -> bool:
    """Return the heap's free memory to the kernel now (glibc ``malloc_trim(0)``); False where there is no glibc.

    Under :func:`retain_host_memory` a process keeps its peak heap; this gives the free part back (e.g. after an
    evaluation with large batches). The next calls fault their temporaries in again, once. The benchmarks call
    it before every call of an ablation row: the cost the retained heap removes, measured in the same rounds.
    """
    libc = _glibc()
    if libc is None or not hasattr(libc, "malloc_trim"):
        return False
    libc.malloc_trim(0)
    return True

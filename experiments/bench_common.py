"""Benchmark timing that survives a shared machine: interleaved rounds, CPU time beside wall time, paired ratios.

Every ``experiments/bench_*.py`` times its variants with :func:`interleaved`::

    from bench_common import interleaved, machine_info, machine_line, ratio

    info = machine_info()                                   # CPU model, cores, jax, load average now
    timings = interleaved({"fast": lambda: f(x), "slow": lambda: g(x)}, rounds=7)
    timings["fast"].cpu_ms, timings["fast"].wall_ms         # medians per call (also .p99_wall_ms, .rounds)
    r = ratio(timings, "slow", "fast")                      # slow / fast per round, CPU time: Ratio(median, lo, hi)
    f"{r}"                                                  # "2.31x (2.20-2.45)"
    header = machine_line(info, finished=machine_info())    # a markdown line naming the machine and its load

    add_cpus_arg(parser); start_process(parser.parse_args())   # --cpus 1: run on CPU 1 only, before jax starts

How: each variant is called once untimed (compiles), then ``rounds`` rounds run every variant once each, in an
order that rotates from round to round, so a burst of load from another job hits all variants of a round
alike. A call is timed with ``time.perf_counter`` (wall) and ``time.process_time`` (CPU seconds of this
process, all its threads): on a loaded box the wall time grows with the other jobs' share of the cores while
the CPU time mostly does not. A ratio of two variants is the median of the per-round ratios (the two calls of
a round saw the same load), with the 25th-75th percentile as its spread. A variant shorter than
``min_call_ms`` is called several times per timed sample (the same count every round), so timer resolution
and dispatch jitter stay small against it. Results are per call.

``--cpus`` (:func:`pin_cpus`) pins the process to some logical CPUs before jax builds its thread pool. On a
shared box, the CPU time of a multi-threaded XLA call also counts its threads' spinning and waiting for
each other, which grows with the other jobs' load: two unpinned runs of bench_serving half an hour apart
gave ratios 2x apart (experiments/results/serving_cpu.md). Pinned to one CPU, XLA runs one thread and the
CPU time is the work of the call.

``--host-allocator`` (:func:`start_process`, default ``$GESR_HOST_ALLOCATOR`` or "retain", as the ``gesr``
command) sets glibc malloc to keep freed memory (``gesr_jax/host_memory.py``). With glibc's defaults every
call of a program with a temporary buffer above 32-64 MiB maps it afresh and page-faults it in: system time
that varied 2x between runs of bench_serving and was a third of the GESR train step's CPU time. The machine line
names the setting.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import os
import pathlib
import platform
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import numpy as np

__all__ = [
    "METHOD_NOTE", "Ratio", "Timing", "add_cpus_arg", "compiled_cost", "interleaved", "load_average", "machine_info",
    "machine_line", "pin_cpus", "ratio", "start_process", "with_memory_released",
]  # fmt: skip


def _block(value: Any) -> Any:
    """Wait for jax's asynchronous dispatch (no-op for non-jax results)."""
    try:
        import jax
    except ImportError:
        return value
    return jax.block_until_ready(value)


@dataclasses.dataclass
class Timing:
    """Per-call times of one variant, one entry per round (milliseconds)."""

    wall: list[float]
    cpu: list[float]
    calls_per_sample: int

    @property
    def rounds(self) -> int:
        return len(self.wall)

    @property
    def wall_ms(self) -> float:
        return float(np.median(self.wall))

    @property
    def cpu_ms(self) -> float:
        return float(np.median(self.cpu))

    @property
    def p99_wall_ms(self) -> float:
        return float(np.percentile(self.wall, 99))

    @property
    def cpu_share(self) -> float:
        """Median CPU time / wall time of a call: ~1 single-threaded, up to the cores used, < 1 when starved."""
        return float(np.median(np.asarray(self.cpu) / np.maximum(np.asarray(self.wall), 1e-9)))


@dataclasses.dataclass(frozen=True)
class Ratio:
    """The median of per-round ratios and their 25th-75th percentile spread."""

    median: float
    lo: float
    hi: float
    rounds: int

    def scaled(self, factor: float) -> Ratio:
        """The same ratio times a constant (e.g. a FLOP count ratio turning a time ratio into a rate ratio)."""
        return Ratio(self.median * factor, self.lo * factor, self.hi * factor, self.rounds)

    def __format__(self, spec: str) -> str:
        spec = spec or ".2f"
        return f"{self.median:{spec}}x ({self.lo:{spec}}-{self.hi:{spec}})"

    def __str__(self) -> str:
        return format(self, "")


def interleaved(
    variants: Mapping[str, Callable[[], Any]],
    rounds: int,
    *,
    warmup: int = 1,
    min_call_ms: float = 5.0,
    before_each: Mapping[str, Callable[[], Any]] | None = None,
    prime: bool = False,
) -> dict[str, Timing]:
    """Time every variant once per round, ``rounds`` rounds; per-call wall and CPU milliseconds per round.

    ``variants`` are zero-argument callables (their jax results are waited for). ``before_each[name]`` runs
    untimed before each of that variant's samples (e.g. to reset a cache). The first ``warmup`` calls of each
    variant are untimed; one more untimed call after them sets how many calls make one sample, at least
    ``min_call_ms`` of wall time (none with ``min_call_ms=0``). Sizing on the last warm-up call instead gave every
    jitted variant one call per sample, since with ``warmup=1`` that call is the one that compiles.
    ``prime=True`` runs one more untimed call right before each sample, so a sample finds its own variant's
    parameters and buffers in cache rather than the previous variant's (a server running one model sees the
    former; a 2.5 ms call measured 7 ms cold after a larger model's call on the 2-core benchmark box).
    """
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    names = list(variants)
    setup = dict(before_each or {})
    calls: dict[str, int] = {}
    for name in names:
        for _ in range(max(warmup, 1)):
            if name in setup:
                setup[name]()
            _block(variants[name]())
        calls[name] = 1
        if min_call_ms > 0:  # sized by one more call: a jitted variant's first call compiles
            if name in setup:
                setup[name]()
            start = time.perf_counter()
            _block(variants[name]())
            elapsed = (time.perf_counter() - start) * 1e3
            calls[name] = max(1, int(np.ceil(min_call_ms / max(elapsed, 1e-3))))
    out = {name: Timing([], [], calls[name]) for name in names}
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:  # the order rotates every round
            if name in setup:
                setup[name]()
            fn, n = variants[name], calls[name]
            if prime:
                _block(fn())
            wall0, cpu0 = time.perf_counter(), time.process_time()
            for _ in range(n):
                _block(fn())
            cpu1, wall1 = time.process_time(), time.perf_counter()
            out[name].wall.append((wall1 - wall0) * 1e3 / n)
            out[name].cpu.append((cpu1 - cpu0) * 1e3 / n)
    return out


def ratio(timings: Mapping[str, Timing], numerator: str, denominator: str, *, clock: str = "cpu") -> Ratio:
    """``numerator`` time / ``denominator`` time, round by round (``clock`` "cpu" or "wall")."""
    if clock not in ("cpu", "wall"):
        raise ValueError(f"clock must be 'cpu' or 'wall', got {clock!r}")
    num = np.asarray(getattr(timings[numerator], clock))
    den = np.asarray(getattr(timings[denominator], clock))
    per_round = num / np.maximum(den, 1e-9)
    lo, med, hi = np.percentile(per_round, [25, 50, 75])
    return Ratio(float(med), float(lo), float(hi), len(per_round))


def load_average() -> tuple[float, float, float]:
    """The 1, 5 and 15 minute load averages (nan where the OS has none)."""
    try:
        return os.getloadavg()
    except OSError:
        return (float("nan"),) * 3


def _cpu_model() -> str:
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _cpu_set(spec: str) -> set[int]:
    """The CPUs of ``spec`` ("1", "0,2", "0-3"), all of them ones this process may run on; else ValueError."""
    cpus: set[int] = set()
    try:
        for part in spec.split(","):
            lo, _, hi = part.strip().partition("-")
            cpus |= set(range(int(lo), int(hi or lo) + 1))
    except ValueError:
        raise ValueError(f"--cpus must look like '1', '0,2' or '0-3', got {spec!r}") from None
    available = os.sched_getaffinity(0)
    if not cpus or not cpus <= available:
        raise ValueError(f"--cpus {spec!r}: this process may run on CPUs {sorted(available)} only")
    return cpus


def _cpus_option(spec: str) -> str:
    try:
        _cpu_set(spec)
    except ValueError as err:  # argparse then names the option and exits 2 with the usage line
        raise argparse.ArgumentTypeError(str(err)) from None
    return spec


def add_cpus_arg(parser: argparse.ArgumentParser) -> None:
    """The ``--cpus`` and ``--host-allocator`` options the benchmarks share (see the module docstring)."""
    from gesr_jax import host_memory

    parser.add_argument("--cpus", default=None, type=_cpus_option,
                        help="pin to these logical CPUs before jax starts, e.g. '1' or '0,1' (default: all)")
    parser.add_argument("--host-allocator", choices=host_memory.CHOICES, default=host_memory.choice_from_env(),
                        help="'retain': glibc malloc keeps freed memory for the next call (gesr_jax/host_memory.py); "
                             "'default': glibc's defaults (default: $GESR_HOST_ALLOCATOR, else retain)")


def start_process(args: argparse.Namespace) -> None:
    """Apply ``--cpus`` and ``--host-allocator`` of :func:`add_cpus_arg`; call it before jax's first computation."""
    from gesr_jax import host_memory

    pin_cpus(args.cpus)
    if args.host_allocator == "retain":
        host_memory.retain_host_memory()


def pin_cpus(spec: str | None) -> set[int] | None:
    """Pin this process to the CPUs of ``spec`` ("1", "0,2", "0-3"); call it before jax's first computation.

    XLA sizes its CPU thread pool from the CPUs the process may run on when the backend starts, so pinning
    afterwards would leave more threads than CPUs. Returns the CPU set (None for ``spec`` None).
    """
    if spec is None:
        return None
    cpus = _cpu_set(spec)
    os.sched_setaffinity(0, cpus)
    return cpus


def with_memory_released(call: Callable[[], Any]) -> Callable[[], Any]:
    """``call`` after giving the heap's free memory back to the kernel (``host_memory.release_free_memory``), so
    its temporaries are faulted in afresh, as with glibc's defaults (where a block above 32-64 MiB is a new
    mapping per call). The ablation of ``--host-allocator retain``, timed in the same rounds."""
    from gesr_jax import host_memory

    def run() -> Any:
        host_memory.release_free_memory()
        return _block(call())

    return run


@contextlib.contextmanager
def patched(owner: Any, name: str, value: Any) -> Iterator[None]:
    """``owner.name`` replaced by ``value`` inside the block: an ablation traced (compiled) with an older formula.

    jit keeps what it traced, so only a variant's first (compiling) call needs the block.
    """
    saved = getattr(owner, name)
    setattr(owner, name, value)
    try:
        yield
    finally:
        setattr(owner, name, saved)


def compiled_cost(fn: Callable, *args: Any) -> tuple[Any, float, float]:
    """``(executable, FLOPs, bytes accessed)`` of ``jax.jit(fn)`` at ``args``, from XLA's compiled cost analysis."""
    import jax

    exe = jax.jit(fn).lower(*args).compile()
    cost = exe.cost_analysis()
    cost = cost[0] if isinstance(cost, list | tuple) else cost  # one dict per device on older jax
    return exe, float(cost.get("flops", 0.0)), float(cost.get("bytes accessed", 0.0))


def machine_info() -> dict[str, Any]:
    """Platform, device, CPU model and core count, jax/python versions, date and the load average now."""
    import jax

    from gesr_jax import host_memory

    device = jax.devices()[0]
    return {
        "host_allocator": host_memory.current().detail,
        "platform": jax.default_backend(),
        "device": getattr(device, "device_kind", str(device)),
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "pinned": sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "arch": platform.machine(),
        "jax": jax.__version__,
        "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="minutes"),
        "load": load_average(),
    }


def machine_line(info: Mapping[str, Any], *, finished: Mapping[str, Any] | None = None) -> str:
    """One markdown line naming the machine, versions and the load average at the start (and end) of a run."""
    load = "/".join(f"{x:.2f}" for x in info["load"])
    pinned = info.get("pinned")
    cores = f"{info['cores']} logical cores visible"
    if pinned is not None and len(pinned) < (info["cores"] or 0):
        cores += f", this process pinned to CPU {','.join(map(str, pinned))} (`--cpus`)"
    text = (
        f"Machine: platform **{info['platform']}** ({info['device']}), CPU {info['cpu']} ({info['arch']}, "
        f"{cores}, shared with other jobs); jax {info['jax']}, Python "
        f"{info['python']}; {info['date']}. Load average (1/5/15 min) at start {load}"
    )
    if finished is not None:
        text += ", at end " + "/".join(f"{x:.2f}" for x in finished["load"])
    if info.get("host_allocator"):
        text += f". Host memory: {info['host_allocator']}"
    return text + "."


METHOD_NOTE = (
    "Method (experiments/bench_common.py): variants interleaved round by round (order rotating), one untimed "
    "compile call each; per call the median wall and CPU (process) time over the rounds; every ratio is the "
    "median of per-round CPU-time ratios with its 25th-75th percentile spread in parentheses."
)


RESULTS = pathlib.Path(__file__).resolve().parent / "results"


def write_results(text: str, stem: str, info: Mapping[str, Any], smoke: bool, out: str | None = None) -> pathlib.Path:
    """Print a benchmark's markdown and write it to ``out`` or ``results/<stem>_<platform>[_smoke].md``."""
    path = pathlib.Path(out) if out else RESULTS / f"{stem}_{info['platform']}{'_smoke' if smoke else ''}.md"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    print(text, end="")
    print(f"wrote {path}")
    return path

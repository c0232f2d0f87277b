"""What a run tells its user while it runs: phase lines, step progress and TensorBoard event files.

* :class:`Reporter` prints one line when a phase starts and one with its duration when it ends
  (``building data``, ``initialising the model``, ``compiling the train step``, ``evaluating valid``,
  ``saving checkpoint 30``, ...) on stderr, whether or not stderr is a terminal, so a log file shows
  where the time went. ``GESR_PROGRESS=0`` silences it.
* :class:`Progress` (a hook) reports training: a tqdm bar on a terminal, otherwise a line every
  ``interval_s`` seconds (``$GESR_PROGRESS_EVERY_S``, default 10). The first step compiles, so it is
  reported as its own phase and the step time and ETA are measured from its end on.
* :class:`TensorBoard` writes every ``metrics.jsonl`` record as scalars (``train/loss``,
  ``train/learning_rate``, ``valid/consume/ne``, ``train/requests_per_sec``, ...) to
  ``workdir/tensorboard/`` with tensorboardX; ``tensorboard --logdir WORKDIR/tensorboard`` shows them.
  :func:`read_scalars` reads such a folder back (tensorboardX's protobufs; no TensorFlow needed).
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import struct
import sys
import time
from collections.abc import Iterator, Mapping
from typing import Any, TextIO

import jax
import tqdm
from tensorboardX.event_file_writer import EventsWriter
from tensorboardX.proto import event_pb2
from tensorboardX.proto.event_pb2 import Event, SessionLog
from tensorboardX.proto.summary_pb2 import Summary

from gesr_jax.train import distributed
from gesr_jax.train.hooks import Hook, LoopContext
from gesr_jax.workdir_files import RunIOError

TENSORBOARD_DIR = "tensorboard"  # inside the workdir


def _enabled_by_env() -> bool:
    return os.environ.get("GESR_PROGRESS", "1").strip().lower() not in ("0", "false", "no", "off")


def is_terminal(stream: TextIO) -> bool:
    """A tqdm bar only makes sense on an interactive terminal (not in CI, not redirected to a file)."""
    ci = os.environ.get("CI", "").lower() in ("1", "true", "yes")
    return not ci and hasattr(stream, "isatty") and stream.isatty()


def format_duration(seconds: float) -> str:
    """``0.42 s``, ``12.3 s``, ``2 min 05 s``, ``1 h 02 min``."""
    if seconds < 10:
        return f"{seconds:.2f} s"
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, sec = divmod(int(round(seconds)), 60)
    if minutes < 60:
        return f"{minutes} min {sec:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


class Reporter:
    """Phase lines on ``stream`` (stderr) from process 0; time spent in phases is tallied for the step timer."""

    def __init__(self, stream: TextIO | None = None, *, enabled: bool | None = None):
        self.stream = sys.stderr if stream is None else stream
        self.enabled = (_enabled_by_env() if enabled is None else enabled) and distributed.is_primary()
        self.start = time.perf_counter()
        self.phase_seconds = 0.0  # total time inside phases (evaluations, checkpoints) since the start
        self.bar: Any = None  # the training bar while one is shown (lines must not tear it)
        self._depth = 0

    def line(self, message: str) -> None:
        """One line prefixed with the time since the start, e.g. ``[gesr 0:00:12] evaluating valid``."""
        if not self.enabled:
            return
        stamp = time.strftime("%H:%M:%S", time.gmtime(time.perf_counter() - self.start))
        text = f"[gesr {stamp}] {message}"
        if self.bar is not None:
            self.bar.write(text, file=self.stream)
        else:
            print(text, file=self.stream, flush=True)

    @contextlib.contextmanager
    def phase(self, what: str) -> Iterator[dict[str, Any]]:
        """Report ``what ...`` now and ``what: <duration>[, detail]`` at the end; yields a dict for ``detail``."""
        info: dict[str, Any] = {}
        self.line(f"{what} ...")
        start = time.perf_counter()
        self._depth += 1
        try:
            yield info
        finally:
            self._depth -= 1
            seconds = time.perf_counter() - start
            if self._depth == 0:
                self.phase_seconds += seconds
            detail = f" ({info['detail']})" if info.get("detail") else ""
            self.line(f"{what}: {format_duration(seconds)}{detail}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def throughput(requests: float, candidates: float, seconds: float) -> dict[str, float]:
    """``requests_per_sec`` and ``candidates_per_sec`` (NaN when nothing was timed)."""
    if seconds <= 0 or requests <= 0:
        return {"requests_per_sec": float("nan"), "candidates_per_sec": float("nan")}
    return {"requests_per_sec": requests / seconds, "candidates_per_sec": candidates / seconds}


class Progress(Hook):
    """Training progress: the first step as a compile phase, then a bar (terminal) or periodic lines.

    Step time and ETA count only steps after the first one of this run and leave out the time spent in
    phases (evaluations, checkpoints), so neither compilation nor a long validation pass distorts them.
    """

    def __init__(self, reporter: Reporter, *, interval_s: float | None = None, terminal: bool | None = None):
        if interval_s is None:
            interval_s = float(os.environ.get("GESR_PROGRESS_EVERY_S", "10"))
        self.reporter, self.interval_s = reporter, interval_s
        self.terminal = is_terminal(reporter.stream) if terminal is None else terminal
        self.first_step: int | None = None
        self.timed_from = 0.0  # wall clock when timed steps began
        self.phase_base = 0.0  # reporter.phase_seconds at that moment
        self.last_line = 0.0
        self.loop_start = 0.0

    def on_train_start(self, ctx: LoopContext) -> None:
        tc = ctx.config.train
        self.loop_start = time.perf_counter()
        if ctx.step >= tc.num_steps:
            return
        what = "resuming at step" if ctx.step else "training from step"
        self.reporter.line(f"{what} {ctx.step} to {tc.num_steps} (batch {tc.batch_size} requests)")
        self._compile = self.reporter.phase("compiling the train step (first step)")
        self._compile.__enter__()

    def on_step(self, ctx: LoopContext, step: int, metrics: dict[str, Any]) -> None:
        now = time.perf_counter()
        if self.first_step is None:
            jax.block_until_ready(metrics)  # the first step compiles: its end is where step timing starts
            self._compile.__exit__(None, None, None)
            self.first_step, self.timed_from = step, time.perf_counter()
            self.phase_base, self.last_line = self.reporter.phase_seconds, self.timed_from
            if self.terminal and self.reporter.enabled:
                tc = ctx.config.train
                self.reporter.bar = tqdm.tqdm(total=tc.num_steps, initial=step, desc="train", unit="step",
                                              file=self.reporter.stream, dynamic_ncols=True)  # fmt: skip
                ctx.progress = self.reporter.bar
            return
        if self.reporter.bar is not None:
            self.reporter.bar.update(1)
        elif now - self.last_line >= self.interval_s:
            self.last_line = now
            self.reporter.line(self.status(ctx, step, metrics))

    def seconds_per_step(self, step: int) -> float | None:
        """Mean wall time of the timed steps, phases excluded; None before the second step."""
        if self.first_step is None or step <= self.first_step:
            return None
        busy = time.perf_counter() - self.timed_from - (self.reporter.phase_seconds - self.phase_base)
        return max(busy, 0.0) / (step - self.first_step)

    def status(self, ctx: LoopContext, step: int, metrics: Mapping[str, Any]) -> str:
        """``train step 40/60 (67%): loss 0.5120, 12.3 ms/step, 2600 requests/s, ETA 0.25 s``."""
        tc = ctx.config.train
        parts = [f"train step {step}/{tc.num_steps} ({100 * step / max(tc.num_steps, 1):.0f}%)"]
        try:
            parts.append(f"loss {float(metrics['loss']):.4f}")
        except (KeyError, TypeError, ValueError):
            pass
        per_step = self.seconds_per_step(step)
        if per_step:
            parts.append(f"{1e3 * per_step:.1f} ms/step, {tc.batch_size / per_step:.0f} requests/s")
            parts.append(f"ETA {format_duration(per_step * (tc.num_steps - step))}")
        return parts[0] + ": " + ", ".join(parts[1:]) if len(parts) > 1 else parts[0]

    def on_eval(self, ctx: LoopContext, step: int, split: str, metrics: dict[str, float]) -> None:
        shown = [f"{k} {v:.4f}" for k, v in metrics.items() if k.endswith("/ne") and isinstance(v, float)]
        rate = metrics.get("candidates_per_sec")
        if isinstance(rate, float) and rate == rate:
            shown.append(f"{rate:.0f} candidates/s")
        self.reporter.line(f"{split} at step {step}: " + (", ".join(shown) or "done"))

    def on_loop_end(self, ctx: LoopContext) -> None:
        if self.first_step is None:
            if hasattr(self, "_compile"):  # the loop ended before a step (a stop right after a resume)
                self._compile.__exit__(None, None, None)
            return
        self.reporter.close()
        ctx.progress = None
        steps = ctx.step - self.first_step + 1
        per_step = self.seconds_per_step(ctx.step)
        timing = (f"; {1e3 * per_step:.1f} ms/step after the first, evaluations and checkpoints left out"
                  if per_step else "")
        total = time.perf_counter() - self.loop_start
        self.reporter.line(f"training: {steps} steps in {format_duration(total)} (first step included){timing}")


class TensorBoard:
    """A ``metrics.jsonl`` sink: every numeric field of a record becomes the scalar ``<split>/<key>``.

    Created lazily on process 0, so a run that never logs leaves no folder. ``purge_step`` (a resume's
    restored step + 1) tells TensorBoard to drop the events a previous, interrupted run wrote after it.
    Events are written and flushed in the calling thread, one record at a time (records come every
    ``train.log_every`` steps): tensorboardX's background writer thread would die on a full disk and
    leave its queue to block the run, where here the failure is one :class:`RunIOError` naming the folder.
    """

    def __init__(self, logdir: str | os.PathLike[str], *, purge_step: int | None = None):
        self.logdir, self.purge_step = pathlib.Path(logdir), purge_step
        self._writer: EventsWriter | None = None

    def __call__(self, record: Mapping[str, Any]) -> None:
        if not distributed.is_primary():
            return
        split, step = record.get("split", "train"), int(record.get("step", 0))
        values = [
            Summary.Value(tag=f"{split}/{key}", simple_value=float(value))
            for key, value in record.items()
            if key not in ("step", "split", "final") and not isinstance(value, bool)
            and isinstance(value, (int, float)) and value == value  # skips None and NaN
        ]  # fmt: skip
        try:
            writer = self._open()
            writer.write_event(Event(wall_time=time.time(), step=step, summary=Summary(value=values)))
            writer.flush()
        except OSError as err:
            raise RunIOError.wrap("write TensorBoard events to", self.logdir, err) from None

    def _open(self) -> EventsWriter:
        if self._writer is None:
            self.logdir.mkdir(parents=True, exist_ok=True)
            writer = EventsWriter(str(self.logdir / "events"))
            if self.purge_step is not None:  # what tensorboardX's SummaryWriter(purge_step=...) writes
                writer.write_event(Event(step=self.purge_step, session_log=SessionLog(status=SessionLog.START)))
            self._writer = writer
        return self._writer

    def close(self) -> None:
        """Close the event file; a failure is raised once, never again on a second close."""
        writer, self._writer = self._writer, None
        if writer is not None:
            try:
                writer.close()
            except OSError as err:
                raise RunIOError.wrap("close the TensorBoard events in", self.logdir, err) from None


def read_scalars(logdir: str | os.PathLike[str]) -> dict[str, list[tuple[int, float]]]:
    """``{tag: [(step, value), ...]}`` of every scalar in the event files under ``logdir``, in file order.

    Reads the TFRecord framing (length, CRC, payload, CRC) and decodes ``Event`` protobufs with
    tensorboardX's generated classes; a record cut short by a crash ends that file's reading.
    """
    out: dict[str, list[tuple[int, float]]] = {}
    for path in sorted(pathlib.Path(logdir).rglob("events.out.tfevents.*")):
        data, pos = path.read_bytes(), 0
        while pos + 12 <= len(data):
            (length,) = struct.unpack("<Q", data[pos : pos + 8])
            payload = data[pos + 12 : pos + 12 + length]
            if len(payload) < length:
                break
            pos += 12 + length + 4
            event = event_pb2.Event.FromString(payload)
            for value in event.summary.value:
                if value.HasField("simple_value"):
                    out.setdefault(value.tag, []).append((int(event.step), float(value.simple_value)))
    return out

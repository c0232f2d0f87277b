"""What can go wrong with checkpoints, as exceptions with one-line messages, and Orbax's logs kept quiet.

* :class:`CheckpointError` (a usage error, exit status 2): :class:`CheckpointNotFoundError`,
  :class:`CheckpointMismatchError`, :class:`CheckpointCorruptError`, :class:`CheckpointUnusableError`.
* :class:`CheckpointWriteError` (an I/O error, exit status 3): a save failed on a full disk, a read-only
  folder, ... Orbax raises those as ``ValueError("RESOURCE_EXHAUSTED: ... [os_error_code='28']")``;
  :func:`os_errno` finds the OS error behind them.
* :class:`OrbaxTracebackFilter`: Orbax logs every failure with a full traceback before raising it; the
  caller reports the raised error in one line, so while a checkpoint folder is open those logged
  tracebacks are dropped (kept when the ``gesr_jax`` logger's own level is DEBUG, as ``gesr --debug`` sets it).
  Orbax reads array shards in parallel asyncio tasks; when one fails, the sibling tasks' failures are
  logged by ``asyncio`` ("unhandled exception during asyncio.run() shutdown") at a moment that depends
  on thread timing, so the same filter sits on the ``asyncio`` logger for records naming Orbax.
"""

from __future__ import annotations

import logging
import os
import re

from gesr_jax.workdir_files import RunIOError, describe_os_error

_OS_ERROR_CODE = re.compile(r"os_error_code='?(\d+)")


class CheckpointError(Exception):
    """A checkpoint cannot be used: missing, corrupt, or not matching this config (a usage error)."""


class CheckpointNotFoundError(CheckpointError):
    """The requested step is not in the checkpoint folder."""


class CheckpointMismatchError(CheckpointError):
    """The saved tree differs from the model/optimizer built from this config (paths, shapes, dtypes)."""


class CheckpointCorruptError(CheckpointError):
    """A step's files are damaged or unreadable; the message is one line naming step, folder and what.

    ``step`` is the corrupt step (``None`` when every step was) and ``reason`` the "what" part alone.
    """

    def __init__(self, message: str, *, step: int | None = None, reason: str = ""):
        super().__init__(message)
        self.step, self.reason = step, reason or message


class CheckpointUnusableError(CheckpointError):
    """A step restores intact, but its params give NaN/Inf predictions (a run from before the probe check)."""


class CheckpointWriteError(RunIOError):
    """Writing a checkpoint failed at the OS level; the newest complete step on disk is untouched."""


class CheckpointWarning(UserWarning):
    """A step was skipped as corrupt, or restored without checksums (written before they existed)."""


def one_line(err: BaseException) -> str:
    """``Type: first line of the message``, without TensorStore's spec dump, at most ~300 characters."""
    text = str(err)
    for noise in (" See full TensorStore details", " [tensorstore_spec"):  # multi-kilobyte spec dumps
        text = text.split(noise)[0]
    text = text.strip().splitlines()
    line = text[0] if text else ""
    line = line if len(line) <= 300 else line[:297] + "..."
    return f"{type(err).__name__}: {line}" if line else type(err).__name__


def os_errno(err: BaseException) -> int | None:
    """The OS errno behind ``err`` or an exception it was raised from (TensorStore's ``os_error_code``), or None."""
    seen: set[int] = set()
    current: BaseException | None = err
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno:
            return current.errno
        match = _OS_ERROR_CODE.search(str(current))
        if match:
            return int(match.group(1))
        current = current.__cause__ or current.__context__
    return None


def write_error(err: BaseException, directory: os.PathLike[str] | str) -> CheckpointWriteError | None:
    """A :class:`CheckpointWriteError` naming ``directory`` when ``err`` is an OS-level failure, else None."""
    code = os_errno(err)
    if code is None:
        return None
    reason = describe_os_error(OSError(code, os.strerror(code)))
    return CheckpointWriteError(
        f"cannot write a checkpoint to {directory}: {reason}; the newest complete step there is kept", directory, code
    )


class OrbaxTracebackFilter(logging.Filter):
    """Drops the tracebacks Orbax logs for failures it also raises (see the module docstring)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and ("orbax" in record.pathname or _names_orbax_task(record)):
            # The switch is the level set on ``gesr_jax`` itself: a root logger at DEBUG (pytest's caplog,
            # a notebook's basicConfig) is not a request for Orbax's tracebacks.
            level = logging.getLogger("gesr_jax").level
            return level != logging.NOTSET and level <= logging.DEBUG
        return True


def _names_orbax_task(record: logging.LogRecord) -> bool:
    """An ``asyncio`` record about a task whose coroutine is Orbax's (its message holds the task repr)."""
    return record.name == "asyncio" and "orbax" in record.getMessage()


_FILTER = OrbaxTracebackFilter()
_users = 0


def quiet_orbax_tracebacks(on: bool) -> None:
    """Install (``on``) or release the filter on the loggers Orbax's failures reach; counted, so nesting works."""
    global _users
    _users += 1 if on else -1
    for name in ("absl", "asyncio"):
        if on and _users == 1:
            logging.getLogger(name).addFilter(_FILTER)
        elif not on and _users == 0:
            logging.getLogger(name).removeFilter(_FILTER)

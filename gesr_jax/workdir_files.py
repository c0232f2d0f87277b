"""The files of a workdir, kept safe: one run per workdir, atomic small files, writability and free space, data fingerprints.

The primitives under :mod:`gesr_jax.workdir` (which reads and writes a run's records with them); none
of them imports JAX.

* :class:`WorkdirLock` -- ``<workdir>/.lock``, held for the whole run; a second run fails at once.
* :func:`atomic_write_text` / :func:`atomic_write_json` -- readers never see a half-written file.
* :func:`check_writable` / :func:`free_space_warning` -- a read-only or full folder is reported before any work.
* :func:`data_fingerprint` / :func:`check_data_fingerprint` -- a resume on different data is refused.

A busy workdir or changed data is a :class:`WorkdirError` (a usage error, exit status 2); a file or
folder that cannot be written is a :class:`RunIOError` (an ``OSError``, exit status 3; see
``docs/failures.md``).
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import json
import os
import pathlib
import shutil
import socket
import tempfile
import warnings
from collections.abc import Mapping
from typing import Any

from gesr_jax.config import ConfigError
from gesr_jax.data.event_log import SPLIT_NAMES

LOCK_FILE = ".lock"
FINGERPRINT_FILE = "data_fingerprint.json"  # suggested name for the saved fingerprint


class WorkdirError(ConfigError):
    """A workdir cannot be used as asked: busy, trained on other data or by another model API, or without
    config.json / checkpoints (a usage error: the CLI prints one line and exits with status 2)."""


class WorkdirBusyError(WorkdirError):
    """Another live process holds the workdir's lock."""


class RunIOError(OSError):
    """Reading or writing a run's file failed (disk full, read-only, no permission, I/O error).

    ``str()`` is one line naming the operation, the path and the OS reason; ``errno`` is the OS error's
    (None when unknown) and ``path`` the file or folder. The CLI reports it with exit status 3.
    """

    def __init__(self, message: str, path: str | os.PathLike[str] | None = None, code: int | None = None):
        super().__init__(message)
        self.message, self.errno = message, code
        self.path = None if path is None else pathlib.Path(path)

    def __str__(self) -> str:
        return self.message

    @classmethod
    def wrap(cls, operation: str, path: str | os.PathLike[str], err: OSError) -> RunIOError:
        """``cannot <operation> <path>: <reason> [ERRNO]`` from the OS error ``err``."""
        return cls(f"cannot {operation} {path}: {describe_os_error(err)}", path, err.errno)


class WorkdirNotWritableError(RunIOError):
    """A folder of the workdir cannot be created or written (read-only, no permission, disk full)."""


class DataChangedError(WorkdirError):
    """The data differ from the data the workdir was trained on."""


class WorkdirWarning(UserWarning):
    """A stale lock was taken over, or a data change was allowed."""


# ---------------------------------------------------------------------------------------------- lock


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _describe(record: Mapping[str, Any]) -> str:
    return f"pid {record.get('pid')} on host {record.get('host')} (started {record.get('started')})"


class WorkdirLock:
    """Exclusive lock on ``<workdir>/.lock`` for as long as the context is open.

    The lock is an ``fcntl.flock`` on the file, released by the kernel when the holder exits, however it
    exits; the file also records ``{"pid", "host", "started"}`` so a refusal can name the holder.
    Rules, in order:

    * flock refused: another open file holds it, so the workdir is busy -> :class:`WorkdirBusyError`
      naming the recorded holder (even if that pid is gone: a child it forked may still hold the lock).
    * flock granted and the file still records a holder (it was killed before releasing): the lock is
      stale and taken over with a :class:`WorkdirWarning` saying whether that pid is still running.
    * flock unsupported by the filesystem (``ENOLCK``/``EOPNOTSUPP``, some network mounts): the record
      alone decides; a holder recorded on this host whose pid is alive means busy, a dead one is stale.
      A holder on another host cannot be checked and is treated as busy.

    Releasing empties the file but keeps it: unlinking a lock file races with a process that has just
    opened it. An empty ``.lock`` therefore means "free".
    """

    def __init__(self, workdir: str | os.PathLike[str]):
        self.path = pathlib.Path(workdir) / LOCK_FILE
        self._fd: int | None = None

    def acquire(self) -> WorkdirLock:
        if self._fd is not None:
            raise WorkdirBusyError(f"{self.path} is already held by this WorkdirLock")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as err:
            raise WorkdirNotWritableError(
                f"cannot create the lock file {self.path}: {describe_os_error(err)}", self.path.parent, err.errno
            ) from None
        try:
            flock_works = self._flock(fd)
            record = self._read(fd)
            self._check_record(record, flock_works)
            me = {
                "pid": os.getpid(),
                "host": socket.gethostname(),
                "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            }
            os.ftruncate(fd, 0)
            os.pwrite(fd, (json.dumps(me) + "\n").encode(), 0)
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        return self

    def _flock(self, fd: int) -> bool:
        """Take the flock; False when the filesystem has none. Raise WorkdirBusyError when it is held."""
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            record = self._read(fd)
            holder = _describe(record) if record else "another process"
            gone = ""
            if record.get("host") == socket.gethostname() and isinstance(record.get("pid"), int):
                if not _pid_alive(record["pid"]):
                    gone = "; that pid is no longer running, but a process it started still holds the lock"
            raise WorkdirBusyError(
                f"workdir {self.path.parent} is in use by {holder}{gone}; wait for it to finish or use another "
                "--workdir"
            ) from None
        except OSError as err:
            if err.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                return False
            raise
        return True

    @staticmethod
    def _read(fd: int) -> dict[str, Any]:
        raw = os.pread(fd, 4096, 0).decode("utf-8", "replace").strip()
        if not raw:
            return {}
        try:
            record = json.loads(raw)
        except json.JSONDecodeError:
            return {"pid": None, "host": None, "started": None, "raw": raw[:80]}
        return record if isinstance(record, dict) else {"raw": raw[:80]}

    def _check_record(self, record: dict[str, Any], flock_works: bool) -> None:
        if not record:
            return
        here = record.get("host") == socket.gethostname()
        pid = record.get("pid")
        alive = here and isinstance(pid, int) and _pid_alive(pid)
        if not flock_works and (alive or not here):
            raise WorkdirBusyError(
                f"workdir {self.path.parent} is in use by {_describe(record)} (this filesystem has no file "
                f"locks, so only the record in {self.path} says so; delete it if that run is gone)"
            )
        if not here:
            state = "which cannot be checked from this host"
        elif alive:
            state = "whose pid now belongs to another process"
        else:
            state = "which is no longer running"
        warnings.warn(
            f"taking over the stale lock {self.path} left by {_describe(record)}, {state}",
            WorkdirWarning,
            stacklevel=4,
        )

    def release(self) -> None:
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            os.ftruncate(fd, 0)
        finally:
            os.close(fd)  # closing drops the flock

    @property
    def held(self) -> bool:
        return self._fd is not None

    def __enter__(self) -> WorkdirLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


# ---------------------------------------------------------------------------------------------- files


def atomic_write_text(path: str | os.PathLike[str], text: str, encoding: str = "utf-8") -> None:
    """Write ``text`` to ``path`` so readers see the old file or the new one, never a part.

    Writes a temporary file in the same folder (same filesystem, so the rename is atomic), fsyncs it,
    ``os.replace``-s it over ``path`` and fsyncs the folder so the rename itself survives a crash. A failure
    (a full disk) removes the temporary file, keeps the old ``path`` and raises :class:`RunIOError`.
    """
    path = pathlib.Path(path)
    try:
        mode = path.stat().st_mode & 0o777
    except FileNotFoundError:
        mode = 0o644  # mkstemp's 0600 would make config.json unreadable to others
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as err:
        raise RunIOError.wrap("write", path, err) from None
    try:
        with os.fdopen(fd, "w", encoding=encoding) as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException as err:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(err, OSError) and not isinstance(err, RunIOError):
            raise RunIOError.wrap("write", path, err) from None
        raise
    with contextlib.suppress(OSError):  # not every filesystem lets a folder be opened/fsynced
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def atomic_write_json(path: str | os.PathLike[str], obj: Any, *, indent: int | None = 2) -> None:
    """:func:`atomic_write_text` of ``json.dumps(obj)`` (sorted keys, strict JSON, trailing newline)."""
    atomic_write_text(path, json.dumps(obj, indent=indent, sort_keys=True, allow_nan=False) + "\n")


def _probe_write(fd: int, data: bytes) -> None:
    """Write and fsync ``data`` (its own function so tests can simulate a full disk)."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]
    os.fsync(fd)


def check_writable(folder: str | os.PathLike[str], *, what: str = "workdir", min_free_bytes: int = 0) -> None:
    """Create ``folder`` if needed and write, fsync and delete a small file in it; else raise.

    Raises :class:`WorkdirNotWritableError` naming ``what``, the path and the OS reason (read-only
    filesystem, permission denied, no space left), or the free space when it is below ``min_free_bytes``.
    """
    folder = pathlib.Path(folder)
    probe = None
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".write-check-")
        try:
            _probe_write(fd, b"\0" * 4096)
        finally:
            os.close(fd)
    except OSError as err:
        raise WorkdirNotWritableError(
            f"{what} {folder} is not writable: {describe_os_error(err)}", folder, err.errno
        ) from None
    finally:
        if probe is not None:
            with contextlib.suppress(OSError):
                os.unlink(probe)
    if min_free_bytes > 0:
        free = shutil.disk_usage(folder).free
        if free < min_free_bytes:
            raise WorkdirNotWritableError(
                f"{what} {folder} has {free / 2**20:.1f} MiB free, less than the {min_free_bytes / 2**20:.1f} "
                "MiB this run needs",
                folder,
            )


def describe_os_error(err: OSError) -> str:
    """``No space left on device [ENOSPC]``: the OS reason and its errno name."""
    code = f" [{errno.errorcode[err.errno]}]" if err.errno in errno.errorcode else ""
    return f"{err.strerror or err}{code}"


def free_space_warning(folder: str | os.PathLike[str], checkpoint_bytes: int, source: str = "estimated") -> str | None:
    """A message when ``folder`` cannot hold two more checkpoints of ``checkpoint_bytes`` (``source`` says how
    that size was found), else None. Two: a new step is written beside the previous one before it is deleted."""
    free = shutil.disk_usage(folder).free
    if free >= 2 * checkpoint_bytes:
        return None
    return (
        f"{folder} has {free / 2**20:.1f} MiB free, less than two checkpoints of {checkpoint_bytes / 2**20:.1f} MiB "
        f"({source}): a checkpoint save may fail with 'No space left on device'"
    )


def disk_bytes(folder: str | os.PathLike[str]) -> int:
    """The bytes the files under ``folder`` take on disk (allocated blocks, as ``du``)."""
    return sum(p.lstat().st_blocks * 512 for p in pathlib.Path(folder).rglob("*") if p.is_file())


# ---------------------------------------------------------------------------------------------- data


def check_data_fingerprint(
    saved: Mapping[str, Any] | None, current: Mapping[str, Any], *, allow_change: bool = False
) -> list[str]:
    """Compare two :func:`data_fingerprint` results; return the changes, or raise :class:`DataChangedError`.

    Each change is one phrase ("train split: 12000 -> 10800 requests", "valid split: same 37 requests,
    different contents", "test split: arrays added ['x']"). With ``allow_change`` the changes are
    returned with a :class:`WorkdirWarning` instead of raised. ``saved=None`` (a workdir from before
    fingerprints) returns ``[]``.
    """
    if saved is None:
        return []
    changes = []
    for name in [n for n in SPLIT_NAMES if n in saved or n in current]:
        old, new = saved.get(name), current.get(name)
        if old is None or new is None:
            changes.append(f"{name} split: {'added' if old is None else 'missing'}")
            continue
        added = sorted(set(new["arrays"]) - set(old["arrays"]))
        removed = sorted(set(old["arrays"]) - set(new["arrays"]))
        if added:
            changes.append(f"{name} split: arrays added {added}")
        if removed:
            changes.append(f"{name} split: arrays removed {removed}")
        if old["requests"] != new["requests"]:
            changes.append(f"{name} split: {old['requests']} -> {new['requests']} requests")
        elif old["sha256"] != new["sha256"] and not (added or removed):
            changes.append(f"{name} split: same {new['requests']} requests, different contents")
    if changes and not allow_change:
        raise DataChangedError(
            f"the data differ from what this workdir was trained on ({'; '.join(changes)}); check the dataset's "
            "path (data.movielens.path) and the data config, use a new --workdir, or allow the change explicitly to "
            "resume anyway"
        )
    if changes:
        warnings.warn(f"resuming on changed data: {'; '.join(changes)}", WorkdirWarning, stacklevel=2)
    return changes

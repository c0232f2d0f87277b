"""Workdir safety: the lock (against a real second process), atomic writes, writability, data fingerprints."""

from __future__ import annotations

import errno
import json
import os
import socket
import subprocess
import sys
import warnings

import numpy as np
import pytest

from gesr_jax import workdir_files as wd
from gesr_jax.data.fingerprint import data_fingerprint
from gesr_jax.workdir_files import (
    DataChangedError,
    WorkdirBusyError,
    WorkdirError,
    WorkdirLock,
    WorkdirNotWritableError,
    WorkdirWarning,
)

HOLDER = """
import sys
from gesr_jax.workdir_files import WorkdirLock
with WorkdirLock(sys.argv[1]):
    print("locked", flush=True)
    sys.stdin.readline()
"""


def _holder(path):
    """A subprocess holding the lock on ``path`` until a line is written to its stdin."""
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(path)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout.readline().strip() == "locked"
    return proc


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_a_second_holder_fails_at_once_naming_the_first(tmp_path):
    proc = _holder(tmp_path)
    try:
        with pytest.raises(WorkdirBusyError, match=rf"in use by pid {proc.pid} on host {socket.gethostname()}"):
            WorkdirLock(tmp_path).acquire()
        record = json.loads((tmp_path / ".lock").read_text())
        assert record["pid"] == proc.pid and record["started"]
    finally:
        proc.stdin.write("\n")
        proc.stdin.flush()
        proc.wait()
    assert proc.returncode == 0
    assert (tmp_path / ".lock").read_text() == ""  # released cleanly: empty means free
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a clean release leaves nothing stale to warn about
        with WorkdirLock(tmp_path) as lock:
            assert lock.held
            with pytest.raises(WorkdirBusyError):  # the same process, a second lock object
                WorkdirLock(tmp_path).acquire()
        assert not lock.held


def test_a_killed_holders_lock_is_taken_over_with_a_warning(tmp_path):
    proc = _holder(tmp_path)
    proc.kill()
    proc.wait()
    proc.stdin.close()
    proc.stdout.close()
    with pytest.warns(WorkdirWarning, match=rf"stale lock .* pid {proc.pid} .*no longer running"):
        with WorkdirLock(tmp_path):
            assert json.loads((tmp_path / ".lock").read_text())["pid"] == os.getpid()


def test_without_flock_the_recorded_pid_decides(tmp_path, monkeypatch):
    def no_flock(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(wd.fcntl, "flock", no_flock)
    host = socket.gethostname()
    (tmp_path / ".lock").write_text(json.dumps({"pid": os.getppid(), "host": host, "started": "earlier"}))
    with pytest.raises(WorkdirBusyError, match=rf"pid {os.getppid()} .*has no file locks"):
        WorkdirLock(tmp_path).acquire()
    (tmp_path / ".lock").write_text(json.dumps({"pid": os.getppid(), "host": "elsewhere", "started": "x"}))
    with pytest.raises(WorkdirBusyError, match="on host elsewhere"):
        WorkdirLock(tmp_path).acquire()
    dead = _dead_pid()
    (tmp_path / ".lock").write_text(json.dumps({"pid": dead, "host": host, "started": "x"}))
    with pytest.warns(WorkdirWarning, match=f"pid {dead} .*no longer running"), WorkdirLock(tmp_path):
        pass


def test_atomic_writes_replace_whole_files_and_leave_no_temp(tmp_path, monkeypatch):
    path = tmp_path / "config.json"
    wd.atomic_write_json(path, {"b": 1, "a": [1, 2]})
    assert json.loads(path.read_text()) == {"a": [1, 2], "b": 1} and path.read_text().endswith("\n")
    assert path.stat().st_mode & 0o777 == 0o644
    os.chmod(path, 0o600)
    wd.atomic_write_text(path, "second\n")
    assert path.read_text() == "second\n" and path.stat().st_mode & 0o777 == 0o600
    with pytest.raises(ValueError):
        wd.atomic_write_json(path, {"x": float("nan")})  # strict JSON: refused before anything is written

    def failing_replace(src, dst):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(wd.os, "replace", failing_replace)
    with pytest.raises(OSError, match="Input/output"):
        wd.atomic_write_text(path, "third\n")
    assert path.read_text() == "second\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json"]


def test_check_writable_reports_path_and_reason(tmp_path, monkeypatch):
    wd.check_writable(tmp_path / "new" / "run")  # created
    assert (tmp_path / "new" / "run").is_dir() and list((tmp_path / "new" / "run").iterdir()) == []
    (tmp_path / "afile").write_text("x")
    with pytest.raises(WorkdirNotWritableError, match=r"workdir .*afile/run is not writable: Not a directory"):
        wd.check_writable(tmp_path / "afile" / "run")

    def full(fd, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    with monkeypatch.context() as m:
        m.setattr(wd, "_probe_write", full)
        with pytest.raises(WorkdirNotWritableError, match=r"not writable: No space left on device \[ENOSPC\]"):
            wd.check_writable(tmp_path)
    assert list(tmp_path.glob(".write-check-*")) == []
    with pytest.raises(WorkdirNotWritableError, match="MiB free, less than"):
        wd.check_writable(tmp_path, min_free_bytes=1 << 62)
    if os.geteuid() != 0:  # root writes through permission bits
        ro = tmp_path / "ro"
        ro.mkdir()
        os.chmod(ro, 0o500)
        try:
            with pytest.raises(WorkdirNotWritableError, match="Permission denied"):
                wd.check_writable(ro)
        finally:
            os.chmod(ro, 0o700)


def _splits(n_train=12):
    rng = np.random.default_rng(0)

    def make(n):
        return {"user_id": np.arange(n, dtype=np.int32), "label": rng.uniform(size=(n, 3)).astype(np.float32)}

    return {"train": make(n_train), "valid": make(5), "test": make(5)}


def test_data_fingerprint_detects_what_changed():
    splits = _splits()
    saved = json.loads(json.dumps(data_fingerprint(splits)))  # as stored in the workdir
    assert saved["train"]["requests"] == 12 and saved["train"]["arrays"] == ["label", "user_id"]
    assert wd.check_data_fingerprint(saved, data_fingerprint(_splits())) == []
    assert wd.check_data_fingerprint(None, saved) == []
    with pytest.raises(DataChangedError, match=r"train split: 12 -> 10 requests"):
        wd.check_data_fingerprint(saved, data_fingerprint(_splits(10)))
    changed = _splits()
    changed["valid"]["label"][0, 0] += 1
    changed["test"]["extra"] = np.zeros(5)
    with pytest.raises(DataChangedError) as info:
        wd.check_data_fingerprint(saved, data_fingerprint(changed))
    assert "valid split: same 5 requests, different contents" in str(info.value)
    assert "test split: arrays added ['extra']" in str(info.value)
    with pytest.warns(WorkdirWarning, match="resuming on changed data: valid split"):
        got = wd.check_data_fingerprint(saved, data_fingerprint(changed), allow_change=True)
    assert len(got) == 2
    assert issubclass(DataChangedError, WorkdirError) and issubclass(WorkdirBusyError, WorkdirError)
    assert issubclass(WorkdirNotWritableError, OSError)  # an I/O failure (exit status 3), not a usage error

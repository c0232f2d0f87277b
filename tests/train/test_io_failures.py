"""Failures as a user meets them: a full disk, a read-only folder, an unusable "last good" step, a config error
in a new workdir, a corrupt step's logged tracebacks, too little space for two checkpoints.

Each CLI case checks the exit status, the single ``error:`` line, that no half-written step is restored, and
that the same command succeeds once the fault is removed. The disk-full and read-only cases mount a tmpfs or
a read-only bind mount, so they need root and ``mount``; elsewhere they skip and say why.
"""

from __future__ import annotations

import collections
import contextlib
import json
import logging
import os
import pathlib
import shutil
import subprocess
import sys

import jax
import pytest
import train_fixtures as fx

from gesr_jax import cli, workdir_files
from gesr_jax.config import ConfigError
from gesr_jax.train import evaluators, hooks, trainer
from gesr_jax.train import setup as setup_lib
from gesr_jax.train.checkpoint import Checkpointer
from gesr_jax.train.checkpoint_errors import CheckpointUnusableError, CheckpointWarning

SPLITS = fx.make_splits()
SETS = [f"--set=train.{k}={v}" for k, v in dict(num_steps=8, batch_size=16, eval_batch_size=16, checkpoint_every=2,
                                                 eval_every=4, log_every=1, warmup_steps=2).items()]  # fmt: skip


def _mount_problem() -> str | None:
    if os.geteuid() != 0:
        return "needs root to mount a tmpfs or a read-only bind mount"
    if shutil.which("mount") is None or shutil.which("umount") is None:
        return "needs the mount and umount commands"
    return None


needs_mount = pytest.mark.skipif(_mount_problem() is not None, reason=_mount_problem() or "")


@contextlib.contextmanager
def _mounted(target: pathlib.Path, *args: str):
    done = subprocess.run(["mount", *args, str(target)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount here ({done.stderr.strip()})")
    try:
        yield target
    finally:
        subprocess.run(["umount", "-l", str(target)], check=True)


@pytest.fixture
def fake_model_and_data(monkeypatch):
    monkeypatch.setattr(setup_lib, "default_model_api", lambda: fx.linear_api())
    monkeypatch.setattr(setup_lib, "default_splits", lambda config: SPLITS)


def _train(workdir: pathlib.Path) -> list[str]:
    return ["train", "--config", "synthetic_tiny", "--workdir", str(workdir), *SETS]


def _error_lines(err: str) -> list[str]:
    assert "Traceback" not in err
    return [line for line in err.splitlines() if line.startswith("error:")]


def _complete_steps(workdir: pathlib.Path) -> list[int]:
    """The steps a restore can see, each checked to restore and verify (a half-written step is never one)."""
    with Checkpointer(workdir / "checkpoints") as checkpoints:
        steps = checkpoints.all_steps()
        template = fx.linear_api().init(None, 0)[1]
        for step in steps:
            checkpoints.restore_params(step, template)
    return steps


def _fill(folder: pathlib.Path) -> None:
    with open(folder / "filler", "wb") as f:
        with contextlib.suppress(OSError):
            while True:
                f.write(b"\0" * 65536)
                f.flush()


@needs_mount
def test_a_full_disk_during_train_is_one_io_error_and_the_same_command_resumes(
    tmp_path, monkeypatch, capsys, fake_model_and_data
):
    disk = tmp_path / "disk"
    disk.mkdir()
    with _mounted(disk, "-t", "tmpfs", "-o", "size=8m", "tmpfs"):
        workdir = disk / "run"
        real = trainer.train_and_evaluate

        def filling_the_disk_after_step_5(config, path, **kwargs):
            return real(config, path, on_step=lambda step: _fill(disk) if step == 5 else None, **kwargs)

        monkeypatch.setattr(trainer, "train_and_evaluate", filling_the_disk_after_step_5)
        assert cli.main(_train(workdir)) == cli.EXIT_IO
        errors = _error_lines(capsys.readouterr().err)
        assert len(errors) == 1 and "No space left on device [ENOSPC]" in errors[0] and str(workdir) in errors[0]
        assert max(_complete_steps(workdir)) <= 4  # step 6 never completed

        (disk / "filler").unlink()  # the fault is removed: the same command resumes and finishes
        monkeypatch.setattr(trainer, "train_and_evaluate", real)
        assert cli.main(_train(workdir)) == 0
        out, err = capsys.readouterr()
        assert json.loads(out.splitlines()[-1])["last_step"] == 8 and not _error_lines(err)
        assert not list((workdir / "checkpoints").glob("*.orbax-checkpoint-tmp*"))  # the partial step is gone


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("io") / "run"
    trainer.train_and_evaluate(fx.tiny_config(num_steps=4, checkpoint_every=2, eval_every=2), workdir,
                               model_api=fx.linear_api(), splits=SPLITS)  # fmt: skip
    return workdir


@needs_mount
@pytest.mark.parametrize("folder, what", [("checkpoints", "checkpoint folder"), ("tensorboard", "TensorBoard folder"),
                                          ("plots", "plots folder")])  # fmt: skip
def test_a_read_only_folder_inside_the_workdir_is_refused_before_any_work(
    finished, folder, what, tmp_path, capsys, fake_model_and_data
):
    workdir = tmp_path / "run"
    shutil.copytree(finished, workdir)
    before = sorted(str(p.relative_to(workdir)) for p in workdir.rglob("*"))
    argv = ["train", "--workdir", str(workdir), "--set", "train.num_steps=6"]
    with _mounted(workdir / folder, "--bind", "-o", "ro", str(workdir / folder)):
        assert cli.main(argv) == cli.EXIT_IO
        errors = _error_lines(capsys.readouterr().err)
        assert errors == [f"error: {what} {workdir / folder} is not writable: Read-only file system [EROFS]"]
        assert sorted(str(p.relative_to(workdir)) for p in workdir.rglob("*")) == before
    assert cli.main(argv) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["last_step"] == 6
    assert _complete_steps(workdir)[-1] == 6


class _OverflowAt(hooks.Hook):
    """Scales the params at ``step`` so every prediction overflows while the params stay finite (a huge lr)."""

    def __init__(self, step: int):
        self.step = step

    def on_step(self, ctx, step, metrics):
        if step == self.step:
            ctx.params = jax.tree.map(lambda x: x * 1e20, ctx.params)


def test_divergence_ends_with_the_newest_usable_step_and_eval_last_strict_works(tmp_path, capsys):
    config = fx.tiny_config(num_steps=4, checkpoint_every=3, eval_every=0)
    with pytest.raises(hooks.TrainingDivergedError,
                       match=r"valid probe batch became NaN/Inf at step 4; .*last good checkpoint \(step 3\)"):
        trainer.train_and_evaluate(config, tmp_path, model_api=fx.linear_api(), splits=SPLITS, hooks=[_OverflowAt(4)])
    assert _complete_steps(tmp_path) == [3]
    got = trainer.evaluate_workdir(tmp_path, model_api=fx.linear_api(), splits=SPLITS, step="last", strict=True)
    assert got["step"] == 3 and all(v == v for v in got["test"].values())


def test_eval_of_a_step_with_non_finite_predictions_is_one_line_naming_it(
    tmp_path, monkeypatch, capsys, fake_model_and_data
):
    # A run from before the probe check: the overflowing step 4 was saved.
    monkeypatch.setattr(evaluators.FiniteProbe, "__call__", lambda self, params: True)
    config = fx.tiny_config(num_steps=4, checkpoint_every=3, eval_every=0)
    with pytest.raises(hooks.TrainingDivergedError):  # the final valid pass sees the NaN/Inf predictions
        trainer.train_and_evaluate(config, tmp_path, model_api=fx.linear_api(), splits=SPLITS, hooks=[_OverflowAt(4)])
    assert _complete_steps(tmp_path) == [3, 4]
    with pytest.raises(CheckpointUnusableError, match=r"checkpoint step 4 .* is unusable"):
        trainer.evaluate_workdir(tmp_path, model_api=fx.linear_api(), splits=SPLITS, step="last")
    capsys.readouterr()
    assert cli.main(["eval", "--workdir", str(tmp_path), "--step", "last", "--strict"]) == cli.EXIT_USAGE
    errors = _error_lines(capsys.readouterr().err)
    assert len(errors) == 1 and "checkpoint step 4" in errors[0] and "NaN/Inf" in errors[0]
    assert cli.main(["eval", "--workdir", str(tmp_path), "--step", "3"]) == 0


def test_a_config_error_found_by_the_data_checks_leaves_no_new_workdir(tmp_path):
    new = tmp_path / "new" / "run"
    with pytest.raises(ConfigError, match="larger than the train split"):
        trainer.train_and_evaluate(fx.tiny_config(batch_size=128), new, model_api=fx.linear_api(), splits=SPLITS)
    assert not new.exists()
    old = tmp_path / "old"
    old.mkdir()
    (old / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="larger than the train split"):
        trainer.train_and_evaluate(fx.tiny_config(batch_size=128), old, model_api=fx.linear_api(), splits=SPLITS)
    assert sorted(p.name for p in old.iterdir()) == [".lock", "notes.txt"]  # an existing folder is left as it was


def test_a_corrupt_params_file_logs_no_tracebacks_only_the_fallback_warning(finished, tmp_path, caplog):
    workdir = tmp_path / "run"
    shutil.copytree(finished, workdir)
    params = max((p for p in (workdir / "checkpoints" / "4" / "params").rglob("*") if p.is_file()),
                 key=lambda p: p.stat().st_size)  # fmt: skip
    params.write_bytes(params.read_bytes()[: params.stat().st_size // 2])
    with caplog.at_level(logging.DEBUG), pytest.warns(CheckpointWarning, match="step 4") as warned:
        got = trainer.evaluate_workdir(workdir, model_api=fx.linear_api(), splits=SPLITS, step="last")
    assert got["step"] == 2
    assert [r.getMessage() for r in caplog.records if r.exc_info] == []
    assert len([w for w in warned if "corrupt" in str(w.message)]) == 1


def test_too_little_space_for_two_checkpoints_is_a_warning(tmp_path, monkeypatch):
    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(workdir_files.shutil, "disk_usage", lambda path: usage(10**6, 10**6 - 100, 100))
    with pytest.warns(workdir_files.WorkdirWarning, match=r"less than two checkpoints") as warned:
        trainer.train_and_evaluate(fx.tiny_config(num_steps=2), tmp_path, model_api=fx.linear_api(), splits=SPLITS)
    messages = [str(w.message) for w in warned if "less than two checkpoints" in str(w.message)]
    assert "the arrays' bytes" in messages[0] and "measured on step 2" in messages[1]  # before training, after a save
    assert workdir_files.disk_bytes(tmp_path / "checkpoints" / "2") > 0
    assert workdir_files.free_space_warning(tmp_path, 10**6) is not None
    monkeypatch.undo()
    assert workdir_files.free_space_warning(tmp_path, 1) is None


def test_the_traceback_filter_drops_asyncio_records_about_orbax_tasks_only():
    from gesr_jax.train import checkpoint_errors

    def record(msg):
        try:
            raise ValueError("read failed")
        except ValueError:
            exc = sys.exc_info()
        return logging.LogRecord("asyncio", logging.ERROR, "/usr/lib/asyncio/runners.py", 1, msg, (), exc)

    orbax_task = record("unhandled exception during asyncio.run() shutdown\ntask: <Task coro=<f() at /x/orbax/checkpoint/s.py:1>>")
    other_task = record("unhandled exception during asyncio.run() shutdown\ntask: <Task coro=<mine() at /x/app.py:1>>")
    log, ours = logging.getLogger("asyncio"), logging.getLogger("gesr_jax")
    saved = ours.level
    ours.setLevel(logging.NOTSET)  # not `gesr --debug`, whatever ran before in this process
    checkpoint_errors.quiet_orbax_tracebacks(True)
    try:
        assert not log.filter(orbax_task) and log.filter(other_task)
    finally:
        checkpoint_errors.quiet_orbax_tracebacks(False)
        ours.setLevel(saved)
    assert log.filter(orbax_task)  # released with the checkpoint folder


def test_orbax_tracebacks_stay_quiet_under_a_debug_root_logger_and_show_under_gesr_debug():
    from gesr_jax.train import checkpoint_errors

    try:
        raise ValueError("read failed")
    except ValueError:
        exc = sys.exc_info()
    rec = logging.LogRecord("absl", logging.ERROR, "/x/orbax/checkpoint/a.py", 1, "failed", (), exc)
    root, ours = logging.getLogger(), logging.getLogger("gesr_jax")
    saved = root.level, ours.level
    try:
        root.setLevel(logging.DEBUG)
        ours.setLevel(logging.NOTSET)
        assert not checkpoint_errors.OrbaxTracebackFilter().filter(rec)
        ours.setLevel(logging.DEBUG)  # what `gesr --debug` sets
        assert checkpoint_errors.OrbaxTracebackFilter().filter(rec)
    finally:
        root.setLevel(saved[0])
        ours.setLevel(saved[1])


def test_a_save_that_fails_only_when_the_manager_closes_is_one_checkpoint_write_error(tmp_path):
    """Orbax can surface a background save's ENOSPC in close(), after save() and wait() returned."""
    import errno

    from gesr_jax.train.checkpoint_errors import CheckpointWriteError

    checkpoints = Checkpointer(tmp_path / "checkpoints")

    def close():
        raise OSError(errno.ENOSPC, "No space left on device")

    checkpoints._manager.close = close
    with pytest.raises(CheckpointWriteError, match="No space left on device") as info:
        checkpoints.close()
    assert str(tmp_path / "checkpoints") in str(info.value) and info.value.errno == errno.ENOSPC
    checkpoints.close()  # closed once: a second call does nothing


def test_an_os_error_without_a_file_name_names_the_commands_workdir(tmp_path, monkeypatch, capsys):
    import errno

    def fail(config, workdir, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")  # e.g. a write() to an open file

    monkeypatch.setattr(trainer, "train_and_evaluate", fail)
    assert cli.main(_train(tmp_path / "run")) == cli.EXIT_IO
    (line,) = _error_lines(capsys.readouterr().err)
    assert line == f"error: I/O failure under {tmp_path / 'run'}: No space left on device [ENOSPC]"

"""The `gesr` CLI: train, resume, eval, one-line errors with an exit status per class (1 diverged, 2 usage, 3 I/O)."""

from __future__ import annotations

import errno
import importlib.util
import json
import logging
import pathlib
import sys

import pytest

from gesr_jax import cli
from gesr_jax.config import ConfigError
from gesr_jax.data.datasets import DataError
from gesr_jax.data.movielens import DataFormatError
from gesr_jax.train import setup as setup_lib
from gesr_jax.train import hooks, trainer
from gesr_jax.workdir_files import RunIOError


def _fixtures():
    path = pathlib.Path(__file__).parent / "train" / "train_fixtures.py"
    spec = importlib.util.spec_from_file_location("gesr_cli_test_fixtures", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file executes
    spec.loader.exec_module(module)
    return module


fx = _fixtures()


@pytest.fixture
def fake_model_and_data(monkeypatch):
    """Route the CLI's model and data to the fast linear fixture (the real ones have their own tests)."""
    splits = fx.make_splits()
    monkeypatch.setattr(setup_lib, "default_model_api", lambda: fx.linear_api())
    monkeypatch.setattr(setup_lib, "default_splits", lambda config: splits)
    return splits


def test_train_resume_and_eval(tmp_path, capsys, fake_model_and_data):
    workdir = tmp_path / "run"
    sets = ["--set", "train.num_steps=4", "--set", "train.batch_size=16", "--set", "train.eval_batch_size=16",
            "--set", "train.checkpoint_every=2", "--set", "train.eval_every=0"]  # fmt: skip
    assert cli.main(["train", "--config", "synthetic_tiny", "--workdir", str(workdir), *sets]) == 0
    trained = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert trained["step"] == 4 and "consume/ne" in trained["test"]
    # Resume from config.json alone, extending the run.
    assert cli.main(["train", "--workdir", str(workdir), "--set", "train.num_steps=6"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["step"] == 6
    assert cli.main(["eval", "--workdir", str(workdir), "--splits", "test"]) == 0
    evaluated = json.loads(capsys.readouterr().out)
    assert evaluated["step"] == 6 and set(evaluated) == {"step", "test"}


@pytest.mark.parametrize(
    "argv, message",
    [
        (["train", "--config", "synthetic_tiny", "--workdir", "W", "--set", "train.nope=1"], "'train.nope'"),
        (["train", "--config", "synthetic_tiny", "--workdir", "W", "--set", "train.num_steps=ten"], "not an integer"),
        (["train", "--config", "synthetic_tiny", "--workdir", "W", "--set", "train.batch_size=0"], "train.batch_size"),
        (["train", "--config", "no_such_preset", "--workdir", "W"], "unknown config 'no_such_preset'"),
        (["train", "--workdir", "W"], "--config is required"),
        (["eval", "--workdir", "W"], "has no config.json"),
    ],
)
def test_errors_print_one_line_and_exit_2(argv, message, tmp_path, capsys):
    argv = [str(tmp_path / "w") if a == "W" else a for a in argv]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and "\n" not in err


def test_diverged_training_exits_1_with_one_line(monkeypatch, tmp_path, capsys):
    def diverge(config, workdir, **kwargs):
        raise hooks.TrainingDivergedError("loss became nan at step 3; training stopped")

    monkeypatch.setattr(trainer, "train_and_evaluate", diverge)
    assert cli.main(["train", "--config", "synthetic_tiny", "--workdir", str(tmp_path)]) == 1
    assert capsys.readouterr().err.strip() == "error: loss became nan at step 3; training stopped"


@pytest.mark.parametrize(
    "error",
    [DataError("data.source 'x' is unknown"), DataFormatError("ratings.dat:3: bad line"), ConfigError("bad key")],
)
def test_usage_errors_exit_2_with_one_line(error, monkeypatch, tmp_path, capsys):
    def fail(config, workdir, **kwargs):
        raise error

    monkeypatch.setattr(trainer, "train_and_evaluate", fail)
    assert cli.main(["train", "--config", "synthetic_tiny", "--workdir", str(tmp_path)]) == 2
    assert capsys.readouterr().err.strip() == f"error: {error}"


@pytest.mark.parametrize("bug", [ValueError("shapes (3,) and (4,) differ"), KeyError("cand_item"), TypeError("x")])
def test_other_exceptions_keep_their_traceback(bug, monkeypatch, tmp_path, capsys):
    def fail(config, workdir, **kwargs):
        raise bug

    monkeypatch.setattr(trainer, "train_and_evaluate", fail)
    with pytest.raises(type(bug)):
        cli.main(["train", "--config", "synthetic_tiny", "--workdir", str(tmp_path)])
    assert "error:" not in capsys.readouterr().err


def test_eval_refuses_a_workdir_trained_by_another_model_api(tmp_path, capsys):
    workdir = tmp_path / "custom"
    config = fx.tiny_config(num_steps=2)
    trainer.train_and_evaluate(config, workdir, model_api=fx.linear_api(), splits=fx.make_splits())
    capsys.readouterr()  # drop the training run's progress lines
    # `gesr eval` uses the default model API (gesr_jax.api); it must not silently score the stock model.
    assert cli.main(["eval", "--workdir", str(workdir)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "trained by the model API 'train_fixtures:linear_api'" in err
    assert "'gesr_jax.api'" in err and "\n" not in err
    assert not (workdir / "eval.json").exists()


@pytest.mark.parametrize(
    "error, line",
    [
        (OSError(errno.ENOSPC, "No space left on device", "/w/metrics.jsonl"),
         "error: I/O failure: /w/metrics.jsonl: No space left on device [ENOSPC]"),
        (RunIOError.wrap("append to", "/w/metrics.jsonl", OSError(errno.EROFS, "Read-only file system")),
         "error: cannot append to /w/metrics.jsonl: Read-only file system [EROFS]"),
    ],
)  # fmt: skip
def test_io_failures_exit_3_with_one_line_naming_the_path(error, line, monkeypatch, tmp_path, capsys):
    def fail(config, workdir, **kwargs):
        raise error

    monkeypatch.setattr(trainer, "train_and_evaluate", fail)
    assert cli.main(["train", "--config", "synthetic_tiny", "--workdir", str(tmp_path)]) == cli.EXIT_IO == 3
    assert capsys.readouterr().err.strip() == line
    assert "3 = I/O failure" in cli.build_parser().format_help().replace("\n", " ")  # documented in the help


def test_debug_prints_the_traceback_and_a_bug_like_oserror_keeps_it(monkeypatch, tmp_path, capsys):
    def fail(config, workdir, **kwargs):
        raise ConfigError("bad key")

    monkeypatch.setattr(trainer, "train_and_evaluate", fail)
    assert cli.main(["--debug", "train", "--config", "synthetic_tiny", "--workdir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and err.strip().splitlines()[-1] == "error: bad key"
    assert logging.getLogger("gesr_jax").level == logging.NOTSET  # --debug does not outlive the call

    def missing(config, workdir, **kwargs):
        raise FileNotFoundError(errno.ENOENT, "No such file or directory", "/nowhere")

    monkeypatch.setattr(trainer, "train_and_evaluate", missing)
    with pytest.raises(FileNotFoundError):  # not an I/O failure of the machine: a bug keeps its traceback
        cli.main(["train", "--config", "synthetic_tiny", "--workdir", str(tmp_path)])

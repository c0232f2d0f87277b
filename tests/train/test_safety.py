"""Trainer-side safety: finite checkpoints, the workdir lock, writability, data fingerprint, checks before writes."""

from __future__ import annotations

import dataclasses
import errno
import json
import shutil

import pytest
import train_fixtures as fx

from gesr_jax import cli
from gesr_jax import config as config_lib
from gesr_jax.config import ConfigError
from gesr_jax.data.fingerprint import data_fingerprint
from gesr_jax.train import setup as setup_lib
from gesr_jax.train import hooks, trainer
from gesr_jax import workdir_files as workdir_lib
from gesr_jax.train.checkpoint import Checkpointer
from gesr_jax.train.checkpoint_errors import CheckpointCorruptError, CheckpointWarning
from gesr_jax.workdir_files import DataChangedError, WorkdirBusyError, WorkdirLock, WorkdirNotWritableError

SPLITS = fx.make_splits()


def _run(workdir, config=None, **kwargs):
    kwargs.setdefault("model_api", fx.linear_api())
    kwargs.setdefault("splits", SPLITS)
    return trainer.train_and_evaluate(config or fx.tiny_config(), workdir, **kwargs)


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("finished")
    _run(workdir, fx.tiny_config(num_steps=8))
    return workdir


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


@pytest.mark.parametrize(
    "field, value",
    [("learning_rate", float("inf")), ("weight_decay", float("nan")), ("grad_clip_norm", float("inf")),
     ("end_lr_fraction", float("inf")), ("task_weights", (1.0, float("nan")))],
)  # fmt: skip
def test_non_finite_hyper_parameters_fail_validation_naming_the_field(field, value):
    config = dataclasses.replace(fx.tiny_config(), train=dataclasses.replace(fx.tiny_config().train, **{field: value}))
    with pytest.raises(ConfigError, match=rf"train\.{field} must be (a )?finite"):
        config_lib.validate_config(config)


@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")
def test_params_that_become_non_finite_are_never_checkpointed(tmp_path):
    # The loss of step 1 is computed before the update and is finite; the updated params are not.
    config = fx.tiny_config(learning_rate=1e39, grad_clip_norm=0.0, warmup_steps=0, checkpoint_every=1)
    with pytest.raises(hooks.TrainingDivergedError, match=r"became NaN/Inf at step 1; .*no checkpoint was written"):
        _run(tmp_path, config)
    with Checkpointer(tmp_path / "checkpoints") as ckpt:
        assert ckpt.all_steps() == []
    assert not (tmp_path / "results.json").exists()


def test_a_second_run_on_a_locked_workdir_fails_at_once(finished, tmp_path, capsys):
    workdir = _copy(finished, tmp_path / "w")
    before = (workdir / "metrics.jsonl").read_text()
    with WorkdirLock(workdir):  # another run holds it
        with pytest.raises(WorkdirBusyError, match=r"workdir .* is in use by pid \d+"):
            _run(workdir, fx.tiny_config(num_steps=10))
        assert cli.main(["train", "--workdir", str(workdir), "--set", "train.num_steps=10"]) == 2
        assert "is in use by pid" in capsys.readouterr().err
    assert (workdir / "metrics.jsonl").read_text() == before
    assert (workdir / ".lock").read_text() == ""  # released


def test_an_unwritable_workdir_is_reported_before_any_work(tmp_path, capsys):
    (tmp_path / "afile").write_text("x")
    with pytest.raises(WorkdirNotWritableError, match="not writable: Not a directory"):
        _run(tmp_path / "afile" / "run")
    args = ["train", "--config", "synthetic_tiny", "--workdir", str(tmp_path / "afile" / "run")]
    assert cli.main(args) == cli.EXIT_IO and "not writable" in capsys.readouterr().err


def test_eval_prints_its_results_when_eval_json_cannot_be_written(finished, tmp_path, monkeypatch, capsys):
    workdir = _copy(finished, tmp_path / "w")
    monkeypatch.setattr(setup_lib, "default_model_api", lambda: fx.linear_api())
    monkeypatch.setattr(setup_lib, "default_splits", lambda config: SPLITS)

    def read_only(fd, data):  # running as root, chmod would not stop writes: simulate EROFS
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(workdir_lib, "_probe_write", read_only)
    assert cli.main(["eval", "--workdir", str(workdir), "--splits", "test"]) == cli.EXIT_IO
    out, err = capsys.readouterr()
    printed = json.loads(out)
    assert printed["step"] == json.loads((workdir / "best.json").read_text())["step"] and "consume/ne" in printed["test"]
    assert err.count("Read-only file system") == 2  # warned up front, then reported after the results
    assert err.strip().splitlines()[-1].startswith("error: ") and "eval.json was not written" in err
    assert not (workdir / "eval.json").exists()
    with pytest.warns(workdir_lib.WorkdirWarning, match="eval.json was not written"):
        got = trainer.evaluate_workdir(workdir, model_api=fx.linear_api(), splits=SPLITS)
    assert got["test"]["consume/ne"] == pytest.approx(printed["test"]["consume/ne"])


def test_a_resume_on_changed_data_is_refused_unless_allowed(finished, tmp_path):
    workdir = _copy(finished, tmp_path / "w")
    saved = json.loads((workdir / workdir_lib.FINGERPRINT_FILE).read_text())
    assert saved == json.loads(json.dumps(data_fingerprint(SPLITS)))
    fewer = dataclasses.replace(SPLITS, train={k: v[:80] for k, v in SPLITS.train.items()})
    with pytest.raises(DataChangedError, match="train split: 96 -> 80 requests"):
        _run(workdir, fx.tiny_config(num_steps=10), splits=fewer)
    assert not list((workdir / "checkpoints").glob("10"))
    with pytest.warns(workdir_lib.WorkdirWarning, match="resuming on changed data"):
        results = _run(workdir, fx.tiny_config(num_steps=10), splits=fewer, allow_data_change=True)
    assert results["last_step"] == 10
    assert json.loads((workdir / workdir_lib.FINGERPRINT_FILE).read_text())["train"]["requests"] == 80


@pytest.mark.parametrize(
    "train, error",
    [({"batch_size": 128, "eval_batch_size": 16}, r"train.batch_size=128 is larger than the train split \(96"),
     ({"select_metric": "click/ne"}, "train.select_metric='click/ne' is not a valid metric"),
     ({"evaluators": ("ranking",), "select_metric": "ranking/mrr"}, "train.evaluators has 'ranking', but")],
)  # fmt: skip
def test_dataset_dependent_checks_run_before_anything_is_written(tmp_path, train, error):
    import types

    api = fx.linear_api()
    if "evaluators" in train:  # a model API without an item cache
        api = types.SimpleNamespace(init=api.init, apply=api.apply, api_name="no_cache")
    with pytest.raises(ConfigError, match=error):
        _run(tmp_path, fx.tiny_config(**train), model_api=api)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".lock"]


def test_bad_model_fields_for_this_data_are_config_errors_before_writes(tmp_path):
    fields = ["model.history_fields=item,category", "model.candidate_fields=item,category", "train.batch_size=16"]
    config = config_lib.load_config("synthetic_tiny", ["model.hma.pairs=item:nope", *fields])
    with pytest.raises(ConfigError, match="model.hma.pairs names 'nope'"):
        trainer.train_and_evaluate(config, tmp_path, splits=SPLITS)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".lock"]


def test_resume_quarantines_a_corrupt_newest_step_and_strict_refuses(finished, tmp_path):
    workdir = _copy(finished, tmp_path / "w")
    params = max((p for p in (workdir / "checkpoints" / "8" / "params").rglob("*") if p.is_file()),
                 key=lambda p: p.stat().st_size)  # fmt: skip
    params.write_bytes(params.read_bytes()[: params.stat().st_size // 2])
    strict = _copy(workdir, tmp_path / "strict")
    with pytest.raises(CheckpointCorruptError, match="checkpoint step 8"):
        _run(strict, fx.tiny_config(num_steps=10), strict=True)
    assert (strict / "checkpoints" / "8").is_dir()
    with pytest.warns(CheckpointWarning, match=r"step 8 .* corrupt.*falling back to step \d"):
        results = _run(workdir, fx.tiny_config(num_steps=10))
    assert results["last_step"] == 10
    assert (workdir / "checkpoints.corrupt" / "8").is_dir()
    steps = [json.loads(line)["step"] for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    train_steps = [s for s, line in zip(steps, (workdir / "metrics.jsonl").read_text().splitlines())
                   if json.loads(line)["split"] == "train"]  # fmt: skip
    assert train_steps == sorted(set(train_steps))  # replayed steps 5-8 are logged once


def test_a_torn_metrics_line_from_a_crash_is_dropped_on_resume(finished, tmp_path):
    workdir = _copy(finished, tmp_path / "w")
    with (workdir / "metrics.jsonl").open("a") as f:
        f.write('{"step": 9, "split": "tra')
    _run(workdir, fx.tiny_config(num_steps=10))
    lines = (workdir / "metrics.jsonl").read_text().splitlines()
    assert all(json.loads(line) for line in lines)
    assert not list(workdir.glob(".*.tmp"))

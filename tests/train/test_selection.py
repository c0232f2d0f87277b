"""Model selection: the best valid step is kept, reported and tested; early stopping by patience; eval's step."""

from __future__ import annotations

import json
import warnings

import pytest
import train_fixtures as fx

from gesr_jax.config import ConfigError
from gesr_jax.train import evaluators, hooks, selection, trainer
from gesr_jax.train.checkpoint import Checkpointer
from gesr_jax.train.checkpoint_errors import CheckpointCorruptError, CheckpointWarning

SPLITS = fx.make_splits()
NONDETERMINISTIC = ("wall_time", "examples_per_sec", "requests_per_sec", "candidates_per_sec", "sec_per_step")


class Interrupt(Exception):
    pass


class Clock(hooks.Hook):
    """Tells the scripted evaluator which step a pass belongs to (PeriodicEval runs before user hooks)."""

    step = 0

    def on_train_start(self, ctx):
        Clock.step = ctx.step + 1

    def on_step(self, ctx, step, metrics):
        Clock.step = step + 1

    def on_loop_end(self, ctx):
        Clock.step = ctx.step


SCRIPT: dict[int, float] = {}


def _scripted(context):
    def evaluate(params, arrays, name):
        return {"scripted/score": SCRIPT.get(Clock.step, 9.0) if name == "valid" else 0.0}

    return evaluate


evaluators.register_evaluator("scripted", _scripted, replace=True)


def _config(**train):
    base = dict(evaluators=("candidate", "scripted"), select_metric="scripted/score", select_mode="min",
                eval_every=2, checkpoint_every=2, max_checkpoints=2)  # fmt: skip
    return fx.tiny_config(**{**base, **train})


def _run(workdir, config, **kwargs):
    hooks_ = [Clock(), *kwargs.pop("hooks", [])]
    return trainer.train_and_evaluate(config, workdir, model_api=fx.linear_api(), splits=SPLITS, hooks=hooks_, **kwargs)


def _strip(metrics):
    return {k: v for k, v in metrics.items() if k not in NONDETERMINISTIC}


@pytest.fixture(scope="module")
def up_and_down(tmp_path_factory):
    """A 12-step run whose valid score goes down, up, down (best at 8), up."""
    SCRIPT.clear()
    SCRIPT.update({2: 0.5, 4: 0.3, 6: 0.4, 8: 0.2, 10: 0.6, 12: 0.7})
    workdir = tmp_path_factory.mktemp("select")
    return workdir, _run(workdir, _config())


def test_the_best_valid_step_is_selected_kept_and_tested(up_and_down):
    workdir, results = up_and_down
    assert results["best_step"] == results["step"] == 8 and results["last_step"] == 12
    assert [p["step"] for p in results["valid_curve"]] == [2, 4, 6, 8, 10, 12]
    assert [p["metrics"]["scripted/score"] for p in results["valid_curve"]] == [0.5, 0.3, 0.4, 0.2, 0.6, 0.7]
    assert results["valid"]["scripted/score"] == results["best_valid"]["scripted/score"] == 0.2
    assert results["selection"] == {"metric": "scripted/score", "mode": "min", "value": 0.2, "patience": 0}
    assert json.loads((workdir / "best.json").read_text()) == {"step": 8, "metric": "scripted/score", "mode": "min",
                                                              "value": 0.2}  # fmt: skip
    saved = json.loads((workdir / "results.json").read_text())
    assert saved["best_step"] == 8 and saved["last_step"] == 12 and len(saved["valid_curve"]) == 6
    with Checkpointer(workdir / "checkpoints") as ckpt:
        assert ckpt.all_steps() == [8, 10, 12]  # max_checkpoints=2 newest, plus the best one
    # Test metrics are those of the best checkpoint, and only of it: one test line, at step 8.
    best = trainer.evaluate_workdir(workdir, model_api=fx.linear_api(), splits=SPLITS, write=False)
    assert best["step"] == 8
    for split in ("valid", "test"):
        got = _strip(best[split])
        assert got.pop("scripted/score") is not None
        want = _strip(results[split])
        want.pop("scripted/score")
        assert got == pytest.approx(want, rel=1e-6)
    last = trainer.evaluate_workdir(workdir, model_api=fx.linear_api(), splits=SPLITS, step="last", write=False)
    assert last["step"] == 12 and last["test"]["loss"] != pytest.approx(results["test"]["loss"], rel=1e-9)
    lines = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r.get("final", False)) for r in lines if r["split"] == "test"] == [(8, True)]


def test_eval_falls_back_from_a_corrupt_best_step_unless_strict(up_and_down, tmp_path):
    import shutil

    workdir = tmp_path / "copy"
    shutil.copytree(up_and_down[0], workdir)
    target = max((p for p in (workdir / "checkpoints" / "8" / "params").rglob("*") if p.is_file()),
                 key=lambda p: p.stat().st_size)  # fmt: skip
    data = bytearray(target.read_bytes())
    mid = len(data) // 2
    data[mid : mid + 64] = bytes(b ^ 0xFF for b in data[mid : mid + 64])
    target.write_bytes(bytes(data))
    with pytest.raises(CheckpointCorruptError, match="step 8"):
        trainer.evaluate_workdir(workdir, model_api=fx.linear_api(), splits=SPLITS, strict=True, write=False)
    with pytest.warns(CheckpointWarning, match="the best step 8 cannot be used"):
        got = trainer.evaluate_workdir(workdir, model_api=fx.linear_api(), splits=SPLITS, write=False)
    assert got["step"] == 12
    assert (workdir / "checkpoints" / "8").is_dir()  # eval never moves or deletes anything


def test_patience_stops_early_and_a_resume_continues_exactly(tmp_path):
    SCRIPT.clear()
    SCRIPT.update({2: 0.5, 4: 0.3, 6: 0.4, 8: 0.45, 10: 0.1})
    config = _config(patience=2, checkpoint_every=3)
    full = _run(tmp_path / "full", config)
    assert full["last_step"] == 8 and full["best_step"] == 4
    assert "did not improve for 2 passes (best 0.3 at step 4)" in full["stop_reason"]
    assert [p["step"] for p in full["valid_curve"]] == [2, 4, 6, 8]

    class Crash(hooks.Hook):
        def on_step(self, ctx, step, metrics):
            if step == 7:
                raise Interrupt

    with pytest.raises(Interrupt):
        _run(tmp_path / "killed", config, hooks=[Crash()])
    with Checkpointer(tmp_path / "killed" / "checkpoints") as ckpt:
        assert ckpt.all_steps() == [4, 6]  # the 2 newest; 4 is also the best
    resumed = _run(tmp_path / "killed", config)
    for key in ("best_step", "last_step", "stop_reason", "selection"):
        assert resumed[key] == full[key], key
    assert _strip(resumed["test"]) == pytest.approx(_strip(full["test"]), rel=1e-6)
    assert [p["step"] for p in resumed["valid_curve"]] == [2, 4, 6, 8]

    def lines(name):
        text = (tmp_path / name / "metrics.jsonl").read_text().splitlines()
        return [{k: v for k, v in json.loads(x).items() if k not in NONDETERMINISTIC} for x in text]

    assert lines("killed") == lines("full")  # no line twice after the resume
    again = _run(tmp_path / "killed", config)  # a stopped run stays stopped: only the final passes again
    assert again["last_step"] == 8 and again["best_step"] == 4
    assert sum(r["split"] == "test" for r in lines("killed")) == 1


def test_selection_metric_direction_and_checks():
    assert selection.derive_mode("mean_ne") == "min" and selection.derive_mode("consume/ne") == "min"
    assert selection.derive_mode("engage/auc") == "max" and selection.derive_mode("ranking/ndcg@10") == "max"
    assert selection.derive_mode("scripted/score") is None
    tc = fx.tiny_config(select_metric="scripted/score").train
    with pytest.raises(ConfigError, match="train.select_metric='scripted/score'.*train.select_mode=min"):
        selection.criterion(tc)
    tasks = ("consume", "engage")
    assert selection.check_metric(fx.tiny_config(select_metric="engage/auc").train, tasks).mode == "max"
    with pytest.raises(ConfigError, match=r"train.select_metric='click/ne' is not a valid metric.*'consume'"):
        selection.check_metric(fx.tiny_config(select_metric="click/ne").train, tasks)
    with pytest.raises(ConfigError, match="needs 'ranking' in train.evaluators"):
        selection.check_metric(fx.tiny_config(select_metric="ranking/mrr").train, tasks)
    crit = selection.Criterion("mean_ne", "min", tasks)
    assert crit.value({"consume/ne": 0.8, "engage/ne": 0.6}) == pytest.approx(0.7)
    assert crit.value({"consume/ne": float("nan"), "engage/ne": 0.6}) is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert crit.better(0.5, None) and not crit.better(None, 0.5) and not crit.better(0.6, 0.5)

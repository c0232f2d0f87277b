"""The training loop end to end with the linear fixture: outputs, exact resume, divergence, eval."""

from __future__ import annotations

import dataclasses
import json

import jax
import numpy as np
import pytest
import train_fixtures as fx

from gesr_jax import config as config_lib
from gesr_jax import metrics as metrics_lib
from gesr_jax.config import ConfigError
from gesr_jax.data import pipeline
from gesr_jax.train import evaluators, hooks, sharding, trainer
from gesr_jax.train import setup as setup_lib
from gesr_jax.train.checkpoint import Checkpointer

NONDETERMINISTIC = ("wall_time", "examples_per_sec", "requests_per_sec", "candidates_per_sec", "sec_per_step")


def run(workdir, config=None, **kwargs):
    return trainer.train_and_evaluate(
        config or fx.tiny_config(), workdir, model_api=kwargs.pop("model_api", fx.linear_api()),
        splits=kwargs.pop("splits", SPLITS), **kwargs,
    )  # fmt: skip


SPLITS = fx.make_splits()


def records(workdir):
    lines = (workdir / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k not in NONDETERMINISTIC} for line in lines]


def final_params(workdir, step):
    mesh = sharding.make_mesh(1)
    _, template = fx.linear_api().init(None, 0)
    with Checkpointer(workdir / "checkpoints") as ckpt:
        params = ckpt.restore_params(step, sharding.place(template, sharding.param_shardings(template, mesh)))
    return [np.asarray(x) for x in jax.tree.leaves(params)]


class Interrupt(Exception):
    pass


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("full")
    return workdir, run(workdir)


def test_run_writes_every_output(full_run):
    workdir, results = full_run
    assert config_lib.load_json(workdir / "config.json") == fx.tiny_config()
    lines = records(workdir)
    train = [r for r in lines if r["split"] == "train"]
    assert [r["step"] for r in train] == [3, 6, 9, 12]
    assert all(np.isfinite(r["loss"]) and "loss/consume" in r and "learning_rate" in r for r in train)
    valid = [r["step"] for r in lines if r["split"] == "valid"]
    assert valid == [6, 12]  # eval_every=6 plus the final pass
    assert results["last_step"] == 12 and results["step"] == results["best_step"] in (6, 12)
    assert [p["step"] for p in results["valid_curve"]] == [6, 12]
    # The reported metrics are those of the best step's params, recomputed from the checkpoint and the labels.
    api = fx.linear_api()
    graphdef, template = api.init(fx.tiny_config(), 0, fx.SCHEMA)
    with Checkpointer(workdir / "checkpoints") as ckpt:
        params = ckpt.restore_params(results["best_step"], template)
    for split in ("valid", "test"):
        arrays = getattr(SPLITS, split)
        logits = api.apply(graphdef, params, arrays)
        mask = np.arange(arrays["cand_item"].shape[1])[None, :] < arrays["num_candidates"][:, None]
        for task in fx.SCHEMA.tasks:
            labels, scores = arrays[f"label_{task}"], np.asarray(logits[task])
            expect = {
                "ne": metrics_lib.normalized_entropy(labels, scores, mask, logits=True),
                "auc": metrics_lib.auc(labels, scores, mask),
                "oracle_ne": metrics_lib.normalized_entropy(labels, arrays[f"prob_{task}"], mask),
            }
            for key, value in expect.items():
                assert results[split][f"{task}/{key}"] == pytest.approx(value, rel=1e-5), (split, task, key)
    assert results["valid"]["num_examples"] == SPLITS.valid["num_candidates"].sum()
    assert json.loads((workdir / "results.json").read_text())["test"]["loss"] == pytest.approx(results["test"]["loss"])
    assert (workdir / "plots" / "loss.png").stat().st_size > 1000
    assert (workdir / "plots" / "ne.png").stat().st_size > 1000
    with Checkpointer(workdir / "checkpoints") as ckpt:
        assert ckpt.all_steps() == [4, 6, 8, 12]  # 6: the first valid pass is a new best, checkpointed
    # Training on learnable labels beats the constant base-rate predictor.
    assert results["valid"]["consume/ne"] < 1.0 or results["valid"]["engage/ne"] < 1.0


def test_interrupted_run_resumes_to_identical_params_and_metrics(full_run, tmp_path):
    workdir_full, results_full = full_run

    def crash(step):
        if step == 6:  # after the step-4 checkpoint and the step-6 eval: steps 5-6 are lost
            raise Interrupt

    with pytest.raises(Interrupt):
        run(tmp_path, on_step=crash)
    with Checkpointer(tmp_path / "checkpoints") as ckpt:
        assert ckpt.latest_step() == 4
    results = run(tmp_path)
    assert records(tmp_path) == records(workdir_full)
    for a, b in zip(final_params(tmp_path, 12), final_params(workdir_full, 12), strict=True):
        np.testing.assert_array_equal(a, b)
    strip = {s: {k: v for k, v in results[s].items() if k not in NONDETERMINISTIC} for s in ("valid", "test")}
    assert strip == {s: {k: v for k, v in results_full[s].items() if k not in NONDETERMINISTIC} for s in strip}


def test_resume_rejects_a_changed_config_but_allows_cadence(full_run, tmp_path):
    workdir, _ = full_run
    changed = dataclasses.replace(fx.tiny_config(), train=dataclasses.replace(fx.tiny_config().train, seed=5))
    with pytest.raises(ConfigError, match=r"train.seed: 0 -> 5"):
        run(workdir, changed)
    # Finished run + only cadence changed: no training, just the final evaluation again.
    again = run(workdir, config_lib.apply_overrides(fx.tiny_config(), ["train.log_every=1", "train.eval_every=0"]))
    assert again["step"] == 12
    assert sum(r["split"] == "test" for r in records(workdir)) == 1


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    config = fx.tiny_config(batch_size=8, checkpoint_every=2, log_every=10, eval_every=0)
    # Poison the first request of the 5th batch: the loss becomes NaN at step 5.
    poisoned = {k: v.copy() for k, v in SPLITS.train.items()}
    fifth = pipeline.train_dataset(SPLITS.train, 8, seed=0, process_index=0, process_count=1)[4]
    assert len(np.unique(SPLITS.train["user_id"])) == len(SPLITS.train["user_id"])  # user_id names the request
    poisoned["user_id"][fifth["user_id"][0] - 1] = 399
    splits = dataclasses.replace(SPLITS, train=poisoned)
    diverged = r"loss became nan at step 5.*last good checkpoint \(step 4\)"
    with pytest.raises(hooks.TrainingDivergedError, match=diverged):
        run(tmp_path, config, model_api=fx.linear_api(poison_user=399), splits=splits)
    with Checkpointer(tmp_path / "checkpoints") as ckpt:
        assert ckpt.all_steps() == [2, 4]
    assert all(np.all(np.isfinite(x)) for x in final_params(tmp_path, 4))


def test_evaluate_workdir_and_evaluate_reproduce_final_metrics(full_run, monkeypatch):
    workdir, results = full_run
    monkeypatch.setattr(setup_lib, "default_splits", lambda config: SPLITS)
    got = trainer.evaluate_workdir(workdir, model_api=fx.linear_api())
    assert got["step"] == 12
    for split in ("valid", "test"):
        for key, value in results[split].items():
            if key not in NONDETERMINISTIC:
                assert got[split][key] == pytest.approx(value, rel=1e-6), (split, key)
    assert json.loads((workdir / "eval.json").read_text())["step"] == 12

    graphdef, _ = fx.linear_api().init(None, 0)
    params = jax.device_get(
        Checkpointer(workdir / "checkpoints").restore_params(12, fx.linear_api().init(None, 0)[1])
    )
    mesh = sharding.make_mesh()
    placed = sharding.param_shardings(params, mesh)
    evaluator = evaluators.CandidateEvaluator(
        fx.linear_api(), graphdef, SPLITS.schema.tasks, (1.0,) * len(SPLITS.schema.tasks),
        fx.tiny_config().train.eval_batch_size, mesh, placed,
    )  # fmt: skip
    with sharding.mesh_context(mesh):
        direct = evaluator(sharding.place(params, placed), SPLITS.test)
    assert direct["consume/ne"] == pytest.approx(results["test"]["consume/ne"], rel=1e-6)

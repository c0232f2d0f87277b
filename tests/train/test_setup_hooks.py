"""setup() builds for the data's schema; hooks stop runs early; the ranking evaluator; model.json refusals."""

from __future__ import annotations

import ast
import dataclasses
import json
import pathlib
import types

import jax
import numpy as np
import pytest
import train_fixtures as fx

import gesr_jax

from gesr_jax.config import ConfigError
from gesr_jax.data import datasets
from gesr_jax.train import hooks, trainer
from gesr_jax.train import setup as setup_lib
from gesr_jax.train.checkpoint import Checkpointer
from gesr_jax.workdir_files import WorkdirError

OTHER_SCHEMA = dataclasses.replace(fx.SCHEMA, num_users=150, num_items=40, tasks=("click",))


def _config(**train):
    return fx.tiny_config(**train)


def test_injected_splits_build_a_model_for_their_own_schema(monkeypatch, tmp_path):
    def never(*args, **kwargs):
        raise AssertionError("config.data must not be consulted when splits are injected")

    monkeypatch.setattr(datasets, "schema_for", never)
    monkeypatch.setattr(datasets, "load_splits", never)
    splits = fx.make_splits(schema=OTHER_SCHEMA)
    # config.data describes the default synthetic log (2000 users, tasks consume/engage); the splits win.
    built = setup_lib.setup(_config(), model_api=fx.linear_api(), splits=splits)
    assert built.params["user"][...].shape == (OTHER_SCHEMA.num_users + 1, 8)
    assert built.params["item"][...].shape == (OTHER_SCHEMA.num_items + 1, 8)
    assert built.tasks == ("click",) and built.params["w"][...].shape == (8, 1)
    results = trainer.train_and_evaluate(_config(num_steps=2), tmp_path, model_api=fx.linear_api(), splits=splits)
    assert "click/ne" in results["test"] and "consume/ne" not in results["test"]


class StopAtFirstValid(hooks.EarlyStopping):
    """Counts valid passes in hook_state (so it survives a resume) and stops at the first one."""

    def should_stop(self, ctx, step, metrics):
        state = ctx.hook_state.setdefault(self.name, {"evals": 0})
        state["evals"] += 1
        return f"valid loss {metrics['loss']:.3f} at step {step}"


class Recorder(hooks.Hook):
    def __init__(self):
        self.events = []

    def on_train_start(self, ctx):
        self.events.append(("start", ctx.step, json.dumps(ctx.hook_state)))

    def on_eval(self, ctx, step, split, metrics):
        self.events.append(("eval", step, split))

    def on_end(self, ctx, results):
        self.events.append(("end", results["step"]))


def test_early_stopping_hook_ends_the_run_and_a_resume_keeps_it_stopped(tmp_path):
    recorder = Recorder()
    run = dict(model_api=fx.linear_api(), splits=fx.make_splits())
    results = trainer.train_and_evaluate(_config(), tmp_path, hooks=[StopAtFirstValid(), recorder], **run)
    assert results["step"] == 6 and results["stop_reason"].startswith("valid loss")
    assert recorder.events == [("start", 0, "{}"), ("eval", 6, "valid"), ("eval", 6, "valid"), ("eval", 6, "test"),
                               ("end", 6)]  # fmt: skip
    with Checkpointer(tmp_path / "checkpoints") as ckpt:
        assert ckpt.all_steps() == [4, 6]
    again = Recorder()
    resumed = trainer.train_and_evaluate(_config(), tmp_path, hooks=[StopAtFirstValid(), again], **run)
    assert resumed["step"] == 6 and resumed["stop_reason"] == results["stop_reason"]
    assert again.events[0][:2] == ("start", 6)
    assert json.loads(again.events[0][2])["early_stopping"] == {"evals": 1}
    train_steps = [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert max(train_steps) == 6


def _brute_force_ranks(api, built, split):
    """Every positive's catalogue rank from apply() on all items, other positives and item 0 left out."""
    v = fx.SCHEMA.num_items + 1
    params = jax.device_get(built.params)
    every_item = np.tile(np.arange(v), (len(split["user_id"]), 1))
    logits = api.apply(built.graphdef, params, {"user_id": split["user_id"], "cand_item": every_item})
    scores = np.asarray(logits["consume"], np.float64)
    ranks = []
    for b in range(len(split["user_id"])):
        n = split["num_candidates"][b]
        pos = split["cand_item"][b, :n][split["label_consume"][b, :n] == 1]
        for target in pos:
            others = set(pos.tolist()) - {int(target)} | {0}
            ahead = [i for i in range(v) if i != target and i not in others and scores[b, i] >= scores[b, target]]
            ranks.append(1 + len(ahead))
    return np.array(ranks)


def test_ranking_evaluator_ranks_positives_against_the_catalogue():
    api = fx.linear_api()
    splits = fx.make_splits()
    config = _config(evaluators=("candidate", "ranking"), ranking_ks=(1, 10))
    built = setup_lib.setup(config, model_api=api, splits=splits, training=False)
    result = built.evaluator(built.params, splits.test, "test")
    assert "consume/ne" in result  # both evaluators ran and their keys were merged
    ranks = _brute_force_ranks(api, built, splits.test)
    assert result["ranking/num_targets"] == ranks.size > 0
    np.testing.assert_allclose(result["ranking/mrr"], np.mean(1.0 / ranks), rtol=1e-6)
    np.testing.assert_allclose(result["ranking/hr@10"], np.mean(ranks <= 10), rtol=1e-6)
    np.testing.assert_allclose(result["ranking/ndcg@1"], np.mean(ranks == 1), rtol=1e-6)


def test_ranking_evaluator_needs_an_item_cache():
    splits = fx.make_splits()
    config = _config(evaluators=("ranking",))
    base = fx.linear_api()
    no_scores = types.SimpleNamespace(init=base.init, apply=base.apply, item_cache=base.item_cache)
    with pytest.raises(ConfigError, match=r"lacks \['retrieval_scores'\]"):
        setup_lib.setup(config, model_api=no_scores, splits=splits, training=False)

    def no_cache(graphdef, params, item_fields):
        raise NotImplementedError("LinearScorer has no item cache")

    without = types.SimpleNamespace(**{**vars(base), "item_cache": no_cache})
    with pytest.raises(ConfigError, match="cannot rank the catalogue .*LinearScorer has no item cache"):
        setup_lib.setup(config, model_api=without, splits=splits, training=False)
    with pytest.raises(ConfigError, match=r"'nope', which is not a registered evaluator; known: \['candidate'"):
        setup_lib.setup(_config(evaluators=("nope",)), model_api=base, splits=splits)


def test_workdir_records_the_model_and_refuses_another_model_api(tmp_path):
    splits = fx.make_splits()
    trainer.train_and_evaluate(_config(num_steps=2), tmp_path, model_api=fx.linear_api(), splits=splits)
    record = json.loads((tmp_path / "model.json").read_text())
    assert record == {"kind": _config().model.kind, "api": "train_fixtures:linear_api",
                      "config_module": type(_config().model).__module__}
    other = types.SimpleNamespace(**{**vars(fx.linear_api()), "api_name": "my_models:other_api"})
    refused = r"trained by the model API 'train_fixtures:linear_api'.*'my_models:other_api'"
    with pytest.raises(WorkdirError, match=refused):
        trainer.evaluate_workdir(tmp_path, model_api=other, splits=splits)
    with pytest.raises(WorkdirError, match="trained by the model API"):
        trainer.train_and_evaluate(_config(num_steps=4), tmp_path, model_api=other, splits=splits)  # nor resumed
    assert trainer.evaluate_workdir(tmp_path, model_api=fx.linear_api(), splits=splits)["step"] == 2


def test_packages_hide_no_imports_and_serving_reads_workdirs_only_through_workdir():
    root = pathlib.Path(gesr_jax.__file__).parent
    for package in ("train", "serving"):
        tree = ast.parse((root / package / "__init__.py").read_text())
        assert [type(n).__name__ for n in tree.body] == ["Expr"], package  # a docstring: no shims, no re-exports
    for path in (root / "serving").glob("*.py"):
        assert "gesr_jax.train" not in path.read_text(), path

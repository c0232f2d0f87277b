"""Orbax checkpoints of params + optimizer + step + grain iterator in one manager step."""

from __future__ import annotations

import jax
import numpy as np
import pytest
import train_fixtures as fx

from gesr_jax.data import pipeline
from gesr_jax.train import sharding, step
from gesr_jax.train.checkpoint import Checkpointer
from gesr_jax.train.checkpoint_errors import CheckpointError, CheckpointMismatchError, CheckpointNotFoundError
from gesr_jax.train.config import TrainConfig


def _state(seed: int, mesh):
    graphdef, params = fx.linear_api().init(None, seed)
    p_sharding = sharding.param_shardings(params, mesh)
    params = sharding.place(params, p_sharding)
    tx = step.make_optimizer(TrainConfig())
    return params, jax.jit(tx.init)(params)


def test_roundtrip_restores_params_optimizer_step_and_iterator(tmp_path):
    mesh = sharding.make_mesh(2)
    splits = fx.make_splits()
    params, opt_state = _state(0, mesh)
    it = pipeline.make_iterator(pipeline.train_dataset(splits.train, 8, seed=0))
    for _ in range(3):
        next(it)
    with Checkpointer(tmp_path / "ck", max_to_keep=2) as ckpt:
        ckpt.save(3, params, opt_state, it, {"note": [1, 2]})
        ckpt.wait()
        expected_next = next(it)["user_id"]
        assert (tmp_path / "ck" / "3" / "data_iterator" / "process_0-of-1.json").exists()
        assert ckpt.latest_step() == 3

    fresh_params, fresh_opt = _state(1, mesh)  # different init: restore must overwrite it
    it2 = pipeline.make_iterator(pipeline.train_dataset(splits.train, 8, seed=0))
    with Checkpointer(tmp_path / "ck") as ckpt:
        got_params, got_opt, got_step, meta = ckpt.restore(
            3, params=fresh_params, opt_state=fresh_opt, data_iterator=it2
        )
        only_params = ckpt.restore_params(3, fresh_params)
    assert got_step == 3 and meta == {"note": [1, 2]}
    for want, got in [(params, got_params), (opt_state, got_opt), (params, only_params)]:
        for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(got), strict=True):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert got_params["user"][...].sharding == fresh_params["user"][...].sharding
    np.testing.assert_array_equal(next(it2)["user_id"], expected_next)


def test_restore_errors_are_clear(tmp_path):
    mesh = sharding.make_mesh(1)
    params, opt_state = _state(0, mesh)
    it = pipeline.make_iterator(pipeline.train_dataset(fx.make_splits().train, 8, seed=0))
    with Checkpointer(tmp_path / "ck") as ckpt:
        ckpt.save(1, params, opt_state, it)
        ckpt.wait()
        with pytest.raises(CheckpointNotFoundError, match=r"no checkpoint for step 5 .* steps there: \[1\]"):
            ckpt.restore_params(5, params)
        bigger = fx.linear_api(dim=4).init(None, 0)[1]
        with pytest.raises(CheckpointMismatchError, match=r"does not match the model .*\['item'\]\.value: saved"):
            ckpt.restore_params(1, bigger)
    # Both are CheckpointErrors (what the CLI reports as usage errors), not ValueErrors (which are bugs).
    assert issubclass(CheckpointNotFoundError, CheckpointError) and not issubclass(CheckpointNotFoundError, ValueError)
    assert issubclass(CheckpointMismatchError, CheckpointError) and not issubclass(CheckpointMismatchError, ValueError)

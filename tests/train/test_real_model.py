"""The trainer with the real GESR model (gesr_jax.api) and the embedded synthetic data."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec

from gesr_jax import api, cli
from gesr_jax.config import load_config
from gesr_jax.train import sharding, step


def test_every_gesr_parameter_axis_has_a_rule():
    config = load_config("synthetic_tiny")
    _, abstract = api.abstract_init(config)
    shardings = sharding.param_shardings(abstract, sharding.make_mesh(8))
    specs = [s.spec for s in jax.tree.leaves(shardings)]
    assert specs and all(all(axis is None for axis in spec) for spec in specs), "data parallel: all replicated"
    assert all(isinstance(s, PartitionSpec) for s in specs)


@pytest.mark.slow
def test_gesr_eight_devices_match_one_device():
    config = load_config("synthetic_tiny")
    batches = [api.example_batch(config, seed=s, batch_size=16) for s in range(2)]
    losses = {}
    for n in (1, 8):
        mesh = sharding.make_mesh(n)
        with sharding.mesh_context(mesh):
            graphdef, params = api.init(config, 0)
            p_sharding = sharding.param_shardings(params, mesh)
            params = sharding.place(params, p_sharding)
            tx = step.make_optimizer(config.train)
            o_sharding = sharding.param_shardings(jax.eval_shape(tx.init, params), mesh)
            opt_state = jax.jit(tx.init, out_shardings=o_sharding)(params)
            train_step = step.make_train_step(
                api, graphdef, tx, ("consume", "engage"), (1.0, 1.0), mesh=mesh, params_sharding=p_sharding,
                opt_state_sharding=o_sharding, batch_sharding=sharding.batch_shardings(batches[0], mesh),
            )  # fmt: skip
            losses[n] = []
            for i, b in enumerate(batches):
                params, opt_state, m = train_step(params, opt_state, sharding.shard_batch(b, mesh), jax.random.key(i))
                losses[n].append(float(m["loss"]))
    np.testing.assert_allclose(losses[8], losses[1], rtol=1e-5)


@pytest.mark.slow
def test_cli_trains_and_evaluates_synthetic_tiny(tmp_path, capsys):
    workdir = tmp_path / "run"
    assert cli.main(["train", "--config", "synthetic_tiny", "--workdir", str(workdir)]) == 0
    results = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    for task in ("consume", "engage"):
        # A trained model sits between the oracle and the constant base-rate predictor.
        assert results["test"][f"{task}/oracle_ne"] < results["test"][f"{task}/ne"] < 1.0
    assert cli.main(["eval", "--workdir", str(workdir)]) == 0
    evaluated = json.loads(capsys.readouterr().out)
    assert evaluated["test"]["consume/ne"] == pytest.approx(results["test"]["consume/ne"], rel=1e-5)

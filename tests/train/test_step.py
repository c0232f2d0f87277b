"""Pure train/eval steps: masked multitask loss, schedule, and 8-device == 1-device data parallelism."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import train_fixtures as fx

from gesr_jax.data import batch as batch_lib
from gesr_jax.train import sharding, step
from gesr_jax.train.config import TrainConfig


def np_bce(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    return np.maximum(x, 0) - x * y + np.log1p(np.exp(-np.abs(x)))


def test_multitask_loss_masks_padding_and_empty_rows_and_weights_tasks():
    rng = np.random.default_rng(0)
    b, c = 4, 5
    num = np.array([5, 2, 0, 1], np.int32)  # row 2 is an empty (padding) row
    mask = np.arange(c)[None] < num[:, None]
    batch = {"num_candidates": num}
    logits = {}
    for task in ("consume", "engage"):
        batch[f"label_{task}"] = np.where(mask, rng.integers(0, 2, (b, c)), 0).astype(np.float32)
        logits[task] = np.where(mask, rng.normal(size=(b, c)), 1e4).astype(np.float32)  # garbage in padding
    loss, per_task = step.multitask_loss(
        {k: jnp.asarray(v) for k, v in logits.items()}, {k: jnp.asarray(v) for k, v in batch.items()},
        ("consume", "engage"), (0.25, 2.0),
    )  # fmt: skip
    expected = {t: np_bce(logits[t][mask], batch[f"label_{t}"][mask]).mean() for t in ("consume", "engage")}
    np.testing.assert_allclose(per_task["loss/consume"], expected["consume"], rtol=1e-5)
    np.testing.assert_allclose(per_task["loss/engage"], expected["engage"], rtol=1e-5)
    np.testing.assert_allclose(loss, 0.25 * expected["consume"] + 2.0 * expected["engage"], rtol=1e-5)


def test_task_weights_must_match_tasks():
    assert step.resolve_task_weights(("a", "b"), TrainConfig()) == (1.0, 1.0)
    with pytest.raises(ValueError, match="train.task_weights has 3 entries"):
        step.resolve_task_weights(("a", "b"), TrainConfig(task_weights=(1.0, 1.0, 1.0)))


def test_schedule_warms_up_then_decays_to_end_fraction():
    config = TrainConfig(learning_rate=0.1, warmup_steps=4, num_steps=20, end_lr_fraction=0.1)
    lr = step.learning_rate_schedule(config)
    assert float(lr(0)) == 0.0
    assert float(lr(4)) == pytest.approx(0.1)
    assert float(lr(2)) == pytest.approx(0.05)
    assert float(lr(20)) == pytest.approx(0.01)
    assert float(lr(10)) < 0.1


def test_weight_decay_skips_vectors():
    tx = step.make_optimizer(TrainConfig(learning_rate=0.1, warmup_steps=0, weight_decay=0.5, grad_clip_norm=0))
    params = {"kernel": jnp.ones((2, 2)), "bias": jnp.ones((2,))}
    zero = jax.tree.map(jnp.zeros_like, params)
    updates, _ = tx.update(zero, tx.init(params), params)
    np.testing.assert_allclose(updates["kernel"], -0.1 * 0.5 * np.ones((2, 2)), rtol=1e-6)
    np.testing.assert_array_equal(updates["bias"], np.zeros(2))


def _run_steps(num_devices: int, batches: list[dict[str, np.ndarray]]) -> tuple[list[float], dict]:
    api = fx.linear_api()
    mesh = sharding.make_mesh(num_devices)
    config = TrainConfig(learning_rate=0.05, warmup_steps=1, num_steps=10)
    with sharding.mesh_context(mesh):
        graphdef, params = api.init(None, 0)
        p_sharding = sharding.param_shardings(params, mesh)
        params = sharding.place(params, p_sharding)
        tx = step.make_optimizer(config)
        o_sharding = sharding.param_shardings(jax.eval_shape(tx.init, params), mesh)
        opt_state = jax.jit(tx.init, out_shardings=o_sharding)(params)
        train_step = step.make_train_step(
            api, graphdef, tx, fx.SCHEMA.tasks, (1.0, 1.0), mesh=mesh, params_sharding=p_sharding,
            opt_state_sharding=o_sharding, batch_sharding=sharding.batch_shardings(batches[0], mesh),
        )  # fmt: skip
        losses = []
        for i, host_batch in enumerate(batches):
            batch = sharding.shard_batch(host_batch, mesh)
            assert len(batch["cand_item"].sharding.device_set) == num_devices
            params, opt_state, metrics = train_step(params, opt_state, batch, jax.random.key(i))
            losses.append(float(metrics["loss"]))
        assert params["user"][...].sharding.is_fully_replicated
        return losses, jax.device_get(params)


def test_eight_devices_match_one_device():
    assert len(jax.devices()) >= 8, "conftest.py should give 8 fake CPU devices"
    batches = [batch_lib.random_batch(fx.SCHEMA, 16, seed=s) for s in range(4)]
    losses_1, params_1 = _run_steps(1, batches)
    losses_8, params_8 = _run_steps(8, batches)
    # Same math, different reduction order across devices: equal to float32 rounding.
    np.testing.assert_allclose(losses_8, losses_1, rtol=2e-6)
    assert len(set(losses_1)) == len(losses_1), "each step should see a different batch"
    for a, b in zip(jax.tree.leaves(params_1), jax.tree.leaves(params_8), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_eval_step_returns_logits_for_every_task():
    api = fx.linear_api()
    mesh = sharding.make_mesh(2)
    batch = batch_lib.random_batch(fx.SCHEMA, 6, seed=0)
    graphdef, params = api.init(None, 0)
    p_sharding = sharding.param_shardings(params, mesh)
    eval_step = step.make_eval_step(
        api, graphdef, fx.SCHEMA.tasks, mesh=mesh, params_sharding=p_sharding,
        batch_sharding=sharding.batch_shardings(batch, mesh),
    )  # fmt: skip
    out = eval_step(sharding.place(params, p_sharding), sharding.shard_batch(batch, mesh))
    want = api.apply(graphdef, params, batch)
    assert sorted(out) == ["logit_consume", "logit_engage"]
    for task in fx.SCHEMA.tasks:
        np.testing.assert_allclose(out[f"logit_{task}"], want[task], rtol=1e-5, atol=1e-6)

"""The train-step speed-ups of issue 23 leave GESR's numbers alone: outputs and gradients on a fixed batch equal
those of the formulas they replaced (kept here as the "before" references) within 1e-5."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from gesr_jax.layers import hstu as hstu_lib
from gesr_jax.layers.quantize import quantize_fp8
from gesr_jax.models.gesr.moa import HSTUComponent
from gesr_jax.train.step import multitask_loss
from helpers.models import SCHEMA, batch_for, make_model, tiny_config


def _history_kv_before(layer: hstu_lib.HSTULayer, x: jax.Array):
    """The last layer's history (k, v) as it was computed before: the whole UVQK projection, u and q dropped."""
    _, v, _, k = layer.project(x)
    return k, v


def _layer(seed: int = 0) -> hstu_lib.HSTULayer:
    return hstu_lib.HSTULayer(8, heads=2, qk_dim=4, v_dim=3, normalizer=8.0, alpha=None, attention_impl=None,
                              dropout_rate=0.1, rngs=nnx.Rngs(seed))  # fmt: skip


@pytest.mark.parametrize("fp8", [False, True])
def test_history_kv_is_the_k_and_v_of_the_full_projection(fp8):
    layer = _layer()
    if fp8:  # the serving copy: a float8 kernel with per-column scales
        quantize_fp8(layer, min_elements=1)
        assert layer.uvqk.kernel_scale is not None
    x = jax.random.normal(jax.random.key(3), (2, 5, 8))
    (k, v), (k0, v0) = layer.history_kv(x), _history_kv_before(layer, x)
    assert k.shape == (2, 5, 2, 4) and v.shape == (2, 5, 2, 3)
    np.testing.assert_allclose(np.asarray(k), np.asarray(k0), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(np.asarray(v), np.asarray(v0), rtol=1e-6, atol=1e-6)


def _loss_and_grads(model, batch, key):
    graphdef, params = nnx.split(model)
    tasks = SCHEMA.tasks

    def loss(p):
        logits = nnx.merge(graphdef, p)(batch, key=key, train=True)
        return multitask_loss(logits, batch, tasks, (1.0,) * len(tasks))[0], logits

    (value, logits), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
    return value, logits, grads


def _assert_close(got, want, what: str) -> None:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    scale = max(float(np.abs(want).max()), 1e-6)
    err = float(np.abs(got - want).max()) / scale
    assert err <= 1e-5, f"{what}: max |difference| / max |before| = {err:.2e}"


def _hstu_grads(module, hist, cand, hlen, ncand, key):
    graphdef, params = nnx.split(module)
    weights = jax.random.normal(jax.random.key(2), (*cand.shape[:2], module.stack.layers[0].out.kernel.shape[1]))

    def loss(p, hist, cand):
        m = nnx.merge(graphdef, p)
        out = m.score(m.encode(hist, hlen, key=key), cand, hlen, ncand, key=key)
        return jnp.sum(out * weights), out

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(params, hist, cand)


def test_hstu_stack_outputs_and_grads_equal_the_before_formulas(monkeypatch):
    """The target-aware HSTU stack in train mode (dropout on): candidate rows and the gradients of the
    parameters and of both token inputs; padded rows included (history_len 5, 2, 0)."""
    module = HSTUComponent.from_config(tiny_config(dropout=0.1, hstu={"layers": 1}), SCHEMA, rngs=nnx.Rngs(4))
    k1, k2 = jax.random.split(jax.random.key(9))
    hist, cand = jax.random.normal(k1, (3, 6, 8)), jax.random.normal(k2, (3, 4, 8))
    hlen, ncand = jnp.array([5, 2, 0], jnp.int32), jnp.array([4, 1, 3], jnp.int32)
    key = jax.random.key(7)
    (_, out), grads = _hstu_grads(module, hist, cand, hlen, ncand, key)
    monkeypatch.setattr(hstu_lib.HSTULayer, "history_kv", _history_kv_before)
    (_, out0), grads0 = _hstu_grads(module, hist, cand, hlen, ncand, key)
    _assert_close(out, out0, "candidate rows")
    for (path, got), want in zip(jax.tree_util.tree_flatten_with_path(grads)[0], jax.tree.leaves(grads0), strict=True):
        _assert_close(got, want, f"gradient {jax.tree_util.keystr(path)}")


@pytest.mark.slow  # two compiles of the whole GESR train step: about a minute on the shared 2-core box
def test_train_loss_logits_and_grads_equal_the_before_formulas(monkeypatch):
    """Train mode (dropout on, fixed key), every MoA component on: loss, logits and every gradient leaf."""
    model = make_model(tiny_config(dropout=0.1))
    batch = {k: jnp.asarray(v) for k, v in batch_for(batch_size=4, seed=5).items()}
    key = jax.random.key(11)
    after = _loss_and_grads(model, batch, key)
    monkeypatch.setattr(hstu_lib.HSTULayer, "history_kv", _history_kv_before)
    before = _loss_and_grads(model, batch, key)
    _assert_close(after[0], before[0], "loss")
    for task in SCHEMA.tasks:
        _assert_close(after[1][task], before[1][task], f"logits {task}")
    flat_after = jax.tree_util.tree_flatten_with_path(after[2])[0]
    flat_before = jax.tree.leaves(before[2])
    assert len(flat_after) == len(flat_before)
    nonzero = 0
    for (path, got), want in zip(flat_after, flat_before, strict=True):
        _assert_close(got, want, f"gradient {jax.tree_util.keystr(path)}")
        nonzero += bool(np.abs(np.asarray(want)).max() > 0)
    assert nonzero > len(flat_before) // 2  # the comparison covers real gradients, not zeros

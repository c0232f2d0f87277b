"""MLPG: branch formulas against a hand computation, broadcasting of per-request inputs, config checks."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from gesr_jax.layers.core import Dense, MultiInputDense
from gesr_jax.layers.mlpg import MLPG as _MLPG


def MLPG(config, dims, num_tasks, *, rngs):  # noqa: N802  (the layer from a GESR config)
    return _MLPG(config.mlpg_branch_specs(), dims, num_tasks, hidden=config.mlpg.hidden, gate=config.mlpg.gate,
                 dropout_rate=config.dropout, rngs=rngs)
from helpers.models import tiny_config

B, C = 3, 4


def _silu(x):
    return x / (1 + np.exp(-x))


def _sigmoid(x):
    return 1 / (1 + np.exp(-x))


def test_multi_input_dense_equals_dense_on_broadcast_concat():
    rngs = nnx.Rngs(0)
    layer = MultiInputDense([5, 3], 7, rngs=rngs)
    per_cand = jax.random.normal(jax.random.key(1), (B, C, 5))
    per_req = jax.random.normal(jax.random.key(2), (B, 1, 3))
    dense = Dense(8, 7, rngs=rngs)
    dense.kernel[...] = jnp.concatenate([layer.parts[0].kernel[...], layer.parts[1].kernel[...]], 0)
    dense.bias[...] = layer.bias[...]
    concat = jnp.concatenate([per_cand, jnp.broadcast_to(per_req, (B, C, 3))], -1)
    np.testing.assert_allclose(layer([per_cand, per_req]), dense(concat), atol=1e-5)


@pytest.mark.parametrize("gate", ["sigmoid", "lhuc"])
def test_gated_branch_is_mlp_of_gate_times_mlp_and_z(gate):
    config = tiny_config(mlpg={"branches": ("gated:hstu+ro_summary",), "gate": gate})
    dims = {"hstu": 8, "ro_summary": 16}
    mlpg = MLPG(config, dims, num_tasks=2, rngs=nnx.Rngs(0))
    z1 = np.asarray(jax.random.normal(jax.random.key(1), (B, C, 8)))
    z2 = np.asarray(jax.random.normal(jax.random.key(2), (B, 1, 16)))
    out = np.asarray(mlpg({"hstu": jnp.asarray(z1), "ro_summary": jnp.asarray(z2)}, C))
    br = mlpg.branches[0]

    def lin(mid, xs):
        return sum(x @ np.asarray(p.kernel[...]) for p, x in zip(mid.parts, xs)) + np.asarray(mid.bias[...])

    z = [z1, np.broadcast_to(z2, (B, C, 16))]
    h = _silu(lin(br.hidden, z))
    g = _sigmoid(lin(br.gate, z)) * (2.0 if gate == "lhuc" else 1.0)
    mixed = _silu(lin(br.mix, [g * h, *z]))
    expected = mixed @ np.asarray(br.out.kernel[...]) + np.asarray(br.out.bias[...])
    np.testing.assert_allclose(out, expected, atol=1e-5)
    assert out.shape == (B, C, 2)


def test_branches_are_summed():
    config = tiny_config(mlpg={"branches": ("gated", "mlp")})
    dims = {"hstu": 8, "nro_cross": 8, "ro_summary": 16, "ro_profile": 8}
    mlpg = MLPG(config, dims, num_tasks=2, rngs=nnx.Rngs(0))
    values = {k: jax.random.normal(jax.random.key(i), (B, C if k in ("hstu", "nro_cross") else 1, d))
              for i, (k, d) in enumerate(dims.items())}
    total = mlpg(values, C)
    parts = [br(values) for br in mlpg.branches]
    np.testing.assert_allclose(total, parts[0] + parts[1], atol=1e-6)
    assert mlpg.branches[0].inputs == ("hstu", "nro_cross", "ro_summary", "ro_profile")


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (dict(mlpg={"branches": ("mlp",)}), "at least one 'gated'"),
        (dict(mlpg={"branches": ("gated:nope",)}), "unknown input 'nope'"),
        (dict(mlpg={"branches": ("fancy",)}), "kind must be one of"),
        (dict(mlpg={"branches": ("gated:hstu",)}, hstu={"enabled": False}), "switched off"),
        (dict(hstu={"enabled": False}, cross={"ro": False, "nro": False}), "has no input"),
        (dict(mlpg={"gate": "tanh"}), "model.mlpg.gate"),
    ],
)
def test_bad_branch_config_is_rejected(overrides, message):
    with pytest.raises(ValueError, match=message):
        tiny_config(**overrides).validate_for_build()


def test_cli_style_override_of_branches():
    from gesr_jax.config import Config, apply_overrides

    config = apply_overrides(Config(), ["model.mlpg.branches=gated:hstu+hma,mlp", "model.hma.enabled=true"])
    assert config.model.mlpg_branch_specs()[0] == ("gated", ("hstu", "hma"))


def test_switching_modules_off_one_by_one_is_a_valid_intermediate_config():
    # --set validates after every override; MLPG without inputs is only an error once the model is built.
    holdable = tiny_config(hstu={"enabled": False}, cross={"ro": False, "nro": False})
    holdable.validate()
    with pytest.raises(ValueError, match="has no input"):
        holdable.validate_for_build()

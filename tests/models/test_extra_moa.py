"""Adding a MoA module is one class plus one component-table row (issue 9): written here, no project edit."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from flax import nnx

from gesr_jax.layers.core import Dense
from gesr_jax.models.gesr import components
from helpers.models import SCHEMA, batch_for, make_model, tiny_config


class LastItemEcho(nnx.Module):
    """A toy "nro" module: per candidate, a projection of [candidate item emb * last history item emb]."""

    @classmethod
    def from_config(cls, config, schema, *, rngs):
        return cls(config.embed_dim, schema.num_items + 1, rngs=rngs)

    def __init__(self, dim, vocab, *, rngs):
        self.table = nnx.Param(jax.random.normal(rngs.params(), (vocab, dim)) * 0.1)
        self.proj = Dense(dim, dim, rngs=rngs)

    def encode_request(self, ctx, *, key=None):
        last = ctx.request["history_item"][jax.numpy.arange(ctx.history_len.shape[0]), ctx.history_len - 1]
        return self.table[...][last]  # [B, D]: request-only work, cached

    def score_candidates(self, cache, ctx, *, key=None):
        cand = self.table[...][ctx.candidates["cand_item"]]  # [B, C, D]
        return {"last_item_echo": self.proj(cand * cache[:, None, :])}


@pytest.fixture(scope="module", autouse=True)
def registered():
    row = components.Component("last_item_echo", LastItemEcho, stage="nro", route="mlpg",
                               outputs=lambda c: {"last_item_echo": c.embed_dim}, tag=99)  # fmt: skip
    components.register_component(row)
    yield row
    components.MOA_COMPONENTS.remove(row)


def test_a_registered_component_is_built_scored_and_trained_when_switched_on():
    model = make_model(tiny_config(extra_moa=("last_item_echo",)))
    assert "last_item_echo" in model.moa
    assert "last_item_echo" in model.config.mlpg_branch_specs()[0][1]  # a default MLPG input now
    graphdef, params = nnx.split(model)
    batch = batch_for(seed=1)

    def loss(p):
        out = nnx.merge(graphdef, p)(batch)
        return sum(v.sum() for v in out.values())

    grads = jax.grad(loss)(params)
    leaves = jax.tree.leaves(grads["moa"]["last_item_echo"])
    assert leaves and all(np.abs(np.asarray(g)).sum() > 0 for g in leaves)
    # Off by default: the same config without extra_moa builds no such module.
    assert "last_item_echo" not in make_model(tiny_config()).moa


def test_unknown_extra_component_is_an_error_naming_the_field():
    with pytest.raises(ValueError, match="model.extra_moa names 'nope'"):
        make_model(tiny_config(extra_moa=("nope",)))
    assert SCHEMA.num_items > 0

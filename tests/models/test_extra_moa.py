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
                               outputs=lambda c: {"last_item_echo": c.embed_dim})  # fmt: skip
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


def _flat_params(model) -> dict[str, np.ndarray]:
    leaves = jax.tree_util.tree_flatten_with_path(nnx.state(model, nnx.Param))[0]
    return {jax.tree_util.keystr(path): np.asarray(value) for path, value in leaves}


def test_adding_a_component_leaves_every_other_initial_value_unchanged():
    """Initial values come from each part's name (layers/core.named_rngs), not from build order (issue 20)."""
    without = _flat_params(make_model(tiny_config(), seed=3))
    with_extra = _flat_params(make_model(tiny_config(extra_moa=("last_item_echo",)), seed=3))
    added = set(with_extra) - set(without)
    # The new component's own parameters, and one new input projection per MLPG layer that now reads its output.
    assert any("'last_item_echo'" in path for path in added)
    assert all("'last_item_echo'" in path or "'mlpg'" in path for path in added), sorted(added)
    assert set(without) <= set(with_extra)
    changed = [path for path, value in without.items() if not np.array_equal(value, with_extra[path])]
    assert changed == []
    # The seed still matters: the comparison above is not between constants.
    other_seed = _flat_params(make_model(tiny_config(), seed=4))
    assert not np.array_equal(without["['towers']['tables']['tables']['item']['table'].value"],
                              other_seed["['towers']['tables']['tables']['item']['table'].value"])  # fmt: skip


def test_switching_a_builtin_component_off_leaves_the_others_unchanged():
    full = _flat_params(make_model(tiny_config(), seed=3))
    no_hma = _flat_params(make_model(tiny_config(hma={"enabled": False}), seed=3))
    # Without HMA the interaction MLP reads one input less, so its first kernel changes shape; all else is equal.
    interaction_in = "['towers']['interaction']['mlp']['layers'][0]['kernel'].value"
    assert full[interaction_in].shape != no_hma[interaction_in].shape
    kept = [p for p in no_hma if p != interaction_in]
    assert kept and all(np.array_equal(full[p], no_hma[p]) for p in kept)

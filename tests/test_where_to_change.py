"""README "Where to change what": each row done as the README says, from this file, with no project file edited.

A model kind, a MoA module, a dataset with its own settings and an evaluator are defined here, registered
through the public hooks the README names and selected with the ``--set`` overrides it names; each is then
built or run through the project's own entry points (``config.load_config``, ``api``, ``setup``). The dataset
brings its own settings section (``data.<source>.*``), set with ``--set``, validated, shown by ``gesr config show``
and kept in ``config.json``.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from gesr_jax import api, cli, config as config_lib
from gesr_jax.data import batch as batch_lib
from gesr_jax.data import datasets
from gesr_jax.layers.core import Dense
from gesr_jax.models import registry
from gesr_jax.models.base import RankingModel
from gesr_jax.models.config_base import ModelConfigBase
from gesr_jax.models.gesr import components
from gesr_jax.train import evaluators
from gesr_jax.train import setup as setup_lib

SCHEMA = batch_lib.BatchSchema(
    num_users=12, num_items=40, user_features=(("segment", 3),), item_features=(("category", 5), ("creator", 7)),
    num_actions=3, history_len=6, num_candidates=5,
)  # fmt: skip


# --- a model --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class WhereDotConfig(ModelConfigBase):
    kind: str = "where_dot"
    dim: int = 4  # width of the user and item embeddings


class WhereDot(RankingModel):
    """logit = <user[user_id] + mean(item[history]), item[cand_item]> + bias[task]."""

    def __init__(self, config: WhereDotConfig, schema: batch_lib.BatchSchema, *, rngs: nnx.Rngs):
        self.config, self.schema = config, schema
        init = nnx.initializers.normal(0.1)
        self.user = nnx.Param(init(rngs.params(), (schema.num_users + 1, config.dim)))
        self.item = nnx.Param(init(rngs.params(), (schema.num_items + 1, config.dim)))
        self.bias = nnx.Param(jnp.zeros((len(schema.tasks),)))

    def encode_request(self, request, *, key=None, train=False):
        valid = batch_lib.lengths_mask(request["history_len"], request["history_item"].shape[1])
        hist = jnp.where(valid[..., None], self.item[...][request["history_item"]], 0.0).sum(1)
        hist = hist / jnp.maximum(request["history_len"], 1)[:, None]
        return {"user": self.user[...][request["user_id"]] + hist}

    def score(self, state, candidates, *, key=None, train=False, item_cache=None):
        dot = jnp.einsum("bd,bcd->bc", state["user"], self.item[...][candidates["cand_item"]])
        valid = batch_lib.lengths_mask(candidates["num_candidates"], candidates["cand_item"].shape[1])
        return {t: jnp.where(valid, dot + self.bias[...][i], 0.0) for i, t in enumerate(self.schema.tasks)}


def test_a_model_kind_registered_and_selected_with_set_model_kind():
    registry.register_model("where_dot", WhereDotConfig, WhereDot, replace=True)
    cfg = config_lib.load_config("synthetic_tiny", ["model.kind=where_dot", "model.dim=6"])
    assert isinstance(cfg.model, WhereDotConfig) and cfg.model.dim == 6
    graphdef, params = api.init(cfg, seed=0, schema=SCHEMA)
    batch = batch_lib.random_batch(SCHEMA, 4, seed=1)
    logits = api.apply(graphdef, params, batch)
    assert set(logits) == set(SCHEMA.tasks) and logits["consume"].shape == (4, SCHEMA.num_candidates)
    request, candidates = batch_lib.split_batch(batch, SCHEMA)
    state = api.encode_request(graphdef, params, request)
    np.testing.assert_array_equal(api.score(graphdef, params, state, candidates)["engage"], logits["engage"])


# --- a MoA module ---------------------------------------------------------------------------------------


class CreatorEcho(nnx.Module):
    """A per-candidate ("nro") module: the candidate's creator embedding times the last history creator's."""

    @classmethod
    def from_config(cls, config, schema, *, rngs):
        return cls(config.embed_dim, schema.item_vocab("creator"), rngs=rngs)

    def __init__(self, dim, vocab, *, rngs):
        self.table = nnx.Param(jax.random.normal(rngs.params(), (vocab, dim)) * 0.1)
        self.proj = Dense(dim, dim, rngs=rngs)

    def encode_request(self, ctx, *, key=None):
        rows = jnp.arange(ctx.history_len.shape[0])
        return self.table[...][ctx.request["history_creator"][rows, jnp.maximum(ctx.history_len - 1, 0)]]

    def score_candidates(self, cache, ctx, *, key=None):
        return {"creator_echo": self.proj(self.table[...][ctx.candidates["cand_creator"]] * cache[:, None, :])}


@pytest.fixture
def creator_echo():
    row = components.Component("creator_echo", CreatorEcho, stage="nro", route="mlpg",
                               outputs=lambda c: {"creator_echo": c.embed_dim})  # fmt: skip
    components.register_component(row)
    yield row
    components.MOA_COMPONENTS.remove(row)


def test_a_moa_module_registered_and_switched_on_with_set_extra_moa(creator_echo):
    # The other MoA modules off keep the compile small; the row itself is the last override.
    others_off = ["model.hma.enabled=false", "model.hstu.enabled=false", "model.cross.ro=false",
                  "model.cross.nro=false"]
    cfg = config_lib.load_config("synthetic_tiny", [*others_off, "model.extra_moa=creator_echo"])
    graphdef, params = api.init(cfg, seed=0, schema=SCHEMA)
    assert "creator_echo" in params["moa"]
    batch = batch_lib.random_batch(SCHEMA, 3, seed=2)

    def loss(p):
        return sum(v.sum() for v in api.apply(graphdef, p, batch, validate=False).values())

    grads = jax.grad(loss)(params)["moa"]["creator_echo"]
    assert all(np.abs(np.asarray(g)).sum() > 0 for g in jax.tree.leaves(grads))  # its output reaches the logits
    # Without it, MLPG has no input left in this config: switch MLPG off too to build the comparison.
    plain = config_lib.load_config("synthetic_tiny", [*others_off, "model.mlpg.enabled=false"])
    _, without = api.init(plain, seed=0, schema=SCHEMA)
    assert "moa" not in without or "creator_echo" not in without["moa"]


# --- a dataset -----------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class WhereLogSettings:
    """The toy dataset's own section, ``data.where_log.*``."""

    train_requests: int = 24  # requests in the train split
    eval_requests: int = 8  # requests in each of valid and test

    def validate(self) -> None:
        if self.train_requests < 1:
            raise ValueError(f"data.where_log.train_requests must be >= 1, got {self.train_requests}")


class WhereLog:
    """A dataset of random valid requests; history_len and seed come from the shared data section, the split
    sizes from its own section (``data_config.where_log``)."""

    def schema(self, data_config) -> batch_lib.BatchSchema:
        return dataclasses.replace(SCHEMA, history_len=data_config.history_len)

    def load_splits(self, data_config) -> datasets.Splits:
        schema, own = self.schema(data_config), data_config.where_log
        sizes = (own.train_requests, own.eval_requests, own.eval_requests)
        parts = [batch_lib.random_batch(schema, n, seed=data_config.seed + i) for i, n in enumerate(sizes)]
        return datasets.Splits(*parts, schema=schema, stats={"requests": sum(sizes)})

    def item_table(self, data_config) -> dict[str, np.ndarray]:
        rng = np.random.default_rng(data_config.seed)
        return {name: rng.integers(1, vocab, SCHEMA.num_items + 1).astype(np.int32)
                for name, vocab in SCHEMA.item_features}  # fmt: skip


@pytest.fixture
def where_log():
    datasets.register_dataset("where_log", WhereLog(), settings=WhereLogSettings, replace=True)
    yield
    datasets.unregister_dataset("where_log")


def test_a_dataset_registered_and_selected_with_set_data_source(where_log, tmp_path, capsys):
    overrides = ["data.source=where_log", "data.history_len=5", "data.where_log.train_requests=16"]
    cfg = config_lib.load_config("synthetic_tiny_two_tower", overrides)
    assert cfg.data.where_log == WhereLogSettings(train_requests=16)
    schema = datasets.schema_for(cfg.data)
    assert schema.history_len == 5
    splits = datasets.load_splits(cfg.data)
    for name in ("train", "valid", "test"):
        batch_lib.validate_batch(getattr(splits, name), schema)
    assert len(splits.train["user_id"]) == 16 and len(splits.valid["user_id"]) == 8
    # Its section is validated with the rest, shown by `gesr config show` and kept in config.json.
    with pytest.raises(config_lib.ConfigError, match="data.where_log.train_requests must be >= 1"):
        config_lib.load_config("synthetic_tiny_two_tower", ["data.source=where_log", "data.where_log.train_requests=0"])
    with pytest.raises(config_lib.ConfigError, match="data.where_log.train_requests"):
        config_lib.load_config("synthetic_tiny_two_tower", ["data.where_log.train_requests=many"])
    assert cli.main(["config", "show", "synthetic_tiny_two_tower", *(f"--set={o}" for o in overrides)]) == 0
    line = next(l for l in capsys.readouterr().out.splitlines() if " data.where_log.train_requests = " in l)
    assert line.startswith("*") and "16" in line and "# requests in the train split" in line
    config_lib.save_json(cfg, tmp_path / "config.json")
    assert config_lib.load_json(tmp_path / "config.json") == cfg
    graphdef, params = api.init(cfg, seed=0, schema=splits.schema)
    logits = api.apply(graphdef, params, batch_lib.slice_rows(splits.valid, 0, 4))
    assert logits["consume"].shape == (4, schema.num_candidates)


# --- an evaluator ---------------------------------------------------------------------------------------


def _rows_evaluator(context: evaluators.EvalContext):
    def evaluate(params, arrays, split):
        return {"where/rows": float(len(arrays["num_candidates"])),
                "where/candidates": float(np.sum(arrays["num_candidates"]))}  # fmt: skip

    return evaluate


def test_an_evaluator_registered_and_chosen_with_set_train_evaluators():
    evaluators.register_evaluator("where_rows", _rows_evaluator, replace=True)
    cfg = config_lib.load_config("synthetic_tiny_two_tower", ["train.evaluators=candidate,where_rows"])
    setup_lib.validate(cfg)
    built = setup_lib.setup(cfg, training=False)
    out = built.evaluator(built.params, built.splits.valid, "valid")
    assert out["where/rows"] == len(built.splits.valid["num_candidates"]) > 0
    assert out["where/candidates"] == built.splits.valid["num_candidates"].sum()
    assert "consume/ne" in out  # the built-in evaluator still runs beside it

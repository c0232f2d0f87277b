"""A model kind defined entirely in this file trains through gesr_jax.train with no project file edited.

``ToyConfig`` / ``ToyLinear`` are registered under ``model.kind = "toy_linear"``; ``gesr_jax.api`` (the
trainer's default model API) builds it from the model registry, for the schema the data gave.
"""

from __future__ import annotations

import dataclasses
import json

import jax.numpy as jnp
import numpy as np
from flax import nnx

from gesr_jax import cli
from gesr_jax.config import Config
from gesr_jax.data.batch import BatchSchema
from gesr_jax.data.config import DataConfig, SyntheticConfig
from gesr_jax.models import registry
from gesr_jax.models.base import RankingModel
from gesr_jax.models.config_base import ModelConfigBase
from gesr_jax.train import trainer
from gesr_jax.train.config import TrainConfig


@dataclasses.dataclass(frozen=True)
class ToyConfig(ModelConfigBase):
    kind: str = "toy_linear"
    dim: int = 8  # width of the user and item embeddings


class ToyLinear(RankingModel):
    """logit[task] = <user_emb[user_id], item_emb[cand_item]> * scale[task] + bias[task]."""

    def __init__(self, config: ToyConfig, schema: BatchSchema, *, rngs: nnx.Rngs):
        self.config, self.schema = config, schema
        init = nnx.initializers.normal(0.1)
        self.user = nnx.Param(init(rngs.params(), (schema.num_users + 1, config.dim)))
        self.item = nnx.Param(init(rngs.params(), (schema.num_items + 1, config.dim)))
        self.scale = nnx.Param(jnp.ones((len(schema.tasks),)))
        self.bias = nnx.Param(jnp.zeros((len(schema.tasks),)))

    def encode_request(self, request, *, key=None, train=False):
        return {"user": self.user[...][request["user_id"]]}

    def score(self, state, candidates, *, key=None, train=False, item_cache=None):
        items = self.item[...] if item_cache is None else item_cache
        dot = jnp.einsum("bd,bcd->bc", state["user"], items[candidates["cand_item"]])
        c = candidates["cand_item"].shape[1]
        valid = jnp.arange(c)[None, :] < candidates["num_candidates"][:, None]
        scale, bias = self.scale[...], self.bias[...]
        return {t: jnp.where(valid, dot * scale[i] + bias[i], 0.0) for i, t in enumerate(self.schema.tasks)}

    # Optional: what the "ranking" evaluator needs (an item cache and a user vector to dot it with).
    def item_cache_fields(self):
        return ("item",)

    def item_cache(self, item_fields):
        return self.item[...][item_fields["item"]]

    def user_embedding(self, state):
        return state["user"]


registry.register_model("toy_linear", ToyConfig, ToyLinear, description="test-only dot-product model")

TINY_DATA = DataConfig(
    history_len=4, num_positives=2, num_negatives=4, min_history=2,
    synthetic=SyntheticConfig(num_users=60, num_items=200, num_creators=20, num_categories=6, requests_per_user=4),
)  # fmt: skip


def toy_config(**train) -> Config:
    defaults = dict(batch_size=8, eval_batch_size=16, num_steps=5, warmup_steps=1, log_every=5, eval_every=0,
                    checkpoint_every=5)  # fmt: skip
    return Config(name="toy", data=TINY_DATA, model=ToyConfig(), train=TrainConfig(**{**defaults, **train}))


def test_a_model_defined_in_a_test_file_trains_through_gesr_jax_train(tmp_path):
    results = trainer.train_and_evaluate(toy_config(), tmp_path)
    assert results["step"] == 5
    for task in ("consume", "engage"):
        assert np.isfinite(results["test"][f"{task}/ne"])
    assert json.loads((tmp_path / "model.json").read_text()) == {
        "kind": "toy_linear", "api": "gesr_jax.api", "config_module": ToyConfig.__module__,
    }
    # The workdir evaluates again with the same (default) model API and gets the same numbers.
    again = trainer.evaluate_workdir(tmp_path)
    assert again["test"]["consume/ne"] == results["test"]["consume/ne"]


def test_the_toy_model_ranks_the_catalogue_and_trains_from_the_cli(tmp_path, capsys):
    config = tmp_path / "toy_config.py"
    config.write_text(
        "import test_custom_model\n\n"
        "def get_config():\n"
        "    return test_custom_model.toy_config(evaluators=('candidate', 'ranking'))\n"
    )
    assert cli.main(["train", "--config", str(config), "--workdir", str(tmp_path / "run")]) == 0
    results = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert results["test"]["ranking/num_targets"] > 0
    test = results["test"]
    assert 0 < test["ranking/mrr"] <= 1 and test["ranking/hr@50"] >= test["ranking/hr@1"]

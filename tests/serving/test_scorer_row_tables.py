"""A workdir trained with row-sharded tables (saved padded to whole row blocks) serves through the Scorer."""

from __future__ import annotations

import jax
import numpy as np

from gesr_jax import api
from gesr_jax import config as config_lib
from gesr_jax.data import datasets
from gesr_jax.serving.requests import requests_from_batch
from gesr_jax.serving.scorer import Scorer
from gesr_jax.train.trainer import train_and_evaluate


def test_scorer_restores_a_row_sharded_workdir_and_equals_apply(tmp_path):
    config = config_lib.load_config(
        "synthetic_tiny",
        ["model.kind=two_tower", "model.embedding_sharding=row", "train.num_steps=4", "train.checkpoint_every=4",
         "train.eval_every=0", "train.log_every=4"],
    )  # fmt: skip
    train_and_evaluate(config, tmp_path / "run")
    scorer = Scorer.from_workdir(tmp_path / "run")
    assert scorer.step == 4
    splits = datasets.load_splits(config.data)
    batch = {k: np.asarray(v)[:6] for k, v in splits.test.gather(slice(0, 6)).items()} if hasattr(
        splits.test, "gather") else {k: v[:6] for k, v in splits.test.items()}  # fmt: skip
    ref = api.apply(scorer.graphdef, scorer.params, batch)
    for row, result in enumerate(scorer.score(requests_from_batch(batch, splits.schema))):
        c = batch["num_candidates"][row]
        for task in splits.schema.tasks:
            np.testing.assert_allclose(result[task], np.asarray(jax.nn.sigmoid(ref[task][row, :c])), atol=1e-5)

"""GenRank through the serving Scorer (no item cache: GenRank has no item tower) and under jit."""

from __future__ import annotations

import pathlib
import sys

import jax
import numpy as np
import pytest
from flax import nnx

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "serving"))
from serving_helpers import SCHEMA, consistent_batch, item_table  # noqa: E402

from gesr_jax import api  # noqa: E402
from gesr_jax import config as config_lib  # noqa: E402
from gesr_jax.models.config_sections import DecoderSection  # noqa: E402
from gesr_jax.models.genrank.config import GenRankConfig  # noqa: E402
from gesr_jax.models.genrank.model import GenRank  # noqa: E402
from gesr_jax.serving.buckets import Buckets  # noqa: E402
from gesr_jax.serving.scorer import Scorer  # noqa: E402
from gesr_jax.serving.requests import requests_from_batch  # noqa: E402

TABLE = item_table()
TINY = GenRankConfig(embed_dim=8, decoder=DecoderSection(head_dim=4, mlp_dim=8), head_mlp=(8,))


@pytest.mark.parametrize("tokens", ["action", "interleaved"])
def test_scorer_equals_apply_and_has_no_item_cache(tokens):
    model = GenRank(config_lib.replace(TINY, tokens={"layout": tokens}), SCHEMA, rngs=nnx.Rngs(params=0))
    graphdef, params = nnx.split(model)
    batch = consistent_batch(SCHEMA, TABLE, batch_size=3, seed=4)
    scorer = Scorer(graphdef, params, SCHEMA, TABLE, buckets=Buckets((2,), (7,)))
    assert scorer.item_cache is None and scorer.kind == "genrank"
    ref = {t: np.asarray(jax.nn.sigmoid(v)) for t, v in api.apply(graphdef, params, batch).items()}
    jitted = jax.jit(lambda p, b: api.apply(graphdef, p, b, validate=False))(params, batch)
    for row, result in enumerate(scorer.score(requests_from_batch(batch, SCHEMA))):
        c = int(batch["num_candidates"][row])
        for task in SCHEMA.tasks:
            np.testing.assert_allclose(result[task], ref[task][row, :c], atol=1e-5, rtol=0)
            np.testing.assert_allclose(np.asarray(jax.nn.sigmoid(jitted[task]))[row, :c], ref[task][row, :c],
                                       atol=1e-5, rtol=0)  # fmt: skip

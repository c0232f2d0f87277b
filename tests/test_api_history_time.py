"""api.apply and the serving Scorer apply one rule to history times: every event strictly before request_time.

Issue 24: ``api.apply`` accepted events at or after ``request_time`` while the Scorer refused them. Both now
read the rule from the batch schema (``data/batch.py``).
"""

from __future__ import annotations

import numpy as np
import pytest

from gesr_jax import api
from gesr_jax import config as config_lib
from gesr_jax.data import datasets
from gesr_jax.serving.buckets import Buckets
from gesr_jax.serving.requests import RequestError, requests_from_batch
from gesr_jax.serving.scorer import Scorer


@pytest.fixture(scope="module")
def model():
    config = config_lib.load_config("synthetic_tiny")
    schema = datasets.schema_for(config.data)
    graphdef, params = api.init(config, 0, schema)
    batch = api.example_batch(config, 1, 4, schema)
    batch["history_len"][:] = np.maximum(batch["history_len"], 1)  # every row has a last event to move
    n = schema.history_len
    valid = np.arange(n)[None] < batch["history_len"][:, None]
    for key in [k for k in batch if k.startswith("history_") and k != "history_len"]:
        batch[key] = np.where(valid, np.maximum(batch[key], 1), 0).astype(np.int32)
    batch["history_time"] = np.where(valid, batch["request_time"][:, None] - 1000 + np.arange(n), 0).astype(np.int32)
    return graphdef, params, schema, batch


def _last_event_at(batch: dict, row: int, offset: int) -> dict:
    """A copy of ``batch`` whose row ``row`` has its last history event at request_time + offset."""
    out = {k: np.array(v) for k, v in batch.items()}
    out["history_time"][row, out["history_len"][row] - 1] = out["request_time"][row] + offset
    return out


@pytest.mark.parametrize("offset", [0, 5])
def test_apply_and_the_scorer_refuse_an_event_at_or_after_request_time(model, offset):
    graphdef, params, schema, batch = model
    bad = _last_event_at(batch, 2, offset)
    with pytest.raises(ValueError, match=r"history_time'\] row 2 .*request_time"):
        api.apply(graphdef, params, bad)
    scorer = Scorer(graphdef, params, schema, buckets=Buckets((1,), (8,)), use_item_cache=False)
    requests = requests_from_batch(bad, schema)
    with pytest.raises(RequestError) as info:
        scorer.parse(requests[2])
    assert info.value.field == "history_time" and "request_time" in str(info.value)
    for row in (0, 1, 3):  # the other rows pass both checks
        scorer.parse(requests[row])


def test_an_event_one_second_before_request_time_is_accepted_by_both(model):
    graphdef, params, schema, batch = model
    ok = _last_event_at(batch, 2, -1)
    logits = api.apply(graphdef, params, ok)
    assert all(np.all(np.isfinite(np.asarray(v))) for v in logits.values())
    scorer = Scorer(graphdef, params, schema, buckets=Buckets((1,), (8,)), use_item_cache=False)
    scorer.parse(requests_from_batch(ok, schema)[2])

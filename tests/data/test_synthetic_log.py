"""The chunked synthetic log generator writes a valid prepared folder whose requests follow the protocol."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from gesr_jax.data import datasets, prepared, synthetic_log
from gesr_jax.data.batch import validate_batch


def test_generated_log_is_a_valid_prepared_folder(tmp_path):
    dc = synthetic_log.scale_config(history_len=8)
    # Small chunks: users straddle nothing, but requests of many chunks land in each split's columns.
    manifest = synthetic_log.write_prepared_log(30_000, tmp_path / "p", dc, users_per_chunk=37, log=lambda m: None)
    counts, _ = synthetic_log.sizes(30_000)
    assert manifest["stats"]["events"] == counts.sum() == 30_000
    splits = datasets.load_splits(dataclasses.replace(dc, prepared=str(tmp_path / "p")))
    log_time = np.asarray(splits.train.log.time)
    user_of_event = np.repeat(np.arange(1, counts.size + 1), counts)
    for name in ("train", "valid", "test"):
        split = getattr(splits, name)
        assert split.num_requests == manifest["stats"][f"requests_{name}"] > 0
        batch = split.materialise()
        validate_batch(batch, splits.schema)  # ids, lengths, zero padding, history strictly before request_time
        end = np.asarray(split.columns["history_end"])
        # The history is the user's own most recent events, and the next event starts the request.
        assert (user_of_event[end - 1] == batch["user_id"]).all() and (user_of_event[end] == batch["user_id"]).all()
        assert np.array_equal(log_time[end], batch["request_time"])
        positives = np.where(batch["label_consume"] == 1, batch["cand_item"], -1)
        negatives = np.where((batch["label_consume"] == 0) & (batch["cand_item"] > 0), batch["cand_item"], -2)
        assert not (positives[:, :, None] == negatives[:, None, :]).any()
    per_user = np.bincount(splits.test["user_id"], minlength=counts.size + 1)
    assert per_user.max() == 1  # one test request per user (per_user_last)
    # Refused like any prepared folder when the config differs.
    with pytest.raises(prepared.PreparedError, match="data.num_negatives"):
        prepared.open_prepared(dataclasses.replace(dc, prepared=str(tmp_path / "p"), num_negatives=3))

"""The batch layout stated once (issue 20 item 2): validation levels, check_part, random_batch, lengths_mask."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gesr_jax.data import batch as batch_lib
from gesr_jax.data.batch import CANDIDATES, REQUEST, TARGETS, BatchSchema

SCHEMA = BatchSchema(
    num_users=20, num_items=30, user_features=(("segment", 4),), item_features=(("category", 5),),
    num_actions=3, history_len=6, num_candidates=4, has_true_probs=True,
)  # fmt: skip


def _with(batch, key, row, slot, value):
    out = dict(batch)
    out[key] = batch[key].copy()
    out[key][(row, slot) if slot is not None else row] = value
    return out


def test_fields_are_the_layout_every_helper_uses():
    fields = SCHEMA.fields()
    keys = [f.key for f in fields]
    assert len(keys) == len(set(keys))
    assert list(batch_lib.batch_spec(SCHEMA, 2)) == keys == list(batch_lib.empty_batch(SCHEMA, 2))
    groups = batch_lib.batch_groups(SCHEMA)
    assert {k for k, g in groups.items() if g == TARGETS} == {"label_consume", "label_engage", "prob_consume",
                                                              "prob_engage"}  # fmt: skip
    assert groups["num_candidates"] == CANDIDATES and groups["request_time"] == REQUEST
    by_key = SCHEMA.field_map()
    assert (by_key["cand_item"].real_min, by_key["cand_item"].hi) == (1, SCHEMA.num_items)
    assert by_key["history_action"].hi == SCHEMA.num_actions - 1
    # random_batch draws every id of a real slot from the field's real range.
    batch = batch_lib.random_batch(SCHEMA, 64, seed=3)
    for f in fields:
        if f.what == "id":
            assert batch[f.key].max() <= f.hi
    valid = batch_lib.lengths_mask(batch["history_len"], SCHEMA.history_len)
    assert batch["history_item"][valid].min() >= 1 and not batch["history_item"][~valid].any()


@pytest.mark.parametrize("level", ["full", "inputs"])
def test_each_level_names_the_key_and_row(level):
    batch = batch_lib.random_batch(SCHEMA, 5, seed=1)
    batch_lib.validate_batch(batch, SCHEMA, level=level)
    cases = [
        (_with(batch, "cand_item", 2, 0, 31), r"batch\['cand_item'\] row 2 holds 31"),
        (_with(batch, "history_len", 3, None, 7), r"batch\['history_len'\] row 3 holds 7"),
        (_with(batch, "history_item", 1, 0, 0), r"batch\['history_item'\] row 1 holds padding id 0"),
        (_with(batch, "history_time", 0, 0, 2_000_000_000), r"row 0 has an event at or after its request_time"),
        (_with(batch, "request_time", 4, None, -1), r"batch\['request_time'\] row 4 holds -1"),
    ]
    for bad, message in cases:
        with pytest.raises(ValueError, match=message):
            batch_lib.validate_batch(bad, SCHEMA, level=level)


def test_levels_differ_in_what_they_require():
    batch = batch_lib.random_batch(SCHEMA, 3, seed=2)
    # "full" wants zeroed padding and every key; "inputs" reads the model inputs present only.
    garbage = _with(batch, "cand_category", 1, 3, 2)  # row 1 has one candidate: slot 3 is padding
    with pytest.raises(ValueError, match=r"row 1 has a non-zero value in padding slot 3"):
        batch_lib.validate_batch(garbage, SCHEMA)
    batch_lib.validate_batch(garbage, SCHEMA, level="inputs")
    lean = {k: v for k, v in batch.items() if k not in ("cand_category", "label_engage", "user_segment")}
    batch_lib.validate_batch(lean, SCHEMA, level="inputs")
    with pytest.raises(ValueError, match="missing keys"):
        batch_lib.validate_batch(lean, SCHEMA, level="layout")
    # "inputs" takes any width and any integer dtype; "layout" the schema's exactly.
    request, candidates = batch_lib.split_batch(batch, SCHEMA)
    chunk = {k: (v[:, :2] if v.ndim == 2 else v) for k, v in candidates.items()}
    chunk["num_candidates"] = np.minimum(chunk["num_candidates"], 2).astype(np.int64)
    batch_lib.validate_batch({**request, **chunk}, SCHEMA, level="inputs")
    with pytest.raises(ValueError, match="level must be"):
        batch_lib.validate_batch(batch, SCHEMA, level="values")


def test_check_part_is_shape_only_and_works_under_jit():
    batch = batch_lib.random_batch(SCHEMA, 3, seed=4)
    request, candidates = batch_lib.split_batch(batch, SCHEMA)
    assert batch_lib.check_part(candidates, ("cand_category",), SCHEMA, CANDIDATES) == (3, 4)
    chunk = {k: (v[:, :2] if v.ndim == 2 else v) for k, v in candidates.items()}
    assert batch_lib.check_part(chunk, (), SCHEMA, CANDIDATES) == (3, 2)  # any chunk width
    jax.jit(lambda r: batch_lib.check_part(r, ("history_time",), SCHEMA, REQUEST) and 0)(request)
    with pytest.raises(ValueError, match="batch has no 'history_category'"):
        batch_lib.check_part({k: v for k, v in request.items() if k != "history_category"},
                             ("history_category",), SCHEMA, REQUEST)  # fmt: skip
    with pytest.raises(ValueError, match=r"batch\['num_candidates'\] has shape \(2,\), expected \(3,\)"):
        batch_lib.check_part({**candidates, "num_candidates": candidates["num_candidates"][:2]}, (), SCHEMA,
                             CANDIDATES)  # fmt: skip


def test_lengths_mask_is_the_same_for_numpy_and_jax():
    lengths = np.array([0, 2, 5], np.int32)
    host = batch_lib.lengths_mask(lengths, 5)
    assert isinstance(host, np.ndarray) and host.tolist() == [[False] * 5, [True] * 2 + [False] * 3, [True] * 5]
    device = batch_lib.lengths_mask(jnp.asarray(lengths), 5)
    assert isinstance(device, jax.Array)
    np.testing.assert_array_equal(np.asarray(device), host)
    traced = jax.jit(lambda n: batch_lib.lengths_mask(n, 5))(jnp.asarray(lengths))
    np.testing.assert_array_equal(np.asarray(traced), host)


def test_request_counts_come_from_the_schema():
    small = dataclasses.replace(SCHEMA, history_len=3)
    assert small.request_counts() == {batch_lib.HISTORY: (0, 3), batch_lib.CANDIDATE: (1, 10_000)}

"""Damaged checkpoints are detected, told apart from config mismatches, and skipped for an older good step."""

from __future__ import annotations

import json
import shutil

import grain
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
import train_fixtures as fx

from gesr_jax.data import pipeline
from gesr_jax.train import checkpoint, checkpoint_errors
from gesr_jax.train import checksums, sharding, step
from gesr_jax.train.checkpoint import Checkpointer
from gesr_jax.train.checkpoint_errors import CheckpointCorruptError, CheckpointMismatchError, CheckpointWarning
from gesr_jax.train.config import TrainConfig


def _state(seed: int, dim: int = 8):
    mesh = sharding.make_mesh(2)
    _, params = fx.linear_api(dim=dim).init(None, seed)
    params = sharding.place(params, sharding.param_shardings(params, mesh))
    return params, jax.jit(step.make_optimizer(TrainConfig()).init)(params)


def _iterator():
    return pipeline.make_iterator(pipeline.train_dataset(fx.make_splits().train, 8, seed=0))


def _equal(a, b) -> bool:
    return all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


@pytest.fixture
def saved(tmp_path):
    """Steps 1 and 2 (different params, iterator one batch apart) in tmp_path/ck; yields the saved states."""
    it = _iterator()
    states = {1: _state(1), 2: _state(2)}
    with Checkpointer(tmp_path / "ck") as ckpt:
        next(it)
        ckpt.save(1, *states[1], it)
        next(it)
        ckpt.save(2, *states[2], it)
        ckpt.wait()
    return tmp_path / "ck", states


def _array_file(step_dir):
    """The largest file of the step's params: the OCDBT data file holding the embedding tables."""
    return max((p for p in (step_dir / "params").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


def _flip(path, n: int = 64):
    data = bytearray(path.read_bytes())
    start = len(data) // 2 - n // 2
    data[start : start + n] = bytes(b ^ 0xFF for b in data[start : start + n])
    path.write_bytes(bytes(data))


def test_flipped_bytes_are_detected_and_fall_back_to_the_previous_step(saved):
    directory, states = saved
    target = _array_file(directory / "2")
    size = target.stat().st_size
    _flip(target)
    assert target.stat().st_size == size
    template = _state(7)
    with Checkpointer(directory) as ckpt:
        with pytest.raises(CheckpointCorruptError, match=r"checkpoint step 2 in .* is corrupt: checksum mismatch"):
            ckpt.restore(2, params=template[0], opt_state=template[1], data_iterator=_iterator())
        it = _iterator()
        with pytest.warns(CheckpointWarning, match=r"step 2 in .* is corrupt: .*; falling back to step 1"):
            got = ckpt.restore_latest_intact(params=template[0], opt_state=template[1], data_iterator=it)
        assert got.step == 1 and got.skipped == (2,)
        assert _equal(got.params, states[1][0]) and _equal(got.opt_state, states[1][1])
        reference = _iterator()
        next(reference)  # step 1 was saved after one batch
        np.testing.assert_array_equal(next(it)["user_id"], next(reference)["user_id"])
        with pytest.warns(CheckpointWarning, match="falling back to step 1"):
            got_step, params = ckpt.restore_params_latest_intact(template[0])
        assert got_step == 1 and _equal(params, states[1][0])
        with pytest.raises(CheckpointCorruptError, match="step 2"):
            ckpt.restore_latest_intact(
                params=template[0], opt_state=template[1], data_iterator=_iterator(), strict=True
            )
        with pytest.raises(CheckpointCorruptError, match="step 2"):
            ckpt.restore_params_latest_intact(template[0], strict=True)
        assert ckpt.all_steps() == [1, 2]  # without quarantine nothing is moved


def test_truncated_array_file_is_a_one_line_corrupt_error(saved):
    directory, _ = saved
    target = _array_file(directory / "2")
    target.write_bytes(target.read_bytes()[: target.stat().st_size // 2])
    template = _state(7)
    with Checkpointer(directory) as ckpt, pytest.raises(CheckpointCorruptError) as info:
        ckpt.restore_params(2, template[0])
    message = str(info.value)
    assert "\n" not in message and len(message) < 600, message
    assert message.startswith(f"checkpoint step 2 in {directory} is corrupt: ")
    assert not isinstance(info.value, CheckpointMismatchError)


@pytest.mark.parametrize(
    "damage",
    [
        lambda d: (d / "params" / "manifest.ocdbt").unlink(),
        lambda d: (d / "params" / "_METADATA").unlink(),
        lambda d: (d / "params" / "_METADATA").write_text("{garbage"),
        lambda d: (d / "params" / "array_metadatas" / "process_0").write_text("{garbage"),
        lambda d: (d / "step" / "metadata").write_text("{garbage"),
        lambda d: (d / "step" / "metadata").unlink(),
        lambda d: (d / "step" / "metadata").write_text('{"step": 2, "integrity": {"params": {"x": 1}}}'),
        lambda d: (d / "data_iterator" / "process_0-of-1.json").unlink(),
        lambda d: (d / "data_iterator" / "process_0-of-1.json").write_text('{"next_index": 40}'),
    ],
    ids=["no-manifest", "no-metadata", "garbage-metadata", "garbage-array-metadata", "garbage-step-record",
         "no-step-record", "malformed-checksums", "no-iterator-state", "tampered-iterator-state"],  # fmt: skip
)
def test_damaged_metadata_is_corrupt_not_a_mismatch(saved, damage):
    directory, states = saved
    damage(directory / "2")
    template = _state(7)
    with Checkpointer(directory) as ckpt:
        with pytest.raises(CheckpointCorruptError, match=r"step 2 in .* is corrupt: ") as info:
            ckpt.restore(2, params=template[0], opt_state=template[1], data_iterator=_iterator())
        assert "\n" not in str(info.value) and "does not match" not in str(info.value)
        with pytest.warns(CheckpointWarning, match="falling back to step 1"):
            got = ckpt.restore_latest_intact(params=template[0], opt_state=template[1], data_iterator=_iterator())
    assert got.step == 1 and _equal(got.params, states[1][0])


def test_a_real_mismatch_is_a_mismatch_and_is_not_skipped(saved):
    directory, _ = saved
    bigger = _state(0, dim=4)
    with Checkpointer(directory) as ckpt:
        with pytest.raises(CheckpointMismatchError, match=r"does not match the model .*\['item'\].*float32\[61, 8\]"):
            ckpt.restore_params(2, bigger[0])
        with pytest.raises(CheckpointMismatchError):
            ckpt.restore_latest_intact(params=bigger[0], opt_state=bigger[1], data_iterator=_iterator())
        assert issubclass(CheckpointMismatchError, checkpoint_errors.CheckpointError)
        assert issubclass(CheckpointCorruptError, checkpoint_errors.CheckpointError)


def test_every_step_corrupt_raises_and_leaves_the_iterator_alone(saved):
    directory, _ = saved
    for s in (1, 2):
        _flip(_array_file(directory / str(s)))
    template = _state(7)
    it = _iterator()
    next(it)
    before = it.get_state()
    with Checkpointer(directory) as ckpt:
        with pytest.warns(CheckpointWarning) as record:
            with pytest.raises(CheckpointCorruptError, match=r"every checkpoint in .* is corrupt \(step 2: .*step 1: "):
                ckpt.restore_latest_intact(params=template[0], opt_state=template[1], data_iterator=it)
    messages = [str(w.message) for w in record]
    assert "falling back to step 1" in messages[0] and "no older step is left" in messages[1]
    assert it.get_state() == before


def test_quarantine_moves_the_corrupt_step_so_it_can_be_saved_again(saved):
    directory, states = saved
    _flip(_array_file(directory / "2"))
    template = _state(7)
    with Checkpointer(directory) as ckpt:
        with pytest.warns(CheckpointWarning) as record:
            got = ckpt.restore_latest_intact(
                params=template[0], opt_state=template[1], data_iterator=_iterator(), quarantine=True
            )
        assert f"moved corrupt checkpoint step 2 to {directory.parent / 'ck.corrupt' / '2'}" in str(record[1].message)
        assert got.step == 1 and ckpt.all_steps() == [1] and ckpt.latest_step() == 1
        assert (directory.parent / "ck.corrupt" / "2" / "params").is_dir()
        ckpt.save(2, *states[2], _iterator())
        ckpt.wait()
        assert _equal(ckpt.restore_params(2, template[0]), states[2][0])


def test_steps_without_checksums_restore_with_a_warning(tmp_path):
    params, opt_state = _state(3)
    with Checkpointer(tmp_path / "ck") as ckpt:  # the layout written before checksums existed
        args = ocp.args.Composite(
            params=ocp.args.StandardSave(params),
            opt_state=ocp.args.StandardSave(opt_state),
            step=ocp.args.JsonSave({"step": 5, "metadata": {"a": 1}}),
            data_iterator=grain.checkpoint.CheckpointSave(_iterator()),
        )
        ckpt._manager.save(5, args=args, force=True)
        ckpt.wait()
    template = _state(7)
    with Checkpointer(tmp_path / "ck") as ckpt:
        with pytest.warns(CheckpointWarning, match="step 5 .* has no checksums .* unverified"):
            got_params, got_opt, got_step, meta = ckpt.restore(
                5, params=template[0], opt_state=template[1], data_iterator=_iterator()
            )
        assert got_step == 5 and meta == {"a": 1} and _equal(got_params, params) and _equal(got_opt, opt_state)
        with pytest.warns(CheckpointWarning), pytest.raises(CheckpointMismatchError, match="does not match"):
            ckpt.restore_params(5, _state(0, dim=4)[0])


def test_nonfinite_counts_and_nonfinite_steps_are_refused(tmp_path):
    params, opt_state = _state(0)
    assert checksums.all_finite(params) and checksums.count_nonfinite(opt_state) == 0
    bad = jax.tree.map(lambda x: x.at[0].set(jnp.nan) if x.ndim == 2 else x, params)
    assert checksums.count_nonfinite(bad) == 8 + 8 + 2  # row 0 of user [401, 8], item [61, 8] and w [8, 2]
    assert not checksums.all_finite(bad)
    assert checksums.count_nonfinite({"i": jnp.arange(3), "f": jnp.array([jnp.inf, 1.0])}) == 1
    with Checkpointer(tmp_path / "ck") as ckpt:
        ckpt.save(1, bad, opt_state, _iterator())
        ckpt.wait()
        with pytest.raises(CheckpointCorruptError, match=r"params holds \d+ NaN/Inf values"):
            ckpt.restore_params(1, params)


def test_saved_record_is_plain_json(saved):
    directory, states = saved
    record = json.loads((directory / "2" / "step" / "metadata").read_text())
    assert record["step"] == 2 and record["integrity"]["version"] == checkpoint.INTEGRITY_VERSION
    leaves = record["integrity"]["params"]
    assert set(leaves) == set(checksums.leaf_specs(states[2][0]))
    assert all(len(v["sha256"]) == 64 for v in leaves.values())
    shutil.rmtree(directory / "1")  # steps are independent folders
    with Checkpointer(directory) as ckpt:
        assert _equal(ckpt.restore_params(2, _state(7)[0]), states[2][0])


def test_cleanup_partial_removes_cut_short_saves_only_when_asked(saved):
    directory, _ = saved
    partial = directory / "3.orbax-checkpoint-tmp-1700000000000000"  # what a kill during a save leaves
    (partial / "params").mkdir(parents=True)
    with Checkpointer(directory) as ckpt:  # e.g. `gesr eval` beside a running training: hands off
        assert ckpt.all_steps() == [1, 2]
    assert partial.exists()
    with Checkpointer(directory, cleanup_partial=True) as ckpt:
        assert ckpt.all_steps() == [1, 2]
    assert not partial.exists()

"""GenRank (issue 13): candidate mask, stop-gradient history outputs, ALiBi, interleaved layout, serving split,
training through `gesr train`. Tiny shapes: embed 8, N 6, C 4, B 3."""

from __future__ import annotations

import dataclasses
import json
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from gesr_jax import cli
from gesr_jax import config as config_lib
from gesr_jax.data.batch import split_batch
from gesr_jax.models.genrank.block import DecoderBlock
from gesr_jax.models.config_sections import DecoderSection
from gesr_jax.models.genrank.config import GenRankConfig
from gesr_jax.models.genrank.model import GenRank
from gesr_jax.models.genrank.tokens import interleave
from kernels.hstu_attention import attention_mask, geometric_alibi_slopes
from helpers.models import SCHEMA, batch_for, candidate_chunks

TINY = GenRankConfig(embed_dim=8, decoder=DecoderSection(head_dim=4, mlp_dim=8), head_mlp=(8,))
LAYOUTS = [{}, {"tokens": {"layout": "interleaved"}}]
LAYOUT_IDS = ["action", "interleaved"]
CAND_KEYS = ("cand_item", "cand_category", "cand_creator")


def make(seed: int = 0, schema=SCHEMA, **overrides) -> GenRank:
    return GenRank(config_lib.replace(TINY, **overrides), schema, rngs=nnx.Rngs(params=seed))


def _np(logits: dict) -> np.ndarray:
    return np.stack([np.asarray(logits[t]) for t in SCHEMA.tasks], -1)


# --- candidates never see each other ---


@pytest.mark.parametrize("overrides", LAYOUTS, ids=LAYOUT_IDS)
def test_permuting_candidates_permutes_logits(overrides):
    model = make(**overrides, decoder={"time_alibi": True})
    batch = batch_for(seed=1)
    base = _np(model(batch))
    perm_batch = {k: v.copy() for k, v in batch.items()}
    rng = np.random.default_rng(0)
    perms = []
    for r in range(3):
        nc = batch["num_candidates"][r]
        perm = np.concatenate([rng.permutation(nc), np.arange(nc, SCHEMA.num_candidates)])
        perms.append(perm)
        for key in CAND_KEYS:
            perm_batch[key][r] = batch[key][r, perm]
    out = _np(model(perm_batch))
    for r in range(3):
        np.testing.assert_allclose(out[r], base[r, perms[r]], atol=1e-5)


@pytest.mark.parametrize("overrides", LAYOUTS, ids=LAYOUT_IDS)
def test_changing_one_candidate_changes_only_its_logit(overrides):
    model = make(**overrides)
    batch = batch_for(seed=2)
    base = _np(model(batch))
    changed = {k: v.copy() for k, v in batch.items()}
    changed["cand_item"][0, 1] = 1 + (batch["cand_item"][0, 1] % SCHEMA.num_items)
    changed["cand_category"][0, 1] = 1 + (batch["cand_category"][0, 1] % 4)
    out = _np(model(changed))
    np.testing.assert_allclose(out[0, [0, 2, 3]], base[0, [0, 2, 3]], atol=1e-6)
    np.testing.assert_allclose(out[1:], base[1:], atol=1e-6)
    assert not np.allclose(out[0, 1], base[0, 1], atol=1e-4)


def test_padded_candidate_slots_are_zero_and_history_changes_the_logits():
    model = make()
    batch = batch_for(seed=3)
    out = _np(model(batch))
    for r in range(3):
        assert np.all(out[r, batch["num_candidates"][r]:] == 0)
    changed = {k: v.copy() for k, v in batch.items()}
    changed["history_action"][0, 0] = 3 - batch["history_action"][0, 0]  # actions are 1..2
    assert not np.allclose(_np(model(changed))[0], out[0], atol=1e-5)


@pytest.mark.parametrize("overrides", LAYOUTS, ids=LAYOUT_IDS)
def test_extra_history_padding_changes_nothing(overrides):
    # Positions count back from the most recent event and requests from the most recent request, so widening
    # the history arrays with padding slots (serving passes any width) leaves every logit unchanged.
    model = make(**overrides, decoder={"time_alibi": True})
    batch = batch_for(seed=11)
    batch["history_len"] = np.minimum(batch["history_len"], 4).astype(np.int32)
    for key in [k for k in batch if k.startswith("history_") and k != "history_len"]:
        batch[key][:, 4:] = 0
    wide = dict(batch)
    for key in [k for k in batch if k.startswith("history_") and k != "history_len"]:
        wide[key] = np.concatenate([batch[key], np.zeros((3, 5), batch[key].dtype)], axis=1)
    np.testing.assert_allclose(_np(model(wide)), _np(model(batch)), atol=2e-6)


def test_bfloat16_compute_runs_and_stays_close_to_float32():
    batch = batch_for(seed=12)
    a, b = _np(make()(batch)), _np(make(decoder={"compute_dtype": "bfloat16"})(batch))
    assert b.dtype == np.float32 and np.all(np.isfinite(b))
    np.testing.assert_allclose(b, a, atol=0.05)


# --- history outputs are stop-gradient ---


def test_last_block_history_outputs_get_no_gradient_and_earlier_ones_only_reach_via_attention():
    model = make(decoder={"layers": 2}, dropout=0.0)
    batch = {k: jnp.asarray(v) for k, v in batch_for(seed=4).items()}
    width = model.pack_inputs(batch)["tokens"].shape[1]
    probes = [jnp.zeros((3, width, TINY.embed_dim)) for _ in range(2)]

    def loss(p):
        _, logits = model.sequence(batch, probes=p)
        return sum(jnp.sum(jnp.square(logits[t])) for t in SCHEMA.tasks)

    grads = jax.grad(loss)(probes)
    hlen, nc = np.asarray(batch["history_len"]), np.asarray(batch["num_candidates"])
    for r in range(3):
        hist_rows, cand_rows = slice(0, hlen[r]), slice(hlen[r], hlen[r] + nc[r])
        last, first = np.asarray(grads[1][r]), np.asarray(grads[0][r])
        assert np.all(last[hist_rows] == 0), "last-block history outputs must not reach the loss"
        assert np.abs(last[cand_rows]).sum() > 0
        # Block 0's history outputs feed block 1's history K/V, the one path from history outputs to logits.
        assert np.abs(first[hist_rows]).sum() > 0
        assert np.all(first[hlen[r] + nc[r]:] == 0) and np.all(last[hlen[r] + nc[r]:] == 0)


def test_the_last_block_never_computes_history_outputs_and_history_runs_once():
    model = make(decoder={"layers": 3})
    request, candidates = split_batch(batch_for(seed=5), SCHEMA)
    with mock.patch.object(DecoderBlock, "history", autospec=True, side_effect=DecoderBlock.history) as hist, \
         mock.patch.object(DecoderBlock, "history_kv", autospec=True, side_effect=DecoderBlock.history_kv) as kv, \
         mock.patch.object(DecoderBlock, "finish", autospec=True, side_effect=DecoderBlock.finish) as finish:
        state = model.encode_request(request)
        assert (hist.call_count, kv.call_count) == (2, 1)
        assert all(call.args[0] is not model.blocks[2] for call in hist.call_args_list)
        assert kv.call_args.args[0] is model.blocks[2]
        # No block output is computed for history rows in the last block: finish ran on N-row inputs twice only.
        assert finish.call_count == 2
        for size in (1, 2):
            model.score(state, {k: v[:, :size] if v.ndim == 2 else np.minimum(v, size) for k, v in candidates.items()})
        assert (hist.call_count, kv.call_count) == (2, 1)
        assert all(call.args[1].shape[1] in (1, 2) for call in finish.call_args_list[2:])  # candidate rows only


# --- ALiBi matches a dense reference ---


def _dense_attention(q, k, v, lengths, num_targets, times, alibi, time_slopes):
    """Hand-written target-aware softmax attention with dense [B, H, L, L] ALiBi + time bias."""
    b, length, h, d = q.shape
    hist = np.asarray(lengths - num_targets)
    mask = np.zeros((b, 1, length, length), bool)
    dist = np.zeros((b, 1, length, length), np.float32)
    for r in range(b):
        for i in range(int(lengths[r])):
            for j in range(int(lengths[r])):
                if i < hist[r]:
                    mask[r, 0, i, j] = j <= i  # history: causal
                else:
                    mask[r, 0, i, j] = j < hist[r] or j == i  # candidate: the whole history and itself
                dist[r, 0, i, j] = min(i, hist[r]) - min(j, hist[r])
    t = np.asarray(times, np.float64)
    dt = np.log1p(np.abs(t[:, None, :, None] - t[:, None, None, :])).astype(np.float32)
    bias = -np.asarray(alibi)[None, :, None, None] * dist - np.asarray(time_slopes)[None, :, None, None] * dt
    return jax.nn.dot_product_attention(q, k, v, bias=jnp.asarray(bias), mask=jnp.asarray(mask)), mask


@pytest.mark.parametrize("overrides", LAYOUTS, ids=LAYOUT_IDS)
def test_alibi_and_time_bias_match_a_dense_reference(overrides):
    model = make(decoder={"layers": 1, "time_alibi": True}, **overrides)
    batch = {k: jnp.asarray(v) for k, v in batch_for(seed=6).items()}
    inputs = model.pack_inputs(batch)
    x, lengths, nt, times = inputs["tokens"], inputs["lengths"], inputs["num_targets"], inputs["times"]
    block = model.blocks[0]
    alibi, time_slopes = model.slopes()
    np.testing.assert_allclose(np.asarray(alibi), np.exp2(-8.0 * np.arange(1, 3) / 2))
    got = block.attention_full(x, lengths, nt, **model.bias_args(times))
    q, k, v = block.project(x)
    want, mask = _dense_attention(q, k, v, lengths, nt, times, alibi, time_slopes)
    valid = mask.any(-1)[:, 0]  # rows with at least one key
    np.testing.assert_allclose(np.asarray(got)[valid], np.asarray(want)[valid], atol=2e-6)
    # The bias matters: without it the attention differs.
    plain = block.attention_full(x, lengths, nt)
    assert not np.allclose(np.asarray(plain)[valid], np.asarray(got)[valid], atol=1e-4)


@pytest.mark.parametrize("time_alibi", [False, True])
def test_learnable_slopes_are_params_and_get_gradients_through_the_kernel(time_alibi):
    model = make(decoder={"learnable_slopes": True, "time_alibi": time_alibi})
    graphdef, params = nnx.split(model)
    batch = batch_for(seed=7)

    def loss(p):
        logits = nnx.merge(graphdef, p)(batch)
        return sum(jnp.sum(jnp.square(logits[t])) for t in SCHEMA.tasks)

    grads = jax.grad(loss)(params)
    names = ["alibi_slopes"] + (["time_slopes"] if time_alibi else [])
    for name in names:
        g = np.asarray(grads[name][...])
        assert g.shape == (TINY.decoder.heads,) and np.all(np.isfinite(g)) and np.abs(g).sum() > 0
    fixed_paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(nnx.split(make())[1])]
    assert fixed_paths and not any("slopes" in p for p in fixed_paths)


# --- the interleaved baseline ---


HAND = dataclasses.replace(SCHEMA, history_len=3)


def _hand_batch():
    """One request: N = 3 slots, 2 events, 2 of C = 4 candidates."""
    batch = {k: np.zeros_like(v) for k, v in batch_for(HAND, batch_size=1).items()}
    batch["history_item"][0, :2] = [5, 7]
    batch["history_category"][0, :2] = [1, 2]
    batch["history_creator"][0, :2] = [3, 4]
    batch["history_action"][0, :2] = [1, 2]
    batch["history_time"][0, :2] = [1000, 5000]
    batch["history_len"][0] = 2
    batch["request_time"][0] = 9000
    batch["cand_item"][0, :2] = [9, 11]
    batch["cand_category"][0, :2] = [3, 4]
    batch["cand_creator"][0, :2] = [5, 1]
    batch["num_candidates"][0] = 2
    batch["user_id"][0] = 1
    return batch


def test_interleave_orders_item_then_action_per_event():
    item = jnp.array([[[1.0], [2.0], [3.0]]])
    action = jnp.array([[[10.0], [20.0], [30.0]]])
    np.testing.assert_array_equal(np.asarray(interleave(item, action))[0, :, 0], [1, 10, 2, 20, 3, 30])


def test_interleaved_sequence_on_a_hand_built_example():
    batch = _hand_batch()
    plain = make(tokens={"layout": "interleaved", "position": False, "request": False, "time": False}, schema=HAND)
    inputs = plain.pack_inputs(batch)
    t = plain.tokens
    emb = {f: t.tables.tables[f].table[...] for f in ("item", "category", "creator")}
    act = t.action.table[...]

    def item_row(item, cat, cre):
        return emb["item"][item] + emb["category"][cat] + emb["creator"][cre]

    expected = jnp.stack([
        item_row(5, 1, 3), act[1], item_row(7, 2, 4), act[2],      # x_1, a_1, x_2, a_2
        item_row(9, 3, 5), item_row(11, 4, 1),                      # candidate item tokens (no M, no action slot)
        jnp.zeros(8), jnp.zeros(8), jnp.zeros(8), jnp.zeros(8),     # padding: 2 history slots, 2 candidate slots
    ])  # fmt: skip
    np.testing.assert_allclose(np.asarray(inputs["tokens"][0]), np.asarray(expected), atol=1e-7)
    assert int(inputs["lengths"][0]) == 6 and int(inputs["num_targets"][0]) == 2
    assert int(inputs["history_len"][0]) == 4
    np.testing.assert_array_equal(np.asarray(inputs["times"][0]), [1000, 1000, 5000, 5000, 9000, 9000, 0, 0, 0, 0])
    # The mask the kernel applies for these lengths: history causal, each candidate item token sees all four
    # history tokens and itself, never the other candidate; padding sees nothing.
    mask = np.asarray(attention_mask(inputs["lengths"], inputs["num_targets"], 10))[0].astype(int)
    want = np.zeros((10, 10), int)
    for i in range(4):
        want[i, : i + 1] = 1
    want[4, [0, 1, 2, 3, 4]] = 1
    want[5, [0, 1, 2, 3, 5]] = 1
    np.testing.assert_array_equal(mask, want)
    # With the context embeddings on, both tokens of an event carry the same per-event context.
    full = make(tokens={"layout": "interleaved"}, schema=HAND)
    full_inputs, ft = full.pack_inputs(batch), full.tokens
    fe = {f: ft.tables.tables[f].table[...] for f in ("item", "category", "creator")}
    tok = full_inputs["tokens"][0]
    ctx_item = tok[0] - (fe["item"][5] + fe["category"][1] + fe["creator"][3])
    ctx_action = tok[1] - ft.action.table[...][1]
    np.testing.assert_allclose(np.asarray(ctx_item), np.asarray(ctx_action), atol=1e-6)


def test_interleaved_history_is_twice_as_long_as_action_oriented():
    batch = batch_for(seed=8)
    request, _ = split_batch(batch, SCHEMA)
    for overrides, tokens in ((LAYOUTS[0], SCHEMA.history_len), (LAYOUTS[1], 2 * SCHEMA.history_len)):
        state = make(**overrides).encode_request(request)
        assert all(k.shape[1] == tokens and v.shape[1] == tokens for k, v in state["kv"])
        factor = 1 if tokens == SCHEMA.history_len else 2
        np.testing.assert_array_equal(np.asarray(state["history_len"]), factor * batch["history_len"])


# --- serving split: chunked score == apply == one pass ---


_chunks = candidate_chunks


def _score_in_chunks(model, batch, size: int) -> np.ndarray:
    request, candidates = split_batch(batch, model.schema)
    state = model.encode_request(request)
    out = np.zeros((*batch["cand_item"].shape, len(SCHEMA.tasks)), np.float32)
    for start, part in _chunks(candidates, size):
        out[:, start : start + part["cand_item"].shape[1]] = _np(model.score(state, part))
    return out


VARIANTS = [
    {}, {"tokens": {"layout": "interleaved"}}, {"decoder": {"time_alibi": True, "learnable_slopes": True}},
    {"decoder": {"attention": "hstu", "mlp": "gelu", "alibi": False}},
]  # fmt: skip


@pytest.mark.parametrize("overrides", VARIANTS, ids=["action", "interleaved", "time_alibi", "hstu_gelu"])
def test_chunked_score_equals_apply_and_the_one_pass_sequence(overrides):
    model = make(**overrides)
    batch = batch_for(batch_size=3, seed=9)
    full = _np(model(batch))
    for size in (1, SCHEMA.num_candidates):
        np.testing.assert_allclose(_score_in_chunks(model, batch, size), full, atol=2e-6, rtol=2e-6)
    _, one_pass = model.sequence(batch)
    np.testing.assert_allclose(_np(one_pass), full, atol=2e-6, rtol=2e-6)


def test_dropout_needs_a_key_and_is_deterministic_given_one():
    model = make(dropout=0.3)
    batch = batch_for(seed=10)
    with pytest.raises(ValueError, match="PRNG key"):
        model(batch, train=True)
    key = jax.random.key(0)
    a, b = _np(model(batch, key=key, train=True)), _np(model(batch, key=key, train=True))
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, _np(model(batch)), atol=1e-5)
    np.testing.assert_array_equal(_np(model(batch, key=key)), _np(model(batch)))  # train=False ignores the key


# --- training through the CLI ---

TINY_SETS = [
    "train.num_steps=5", "train.batch_size=8", "train.eval_batch_size=16", "train.eval_every=0",
    "train.checkpoint_every=5", "train.log_every=5", "train.warmup_steps=1", "data.history_len=4",
    "data.num_positives=2", "data.num_negatives=4", "data.min_history=2", "data.synthetic.num_users=60",
    "data.synthetic.num_items=200", "data.synthetic.num_creators=20", "data.synthetic.num_categories=6",
    "data.synthetic.requests_per_user=4", "model.embed_dim=8", "model.decoder.head_dim=4",
    "model.decoder.mlp_dim=8", "model.head_mlp=8",
]  # fmt: skip


def test_a_tiny_genrank_trains_through_gesr_train(tmp_path, capsys):
    sets = [a for s in TINY_SETS for a in ("--set", s)]
    assert cli.main(["train", "--config", "synthetic_genrank", "--workdir", str(tmp_path), *sets]) == 0
    results = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert results["step"] == 5
    assert all(np.isfinite(results["test"][f"{t}/ne"]) for t in SCHEMA.tasks)
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train = [x for x in lines if x.get("split") == "train"]
    assert train and all(np.isfinite(x["loss"]) for x in train)
    assert json.loads((tmp_path / "model.json").read_text())["kind"] == "genrank"
    # `gesr eval` restores the checkpoint and reproduces the test metrics.
    assert cli.main(["eval", "--workdir", str(tmp_path)]) == 0
    again = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert again["test"]["consume/ne"] == pytest.approx(results["test"]["consume/ne"], abs=1e-6)

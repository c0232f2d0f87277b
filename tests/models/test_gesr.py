"""Properties of the assembled GESR model (issue 4): candidate isolation, causality, padding, gradients, jit."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from gesr_jax.data.batch import BatchSchema, pad_rows, random_batch
from helpers.models import SCHEMA, TINY, batch_for, jitted, make_model, tiny_config

CAND_KEYS = ("cand_item", "cand_category", "cand_creator")
HIST_KEYS = ("history_item", "history_category", "history_creator", "history_action")


@pytest.fixture(scope="module")
def full():
    model = make_model()
    run, params = jitted(model)
    return model, run, params


def _logits(out) -> np.ndarray:
    return np.stack([np.asarray(out[t]) for t in SCHEMA.tasks], -1)


def test_logits_shape_and_padding_slots(full):
    _, run, params = full
    batch = batch_for()
    out = _logits(run(params, batch))
    assert out.shape == (3, SCHEMA.num_candidates, 2)
    valid = np.arange(4)[None] < batch["num_candidates"][:, None]
    assert np.all(np.isfinite(out)) and not out[~valid].any()


def test_permuting_candidates_permutes_logits(full):
    _, run, params = full
    batch = batch_for(seed=1)
    base = _logits(run(params, batch))
    perm_batch = {k: v.copy() for k, v in batch.items()}
    rng = np.random.default_rng(0)
    perms = []
    for r in range(3):
        nc = batch["num_candidates"][r]
        perm = np.concatenate([rng.permutation(nc), np.arange(nc, 4)])
        perms.append(perm)
        for key in CAND_KEYS:
            perm_batch[key][r] = batch[key][r, perm]
    out = _logits(run(params, perm_batch))
    for r in range(3):
        np.testing.assert_allclose(out[r], base[r, perms[r]], atol=1e-5)


def test_changing_one_candidate_leaves_the_others_unchanged(full):
    _, run, params = full
    batch = batch_for(seed=2)
    base = _logits(run(params, batch))
    changed = {k: v.copy() for k, v in batch.items()}
    changed["cand_item"][0, 1] = 1 + (batch["cand_item"][0, 1] % SCHEMA.num_items)
    changed["cand_category"][0, 1] = 1 + (batch["cand_category"][0, 1] % 4)
    out = _logits(run(params, changed))
    others = [0, 2, 3]
    np.testing.assert_allclose(out[0, others], base[0, others], atol=1e-5)
    np.testing.assert_allclose(out[1:], base[1:], atol=1e-5)
    assert not np.allclose(out[0, 1], base[0, 1], atol=1e-4)


def test_changing_history_event_t_changes_nothing_before_t(full):
    model, _, _ = full
    graphdef, params = nnx.split(model)
    seq_fn = jax.jit(lambda p, b: nnx.merge(graphdef, p).hstu_sequence(b))
    batch = batch_for(seed=3)  # row 0 has a full history of 6 events
    t = 2
    changed = {k: v.copy() for k, v in batch.items()}
    for key in HIST_KEYS:
        changed[key][0, t] = 1 + (batch[key][0, t] % (2 if key == "history_action" else 4))
    changed["history_time"][0, t] = (batch["history_time"][0, t - 1] + batch["history_time"][0, t]) // 2
    seq, seq2 = np.asarray(seq_fn(params, batch)), np.asarray(seq_fn(params, changed))
    np.testing.assert_allclose(seq2[0, :t], seq[0, :t], atol=1e-6)
    assert not np.allclose(seq2[0, t], seq[0, t], atol=1e-4)
    np.testing.assert_allclose(seq2[1:], seq[1:], atol=1e-6)


def _pad_batch(batch, extra_n: int, extra_c: int):
    out = {}
    for key, value in batch.items():
        if key.startswith("history_") and key != "history_len":
            out[key] = np.pad(value, ((0, 0), (0, extra_n)))
        elif key.startswith(("cand_", "label_", "prob_")):
            out[key] = np.pad(value, ((0, 0), (0, extra_c)))
        else:
            out[key] = value
    return out


def test_appending_padding_leaves_valid_logits_unchanged(full):
    _, run, params = full
    batch = batch_for(seed=4)
    base = _logits(run(params, batch))
    out = _logits(run(params, _pad_batch(batch, 3, 2)))
    np.testing.assert_allclose(out[:, :4], base, atol=1e-5)
    assert not out[:, 4:].any()
    rows = _logits(run(params, pad_rows(batch, 5)))  # empty padding rows: zeros, no NaN
    np.testing.assert_allclose(rows[:3], base, atol=1e-5)
    assert np.all(np.isfinite(rows)) and not rows[3:].any()


def _loss(graphdef, params, batch, *, key=None, train=False):
    out = nnx.merge(graphdef, params)(batch, key=key, train=train)
    valid = jnp.arange(batch["cand_item"].shape[1])[None] < batch["num_candidates"][:, None]
    total = 0.0
    for task, logit in out.items():
        y = batch[f"label_{task}"]
        bce = jnp.maximum(logit, 0) - logit * y + jnp.log1p(jnp.exp(-jnp.abs(logit)))
        total = total + jnp.sum(jnp.where(valid, bce, 0.0))
    return total


def test_every_parameter_gets_a_nonzero_gradient(full):
    model, _, _ = full
    graphdef, params = nnx.split(model)
    batch = pad_rows(batch_for(batch_size=4, seed=5), 5)  # includes an empty row
    grads = jax.jit(jax.grad(lambda p, b: _loss(graphdef, p, b)))(params, batch)
    leaves = jax.tree_util.tree_leaves_with_path(grads)
    assert len(leaves) > 40
    for path, g in leaves:
        g = np.asarray(g)
        assert np.all(np.isfinite(g)), jax.tree_util.keystr(path)
        assert np.abs(g).sum() > 0, f"zero gradient for {jax.tree_util.keystr(path)}"


def test_without_mlpg_the_attention_modules_still_train():
    # Its inputs move into the main interaction; nothing is computed and then dropped.
    model = make_model(tiny_config(mlpg={"enabled": False}))
    graphdef, params = nnx.split(model)
    grads = jax.grad(lambda p, b: _loss(graphdef, p, b))(params, batch_for(batch_size=4, seed=5))
    for part in ("hstu", "ro_cross", "nro_cross"):
        leaves = jax.tree_util.tree_leaves(grads["moa"][part])
        assert leaves and all(np.abs(np.asarray(g)).sum() > 0 for g in leaves), part


def test_jit_compiles_once_per_shape(full):
    model, _, _ = full
    graphdef, params = nnx.split(model)

    @jax.jit
    @chex.assert_max_traces(n=1)
    def run(p, b):
        return nnx.merge(graphdef, p)(b)

    for seed in range(3):  # new values, same shapes: no retrace
        run(params, batch_for(seed=seed))
    with pytest.raises(AssertionError):
        run(params, batch_for(batch_size=2))  # a new shape traces again


def test_only_params_and_logical_axis_names(full):
    model, _, _ = full
    state = nnx.state(model)
    variables = jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, nnx.Variable))
    assert {type(v) for v in variables} == {nnx.Param}
    specs = jax.tree.leaves(nnx.get_partition_spec(state), is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
    names = {n for spec in specs for n in spec}
    assert names <= {"vocab", "embed", "mlp", "heads", None}
    assert {"vocab", "embed", "mlp", "heads"} <= names


MOA_KEYS = {"hma", "tokens", "hstu", "ro_cross", "nro_cross", "mlpg"}


def _top_keys(model) -> set[str]:
    """Top-level modules, with the MoA components (under ``model.moa``) listed by name."""
    state = nnx.state(model)
    return (set(state.keys()) - {"moa"}) | set(state["moa"].keys() if "moa" in state else ())


def test_all_switches_off_is_exactly_the_two_tower_model():
    model = make_model(TINY.moa_off())
    assert _top_keys(model) == {"towers"}
    off = dict(hma={"enabled": False}, hstu={"enabled": False}, cross={"ro": False, "nro": False},
               mlpg={"enabled": False})  # fmt: skip
    baseline = make_model(tiny_config(**off))
    same = jax.tree.map(lambda a, b: np.array_equal(a, b), nnx.state(model), nnx.state(baseline))
    assert all(jax.tree.leaves(same))
    run, params = jitted(model)
    batch = batch_for(seed=6)
    out = _logits(run(params, batch))
    # Two-tower: a candidate's logit is a function of (its request's user side, the candidate alone).
    swapped = {k: v.copy() for k, v in batch.items()}
    for key in CAND_KEYS:
        swapped[key][0, 0], swapped[key][1, 0] = batch[key][1, 0], batch[key][0, 0]
    for key in [k for k in batch if k.startswith(("user_", "history_"))] + ["request_time"]:
        swapped[key][1] = batch[key][0]
    out2 = _logits(run(params, swapped))
    np.testing.assert_allclose(out2[1, 0], out[0, 0], atol=1e-5)


@pytest.mark.parametrize(
    ("switch", "removed"),
    [
        (("hma", "enabled"), {"hma"}),
        (("hstu", "enabled"), {"hstu"}),
        (("cross", "ro"), {"ro_cross"}),
        (("cross", "nro"), {"nro_cross"}),
        (("mlpg", "enabled"), {"mlpg"}),
    ],
)
def test_each_switch_removes_its_module(switch, removed):
    section, field = switch
    model = make_model(tiny_config(**{section: {field: False}}))
    assert _top_keys(model) == ({"towers"} | MOA_KEYS) - removed
    run, params = jitted(model)
    out = _logits(run(params, batch_for()))
    assert np.all(np.isfinite(out))


def test_without_target_awareness_hstu_sees_no_candidate(full):
    model = make_model(tiny_config(hstu={"target_aware": False}, cross={"nro": False}, hma={"enabled": False}))
    batch = {k: jnp.asarray(v) for k, v in batch_for(seed=7).items()}
    tokens = model.tokens
    hstu = model.moa["hstu"](tokens.history(batch), tokens.candidates(batch), batch["history_len"], batch["num_candidates"])
    assert hstu.shape == (3, 1, 8)
    full_model, _, _ = full
    assert jax.tree.map(jnp.shape, nnx.state(model.moa["hstu"])) == jax.tree.map(jnp.shape, nnx.state(full_model.moa["hstu"]))


def test_config_naming_a_missing_field_fails_with_the_key_and_choices():
    choices = r"\['item', 'category', 'creator', 'action'\]"
    with pytest.raises(ValueError, match=r"model.history_fields names 'genre'.*" + choices):
        make_model(tiny_config(history_fields=("item", "genre")))
    with pytest.raises(ValueError, match=r"model.candidate_fields names 'director'"):
        make_model(tiny_config(candidate_fields=("director",)))
    with pytest.raises(ValueError, match=r"model.cross.nro_query_fields names 'year'"):
        make_model(tiny_config(cross={"nro_query_fields": ("year",)}))
    make_model(tiny_config(hma={"enabled": False, "pairs": (("genre", "genre"),)}))  # unused pairs are not checked


def test_item_cache_gives_the_same_logits(full):
    model, _, _ = full
    graphdef, params = nnx.split(model)
    rng = np.random.default_rng(0)
    items = {
        "item": np.arange(SCHEMA.num_items + 1, dtype=np.int32),
        "category": rng.integers(1, 5, SCHEMA.num_items + 1).astype(np.int32),
        "creator": rng.integers(1, 6, SCHEMA.num_items + 1).astype(np.int32),
    }
    batch = batch_for(seed=8)
    valid = np.arange(4)[None] < batch["num_candidates"][:, None]
    for f in ("category", "creator"):
        batch[f"cand_{f}"] = np.where(valid, items[f][batch["cand_item"]], 0).astype(np.int32)
    cache = jax.jit(lambda p, f: nnx.merge(graphdef, p).item_cache(f))(params, items)
    assert cache.shape == (SCHEMA.num_items + 1, TINY.tower_mlp[-1])
    cached = jax.jit(lambda p, b, c: nnx.merge(graphdef, p)(b, item_cache=c))
    _, run, _ = full
    np.testing.assert_allclose(_logits(cached(params, batch, cache)), _logits(run(params, batch)), atol=1e-5)


def _all_shapes(jaxpr, with_origin: bool = False):
    for eqn in jaxpr.eqns:
        for var in eqn.outvars:
            shape = tuple(getattr(var.aval, "shape", ()))
            yield (shape, str(getattr(var.aval, "dtype", "")), eqn.primitive.name) if with_origin else shape
        for param in eqn.params.values():
            for sub in param if isinstance(param, (list, tuple)) else (param,):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    yield from _all_shapes(inner, with_origin)


def test_no_history_tensor_is_materialised_per_candidate():
    b, n, c = 3, 7, 5
    schema = BatchSchema(
        num_users=40, num_items=60, user_features=(("segment", 9),), item_features=(("category", 11), ("creator", 13)),
        num_actions=3, history_len=n, num_candidates=c,
    )
    # Dropout and stochastic length on, so the train-mode graph holds their extra ops too.
    model = make_model(tiny_config(dropout=0.1, stochastic_length={"enabled": True}), schema=schema)
    graphdef, params = nnx.split(model)
    batch = random_batch(schema, b, 0)
    for train in (False, True):
        fn = lambda p, bt, k: _loss(graphdef, p, bt, key=k, train=train)  # noqa: E731
        jaxpr = jax.make_jaxpr(jax.grad(fn))(params, batch, jax.random.key(0)).jaxpr
        assert TINY.cross.heads == TINY.hstu.heads == 2  # distinct from b, n, c, so shapes are unambiguous
        for shape, dtype, primitive in _all_shapes(jaxpr, with_origin=True):
            assert b * c not in shape or n not in shape, f"[B*C, N, ...]-like intermediate {shape}"
            if c in shape and n in shape:
                # Allowed: attention scores/weights [B, H, C, N] and the attention's validity mask [B, C, N]
                # (built from positions and lengths; also as [B, 1, C, N]). A [B, C, N] id-equality table
                # (brute-force HMA) or a [B, C, N, D] history copy fails here.
                unit_free = sorted(d for d in shape if d != 1)
                mask = dtype == "bool" and primitive != "eq" and unit_free == sorted((b, c, n))
                assert mask or sorted(shape) == sorted((b, 2, c, n)), f"per-candidate history {dtype}{shape} ({primitive})"


def test_train_mode_dropout_and_stochastic_length_need_and_use_the_key():
    model = make_model(tiny_config(dropout=0.2, stochastic_length={"enabled": True}))
    graphdef, params = nnx.split(model)
    batch = random_batch(SCHEMA, 3, 9)
    with pytest.raises(ValueError, match="needs a PRNG key"):
        model(batch, train=True)
    run = jax.jit(lambda p, bt, k: nnx.merge(graphdef, p)(bt, key=k, train=True))
    a = _logits(run(params, batch, jax.random.key(0)))
    b = _logits(run(params, batch, jax.random.key(1)))
    assert np.all(np.isfinite(a)) and not np.allclose(a, b)
    np.testing.assert_allclose(a, _logits(run(params, batch, jax.random.key(0))))


def test_bfloat16_hstu_stack_tracks_float32(full):
    _, run, params = full
    model = make_model(tiny_config(hstu={"compute_dtype": "bfloat16"}))
    graphdef, params16 = nnx.split(model)
    batch = batch_for(seed=10)
    out16 = _logits(jax.jit(lambda p, b: nnx.merge(graphdef, p)(b))(params16, batch))
    out32 = _logits(run(params, batch))
    assert out16.dtype == np.float32
    np.testing.assert_allclose(out16, out32, atol=0.05, rtol=0.05)


def test_malformed_batches_name_the_key(full):
    model, _, _ = full
    batch = batch_for()
    missing = {k: v for k, v in batch.items() if k != "history_creator"}
    with pytest.raises(ValueError, match="batch has no 'history_creator'"):
        model(missing)
    with pytest.raises(ValueError, match=r"batch\['cand_category'\] has shape \(3, 3\), expected \(3, 4\)"):
        model({**batch, "cand_category": batch["cand_category"][:, :3]})
    with pytest.raises(ValueError, match=r"batch\['history_action'\] has dtype float32"):
        model({**batch, "history_action": batch["history_action"].astype(np.float32)})

"""GenRank config, registry, presets, field checks and the request (session) derivation from event times."""

from __future__ import annotations

import math
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from gesr_jax import config as config_lib
from gesr_jax.models import registry
from gesr_jax.models.genrank.config import GenRankConfig
from gesr_jax.models.genrank.model import GenRank
from gesr_jax.models.genrank.tokens import sessions, time_bucket
from helpers.models import SCHEMA

PRESETS = ("synthetic_genrank", "synthetic_genrank_interleaved", "ml1m_genrank", "ml1m_genrank_interleaved")


def test_genrank_is_a_registered_kind_named_lazily():
    entry = registry.get("genrank")
    assert entry.config_cls is GenRankConfig and entry.model == "gesr_jax.models.genrank.model:GenRank"
    assert entry.model_class() is GenRank
    assert "genrank" in registry.kinds()


def test_the_package_and_its_config_import_no_jax():
    code = "import sys, gesr_jax.models.genrank as g; g.GenRankConfig().validate(); print('jax' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("tokens.layout", "pairs"), ("decoder.attention", "relu"), ("decoder.mlp", "relu"), ("decoder.layers", 0),
        ("decoder.heads", 0), ("tokens.session_gap", -1), ("tokens.time_bucket_width", 0.0),
        ("tokens.num_requests", 0), ("dropout", 1.0), ("head_mlp", (0,)), ("candidate_fields", ()),
        ("history_fields", ("action",)), ("decoder.compute_dtype", "float16"), ("decoder.attention_impl", "cuda"),
        ("embedding_sharding", "diagonal"),
    ],
)  # fmt: skip
def test_validate_names_the_bad_field(field, value):
    section, _, name = field.rpartition(".")
    change = {section: {name: value}} if section else {name: value}
    with pytest.raises(ValueError, match=f"model.{field}"):
        config_lib.replace(GenRankConfig(), **change).validate()


def test_candidate_fields_cannot_hold_the_action():
    with pytest.raises(ValueError, match="model.candidate_fields"):
        GenRankConfig(candidate_fields=("item", "action")).validate()


def test_unknown_schema_fields_are_named_at_build_time():
    with pytest.raises(ValueError, match="model.history_fields names 'genre'"):
        GenRank(GenRankConfig(history_fields=("item", "genre")), SCHEMA, rngs=nnx.Rngs(params=0))
    with pytest.raises(ValueError, match="model.candidate_fields names 'director'"):
        GenRank(GenRankConfig(candidate_fields=("item", "director")), SCHEMA, rngs=nnx.Rngs(params=0))


@pytest.mark.parametrize("name", PRESETS)
def test_presets_load_and_document_their_launch(name):
    cfg = config_lib.load_config(name)
    assert cfg.name == name and cfg.model.kind == "genrank"
    assert cfg.model.interleaved == name.endswith("_interleaved")
    doc = __import__(f"gesr_jax.configs.{name}", fromlist=["x"]).__doc__
    assert f"gesr train --config {name}" in doc and "Expected:" in doc and "experiments/results/models_" in doc


def test_presets_mirror_the_base_data_and_training_settings():
    for genrank, base in (("synthetic_genrank", "synthetic_base"), ("ml1m_genrank", "ml1m_base")):
        a, b = config_lib.load_config(genrank), config_lib.load_config(base)
        assert a.data == b.data and a.train == b.train
    assert config_lib.load_config("ml1m_genrank").model.history_fields == ("item", "genre", "year", "director")


def test_overrides_and_conversion_from_a_gesr_preset():
    cfg = config_lib.load_config("synthetic_genrank", ["model.tokens.layout=interleaved", "model.decoder.mlp=gelu"])
    assert cfg.model.interleaved and cfg.model.decoder.mlp == "gelu"
    with pytest.raises(config_lib.ConfigError, match="model.decoder.attention"):
        config_lib.load_config("synthetic_genrank", ["model.decoder.attention=dot"])
    with pytest.raises(config_lib.ConfigError, match="'model.genrank_heads' moved to 'model.decoder.heads'"):
        config_lib.load_config("synthetic_genrank", ["model.genrank_heads=4"])
    converted = config_lib.load_config("synthetic_tiny", ["model.kind=genrank"])
    assert isinstance(converted.model, GenRankConfig) and converted.model.embed_dim == 16
    assert "action" in converted.model.history_fields  # GESR's field list is accepted; phi(a) is always added
    assert converted.model.item_history_fields == ("item", "category", "creator")


def test_sessions_split_on_gaps_and_count_back_from_the_most_recent():
    # Events at 0, 100, 5000, 5100, 20000 s (gap 1800): requests {0, 100}, {5000, 5100}, {20000}; one padding slot.
    t = jnp.array([[0, 100, 5000, 5100, 20000, 0]]) + 1_000_000_000
    s = sessions(t, jnp.array([5]), 1800)
    np.testing.assert_array_equal(np.asarray(s["index"])[0], [3, 3, 2, 2, 1, 0])
    np.testing.assert_array_equal(np.asarray(s["has_prev"])[0], [False, False, True, True, True, False])
    np.testing.assert_array_equal(np.asarray(s["pre_gap"])[0], [0, 0, 5000, 5000, 15000, 0])
    assert int(s["last_start"][0]) == 1_000_020_000 and bool(s["has_history"][0])
    empty = sessions(jnp.zeros((1, 3), jnp.int32), jnp.array([0]), 1800)
    assert np.all(np.asarray(empty["index"]) == 0) and not bool(empty["has_history"][0])


def test_time_bucket_is_log_spaced_with_zero_for_no_previous_request():
    dt = jnp.array([0, 1, 2, 100, 10**9, 5000])
    has = jnp.array([True, True, True, True, True, False])
    got = np.asarray(time_bucket(dt, has, 32, 0.301))
    want = [1, 1, 1 + math.floor(math.log(2) / 0.301), 1 + math.floor(math.log(100) / 0.301), 31, 0]
    np.testing.assert_array_equal(got, want)


def test_a_genrank_config_round_trips_through_json():
    import json

    cfg = config_lib.load_config("ml1m_genrank_interleaved", ["model.head_mlp=16,8"])
    back = config_lib.from_dict(config_lib.Config, json.loads(json.dumps(config_lib.to_dict(cfg))))
    assert back == cfg and type(back.model) is GenRankConfig and back.model.head_mlp == (16, 8)


def test_a_flat_genrank_config_json_from_before_the_sections_still_loads():
    """Workdirs written before the typed sections hold flat genrank_* fields; each moves to its section."""
    cfg = config_lib.load_config("synthetic_genrank", ["model.tokens.layout=interleaved", "model.decoder.heads=4",
                                                       "model.head_mlp=16", "model.decoder.attention_impl=xla"])
    data = config_lib.to_dict(cfg)
    model = {k: v for k, v in data["model"].items() if k not in ("tokens", "decoder", "head_mlp")}
    model |= {"genrank_tokens": "interleaved", "genrank_use_position_emb": True, "genrank_use_request_emb": True,
              "genrank_use_pre_request_time_emb": True, "genrank_session_gap": 1800, "genrank_num_requests": 16,
              "genrank_num_time_buckets": 32, "genrank_time_bucket_width": 0.301, "genrank_layers": 2,
              "genrank_heads": 4, "genrank_head_dim": 16, "genrank_mlp": "swiglu", "genrank_mlp_dim": 64,
              "genrank_attention": "softmax", "genrank_hstu_normalizer": 64.0, "genrank_alibi": True,
              "genrank_time_alibi": False, "genrank_learnable_slopes": False, "genrank_head_mlp": [16],
              "attention_impl": "xla", "compute_dtype": "float32"}  # fmt: skip
    assert config_lib.from_dict(config_lib.Config, {**data, "model": model}) == cfg

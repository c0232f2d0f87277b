"""`gesr config list` / `gesr config show`: presets with their descriptions, fields with their source comments."""

from __future__ import annotations

import json

from gesr_jax import cli, config, config_commands
from gesr_jax.data.config import DataConfig, MovieLensConfig, SyntheticConfig
from gesr_jax.train.config import TrainConfig


def test_list_names_every_preset_and_its_two_tower_variant(capsys):
    assert cli.main(["config", "list"]) == 0
    out = capsys.readouterr().out
    names = [line.split()[0] for line in out.splitlines() if line.strip()]
    for preset in config.preset_names():
        assert preset in names
    assert "synthetic_tiny_two_tower" in names and "ml1m_base_two_tower" in names
    line = next(l for l in out.splitlines() if l.startswith("synthetic_tiny "))
    assert "smallest end-to-end run" in line  # the docstring's first line, without the "name:" prefix
    for name in names:  # every listed name loads
        config.load_config(name)


def test_show_prints_every_field_with_value_and_comment(capsys):
    assert cli.main(["config", "show", "synthetic_tiny", "--set", "model.hma.enabled=false"]) == 0
    out = capsys.readouterr().out
    rows = {r.key: r for r in config_commands.field_rows(config.load_config("synthetic_tiny"))}
    for key in rows:
        assert f" {key} = " in out, key
    line = next(l for l in out.splitlines() if " model.hma.enabled = " in l)
    assert line.startswith("*") and "False" in line and "# explicit match counts" in line
    line = next(l for l in out.splitlines() if " data.history_len = " in l)
    assert line.startswith("*") and "16" in line and "# N: most recent events" in line
    assert next(l for l in out.splitlines() if " train.seed = " in l).startswith(" ")  # the default: unmarked


def test_every_data_and_train_field_is_documented():
    for cls in (DataConfig, SyntheticConfig, MovieLensConfig, TrainConfig):
        for name in cls.__dataclass_fields__:
            assert config_commands.field_comment(cls, name), f"{cls.__name__}.{name} has no comment"


def test_comments_above_a_field_and_inherited_fields_are_found():
    assert config_commands.field_comment(DataConfig, "max_requests_per_user").startswith("0 = every request")
    assert "global_time" in config_commands.field_comment(MovieLensConfig, "split")
    gesr = type(config.load_config("synthetic_tiny").model)
    assert "width of every embedding table" in config_commands.field_comment(gesr, "embed_dim")  # a base's field
    assert config_commands.field_comment(gesr, "no_such_field") == ""


def test_show_json(capsys):
    assert cli.main(["config", "show", "synthetic_tiny_two_tower", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["model.kind"]["value"] == "two_tower" and data["train.num_steps"]["value"] == 60
    assert data["train.num_steps"]["default"] == 1000 and data["train.num_steps"]["comment"]


def test_data_inspect_with_a_preset_uses_its_data_settings(capsys):
    assert cli.main(["data", "inspect", "--config", "synthetic_tiny", "--set", "synthetic.num_users=50"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["config"] == "synthetic_tiny" and report["source"] == "synthetic"
    assert report["schema"]["history_len"] == 16 and report["requests"]["users"] == 50
    assert set(report["health"]["splits"]) == {"train", "valid", "test"}
    assert "creator:creator" in report["health"]["splits"]["valid"]["hma_nonzero_rate"]
    assert cli.main(["data", "inspect"]) == 2  # a usage error (the CLI's code 2)
    assert "--path DIR" in capsys.readouterr().err

"""Typed, frozen experiment configs and the ``--set key=value`` override parser.

A :class:`Config` is three frozen dataclasses: :class:`DataConfig` (what the batches
hold), a model config and :class:`TrainConfig` (optimizer, loop, checkpoints). The model
section is a tagged union: its ``kind`` names a registered model (``gesr_jax/models/registry.py``;
``gesr``, ``two_tower``, ``genrank``, or a user's) and picks its config class. Named presets live
in ``gesr_jax/configs/<name>.py``; every preset ``NAME`` whose model has a two-tower backbone also
has ``NAME_two_tower``: the same run with a model of kind ``two_tower`` (the paper's baseline).

Overrides use dotted paths (``model.hma.enabled=false``, ``model.hstu.heads=4``, ``train.learning_rate=3e-4``,
``model.tower_mlp=64,32``); ``model.kind=two_tower`` converts the section to that kind, keeping
the fields both kinds have. An unknown key or a value that does not parse as the field's type
raises :class:`ConfigError` naming the key (a key that moved into a section names its new path);
validation runs once, after every override.

A dataset's own settings are a data sub-section (``data.synthetic.*``, ``data.movielens.*``, and
``data.<source>.*`` for a dataset registered with ``settings=``), handled like any other section.

``config.json`` files written before the typed sections (flat ``model.hma_dim``, ``model.genrank_heads``,
``data.path``, ...) still load: :func:`from_dict` moves each old field to its section, using the
``moved_fields`` table of the section's class.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib
import importlib.util
import json
import math
import pathlib
import types
import typing
from collections.abc import Sequence
from typing import Any

from gesr_jax.data.config import DataConfig
from gesr_jax.models import registry
from gesr_jax.models.config_base import ModelConfigBase
from gesr_jax.models.gesr.config import GESRConfig
from gesr_jax.models.two_tower.config import TwoTowerConfig
from gesr_jax.train.config import TrainConfig

TWO_TOWER_SUFFIX = "_two_tower"


class ConfigError(ValueError):
    """A config name, key or value is not valid."""


@dataclasses.dataclass(frozen=True)
class Config:
    name: str = "custom"  # preset name, recorded in the workdir for `gesr eval`
    data: DataConfig = DataConfig()  # dataset, request construction, batch schema
    model: ModelConfigBase = GESRConfig()  # the model: any registered kind (tagged by model.kind)
    train: TrainConfig = TrainConfig()  # optimizer, steps, eval and checkpoint cadence


def preset_names() -> list[str]:
    folder = pathlib.Path(__file__).parent / "configs"
    return sorted(p.stem for p in folder.glob("*.py") if not p.stem.startswith("_"))


def load_config(name_or_path: str, overrides: Sequence[str] = ()) -> Config:
    """Load a preset by name (``synthetic_tiny``, ``ml1m_base_two_tower``) or a ``.py`` file with ``get_config()``."""
    base, two_tower = name_or_path, False
    if name_or_path.endswith(TWO_TOWER_SUFFIX):
        base, two_tower = name_or_path[: -len(TWO_TOWER_SUFFIX)], True
    if base.endswith(".py"):
        path = pathlib.Path(base)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        spec = importlib.util.spec_from_file_location(f"gesr_user_config_{path.stem}", path)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    elif base in preset_names():
        module = importlib.import_module(f"gesr_jax.configs.{base}")  # presets are found by name at run time
    else:
        raise ConfigError(
            f"unknown config {name_or_path!r}: expected a .py file or one of "
            f"{preset_names()} (each also as NAME{TWO_TOWER_SUFFIX})"
        )
    if not hasattr(module, "get_config"):
        raise ConfigError(f"config {name_or_path!r} defines no get_config()")
    config = module.get_config()
    if not isinstance(config, Config):
        raise ConfigError(f"get_config() of {name_or_path!r} returned {type(config).__name__}, not Config")
    if two_tower:
        if not isinstance(config.model, TwoTowerConfig):
            # Only models built on the two towers (GESR) have the baseline as a variant of themselves.
            raise ConfigError(
                f"config {base!r} is a {config.model.kind!r} model without two towers, so it has no "
                f"{TWO_TOWER_SUFFIX} variant; use a two-tower preset or --set model.kind=two_tower"
            )
        model = registry.convert(config.model, "two_tower")
        config = dataclasses.replace(config, name=config.name + TWO_TOWER_SUFFIX, model=model)
    return apply_overrides(config, overrides)


def apply_overrides(config: Any, overrides: Sequence[str]) -> Any:
    """Return ``config`` with each ``a.b.c=value`` applied, parsed by the field's type.

    Cross-field checks run once, after the last override, so the order of overrides never matters.
    """
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        key, raw = item.split("=", 1)
        config = _set_path(config, key.strip().split("."), raw.strip(), key.strip())
    validate_config(config)
    return config


def validate_config(config: Any) -> None:
    """Run ``validate()`` of ``config`` or of each of its top-level sections, raising :class:`ConfigError`.

    Each section validates its own sub-sections (``model.hstu``, ``data.synthetic``), so every check runs once.
    """
    targets = [config] if hasattr(config, "validate") else [getattr(config, f.name) for f in dataclasses.fields(config)]
    for target in targets:
        validate = getattr(target, "validate", None)
        if validate is None:
            continue
        try:
            validate()
        except ValueError as err:
            raise ConfigError(str(err)) from None


def _set_path(obj: Any, path: list[str], raw: str, full_key: str) -> Any:
    if not dataclasses.is_dataclass(obj):
        raise ConfigError(f"unknown config key {full_key!r}: {'.'.join(path)} is below a non-config value")
    fields = {f.name: f for f in dataclasses.fields(obj)}
    head = path[0]
    extra = getattr(obj, "extra_section_class", lambda name: None)(head)  # data.<source> of a registered dataset
    if head not in fields and extra is not None and len(path) > 1:
        return obj.with_extra_section(head, _set_path(getattr(obj, head), path[1:], raw, full_key))
    if head not in fields:
        moved = getattr(type(obj), "moved_fields", {}).get(head)
        if moved is not None and len(path) == 1:
            new_key = full_key[: len(full_key) - len(head)] + moved
            raise ConfigError(f"config key {full_key!r} moved to {new_key!r}")
        raise ConfigError(f"unknown config key {full_key!r}: {type(obj).__name__} has fields {sorted(fields)}")
    current = getattr(obj, head)
    if head == "kind" and len(path) == 1 and isinstance(obj, ModelConfigBase):
        try:
            return registry.convert(obj, raw)
        except (ValueError, TypeError) as err:
            raise ConfigError(f"bad value for config key {full_key!r}: {err}") from None
    if len(path) > 1:
        return dataclasses.replace(obj, **{head: _set_path(current, path[1:], raw, full_key)})
    hint = typing.get_type_hints(type(obj))[head]
    if dataclasses.is_dataclass(current):
        raise ConfigError(f"config key {full_key!r} is a section; set one of its fields, e.g. {full_key}.<field>=...")
    try:
        value = parse_value(raw, hint)
    except (ValueError, TypeError) as err:
        raise ConfigError(f"bad value for config key {full_key!r}: {err}") from None
    return dataclasses.replace(obj, **{head: value})


def replace(config: Any, **changes: Any) -> Any:
    """``dataclasses.replace`` where a dict value updates the fields of that section, e.g.
    ``replace(model, hma={"enabled": False}, embed_dim=8)``. Nothing is validated (that is the caller's step)."""
    for name, value in changes.items():
        if isinstance(value, dict):
            changes[name] = replace(getattr(config, name), **value)
    return dataclasses.replace(config, **changes)


def parse_value(raw: str, hint: Any) -> Any:
    """Parse a command-line string as type ``hint`` (bool, int, float, str, Optional, tuples, Literal)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if type(None) in args and raw.lower() in ("none", "null", ""):
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return parse_value(raw, arg)
            except (ValueError, TypeError) as err:
                errors.append(str(err))
        raise ValueError("; ".join(errors))
    if origin is typing.Literal:
        for option in args:
            if str(option) == raw:
                return option
        raise ValueError(f"{raw!r} is not one of {list(args)}")
    if hint is bool:
        low = raw.lower()
        if low in ("true", "1", "yes", "on"):
            return True
        if low in ("false", "0", "no", "off"):
            return False
        raise ValueError(f"{raw!r} is not a boolean (true/false)")
    if hint is int:
        try:
            return int(raw)
        except ValueError:
            raise ValueError(f"{raw!r} is not an integer") from None
    if hint is float:
        try:
            value = float(raw)
        except ValueError:
            raise ValueError(f"{raw!r} is not a number") from None
        if not math.isfinite(value):
            raise ValueError(f"{raw!r} is not a finite number")
        return value
    if hint is str:
        return raw
    if origin is tuple:
        # tuple[X, ...] from "a,b,c"; tuple[tuple[str, str], ...] from "a:b,c:d".
        if raw in ("", "()"):
            return ()
        parts = [p.strip() for p in raw.split(",")]
        if len(args) == 2 and args[1] is Ellipsis:
            inner = args[0]
            if typing.get_origin(inner) is tuple:
                return tuple(parse_value(p.replace(":", ","), inner) for p in parts)
            return tuple(parse_value(p, inner) for p in parts)
        if len(parts) != len(args):
            raise ValueError(f"{raw!r} needs {len(args)} comma-separated values")
        return tuple(parse_value(p, a) for p, a in zip(parts, args, strict=True))
    raise TypeError(f"fields of type {hint} cannot be set from the command line")


def to_dict(config: Any) -> dict[str, Any]:
    """Nested plain dicts; a config's open sections (``extra_sections()``, e.g. ``data.<source>``) appear as fields."""
    out: dict[str, Any] = {}
    for name, value in sections_and_fields(config):
        out[name] = to_dict(value) if dataclasses.is_dataclass(value) else copy.deepcopy(value)
    return out


def sections_and_fields(config: Any) -> list[tuple[str, Any]]:
    """``(name, value)`` of each field of ``config``, then of each open section (``config.extra_sections()``).

    A field that stores the open sections (``DataConfig.sections``) is left out: they are listed under their names.
    """
    extra = getattr(config, "extra_sections", None)
    out = [(f.name, getattr(config, f.name)) for f in dataclasses.fields(config)
           if not (extra is not None and f.name == "sections")]  # fmt: skip
    return out + list(extra().items()) if extra is not None else out


def from_dict(cls: type, data: dict[str, Any]) -> Any:
    """Rebuild a (nested) frozen config from :func:`to_dict` output, e.g. read from ``config.json``."""
    hints = typing.get_type_hints(cls)
    data = move_old_fields(cls, data)
    kwargs: dict[str, Any] = {}
    open_sections: dict[str, Any] = {}
    extra_class = getattr(cls, "extra_section_class", None)
    if extra_class is not None:
        # data.<source> of a registered dataset with settings (its class comes from the dataset registry).
        names = {f.name for f in dataclasses.fields(cls)}
        for name in sorted(set(data) - names):
            section_cls = extra_class(name)
            if section_cls is not None and isinstance(data[name], dict):
                open_sections[name] = from_dict(section_cls, data[name])
    for f in dataclasses.fields(cls):
        if f.name not in data:
            continue
        value, hint = data[f.name], hints[f.name]
        if isinstance(hint, type) and issubclass(hint, ModelConfigBase):
            # The tagged union: the saved kind picks the class (workdirs from before kinds existed are GESR).
            try:
                hint = registry.config_class(value.get("kind", "gesr"))
            except registry.UnknownModelKindError as err:
                raise ConfigError(str(err)) from None
            value = from_dict(hint, value)
        elif dataclasses.is_dataclass(hint):
            value = from_dict(hint, value)
        else:
            value = _tuplify(value)
        kwargs[f.name] = value
    unknown = sorted(set(data) - set(kwargs) - set(open_sections))
    if unknown:
        hint = " (a dataset's own settings section loads once the module registering that dataset is imported)"
        raise ConfigError(f"{cls.__name__} has no fields {unknown}{hint if extra_class is not None else ''}")
    if open_sections:
        kwargs["sections"] = tuple(open_sections.items())
    return cls(**kwargs)


def move_old_fields(cls: type, data: dict[str, Any]) -> dict[str, Any]:
    """``data`` with each flat field of an older ``config.json`` moved to its section (``cls.moved_fields``).

    A class may also define ``upgrade_old_values(data)`` for a value whose meaning changed with its move.
    """
    table = getattr(cls, "moved_fields", {})
    old = [name for name in table if name in data and not isinstance(data[name], dict)]
    if not old:
        return data
    data = dict(data)
    for name in old:
        *sections, field = table[name].split(".")
        value, target = data.pop(name), data
        for section in sections:
            target[section] = dict(target.get(section, {}))
            target = target[section]
        if field in target:
            raise ConfigError(f"{cls.__name__}: the old field {name!r} and its new place {table[name]!r} are both set")
        target[field] = value
    upgrade = getattr(cls, "upgrade_old_values", None)
    return upgrade(data, old) if upgrade is not None else data


def _tuplify(value: Any) -> Any:
    if isinstance(value, list):
        return tuple(_tuplify(v) for v in value)
    return value


def save_json(config: Config, path: pathlib.Path) -> None:
    path.write_text(json.dumps(to_dict(config), indent=2, sort_keys=True))


def load_json(path: pathlib.Path) -> Config:
    return from_dict(Config, json.loads(path.read_text()))

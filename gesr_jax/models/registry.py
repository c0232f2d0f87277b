"""The model registry: ``model.kind`` -> (config class, model class).

Every model is registered under a kind string. The config's ``model`` section is a tagged union:
``Config.from_dict`` reads ``model.kind`` and rebuilds that kind's config class, and ``gesr_jax.api``
builds the registered model class for ``config.model.kind``. Built-in kinds (``two_tower``, ``gesr``,
``genrank``) register themselves when their package is imported, which happens on first lookup; their
packages import no JAX, and the model class is named as ``"module:Class"`` and imported only when a
model is built, so reading a config stays cheap.

A user model needs no project file edited::

    @dataclasses.dataclass(frozen=True)
    class MyConfig(ModelConfigBase):
        kind: str = "my_model"
        width: int = 16  # hidden width

    registry.register_model("my_model", MyConfig, MyModel)   # MyModel(config, schema, *, rngs)

and then ``Config(model=MyConfig())`` trains with ``gesr train`` / ``gesr_jax.train.trainer.train_and_evaluate``.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable
from typing import Any

from gesr_jax.models.config_base import ModelConfigBase

# Packages that register the built-in kinds when imported.
_BUILTIN_PACKAGES = {
    "two_tower": "gesr_jax.models.two_tower",
    "gesr": "gesr_jax.models.gesr",
    "genrank": "gesr_jax.models.genrank",
}


class UnknownModelKindError(ValueError):
    """``model.kind`` names no registered model."""


@dataclasses.dataclass(frozen=True)
class ModelEntry:
    """One registered model kind."""

    kind: str  # the value of model.kind
    config_cls: type[ModelConfigBase]  # its frozen config dataclass
    model: Callable[..., Any] | str  # model class ``cls(config, schema, *, rngs)``, or "module:Class" (lazy)
    description: str = ""  # one line for `gesr config list`

    def model_class(self) -> Callable[..., Any]:
        """The model class, imported on first use when registered by name."""
        if isinstance(self.model, str):
            module, _, name = self.model.partition(":")
            return getattr(importlib.import_module(module), name)  # only when a model is built: configs need no JAX
        return self.model


_ENTRIES: dict[str, ModelEntry] = {}


def register_model(
    kind: str,
    config_cls: type[ModelConfigBase],
    model: Callable[..., Any] | str,
    *,
    description: str = "",
    replace: bool = False,
) -> ModelEntry:
    """Register ``model`` (a class taking ``(config, schema, *, rngs)``) under ``kind``.

    Registering a kind twice raises unless ``replace=True`` (notebooks re-running a cell).
    """
    if not isinstance(kind, str) or not kind:
        raise ValueError(f"model kind must be a non-empty string, got {kind!r}")
    if not (isinstance(config_cls, type) and issubclass(config_cls, ModelConfigBase)):
        raise TypeError(f"config class for kind {kind!r} must subclass ModelConfigBase, got {config_cls!r}")
    default_kind = config_cls.__dataclass_fields__["kind"].default
    if default_kind != kind:
        raise ValueError(f"{config_cls.__name__}.kind defaults to {default_kind!r}, but it is registered as {kind!r}")
    if kind in _ENTRIES and not replace and _ENTRIES[kind].config_cls is not config_cls:
        raise ValueError(f"model kind {kind!r} is already registered (pass replace=True to override it)")
    entry = ModelEntry(kind, config_cls, model, description)
    _ENTRIES[kind] = entry
    return entry


def get(kind: str) -> ModelEntry:
    """The entry registered under ``kind`` (importing a built-in kind's package on first use)."""
    if kind not in _ENTRIES and kind in _BUILTIN_PACKAGES:
        importlib.import_module(_BUILTIN_PACKAGES[kind])  # a built-in registers on import (it imports this module)
    if kind not in _ENTRIES:
        raise UnknownModelKindError(f"model.kind {kind!r} is not a registered model; known kinds: {kinds()}")
    return _ENTRIES[kind]


def kinds() -> list[str]:
    """Every registered kind, built-ins included."""
    for kind in _BUILTIN_PACKAGES:
        get(kind)
    return sorted(_ENTRIES)


def config_class(kind: str) -> type[ModelConfigBase]:
    return get(kind).config_cls


def convert(config: ModelConfigBase, kind: str) -> ModelConfigBase:
    """``config`` as kind ``kind``: every field both classes have keeps its value, the rest take defaults.

    ``--set model.kind=two_tower`` on a GESR config goes through here, as do the ``NAME_two_tower`` presets.
    """
    target = config_class(kind)
    if type(config) is target:
        return config
    shared = {f.name for f in dataclasses.fields(target)} & {f.name for f in dataclasses.fields(config)}
    values = {name: getattr(config, name) for name in shared if name != "kind"}
    return target(**values)

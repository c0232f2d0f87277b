"""The base of every model config: a frozen dataclass tagged with its registry ``kind``.

Kept free of JAX so that reading and validating configs (``gesr config show``) stays cheap.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

from gesr_jax.models.config_sections import AttentionStack, check_choices


@dataclasses.dataclass(frozen=True)
class ModelConfigBase:
    """Subclasses redeclare ``kind`` with their registry key as the default and add their own fields."""

    kind: str = ""  # registry key of the model (gesr_jax/models/registry.py); picks the model class
    # layout of every embedding table on the mesh's `model` axis: "replicated" (a full copy per device),
    # "row" (vocab rows sharded) or "column" (embedding width sharded); see train/sharding.py
    embedding_sharding: Literal["replicated", "row", "column"] = "replicated"

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first bad field; subclasses extend it.

        Checks the kind, every ``Literal`` field against its type, and every section (a dataclass field) with
        its own ``validate(path)``.
        """
        default = type(self).__dataclass_fields__["kind"].default
        if self.kind != default:
            raise ValueError(
                f"model.kind is {self.kind!r} but this is a {type(self).__name__} (kind {default!r}); "
                "change the kind with --set model.kind=..., which converts the section"
            )
        check_choices(self, "model")
        for f in dataclasses.fields(self):
            section = getattr(self, f.name)
            if dataclasses.is_dataclass(section) and hasattr(section, "validate"):
                section.validate(f"model.{f.name}")

    def attention_stacks(self) -> list[tuple[str, AttentionStack]]:
        """``(path, section)`` of every attention stack of this model (``model.hstu``, ``model.decoder``, ...)."""
        return [(f"model.{f.name}", getattr(self, f.name)) for f in dataclasses.fields(self)
                if isinstance(getattr(self, f.name), AttentionStack)]  # fmt: skip

    def validate_for_build(self) -> None:
        """:meth:`validate` plus checks only a finished config must pass (called when the model is built)."""
        self.validate()

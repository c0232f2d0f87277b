"""The base of every model config: a frozen dataclass tagged with its registry ``kind``.

Kept free of JAX so that reading and validating configs (``gesr config show``) stays cheap.
"""

from __future__ import annotations

import dataclasses
from typing import Literal


@dataclasses.dataclass(frozen=True)
class ModelConfigBase:
    """Subclasses redeclare ``kind`` with their registry key as the default and add their own fields."""

    kind: str = ""  # registry key of the model (gesr_jax/models/registry.py); picks the model class
    # layout of every embedding table on the mesh's `model` axis: "replicated" (a full copy per device),
    # "row" (vocab rows sharded) or "column" (embedding width sharded); see train/sharding.py
    embedding_sharding: Literal["replicated", "row", "column"] = "replicated"

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first bad field; subclasses extend it."""
        default = type(self).__dataclass_fields__["kind"].default
        if self.kind != default:
            raise ValueError(
                f"model.kind is {self.kind!r} but this is a {type(self).__name__} (kind {default!r}); "
                "change the kind with --set model.kind=..., which converts the section"
            )

        if self.embedding_sharding not in ("replicated", "row", "column"):
            raise ValueError(
                f"model.embedding_sharding must be one of ['replicated', 'row', 'column'], got {self.embedding_sharding!r}"
            )

    def validate_for_build(self) -> None:
        """:meth:`validate` plus checks only a finished config must pass (called when the model is built)."""
        self.validate()

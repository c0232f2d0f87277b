"""The base of every model config: a frozen dataclass tagged with its registry ``kind``.

Kept free of JAX so that reading and validating configs (``gesr config show``) stays cheap.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class ModelConfigBase:
    """Subclasses redeclare ``kind`` with their registry key as the default and add their own fields."""

    kind: str = ""  # registry key of the model (gesr_jax/models/registry.py); picks the model class

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first bad field; subclasses extend it."""
        default = type(self).__dataclass_fields__["kind"].default
        if self.kind != default:
            raise ValueError(
                f"model.kind is {self.kind!r} but this is a {type(self).__name__} (kind {default!r}); "
                "change the kind with --set model.kind=..., which converts the section"
            )

    def validate_for_build(self) -> None:
        """:meth:`validate` plus checks only a finished config must pass (called when the model is built)."""
        self.validate()

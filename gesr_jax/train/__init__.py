"""Training and evaluation: ``gesr_jax.train.train_and_evaluate(config, workdir)`` and ``evaluate_workdir``.

The two entry points are imported on first use: ``gesr_jax.config`` imports ``gesr_jax.train.config``,
which runs this file, and the trainer imports ``gesr_jax.config`` back.
"""

from __future__ import annotations

from typing import Any

__all__ = ["TrainingDivergedError", "evaluate_workdir", "train_and_evaluate"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from gesr_jax.train import trainer

        return getattr(trainer, name)
    raise AttributeError(f"module 'gesr_jax.train' has no attribute {name!r}")

"""One Orbax ``CheckpointManager`` holding everything a run needs to resume exactly.

Each checkpoint step in ``<workdir>/checkpoints/<step>/`` has four items:

* ``params``: the model's ``nnx.State`` (sharded arrays, restored onto the current mesh),
* ``opt_state``: the optax state,
* ``step``: ``{"step": int, "metadata": {...}}`` as JSON, readable without JAX (the trainer keeps
  its not-yet-logged train metrics there, so a resumed run logs exactly what an uninterrupted one does),
* ``data_iterator``: the grain iterator state, written by grain's own Orbax handler
  (``process_<i>-of-<n>.json``, one file per host).

Saving is asynchronous for the arrays; the iterator state is captured during the blocking part of
``save``, so it always matches the saved step.
"""

from __future__ import annotations

import pathlib
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp


def _abstract(tree: Any) -> Any:
    """Shape/dtype/sharding template of a pytree of arrays, for restoring onto the same layout."""
    return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)


class Checkpointer:
    """Saves and restores (params, opt_state, step, data iterator) under one directory."""

    def __init__(self, directory: str | pathlib.Path, *, max_to_keep: int = 3):
        self.directory = pathlib.Path(directory).absolute()
        options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True)
        self._manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def save(
        self,
        step: int,
        params: Any,
        opt_state: Any,
        data_iterator: grain.DatasetIterator,
        metadata: dict[str, Any] | None = None,
    ) -> None:
        """Start saving step ``step``; array writes finish in the background (see :meth:`wait`).

        ``metadata`` (JSON-serialisable) is stored beside the step number and returned by :meth:`restore`.
        """
        args = ocp.args.Composite(
            params=ocp.args.StandardSave(params),
            opt_state=ocp.args.StandardSave(opt_state),
            step=ocp.args.JsonSave({"step": int(step), "metadata": metadata or {}}),
            data_iterator=grain.checkpoint.CheckpointSave(data_iterator),
        )
        self._manager.save(step, args=args, force=True)

    def restore(
        self, step: int, *, params: Any, opt_state: Any, data_iterator: grain.DatasetIterator
    ) -> tuple[Any, Any, int, dict[str, Any]]:
        """Restore step ``step`` onto the layout of the given ``params``/``opt_state`` templates.

        Returns ``(params, opt_state, step, metadata)``; ``data_iterator`` is rewound in place to
        where it was when the step was saved.
        """
        args = ocp.args.Composite(
            params=ocp.args.StandardRestore(_abstract(params)),
            opt_state=ocp.args.StandardRestore(_abstract(opt_state)),
            step=ocp.args.JsonRestore(),
            data_iterator=grain.checkpoint.CheckpointRestore(data_iterator),
        )
        restored = self._restore(step, args)
        meta = restored["step"]
        return restored["params"], restored["opt_state"], int(meta["step"]), dict(meta.get("metadata", {}))

    def restore_params(self, step: int, params: Any) -> Any:
        """Restore only the parameters of step ``step`` (for evaluation)."""
        restored = self._restore(step, ocp.args.Composite(params=ocp.args.StandardRestore(_abstract(params))))
        return restored["params"]

    def _restore(self, step: int, args: ocp.args.Composite) -> Any:
        if step not in self._manager.all_steps():
            raise ValueError(f"no checkpoint for step {step} in {self.directory}; steps there: {self.all_steps()}")
        try:
            return self._manager.restore(step, args=args)
        except (ValueError, KeyError, TypeError) as err:
            raise ValueError(
                f"checkpoint step {step} in {self.directory} does not match the model and optimizer built from "
                f"this config ({type(err).__name__}: {err})"
            ) from err

    def wait(self) -> None:
        """Block until every pending save is on disk."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.close()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

"""One Orbax ``CheckpointManager`` holding everything a run needs to resume exactly, and checked on restore.

Each checkpoint step in ``<workdir>/checkpoints/<step>/`` has four items:

* ``params``: the model's ``nnx.State`` (sharded arrays, restored onto the current mesh),
* ``opt_state``: the optax state,
* ``step``: ``{"step": int, "metadata": {...}, "integrity": {...}}`` as JSON, readable without JAX (the
  trainer keeps its not-yet-logged train metrics in ``metadata``, so a resumed run logs exactly what an
  uninterrupted one does),
* ``data_iterator``: the grain iterator state, written by grain's own Orbax handler
  (``process_<i>-of-<n>.json``, one file per host).

Saving is asynchronous for the arrays; the iterator state is captured during the blocking part of
``save``, so it always matches the saved step.

**Integrity.** Orbax 0.12.4 has no content check of its own (the zarr3 ``crc32c`` codec covers only the
shard index, and the default layout is OCDBT + zarr2 + zstd): 64 flipped bytes in an array file restore
without any error as wrong numbers. So :meth:`Checkpointer.save` records, at save time and from host copies,
the shape, dtype and sha256 of every leaf of ``params`` and ``opt_state`` plus a sha256 of the iterator
state, in the ``step`` item's ``integrity`` field. It lives in the step itself rather than in a file
written afterwards: Orbax writes a step into a temporary folder and renames it into place once every
item is on disk, so a step is visible with its checksums or not at all (there is no window in which a
finished step lacks them). A step whose ``integrity`` is absent was written by an older version; it
still restores, with a :class:`CheckpointWarning` that it is unverified.

Restoring a step first compares the recorded leaf paths, shapes and dtypes with the templates built
from the current config (a difference is a :class:`CheckpointMismatchError`), then restores and
compares checksums; anything that fails after the structure matched (unreadable files, bad JSON,
missing manifests, wrong bytes, non-finite values) is a :class:`CheckpointCorruptError`. Both are
:class:`CheckpointError`, one line each. :meth:`Checkpointer.restore_latest_intact` and
:meth:`Checkpointer.restore_params_latest_intact` fall back from a corrupt step to the next older one.
"""

from __future__ import annotations

import dataclasses
import pathlib
import shutil
import warnings
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from gesr_jax.train.checkpoint_errors import (
    CheckpointCorruptError,
    CheckpointMismatchError,
    CheckpointNotFoundError,
    CheckpointWarning,
    one_line,
    quiet_orbax_tracebacks,
    write_error,
)
from gesr_jax.train.checksums import count_nonfinite, iterator_digest, leaf_specs, tree_digest

INTEGRITY_VERSION = 1


class _LatestAndProtected:
    """Orbax preservation policy: the newest ``n`` steps plus every step in ``protected`` (read at each cleanup)."""

    def __init__(self, n: int, protected: set[int]):
        self.n, self.protected = n, protected

    def should_preserve(self, checkpoints: Any, *, context: Any) -> list[bool]:
        newest = {c.step for c in sorted(checkpoints, key=lambda c: c.step)[-self.n :]} if self.n > 0 else set()
        return [c.step in newest or c.step in self.protected for c in checkpoints]


@dataclasses.dataclass(frozen=True)
class Restored:
    """What :meth:`Checkpointer.restore_latest_intact` returns."""

    params: Any
    opt_state: Any
    step: int
    metadata: dict[str, Any]
    skipped: tuple[int, ...]  # newer steps found corrupt and passed over, newest first


def _abstract(tree: Any) -> Any:
    """Shape/dtype/sharding template of a pytree of arrays, for restoring onto the same layout."""
    return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)


class Checkpointer:
    """Saves and restores (params, opt_state, step, data iterator) under one directory, with checksums."""

    def __init__(self, directory: str | pathlib.Path, *, max_to_keep: int = 3, cleanup_partial: bool = False):
        """``cleanup_partial=True`` deletes Orbax's ``<step>.orbax-checkpoint-tmp-*`` folders of saves that a kill
        cut short. Only a process that holds the workdir lock may ask for it: an ``eval`` opened beside a
        running training would otherwise delete the save in progress.
        """
        self.directory = pathlib.Path(directory).absolute()
        self._protected: set[int] = set()
        options = ocp.CheckpointManagerOptions(
            create=True,
            cleanup_tmp_directories=cleanup_partial,
            preservation_policy=_LatestAndProtected(max_to_keep, self._protected),
        )
        self._manager = ocp.CheckpointManager(self.directory, options=options)
        quiet_orbax_tracebacks(True)  # released by close()
        self._open = True
        if cleanup_partial:  # Orbax runs it in the background and awaits it only in save(); finish it now
            getattr(self._manager, "_maybe_await_cleanup_tmp_directory", lambda: None)()

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def protect(self, steps: set[int] | list[int] | tuple[int, ...]) -> None:
        """Keep exactly these steps (e.g. the best one) beyond ``max_to_keep``; replaces the previous set."""
        self._protected.clear()
        self._protected.update(int(s) for s in steps)

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
        The checksums are computed here, synchronously, from host copies of the arrays being saved
        (one device-to-host copy of params and optimizer state per save).
        """
        integrity = {
            "version": INTEGRITY_VERSION,
            "params": tree_digest(params),
            "opt_state": tree_digest(opt_state),
            "data_iterator": iterator_digest(data_iterator),
        }
        args = ocp.args.Composite(
            params=ocp.args.StandardSave(params),
            opt_state=ocp.args.StandardSave(opt_state),
            step=ocp.args.JsonSave({"step": int(step), "metadata": metadata or {}, "integrity": integrity}),
            data_iterator=grain.checkpoint.CheckpointSave(data_iterator),
        )
        # An OS failure of this or an earlier background save is I/O: a CheckpointWriteError naming the folder.
        self._as_write_error(lambda: self._manager.save(step, args=args, force=True))

    def restore(
        self, step: int, *, params: Any, opt_state: Any, data_iterator: grain.DatasetIterator
    ) -> tuple[Any, Any, int, dict[str, Any]]:
        """Restore and verify step ``step`` onto the layout of the given ``params``/``opt_state`` templates.

        Returns ``(params, opt_state, step, metadata)``; ``data_iterator`` is rewound in place to
        where it was when the step was saved. Raises :class:`CheckpointNotFoundError`,
        :class:`CheckpointMismatchError` or :class:`CheckpointCorruptError`.
        """
        templates = {"params": params, "opt_state": opt_state}
        meta = self._check_structure(step, templates)
        args = ocp.args.Composite(
            params=ocp.args.StandardRestore(_abstract(params)),
            opt_state=ocp.args.StandardRestore(_abstract(opt_state)),
            data_iterator=grain.checkpoint.CheckpointRestore(data_iterator),
        )
        restored = self._restore_verified(step, args, meta, templates, data_iterator)
        return restored["params"], restored["opt_state"], int(meta["step"]), dict(meta.get("metadata", {}))

    def restore_params(self, step: int, params: Any) -> Any:
        """Restore and verify only the parameters of step ``step`` (for evaluation); errors as :meth:`restore`."""
        meta = self._check_structure(step, {"params": params})
        args = ocp.args.Composite(params=ocp.args.StandardRestore(_abstract(params)))
        return self._restore_verified(step, args, meta, {"params": params}, None)["params"]

    def restore_latest_intact(
        self,
        *,
        params: Any,
        opt_state: Any,
        data_iterator: grain.DatasetIterator,
        strict: bool = False,
        quarantine: bool = False,
    ) -> Restored | None:
        """Restore the newest step that verifies, falling back past corrupt ones; ``None`` when there are no steps.

        Each corrupt step gives a :class:`CheckpointWarning` ("checkpoint step 400 in DIR is corrupt: ...;
        falling back to step 300"). ``strict=True`` raises the first :class:`CheckpointCorruptError`
        instead. A :class:`CheckpointMismatchError` is raised at once (an older step would not match
        either). When every step is corrupt, raises :class:`CheckpointCorruptError` and leaves
        ``data_iterator`` where it was. ``quarantine=True`` moves each corrupt step out of the folder
        (see :meth:`quarantine`): a training run must do so, or re-saving that step number later fails
        and ``latest_step()`` keeps pointing at it; evaluation should leave the workdir as it is.
        """
        initial_state = data_iterator.get_state()

        def attempt(step: int) -> Restored:
            p, o, s, m = self.restore(step, params=params, opt_state=opt_state, data_iterator=data_iterator)
            return Restored(p, o, s, m, ())

        result = self._newest_intact(attempt, strict, quarantine)
        if isinstance(result, CheckpointCorruptError):
            data_iterator.set_state(initial_state)  # a failed attempt may have rewound it already
            raise result
        return result

    def restore_params_latest_intact(
        self, params: Any, *, strict: bool = False, quarantine: bool = False
    ) -> tuple[int, Any] | None:
        """``(step, params)`` of the newest step whose params verify; fallback as :meth:`restore_latest_intact`."""

        def attempt(step: int) -> Restored:
            return Restored(self.restore_params(step, params), None, step, {}, ())

        result = self._newest_intact(attempt, strict, quarantine)
        if isinstance(result, CheckpointCorruptError):
            raise result
        return None if result is None else (result.step, result.params)

    def quarantine(self, step: int) -> pathlib.Path:
        """Move step ``step`` to ``<directory>.corrupt/<step>`` (kept for inspection, out of Orbax's sight)."""
        target_root = self.directory.with_name(self.directory.name + ".corrupt")
        target = target_root / str(step)
        n = 1
        while target.exists():
            target, n = target_root / f"{step}-{n}", n + 1
        if jax.process_index() == 0:
            target_root.mkdir(parents=True, exist_ok=True)
            shutil.move(str(self.directory / str(step)), str(target))
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices(f"gesr_checkpoint_quarantine_{step}")
        self._manager.reload()
        return target

    def wait(self) -> None:
        """Block until every pending save is on disk."""
        self._as_write_error(self._manager.wait_until_finished)

    def close(self) -> None:
        """Finish pending saves and close; a save that fails here is a :class:`CheckpointWriteError` too."""
        if self._open:
            self._open = False
            try:
                self._as_write_error(self._manager.close)
            finally:
                quiet_orbax_tracebacks(False)

    def _as_write_error(self, call: Any) -> None:
        try:
            call()
        except Exception as err:  # noqa: BLE001 - only OS-level failures are converted; the rest re-raise
            failure = write_error(err, self.directory)
            if failure is None:
                raise
            raise failure from err

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------------------------------ internals

    def _newest_intact(self, attempt: Any, strict: bool, quarantine: bool) -> Restored | CheckpointCorruptError | None:
        """Run ``attempt(step)`` from the newest step down; the first success, the final error, or None."""
        steps = sorted(self.all_steps(), reverse=True)
        if not steps:
            return None
        skipped: list[int] = []
        reasons: list[str] = []
        for i, step in enumerate(steps):
            try:
                result = attempt(step)
            except CheckpointCorruptError as err:
                if strict:
                    raise
                skipped.append(step)
                reasons.append(f"step {step}: {err.reason}")
                older = f"falling back to step {steps[i + 1]}" if i + 1 < len(steps) else "no older step is left"
                warnings.warn(f"{err}; {older}", CheckpointWarning, stacklevel=3)
                if quarantine:
                    moved = self.quarantine(step)
                    warnings.warn(f"moved corrupt checkpoint step {step} to {moved}", CheckpointWarning, stacklevel=3)
                continue
            return dataclasses.replace(result, skipped=tuple(skipped))
        return CheckpointCorruptError(
            f"every checkpoint in {self.directory} is corrupt ({'; '.join(reasons)}); use a new --workdir or "
            "remove the checkpoints to start over",
            reason="; ".join(reasons),
        )

    def _corrupt(self, step: int, what: str) -> CheckpointCorruptError:
        return CheckpointCorruptError(
            f"checkpoint step {step} in {self.directory} is corrupt: {what}", step=step, reason=what
        )

    def _check_structure(self, step: int, templates: dict[str, Any]) -> dict[str, Any]:
        """Read the step's JSON item and compare its recorded trees with ``templates``; return that JSON."""
        if step not in self._manager.all_steps():
            raise CheckpointNotFoundError(
                f"no checkpoint for step {step} in {self.directory}; steps there: {self.all_steps()}"
            )
        try:
            meta = self._manager.restore(step, args=ocp.args.Composite(step=ocp.args.JsonRestore()))["step"]
            if not isinstance(meta, dict) or not isinstance(meta.get("step"), int):
                raise ValueError(f"expected an object with an integer 'step', got {str(meta)[:80]!r}")
        except Exception as err:  # noqa: BLE001 - any failure to read the step record is damage
            raise self._corrupt(step, f"its step record is unreadable ({one_line(err)})") from err
        integrity = meta.get("integrity")
        if integrity is None:
            warnings.warn(
                f"checkpoint step {step} in {self.directory} has no checksums (written by an older version); "
                "restoring it unverified",
                CheckpointWarning,
                stacklevel=3,
            )
            for name, template in templates.items():
                self._compare(step, name, self._orbax_specs(step, name), leaf_specs(template), by_path=False)
            return meta
        try:
            saved = {n: {k: (tuple(v["shape"]), v["dtype"], v["sha256"])[:2] for k, v in integrity[n].items()}
                     for n in templates}  # fmt: skip
        except (KeyError, TypeError, AttributeError) as err:
            raise self._corrupt(step, f"its checksum record is malformed ({one_line(err)})") from err
        for name, template in templates.items():
            self._compare(step, name, saved[name], leaf_specs(template), by_path=True)
        return meta

    def _orbax_specs(self, step: int, name: str) -> dict[str, tuple[tuple[int, ...], str]]:
        """Leaf specs from Orbax's own metadata (for steps without our record)."""
        try:
            tree = ocp.StandardCheckpointer().metadata(self.directory / str(step) / name).item_metadata
            return leaf_specs(tree)
        except Exception as err:  # noqa: BLE001
            raise self._corrupt(step, f"the metadata of {name!r} is unreadable ({one_line(err)})") from err

    def _compare(self, step: int, name: str, saved: dict, current: dict, *, by_path: bool) -> None:
        if by_path:
            diff = [k for k in sorted(saved.keys() | current.keys()) if saved.get(k) != current.get(k)]
            if not diff:
                return
            k = diff[0]
            detail = f"{name}{k}: saved {_spec(saved.get(k))}, this config {_spec(current.get(k))}"
            if len(diff) > 1:
                detail += f" (and {len(diff) - 1} more)"
        else:  # Orbax's key paths are spelled differently; compare the multiset of shapes instead
            if sorted(saved.values()) == sorted(current.values()):
                return
            detail = f"{name}: saved {len(saved)} arrays, this config {len(current)} with different shapes/dtypes"
        raise CheckpointMismatchError(
            f"checkpoint step {step} in {self.directory} does not match the model and optimizer built from "
            f"this config ({detail})"
        )

    def _restore_verified(
        self,
        step: int,
        args: ocp.args.Composite,
        meta: dict[str, Any],
        templates: dict[str, Any],
        data_iterator: grain.DatasetIterator | None,
    ) -> Any:
        try:
            restored = self._manager.restore(step, args=args)
        except Exception as err:  # noqa: BLE001 - the structure matched, so a failure here is damage
            raise self._corrupt(step, f"restoring it failed ({one_line(err)})") from err
        integrity = meta.get("integrity")
        for name in templates:
            if integrity is not None:
                got = tree_digest(restored[name])
                bad = [k for k, v in integrity[name].items() if got.get(k, {}).get("sha256") != v.get("sha256")]
                if bad:
                    more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
                    raise self._corrupt(step, f"checksum mismatch in {name}{bad[0]}{more}")
            nonfinite = count_nonfinite(restored[name])
            if nonfinite:
                raise self._corrupt(step, f"{name} holds {nonfinite} NaN/Inf values")
        # The record holds the primary host's iterator digest only (each host has its own state file).
        if data_iterator is not None and integrity is not None and jax.process_count() == 1:
            if iterator_digest(data_iterator) != integrity.get("data_iterator"):
                raise self._corrupt(step, "checksum mismatch in the data iterator state")
        return restored


def _spec(spec: tuple[tuple[int, ...], str] | None) -> str:
    return "nothing" if spec is None else f"{spec[1]}{list(spec[0])}"

"""A run's folder, :class:`Workdir`: its config, model record, checkpoints, best step, lock and data fingerprint.

The one reader and writer of a workdir's records: the trainer, ``gesr eval``, the serving Scorer,
``gesr export`` and the cascade all go through it, so they pick the same step by the same rule::

    config.json             the full Config (read back with the module of a user's model kind imported)
    model.json              {"kind", "api", "config_module"}: the model API that trained it
    best.json               {"step", "metric", "mode", "value"}: the best valid step (train/selection.py)
    data_fingerprint.json   the data's fingerprint at the first start
    checkpoints/            Orbax steps (gesr_jax/train/checkpoint.py)
    .lock                   held by the running `gesr train`

Restoring params takes ``step``: ``None`` = the best valid step, falling back (with a warning, unless
``strict``) to the newest intact step when the best one is corrupt or gone, or silently when the run
recorded none; ``"last"`` = the newest intact step; a number = exactly that step. The file primitives
(lock, atomic writes, writability, fingerprints) are in ``workdir_files.py``.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
import pathlib
import types
import warnings
from collections.abc import Mapping
from typing import Any

from flax import nnx

from gesr_jax import api as default_api
from gesr_jax import config as config_lib
from gesr_jax.config import Config, ConfigError
from gesr_jax.data import datasets
from gesr_jax.data.batch import BatchSchema
from gesr_jax.layers import sharded_lookup
from gesr_jax.models import registry
from gesr_jax.train.checkpoint import Checkpointer
from gesr_jax.train.checkpoint_errors import CheckpointCorruptError, CheckpointNotFoundError, CheckpointWarning
from gesr_jax.workdir_files import (
    FINGERPRINT_FILE,
    WorkdirError,
    WorkdirLock,
    atomic_write_json,
    check_data_fingerprint,
)

CONFIG_FILE = "config.json"
MODEL_RECORD = "model.json"
BEST_FILE = "best.json"
CHECKPOINTS_DIR = "checkpoints"
DEFAULT_MODEL_API = default_api.__name__  # dispatches on config.model.kind through gesr_jax.models.registry

# Keys that may differ between config.json and a restart: they change how long, how often and what is
# reported, not what is trained. A new num_steps also stretches the cosine schedule from the restored step on.
RESUMABLE_CHANGES = frozenset(
    {
        "train.num_steps",
        "train.log_every",
        "train.eval_every",
        "train.checkpoint_every",
        "train.max_checkpoints",
        "train.evaluators",
        "train.ranking_ks",
        "train.patience",
    }
)

StepChoice = int | str | None  # None = best valid step, "last" = newest intact, or a step number


def api_name(model_api: Any = None) -> str:
    """``"module:qualname"`` naming a model API (a module gives its name); an ``api_name`` attribute wins."""
    model_api = default_api if model_api is None else model_api
    explicit = getattr(model_api, "api_name", None)
    if isinstance(explicit, str):
        return explicit
    if isinstance(model_api, types.ModuleType):
        return model_api.__name__
    named = model_api if hasattr(model_api, "__qualname__") else type(model_api)
    return f"{named.__module__}:{named.__qualname__}"


def model_kind(config: Config) -> str:
    return str(config.model.kind)


def _flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def check_resume_config(saved: Config, config: Config) -> None:
    """Raise ConfigError naming every key where ``config`` differs from the run's saved config."""
    old, new = _flatten(config_lib.to_dict(saved)), _flatten(config_lib.to_dict(config))
    diff = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k) and k not in RESUMABLE_CHANGES)
    if diff:
        details = ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in diff)
        raise ConfigError(
            f"this workdir was trained with a different config ({details}); use a new --workdir, or only change "
            f"{sorted(RESUMABLE_CHANGES)} when resuming"
        )


@dataclasses.dataclass(frozen=True)
class RestoredModel:
    """A workdir's model at one step, built with the default model API for the schema of its data."""

    graphdef: Any
    params: Any
    schema: BatchSchema
    config: Config
    step: int


class Workdir:
    """The folder of one ``gesr train`` run; see the module docstring for its files."""

    def __init__(self, path: str | os.PathLike[str]):
        self.path = pathlib.Path(path)
        self.config_path = self.path / CONFIG_FILE
        self.record_path = self.path / MODEL_RECORD
        self.best_path = self.path / BEST_FILE
        self.fingerprint_path = self.path / FINGERPRINT_FILE
        self.checkpoints_dir = self.path / CHECKPOINTS_DIR

    def __repr__(self) -> str:
        return f"Workdir({str(self.path)!r})"

    # ------------------------------------------------------------------------------------------ records

    def has_checkpoints(self) -> bool:
        """True when ``checkpoints/`` holds a finished Orbax step (a restart), without creating anything."""
        folder = self.checkpoints_dir
        return folder.is_dir() and any(p.name.isdigit() for p in folder.iterdir())

    def read_config(self) -> Config:
        """``config.json``, after importing the module that defines a user's model kind (``model.json``)."""
        if not self.config_path.exists():
            raise WorkdirError(f"{self.path} has no {CONFIG_FILE}; is it a `gesr train` workdir?")
        record = self.read_model_record()
        module = (record or {}).get("config_module")
        if module and not module.startswith("gesr_jax.") and record.get("kind") not in registry.kinds():
            try:  # a user's kind registers itself when its module is imported
                importlib.import_module(module)
            except ImportError as err:
                raise WorkdirError(
                    f"{self.path} was trained with model.kind {record.get('kind')!r} defined in module {module!r}, "
                    f"which cannot be imported here ({err}); put it on PYTHONPATH"
                ) from None
        return config_lib.load_json(self.config_path)

    def read_model_record(self) -> dict[str, Any] | None:
        """``model.json`` as a dict; None for a workdir written before the record existed."""
        return self._read_json(self.record_path)

    def check_model(self, config: Config, model_api: Any = None) -> None:
        """Refuse ``model_api`` unless it is the model API (and kind) that ``model.json`` records.

        Workdirs written before model.json existed are accepted as they are.
        """
        record = self.read_model_record()
        if record is None:
            return
        current = {"kind": model_kind(config), "api": api_name(model_api)}
        if record.get("api") != current["api"] or record.get("kind") != current["kind"]:
            raise WorkdirError(
                f"{self.path} was trained by the model API {record.get('api')!r} (model.kind {record.get('kind')!r}); "
                f"refusing to use it with {current['api']!r} (model.kind {current['kind']!r}). Pass that model API "
                "(gesr_jax.train.trainer.evaluate_workdir(workdir, model_api=...)), or build "
                "serving.scorer.Scorer(graphdef, params, schema) yourself"
            )

    def check_resume(self, config: Config, model_api: Any = None) -> None:
        """Check a restart against the saved config and model API (reads only)."""
        if not self.config_path.exists():
            raise WorkdirError(f"{self.path} has checkpoints but no {CONFIG_FILE} to check this config against")
        check_resume_config(self.read_config(), config)
        self.check_model(config, model_api)

    def check_data(self, fingerprint: Mapping[str, Any], *, resuming: bool, allow_change: bool) -> bool:
        """Compare the data with the fingerprint saved at the first start; True when the record must be (re)written."""
        saved = None
        if resuming and self.fingerprint_path.exists():
            try:
                saved = json.loads(self.fingerprint_path.read_text())
            except (OSError, ValueError) as err:
                raise WorkdirError(
                    f"{self.fingerprint_path} is unreadable ({err}); delete it to resume without the data check"
                ) from None
        changes = check_data_fingerprint(saved, fingerprint, allow_change=allow_change)
        return not resuming or saved is None or bool(changes)

    def write_records(self, config: Config, model_api: Any = None, fingerprint: Mapping[str, Any] | None = None) -> None:
        """(Re)write config.json and model.json, and the data fingerprint when given, each atomically."""
        atomic_write_json(self.config_path, config_lib.to_dict(config))
        record = {"kind": model_kind(config), "api": api_name(model_api),
                  "config_module": type(config.model).__module__}  # fmt: skip
        atomic_write_json(self.record_path, record)
        if fingerprint is not None:
            atomic_write_json(self.fingerprint_path, dict(fingerprint))

    def best_step(self) -> int | None:
        """The best step ``best.json`` records, or None (no file, or one a crash left unreadable)."""
        record = self._read_json(self.best_path, strict=False)
        step = (record or {}).get("step")
        return step if isinstance(step, int) and not isinstance(step, bool) else None

    def lock(self) -> WorkdirLock:
        """The workdir's lock (not yet acquired)."""
        return WorkdirLock(self.path)

    def checkpointer(self, *, max_to_keep: int = 3, cleanup_partial: bool = False) -> Checkpointer:
        """The Orbax checkpoints of the run; see :class:`Checkpointer` for ``cleanup_partial``."""
        return Checkpointer(self.checkpoints_dir, max_to_keep=max_to_keep, cleanup_partial=cleanup_partial)

    # ------------------------------------------------------------------------------------------ restore

    def restore_params(
        self, template: Any, step: StepChoice = None, *, strict: bool = False, checkpoints: Checkpointer | None = None
    ) -> tuple[int, Any]:
        """``(step, params)`` restored onto ``template``'s layout; ``step`` and ``strict`` as in the module docstring.

        ``checkpoints`` reuses an open :class:`Checkpointer` (else one is opened and closed here).
        """
        number = parse_step(step)
        if checkpoints is None:
            with self.checkpointer() as opened:
                return self._restore(opened, template, step, number, strict)
        return self._restore(checkpoints, template, step, number, strict)

    def _restore(self, checkpoints: Checkpointer, template: Any, step: StepChoice, number: int | None,
                 strict: bool) -> tuple[int, Any]:  # fmt: skip
        if number is not None:
            return number, checkpoints.restore_params(number, template)
        best = self.best_step() if step is None else None
        if best is not None:
            try:
                return best, checkpoints.restore_params(best, template)
            except (CheckpointCorruptError, CheckpointNotFoundError) as err:
                if strict:
                    raise
                warnings.warn(f"the best step {best} cannot be used ({err}); using the newest intact checkpoint",
                              CheckpointWarning, stacklevel=4)  # fmt: skip
        got = checkpoints.restore_params_latest_intact(template, strict=strict)
        if got is None:
            raise WorkdirError(f"{self.checkpoints_dir} holds no checkpoint yet")
        return got

    def restore_model(self, step: StepChoice = None, *, strict: bool = False) -> RestoredModel:
        """The model of a workdir trained with the default model API (``gesr_jax.api``), built for its data."""
        config = self.read_config()
        self.check_model(config)
        schema = datasets.schema_for(config.data)
        with nnx.use_eager_sharding(False):
            graphdef, template = default_api.init(config, config.train.seed, schema)
            if config.model.embedding_sharding == "row":  # row tables are saved padded (sharded_lookup.pad_table_rows)
                template = sharded_lookup.pad_table_rows(template)
        chosen, params = self.restore_params(template, step, strict=strict)
        return RestoredModel(graphdef, params, schema, config, chosen)

    @staticmethod
    def _read_json(path: pathlib.Path, *, strict: bool = True) -> dict[str, Any] | None:
        if not path.exists():
            return None
        try:
            value = json.loads(path.read_text())
        except (OSError, ValueError) as err:
            if not strict:
                return None
            raise WorkdirError(f"{path} is unreadable ({err})") from None
        if not isinstance(value, dict):
            if not strict:
                return None
            raise WorkdirError(f"{path} holds {type(value).__name__}, not a JSON object")
        return value


def parse_step(step: StepChoice) -> int | None:
    """The step number of ``step`` (None for None / ``"last"``); ConfigError for anything else."""
    if step is None or step == "last":
        return None
    if isinstance(step, int) and not isinstance(step, bool):
        return step
    try:
        return int(str(step))
    except ValueError:
        raise ConfigError(f"--step must be a checkpoint step number or 'last', got {step!r}") from None

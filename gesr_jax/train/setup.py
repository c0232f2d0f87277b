"""Everything a run builds before its first step, shared by training, evaluation and ``gesr eval``.

:func:`setup` validates the config, gets the splits (from the dataset registry or injected), builds the
mesh, initialises the model for the schema *the splits carry* (never re-derived from ``config.data``, so
injected splits always get a model that fits them), places parameters, and builds the optimizer and the
evaluators. The workdir helpers keep a run's ``config.json`` and ``model.json`` consistent across restarts
and refuse to score a workdir with a different model API than the one that trained it.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import pathlib
import types
from typing import Any

import jax
from flax import nnx

from gesr_jax import config as config_lib
from gesr_jax.config import Config, ConfigError
from gesr_jax.data import datasets, pipeline
from gesr_jax.models import registry
from gesr_jax.train import distributed
from gesr_jax.train import evaluators as evaluators_lib
from gesr_jax.train import sharding as sharding_lib
from gesr_jax.train import step as step_lib
from gesr_jax.train import workdir as workdir_lib
from gesr_jax.train.workdir import WorkdirError  # noqa: F401  (the one workdir error type; re-exported)

DEFAULT_MODEL_API = "gesr_jax.api"  # dispatches on config.model.kind through gesr_jax.models.registry
MODEL_RECORD = "model.json"

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


def default_model_api() -> Any:
    """``gesr_jax.api``, imported on first use so the trainer imports without the model package."""
    return importlib.import_module(DEFAULT_MODEL_API)


def default_splits(config: Config) -> datasets.Splits:
    """Train/valid/test arrays of ``config.data`` from the dataset registry."""
    return datasets.load_splits(config.data)


def api_name(model_api: Any) -> str:
    """``"module:qualname"`` naming a model API (a module gives its name); an ``api_name`` attribute wins."""
    model_api = default_model_api() if model_api is None else model_api
    explicit = getattr(model_api, "api_name", None)
    if isinstance(explicit, str):
        return explicit
    if isinstance(model_api, types.ModuleType):
        return model_api.__name__
    named = model_api if hasattr(model_api, "__qualname__") else type(model_api)
    return f"{named.__module__}:{named.__qualname__}"


def model_kind(config: Config) -> str:
    return str(getattr(config.model, "kind", "gesr"))


@dataclasses.dataclass
class Setup:
    """A run's built pieces; ``tx`` / ``opt_state`` / ``opt_state_sharding`` are None when not training."""

    config: Config
    model_api: Any
    splits: Any  # datasets.Splits or any object with train/valid/test/schema
    tasks: tuple[str, ...]  # = splits.schema.tasks
    task_weights: tuple[float, ...]
    mesh: jax.sharding.Mesh
    graphdef: Any
    params: Any  # freshly initialised, placed on the mesh (a restore template when resuming)
    params_sharding: Any
    evaluator: evaluators_lib.Evaluators
    tx: Any = None
    opt_state: Any = None
    opt_state_sharding: Any = None
    embedding_sharding: str = "replicated"  # the tables' layout on the mesh (train/sharding.py)

    @property
    def schema(self) -> Any:
        return self.splits.schema


def validate(config: Config) -> None:
    """Every section's checks, raised as :class:`ConfigError` (a usage error, not a traceback)."""
    config_lib.validate_config(config)
    for name in config.train.evaluators:
        evaluators_lib.get_evaluator(name)


def setup(
    config: Config,
    *,
    model_api: Any = None,
    splits: Any = None,
    num_devices: int | None = None,
    training: bool = True,
) -> Setup:
    """Validate ``config`` and build splits, mesh, model, optimizer (when ``training``) and evaluators."""
    validate(config)
    tc = config.train
    model_api = default_model_api() if model_api is None else model_api
    splits = default_splits(config) if splits is None else splits
    tasks = tuple(splits.schema.tasks)
    try:
        mesh, layout = sharding_lib.mesh_for(config, num_devices, strict=training)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    try:
        weights = step_lib.resolve_task_weights(tasks, tc)
        if training:
            sharding_lib.check_batch_size(tc.batch_size, mesh, "train.batch_size")
            pipeline.local_batch_size(tc.batch_size, jax.process_count())
            n_train = pipeline.check_split(splits.train, "train split")
            if n_train < tc.batch_size:
                raise ValueError(
                    f"train.batch_size={tc.batch_size} is larger than the train split ({n_train} requests)"
                )
        sharding_lib.check_batch_size(tc.eval_batch_size, mesh, "train.eval_batch_size")
        pipeline.local_batch_size(tc.eval_batch_size, jax.process_count(), field="train.eval_batch_size")
    except ValueError as err:
        raise ConfigError(str(err)) from None
    tx = opt_state = opt_state_sharding = None
    with sharding_lib.mesh_context(mesh, embedding_sharding=layout):
        graphdef, params, params_sharding = init_model(config, model_api, mesh, splits.schema)
        if training:
            tx = step_lib.make_optimizer(tc)
            opt_state_sharding = sharding_lib.param_shardings(
                jax.eval_shape(tx.init, params), mesh, embedding_sharding=layout
            )
            opt_state = jax.jit(tx.init, out_shardings=opt_state_sharding)(params)
        context = evaluators_lib.EvalContext(
            config=config, model_api=model_api, graphdef=graphdef, params=params, schema=splits.schema,
            tasks=tasks, task_weights=weights, mesh=mesh, params_sharding=params_sharding, splits=splits,
        )  # fmt: skip
        evaluator = evaluators_lib.build_evaluators(tc.evaluators, context)
    return Setup(
        config, model_api, splits, tasks, weights, mesh, graphdef, params, params_sharding, evaluator,
        tx, opt_state, opt_state_sharding, embedding_sharding=layout,
    )  # fmt: skip


def init_model(config: Config, model_api: Any, mesh: jax.sharding.Mesh, schema: Any) -> tuple[Any, Any, Any]:
    """``(graphdef, params placed on the mesh, params sharding)`` from ``model_api.init(config, seed, schema)``."""
    # Parameters are created unsharded on the host and placed below; sharding is decided here, not
    # at construction time, so models never need a mesh.
    with nnx.use_eager_sharding(False):
        try:
            graphdef, params = model_api.init(config, config.train.seed, schema=schema)
        except ValueError as err:  # the model config does not fit this data (e.g. model.hma_pairs names)
            raise ConfigError(str(err)) from None
    layout = sharding_lib.embedding_layout(config)
    params = sharding_lib.layout_params(params, layout)
    params_sharding = sharding_lib.param_shardings(params, mesh, embedding_sharding=layout)
    return graphdef, sharding_lib.place(params, params_sharding), params_sharding


# ---------------------------------------------------------------------------------------------- workdir


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
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


def has_checkpoints(workdir: pathlib.Path) -> bool:
    """True when ``workdir/checkpoints`` holds a finished Orbax step (a restart), without creating anything."""
    folder = workdir / "checkpoints"
    return folder.is_dir() and any(p.name.isdigit() for p in folder.iterdir())


def check_resume(workdir: pathlib.Path, config: Config, model_api: Any) -> None:
    """Check a restart against the saved config and model API (reads only)."""
    config_path = workdir / "config.json"
    if not config_path.exists():
        raise WorkdirError(f"{workdir} has checkpoints but no config.json to check this config against")
    check_resume_config(config_lib.load_json(config_path), config)
    check_model_record(workdir, config, model_api)


def check_data(workdir: pathlib.Path, fingerprint: dict[str, Any], resuming: bool, allow_change: bool) -> bool:
    """Compare the data with the fingerprint saved at the first start; True when the record must be (re)written."""
    path = workdir / workdir_lib.FINGERPRINT_FILE
    saved = None
    if resuming and path.exists():
        try:
            saved = json.loads(path.read_text())
        except (OSError, ValueError) as err:
            raise WorkdirError(f"{path} is unreadable ({err}); delete it to resume without the data check") from None
    changes = workdir_lib.check_data_fingerprint(saved, fingerprint, allow_change=allow_change)
    return not resuming or saved is None or bool(changes)


def prepare_workdir(
    workdir: pathlib.Path,
    config: Config,
    model_api: Any,
    resume_step: int | None,
    fingerprint: dict[str, Any] | None = None,
) -> None:
    """(Re)write config.json and model.json (and the data fingerprint when given), atomically, on process 0.

    A restart is checked first (:func:`check_resume`) when ``resume_step`` is not None.
    """
    if resume_step is not None:
        check_resume(workdir, config, model_api)
    if not distributed.is_primary():
        return
    workdir_lib.atomic_write_json(workdir / "config.json", config_lib.to_dict(config))
    record = {"kind": model_kind(config), "api": api_name(model_api),
              "config_module": type(config.model).__module__}  # fmt: skip
    workdir_lib.atomic_write_json(workdir / MODEL_RECORD, record)
    if fingerprint is not None:
        workdir_lib.atomic_write_json(workdir / workdir_lib.FINGERPRINT_FILE, fingerprint)


def read_workdir_config(workdir: pathlib.Path) -> Config:
    config_path = workdir / "config.json"
    if not config_path.exists():
        raise WorkdirError(f"{workdir} has no config.json; is it a `gesr train` workdir?")
    _import_model_kind(workdir)
    return config_lib.load_json(config_path)


def _import_model_kind(workdir: pathlib.Path) -> None:
    """Import the module that defines a custom model kind's config, so config.json can be read back.

    A user's kind registers itself when its module is imported; ``model.json`` records that module.
    """
    path = workdir / MODEL_RECORD
    if not path.exists():
        return
    record = json.loads(path.read_text())
    module = record.get("config_module")
    if module and not module.startswith("gesr_jax.") and record.get("kind") not in registry.kinds():
        try:
            importlib.import_module(module)
        except ImportError as err:
            raise WorkdirError(
                f"{workdir} was trained with model.kind {record.get('kind')!r} defined in module {module!r}, "
                f"which cannot be imported here ({err}); put it on PYTHONPATH"
            ) from None


def check_model_record(workdir: pathlib.Path, config: Config, model_api: Any) -> None:
    """Refuse ``model_api`` unless it is the model API (and kind) that ``workdir/model.json`` records.

    Workdirs written before model.json existed are accepted as they are.
    """
    path = workdir / MODEL_RECORD
    if not path.exists():
        return
    record = json.loads(path.read_text())
    current = {"kind": model_kind(config), "api": api_name(model_api)}
    if record.get("api") != current["api"] or record.get("kind") != current["kind"]:
        raise WorkdirError(
            f"{workdir} was trained by the model API {record.get('api')!r} (model.kind {record.get('kind')!r}); "
            f"refusing to use it with {current['api']!r} (model.kind {current['kind']!r}). Evaluate it from Python "
            f"with gesr_jax.train.evaluate_workdir(workdir, model_api=<that API>)"
        )


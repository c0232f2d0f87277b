"""Everything a run builds before its first step, shared by training, evaluation and ``gesr eval``.

:func:`setup` gets the splits (from the dataset registry or injected), builds the mesh, initialises the
model for the schema *the splits carry* (never re-derived from ``config.data``, so injected splits always
get a model that fits them), places parameters, and builds the optimizer, the evaluators and the probe
batch. :func:`validate` is the config check; the callers run it once per run, before anything is built.
Reading and writing the workdir is :class:`gesr_jax.workdir.Workdir`'s.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
from flax import nnx

from gesr_jax import api as default_api
from gesr_jax import config as config_lib
from gesr_jax.config import Config, ConfigError
from gesr_jax.data import datasets, pipeline
from gesr_jax.train import evaluators as evaluators_lib
from gesr_jax.train import sharding as sharding_lib
from gesr_jax.train import step as step_lib


def default_model_api() -> Any:
    """``gesr_jax.api`` (a function, so tests can swap in another model API)."""
    return default_api


def default_splits(config: Config) -> datasets.Splits:
    """Train/valid/test arrays of ``config.data`` from the dataset registry."""
    return datasets.load_splits(config.data)


@dataclasses.dataclass
class Setup:
    """A run's built pieces; ``tx`` / ``opt_state`` / ``opt_state_sharding`` / ``probe`` are None when not training."""

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
    probe: evaluators_lib.FiniteProbe | None = None  # finite logits on a fixed valid batch? (checked before a save)
    embedding_sharding: str = "replicated"  # the tables' layout on the mesh (train/sharding.py)

    @property
    def schema(self) -> Any:
        return self.splits.schema


def validate(config: Config) -> None:
    """Every section's checks and the evaluator names, raised as :class:`ConfigError` (a usage error)."""
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
    """Build splits, mesh, model, optimizer (when ``training``) and evaluators of a validated ``config``."""
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
    tx = opt_state = opt_state_sharding = probe = None
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
        if training and len(splits.valid["num_candidates"]):  # an empty valid split has nothing to probe
            probe = evaluators_lib.FiniteProbe(context, splits.valid)
    return Setup(
        config, model_api, splits, tasks, weights, mesh, graphdef, params, params_sharding, evaluator,
        tx, opt_state, opt_state_sharding, probe, embedding_sharding=layout,
    )  # fmt: skip


def init_model(config: Config, model_api: Any, mesh: jax.sharding.Mesh, schema: Any) -> tuple[Any, Any, Any]:
    """``(graphdef, params placed on the mesh, params sharding)`` from ``model_api.init(config, seed, schema)``."""
    # Parameters are created unsharded on the host and placed below; sharding is decided here, not
    # at construction time, so models never need a mesh.
    with nnx.use_eager_sharding(False):  # a model's ConfigError (it does not fit this data) stays one line
        graphdef, params = model_api.init(config, config.train.seed, schema=schema)
    layout = sharding_lib.embedding_layout(config)
    params = sharding_lib.layout_params(params, layout)
    params_sharding = sharding_lib.param_shardings(params, mesh, embedding_sharding=layout)
    return graphdef, sharding_lib.place(params, params_sharding), params_sharding

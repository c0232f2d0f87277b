"""Pure train and eval steps over ``nnx.split`` pytrees, compiled with explicit shardings.

The model enters only through a *model API*: any object with

* ``init(config, seed, schema) -> (graphdef, params)``, the model for the batch schema the data gave, and
* ``apply(graphdef, params, batch, *, key=None, train=False) -> {task: logits [B, C]}``

(``gesr_jax.api``, which builds ``config.model.kind`` from the model registry; a tiny linear scorer in
the tests). The "ranking" evaluator also needs ``item_cache`` and ``retrieval_scores``
(gesr_jax/train/evaluators.py). Steps never hold RNG state: the trainer passes ``fold_in(base_key, step)``.

Loss: per task, binary cross-entropy on the final logits averaged over the valid candidates of the
global batch (padding slots and empty rows count 0), then a weighted sum over tasks with
``train.task_weights`` (empty = 1 each).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from gesr_jax.data.batch import lengths_mask
from gesr_jax.train import sharding as sharding_lib
from gesr_jax.train import table_optimizer
from gesr_jax.train.config import TrainConfig

Batch = Mapping[str, jax.Array]
Metrics = dict[str, jax.Array]


class ModelAPI(Protocol):
    """The pure-function surface the trainer needs from a model."""

    def init(self, config: Any, seed: int, schema: Any) -> tuple[Any, Any]: ...

    def apply(
        self, graphdef: Any, params: Any, batch: Batch, *, key: jax.Array | None = None, train: bool = False
    ) -> dict[str, jax.Array]: ...


def learning_rate_schedule(config: TrainConfig) -> optax.Schedule:
    """Linear warm-up from 0 to the peak, then cosine decay to ``end_lr_fraction * peak`` at ``num_steps``."""
    warmup = min(config.warmup_steps, max(config.num_steps - 1, 0))
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=config.learning_rate,
        warmup_steps=warmup,
        decay_steps=max(config.num_steps, warmup + 1),
        end_value=config.learning_rate * config.end_lr_fraction,
    )


def make_optimizer(config: TrainConfig) -> optax.GradientTransformation:
    """AdamW on the warm-up/cosine schedule, after optional global-norm clipping (over every gradient).

    Weight decay skips 0-d and 1-d parameters (biases, norm scales), the usual AdamW practice.
    ``train.table_optimizer="rowwise_adagrad"`` gives the embedding tables their own partition
    (gesr_jax/train/table_optimizer.py) on the same schedule; ``"dense"`` trains them with the AdamW above.
    """
    schedule = learning_rate_schedule(config)
    opt = optax.adamw(
        schedule,
        weight_decay=config.weight_decay,
        mask=lambda params: jax.tree.map(lambda x: jnp.ndim(x) >= 2, params),
    )
    if getattr(config, "table_optimizer", "dense") == "rowwise_adagrad":
        opt = table_optimizer.partitioned(opt, table_optimizer.rowwise_adagrad(schedule))
    if config.grad_clip_norm > 0:
        return optax.chain(optax.clip_by_global_norm(config.grad_clip_norm), opt)
    return opt


def resolve_task_weights(tasks: Sequence[str], config: TrainConfig) -> tuple[float, ...]:
    """``train.task_weights`` checked against the dataset's tasks; ``()`` means 1 for every task."""
    if not config.task_weights:
        return (1.0,) * len(tasks)
    if len(config.task_weights) != len(tasks):
        raise ValueError(
            f"train.task_weights has {len(config.task_weights)} entries but the data has tasks {list(tasks)}"
        )
    return tuple(float(w) for w in config.task_weights)


def candidate_mask(batch: Batch, num_slots: int) -> jax.Array:
    """[B, C] float mask of valid candidate slots (0 for padding slots and empty rows)."""
    return lengths_mask(batch["num_candidates"], num_slots).astype(jnp.float32)


def multitask_loss(
    logits: Mapping[str, jax.Array], batch: Batch, tasks: Sequence[str], weights: Sequence[float]
) -> tuple[jax.Array, Metrics]:
    """Weighted sum over tasks of the masked mean BCE; also returns each task's BCE."""
    missing = [t for t in tasks if t not in logits]
    if missing:
        raise ValueError(f"model returned logits for {sorted(logits)}, missing tasks {missing}")
    first = logits[tasks[0]]
    mask = candidate_mask(batch, first.shape[1])
    count = jnp.maximum(mask.sum(), 1.0)
    total = jnp.zeros((), jnp.float32)
    per_task: Metrics = {}
    for task, weight in zip(tasks, weights, strict=True):
        x = logits[task].astype(jnp.float32)
        if x.shape != first.shape:
            raise ValueError(f"logits for task {task!r} have shape {x.shape}, expected {first.shape}")
        bce = optax.sigmoid_binary_cross_entropy(x, batch[f"label_{task}"].astype(jnp.float32))
        per_task[f"loss/{task}"] = jnp.sum(bce * mask) / count
        total = total + weight * per_task[f"loss/{task}"]
    return total, per_task


def make_train_step(
    model_api: ModelAPI,
    graphdef: Any,
    tx: optax.GradientTransformation,
    tasks: Sequence[str],
    weights: Sequence[float],
    *,
    mesh: Mesh,
    params_sharding: Any,
    opt_state_sharding: Any,
    batch_sharding: Mapping[str, Any],
) -> Callable[[Any, Any, Batch, jax.Array], tuple[Any, Any, Metrics]]:
    """``train_step(params, opt_state, batch, key) -> (params, opt_state, metrics)``, jitted.

    Params and optimizer state are donated: their buffers are reused for the updated values.
    Metrics (``loss``, ``loss/<task>``, ``grad_norm``) come back replicated.
    """
    tasks, weights = tuple(tasks), tuple(weights)

    def loss_fn(params: Any, batch: Batch, key: jax.Array) -> tuple[jax.Array, Metrics]:
        logits = model_api.apply(graphdef, params, batch, key=key, train=True)
        return multitask_loss(logits, batch, tasks, weights)

    def train_step(params: Any, opt_state: Any, batch: Batch, key: jax.Array) -> tuple[Any, Any, Metrics]:
        (loss, per_task), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, batch, key)
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads), **per_task}
        return params, opt_state, metrics

    replicated = sharding_lib.replicated(mesh)
    return jax.jit(
        train_step,
        in_shardings=(params_sharding, opt_state_sharding, dict(batch_sharding), replicated),
        out_shardings=(params_sharding, opt_state_sharding, replicated),
        donate_argnums=(0, 1),
    )


def make_eval_step(
    model_api: ModelAPI,
    graphdef: Any,
    tasks: Sequence[str],
    *,
    mesh: Mesh,
    params_sharding: Any,
    batch_sharding: Mapping[str, Any],
) -> Callable[[Any, Batch], dict[str, jax.Array]]:
    """``eval_step(params, batch) -> {"logit_<task>": [B, C]}``, jitted, outputs replicated.

    Replicated outputs give every host the whole global batch's logits, which host-side metrics
    (AUC, NE over the full eval set) need.
    """
    tasks = tuple(tasks)

    def eval_step(params: Any, batch: Batch) -> dict[str, jax.Array]:
        logits = model_api.apply(graphdef, params, batch, key=None, train=False)
        return {f"logit_{t}": logits[t].astype(jnp.float32) for t in tasks}

    return jax.jit(
        eval_step,
        in_shardings=(params_sharding, dict(batch_sharding)),
        out_shardings=sharding_lib.replicated(mesh),
    )

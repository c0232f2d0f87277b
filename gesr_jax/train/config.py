"""TrainConfig: optimizer, schedule, loop length, evaluation and checkpoint cadence."""

from __future__ import annotations

import dataclasses
import math
import typing


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Optimizer, schedule, loop length, evaluation and checkpoint cadence of one run."""

    batch_size: int = 64  # requests per global batch (sharded over the `data` mesh axis)
    eval_batch_size: int = 256  # requests per eval batch; the last batch is padded with empty rows
    num_steps: int = 1000  # total optimizer steps
    learning_rate: float = 1e-3  # peak AdamW learning rate
    warmup_steps: int = 100  # linear warm-up, then cosine decay to end_lr_fraction * peak
    end_lr_fraction: float = 0.1  # final learning rate as a fraction of the peak
    weight_decay: float = 1e-5  # AdamW decoupled weight decay
    grad_clip_norm: float = 1.0  # global-norm clipping; 0 disables
    seed: int = 0  # params init, per-epoch data shuffling, dropout / stochastic-length keys
    log_every: int = 50  # steps between train-metric lines in metrics.jsonl; 0 = only the last step
    eval_every: int = 500  # steps between validation passes; 0 = only at the end
    checkpoint_every: int = 500  # steps between Orbax checkpoints; 0 = only the last step
    max_checkpoints: int = 3  # checkpoints kept in the workdir
    task_weights: tuple[float, ...] = ()  # per-task BCE weights; () = 1 for every task
    evaluators: tuple[str, ...] = ("candidate",)  # registered evaluators (train/evaluators.py): candidate, ranking
    ranking_ks: tuple[int, ...] = (1, 10, 50)  # K of HR@K / NDCG@K for the "ranking" evaluator
    # Model selection (train/selection.py): the valid metric that picks the reported checkpoint.
    select_metric: str = "mean_ne"  # "mean_ne" (mean NE over tasks), "<task>/ne", "<task>/auc", "ranking/mrr", ...
    select_mode: str = "auto"  # "min", "max", or "auto" (derived from the metric's name: NE/loss min, AUC/HR max)
    patience: int = 0  # stop after this many valid passes without improvement; 0 = never stop early
    model_parallel: int = 1  # size of the mesh's `model` axis (embedding rows/columns shard over it); 1 = data only
    # "dense": embedding tables train with the main optimizer; "rowwise_adagrad": tables get their own optax
    # partition with one Adagrad accumulator per row (train/sharding.py, issue 21)
    table_optimizer: typing.Literal["dense", "rowwise_adagrad"] = "dense"

    def validate(self) -> None:
        """Raise ValueError naming the first field outside its valid range."""
        positive = ("batch_size", "eval_batch_size", "max_checkpoints")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"train.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("learning_rate", "end_lr_fraction", "weight_decay", "grad_clip_norm"):
            if not math.isfinite(getattr(self, name)):
                raise ValueError(f"train.{name} must be a finite number, got {getattr(self, name)}")
        if any(not math.isfinite(w) for w in self.task_weights):
            raise ValueError(f"train.task_weights must be finite numbers, got {self.task_weights}")
        for name in ("seed", "num_steps", "warmup_steps", "log_every", "eval_every", "checkpoint_every", "patience"):
            if getattr(self, name) < 0:
                raise ValueError(f"train.{name} must be >= 0, got {getattr(self, name)}")
        if not self.learning_rate > 0:
            raise ValueError(f"train.learning_rate must be > 0, got {self.learning_rate}")
        for name in ("end_lr_fraction", "weight_decay", "grad_clip_norm"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"train.{name} must be >= 0, got {getattr(self, name)}")
        if any(not w >= 0 for w in self.task_weights):
            raise ValueError(f"train.task_weights must be non-negative, got {self.task_weights}")
        if not self.evaluators or len(set(self.evaluators)) != len(self.evaluators):
            raise ValueError(f"train.evaluators must name at least one evaluator, each once, got {self.evaluators}")
        if not self.ranking_ks or any(k < 1 for k in self.ranking_ks):
            raise ValueError(f"train.ranking_ks must be K >= 1 values, got {self.ranking_ks}")
        if self.select_mode not in ("auto", "min", "max"):
            raise ValueError(f"train.select_mode must be 'auto', 'min' or 'max', got {self.select_mode!r}")
        if self.model_parallel < 1:
            raise ValueError(f"train.model_parallel must be >= 1, got {self.model_parallel}")
        if self.table_optimizer not in typing.get_args(typing.get_type_hints(TrainConfig)["table_optimizer"]):
            raise ValueError(f"train.table_optimizer must be 'dense' or 'rowwise_adagrad', got {self.table_optimizer!r}")
        if not self.select_metric.strip():
            raise ValueError("train.select_metric must name a valid metric, e.g. 'mean_ne' or 'consume/auc'")

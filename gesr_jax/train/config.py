"""TrainConfig: optimizer, schedule, loop length, evaluation and checkpoint cadence."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    batch_size: int = 64  # requests per global batch (sharded over the `data` mesh axis)
    eval_batch_size: int = 256  # requests per eval batch; the last batch is padded with empty rows
    num_steps: int = 1000  # total optimizer steps
    learning_rate: float = 1e-3  # peak AdamW learning rate
    warmup_steps: int = 100  # linear warm-up, then cosine decay to end_lr_fraction * peak
    end_lr_fraction: float = 0.1  # final learning rate as a fraction of the peak
    weight_decay: float = 1e-5  # AdamW decoupled weight decay
    grad_clip_norm: float = 1.0  # global-norm clipping; 0 disables
    seed: int = 0  # params init and dropout / stochastic-length keys
    log_every: int = 50  # steps between train-metric lines in metrics.jsonl
    eval_every: int = 500  # steps between validation passes; 0 = only at the end
    checkpoint_every: int = 500  # steps between Orbax checkpoints
    max_checkpoints: int = 3  # checkpoints kept in the workdir
    task_weights: tuple[float, ...] = ()  # per-task BCE weights; () = 1 for every task

"""Training: one explicit loop (:func:`fit`), optimizer groups and learning-rate schedules."""

from deltatune.train.optim import build_optimizer, layer_index, lr_scale, param_groups
from deltatune.train.schedule import build_scheduler, lr_multiplier, warmup_steps_for
from deltatune.train.trainer import (
    ClassificationTask,
    Task,
    TrainerConfig,
    TrainResult,
    autocast_context,
    evaluate_dataset,
    fit,
    move_to_device,
    read_log,
    resolve_device,
    resolve_precision,
    seed_everything,
)

__all__ = [
    "ClassificationTask",
    "Task",
    "TrainResult",
    "TrainerConfig",
    "autocast_context",
    "build_optimizer",
    "build_scheduler",
    "evaluate_dataset",
    "fit",
    "layer_index",
    "lr_multiplier",
    "lr_scale",
    "move_to_device",
    "param_groups",
    "read_log",
    "resolve_device",
    "resolve_precision",
    "seed_everything",
    "warmup_steps_for",
]

"""Learning-rate schedules: linear warmup, then cosine or linear decay, or constant.

Warmup keeps the first updates small while AdamW's moment estimates are still noisy, which
matters most when a freshly initialised head sits on a pretrained body.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal

import torch
from torch.optim.lr_scheduler import LambdaLR

from deltatune.errors import ConfigError

ScheduleName = Literal["cosine", "linear", "constant"]


def warmup_steps_for(total_steps: int, warmup_ratio: float) -> int:
    """Warmup length in optimizer steps: ``ceil(ratio * total)``, below ``total_steps``."""
    if not 0.0 <= warmup_ratio < 1.0:
        raise ConfigError(f"train.warmup_ratio: value {warmup_ratio!r} must be in [0, 1)")
    return min(math.ceil(warmup_ratio * total_steps), max(total_steps - 1, 0))


def lr_multiplier(name: str, total_steps: int, warmup_steps: int) -> Callable[[int], float]:
    """The factor applied to the base learning rate at optimizer step ``s`` (0-based).

    During warmup the factor rises as ``(s + 1) / (warmup + 1)`` so that the very first update
    is not wasted at zero; afterwards ``linear`` falls towards 0 and ``cosine`` follows half a
    cosine towards 0, both reaching a small positive value at the last step; ``constant``
    stays at 1.
    """
    if name not in ("cosine", "linear", "constant"):
        raise ConfigError(
            f"train.scheduler: value {name!r} is not one of 'cosine', 'linear', 'constant'"
        )
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps}")
    decay_steps = max(1, total_steps - warmup_steps)

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        if name == "constant":
            return 1.0
        progress = min(1.0, (step - warmup_steps) / decay_steps)
        if name == "linear":
            return 1.0 - progress
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def build_scheduler(
    optimizer: torch.optim.Optimizer,
    name: str,
    total_steps: int,
    warmup_steps: int,
) -> LambdaLR:
    """A :class:`LambdaLR` stepping once per optimizer step with :func:`lr_multiplier`."""
    return LambdaLR(optimizer, lr_multiplier(name, total_steps, warmup_steps))

"""QLoRA's two memory savers besides the 4-bit base: paged optimiser states, checkpointing.

- Paged optimiser states (QLoRA §3 "Paged Optimizers"): bitsandbytes keeps AdamW's moments in
  CUDA unified memory, which the driver pages out to CPU RAM when the GPU runs short (e.g. a
  long sequence spikes activation memory) instead of failing with out-of-memory. CUDA only:
  :func:`paged_adamw` raises a clear error elsewhere (on CPU the states already live in RAM).
  ``train.optimizer: paged_adamw`` (32-bit moments) or ``paged_adamw_8bit`` (8-bit blockwise
  moments, 4x smaller).
- Gradient (activation) checkpointing: transformers' ``activation_checkpointing_enable`` keeps
  only each block's input and recomputes the block in backward (about one extra forward per
  step, activation memory of one block instead of all). Works on CPU and CUDA for transformers
  models; ``train.gradient_checkpointing: true``. LoRA dropout masks replay exactly under
  recomputation (deltatune.kernels.lora_linear draws its seeds from the restored generator).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from deltatune.errors import ConfigError, DeltatuneError

OPTIMIZERS = ("adamw", "paged_adamw", "paged_adamw_8bit")


def paged_adamw(
    params: Iterable[Any], lr: float, *, eight_bit: bool = False, weight_decay: float = 0.0
) -> torch.optim.Optimizer:
    """bitsandbytes' ``PagedAdamW`` (or ``PagedAdamW8bit``) over ``params`` (param groups allowed)."""
    params = list(params)
    devices = {
        p.device.type
        for item in params
        for p in (item["params"] if isinstance(item, dict) else [item])
    }
    if devices != {"cuda"}:
        raise DeltatuneError(
            f"train.optimizer=paged_adamw{'_8bit' if eight_bit else ''} needs the trainable "
            f"parameters on CUDA (they are on {', '.join(sorted(devices))}); paged optimiser "
            "states are CUDA unified memory. Use train.optimizer=adamw here"
        )
    try:
        import bitsandbytes as bnb
    except ImportError:
        raise DeltatuneError(
            "paged optimisers need bitsandbytes (pip install bitsandbytes)"
        ) from None
    cls = bnb.optim.PagedAdamW8bit if eight_bit else bnb.optim.PagedAdamW
    return cls(params, lr=lr, weight_decay=weight_decay)  # type: ignore[no-any-return]


def build_named_optimizer(
    name: str, groups: list[dict[str, Any]], lr: float
) -> torch.optim.Optimizer:
    """``adamw`` (torch) or a paged bitsandbytes AdamW over the trainer's param groups."""
    # Only the keys both optimisers understand (torch's AdamW adds its own flags to groups).
    groups = [{k: g[k] for k in ("params", "lr", "weight_decay") if k in g} for g in groups]
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr)
    if name in ("paged_adamw", "paged_adamw_8bit"):
        return paged_adamw(groups, lr, eight_bit=name.endswith("8bit"))
    raise ConfigError(f"train.optimizer: {name!r} is not one of {', '.join(OPTIMIZERS)}")


def enable_gradient_checkpointing(model: nn.Module) -> None:
    """Recompute each transformer block in backward instead of keeping its activations."""
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise ConfigError(
            f"train.gradient_checkpointing: {type(model).__name__} does not support it "
            "(transformers models with supports_gradient_checkpointing do); set it to false"
        )
    # Non-reentrant checkpointing needs no input that requires grad (the base is frozen).
    kwargs = {"use_reentrant": False}
    if callable(getattr(model, "activation_checkpointing_enable", None)):  # transformers >= 5.2x
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)  # type: ignore[operator]
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)  # type: ignore[operator]


__all__ = ["OPTIMIZERS", "build_named_optimizer", "enable_gradient_checkpointing", "paged_adamw"]

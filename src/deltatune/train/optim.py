"""Optimizer parameter groups: no weight decay on biases and norms, layer-wise learning rates.

Weight decay pulls weights towards zero; applied to biases, norm gains and other 1-D
parameters it only hurts, so they get none. Layer-wise learning-rate decay gives lower layers
(general features) smaller steps than upper layers and the task head (task-specific), which
limits forgetting when fine-tuning a pretrained encoder. A head learning-rate multiplier gives
the new task head (a parameter under a top-level ``classifier``/``score``/``fc``/``head``/...
module) a larger rate than the pretrained layers: the classic recipe trains the new head at
about 10x the rate of the pretrained layers.
"""

from __future__ import annotations

import re
from typing import Any

import torch
from torch import nn

from deltatune.errors import ConfigError, DeltatuneError
from deltatune.targeting import HEAD_NAMES

#: Module types whose parameters are normalisation gains/biases (never weight-decayed).
NORM_TYPES: tuple[type[nn.Module], ...] = (
    nn.LayerNorm,
    nn.RMSNorm,
    nn.GroupNorm,
    nn.LocalResponseNorm,
    nn.modules.batchnorm._NormBase,  # BatchNorm1d/2d/3d, SyncBatchNorm, InstanceNorm*
)

#: A block index in a parameter name: ``encoder.layer.3.``, ``model.layers.3.``,
#: ``transformer.h.3.``, ``blocks.3.``.
_LAYER_INDEX = re.compile(r"(?:^|\.)(?:layer|layers|h|blocks|block)\.(\d+)(?:\.|$)")
#: A path component naming an input embedding (BERT, LLaMA, GPT-2, ViT styles).
_EMBEDDING_PART = re.compile(r"^(?:embeddings|embed_tokens|embed_positions|wte|wpe)$")


def layer_index(name: str) -> int | None:
    """The block index in a parameter name (the last one, for nested stacks), or None."""
    found = _LAYER_INDEX.findall(name)
    return int(found[-1]) if found else None


def is_embedding(name: str) -> bool:
    """Whether a parameter sits under an input-embedding module (and in no block)."""
    return layer_index(name) is None and any(
        _EMBEDDING_PART.match(part) for part in name.split(".")[:-1]
    )


def _no_decay_names(model: nn.Module) -> set[str]:
    """Names of parameters that get no weight decay: biases, norm parameters, 1-D tensors."""
    names: set[str] = set()
    for module_name, module in model.named_modules():
        is_norm = isinstance(module, NORM_TYPES) or "norm" in module_name.rsplit(".", 1)[-1].lower()
        for param_name, param in module.named_parameters(recurse=False):
            full = f"{module_name}.{param_name}" if module_name else param_name
            if is_norm or param_name == "bias" or "norm" in param_name.lower() or param.ndim <= 1:
                names.add(full)
    return names


def lr_scale(name: str, num_layers: int, decay: float | None) -> float:
    """Learning-rate multiplier of a parameter under layer-wise decay.

    Block ``i`` of ``num_layers`` gets ``decay ** (num_layers - i)``, embeddings
    ``decay ** (num_layers + 1)`` (the lowest), everything else (head, pooler, final norm,
    anything outside the blocks) the full rate.
    """
    if decay is None or num_layers == 0:
        return 1.0
    index = layer_index(name)
    if index is not None:
        return float(decay ** (num_layers - index))
    if is_embedding(name):
        return float(decay ** (num_layers + 1))
    return 1.0


def is_head(name: str) -> bool:
    """Whether a parameter belongs to the task head: its top-level module is a head name
    (``classifier.weight``, ``score.weight``, ``classifier.modules_to_save.default.bias``)."""
    return name.split(".", 1)[0] in HEAD_NAMES


def _group_place(name: str, decay: float | None, head_multiplier: float = 1.0) -> str:
    """Which learning-rate tier a parameter is in: ``layer_<i>``, ``embeddings``, ``head``, or
    ``task_head`` (only when the head has its own multiplier)."""
    if head_multiplier != 1.0 and is_head(name):
        return "task_head"
    if decay is None:
        return "default"
    index = layer_index(name)
    if index is not None:
        return f"layer_{index}"
    return "embeddings" if is_embedding(name) else "head"


def param_groups(
    model: nn.Module,
    lr: float,
    weight_decay: float,
    layerwise_lr_decay: float | None = None,
    head_lr_multiplier: float = 1.0,
) -> list[dict[str, Any]]:
    """AdamW parameter groups over the model's trainable (``requires_grad``) parameters.

    Groups are keyed by (tier, decayed or not), in the order parameters first appear, so the
    same model always gives the same groups (which a resumed optimizer relies on). The tier is
    ``default`` without layer-wise decay, else ``layer_<i>``, ``embeddings`` or ``head``; each
    group carries a ``group_name`` such as ``"layer_3/decay"`` for logs. With
    ``head_lr_multiplier`` other than 1, the task head's parameters (see :func:`is_head`) form
    the ``task_head`` tier at ``lr * head_lr_multiplier``.
    """
    if lr <= 0:
        raise ConfigError(f"train.learning_rate: value {lr!r} must be > 0")
    if weight_decay < 0:
        raise ConfigError(f"train.weight_decay: value {weight_decay!r} must be >= 0")
    if layerwise_lr_decay is not None and not 0.0 < layerwise_lr_decay <= 1.0:
        raise ConfigError(
            f"train.layerwise_lr_decay: value {layerwise_lr_decay!r} must be in (0, 1] or null"
        )
    if not head_lr_multiplier > 0:
        raise ConfigError(
            f"train.head_lr_multiplier: value {head_lr_multiplier!r} must be > 0 (e.g. 10)"
        )
    named = list(model.named_parameters())
    indices = [i for i in (layer_index(n) for n, _ in named) if i is not None]
    num_layers = max(indices) + 1 if indices else 0
    no_decay = _no_decay_names(model)
    groups: dict[tuple[str, bool], dict[str, Any]] = {}
    for name, param in named:
        if not param.requires_grad:
            continue
        decayed = name not in no_decay
        key = (_group_place(name, layerwise_lr_decay, head_lr_multiplier), decayed)
        if key not in groups:
            scale = (
                head_lr_multiplier
                if key[0] == "task_head"
                else lr_scale(name, num_layers, layerwise_lr_decay)
            )
            groups[key] = {
                "params": [],
                "lr": lr * scale,
                "weight_decay": weight_decay if decayed else 0.0,
                "group_name": f"{key[0]}/{'decay' if decayed else 'no_decay'}",
            }
        groups[key]["params"].append(param)
    if not groups:
        raise DeltatuneError(
            "the model has no trainable parameters (every requires_grad is False); "
            "apply a fine-tuning method or unfreeze some layers first"
        )
    return list(groups.values())


def build_optimizer(
    model: nn.Module,
    lr: float,
    weight_decay: float,
    layerwise_lr_decay: float | None = None,
    head_lr_multiplier: float = 1.0,
) -> torch.optim.AdamW:
    """AdamW over :func:`param_groups` (fused/foreach left to torch's defaults)."""
    return torch.optim.AdamW(
        param_groups(model, lr, weight_decay, layerwise_lr_decay, head_lr_multiplier), lr=lr
    )

r"""Layer freezing: train the later blocks, keep the early ones frozen.

::

    embeddings ─► block 0 … block N−1 ─► block N … block L−1 ─► head
    └──────── frozen (general features) ┘ └──── trained (task-specific) ────┘

Early layers of a pretrained network hold general features (edges and textures in a CNN,
lexical features in a transformer); later layers are more task-specific. The less data, the
more layers should stay frozen. Choose with exactly one of:

- ``freeze_first_n``: freeze the embeddings and the first N blocks, train the rest;
- ``train_last_n``: train only the last N blocks (and everything after them: pooler, norm, head);
- ``trainable_patterns``: train the parameters whose names match (regex full-match or suffix).

Blocks are found as the model's longest ``layer``/``layers``/``h``/``blocks`` ModuleList
(BERT, GPT-2, LLaMA), or the children of ``blocks_path`` (e.g. ``features`` in a VGG), or the
model's top-level children in order. The head (modules after the last block) trains unless
``train_head`` is false.
"""

from __future__ import annotations

import dataclasses
import re
from typing import ClassVar

from torch import nn

from deltatune.errors import ConfigError
from deltatune.registry import Capabilities, MethodConfig, MethodSpec, register

_BLOCK_LIST_NAMES = ("layer", "layers", "h", "blocks", "block")


@dataclasses.dataclass
class FreezeConfig(MethodConfig):
    """Layer freezing settings (set exactly one of the first three)."""

    method_name: ClassVar[str] = "freeze"
    peft_type: ClassVar[str] = "DELTATUNE_FREEZE"

    freeze_first_n: int | None = None
    train_last_n: int | None = None
    trainable_patterns: list[str] | None = None
    blocks_path: str | None = None
    train_head: bool = True

    def validate(self) -> None:
        chosen = [
            k
            for k in ("freeze_first_n", "train_last_n", "trainable_patterns")
            if getattr(self, k) is not None
        ]
        if len(chosen) != 1:
            raise ConfigError(
                "freeze method: set exactly one of freeze_first_n, train_last_n, trainable_patterns "
                f"(got {', '.join(chosen) or 'none'}); e.g. train_last_n: 2"
            )
        for k in ("freeze_first_n", "train_last_n"):
            v = getattr(self, k)
            if v is not None and v < 0:
                raise ConfigError(f"{k}={v} must be >= 0")


def find_blocks(model: nn.Module, blocks_path: str | None = None) -> tuple[str, list[str]]:
    """``(container name, [block names])`` of the model's sequence of blocks."""
    if blocks_path:
        try:
            container = model.get_submodule(blocks_path)
        except AttributeError:
            raise ConfigError(
                f"blocks_path='{blocks_path}' is not a submodule of {type(model).__name__}"
            ) from None
        return blocks_path, [f"{blocks_path}.{c}" for c, _ in container.named_children()]
    best: tuple[str, list[str]] | None = None
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and name.split(".")[-1] in _BLOCK_LIST_NAMES:
            kids = [f"{name}.{c}" for c, _ in module.named_children()]
            if best is None or len(kids) > len(best[1]):
                best = (name, kids)
    if best is not None:
        return best
    kids = [c for c, m in model.named_children() if any(True for _ in m.parameters())]
    if not kids:
        raise ConfigError(f"cannot find blocks in {type(model).__name__}; set blocks_path")
    return "", kids


def select_trainable(model: nn.Module, config: FreezeConfig) -> list[str]:
    params = [n for n, _ in model.named_parameters()]
    if config.trainable_patterns is not None:
        chosen = [
            n
            for n in params
            if any(
                re.fullmatch(p, n) or n == p or n.endswith("." + p) or n.startswith(p + ".")
                for p in config.trainable_patterns
            )
        ]
        if not chosen:
            raise ConfigError(
                f"trainable_patterns={config.trainable_patterns!r} match no parameter"
            )
        return chosen
    _, blocks = find_blocks(model, config.blocks_path)
    n_blocks = len(blocks)
    if config.freeze_first_n is not None:
        if config.freeze_first_n > n_blocks:
            raise ConfigError(
                f"freeze_first_n={config.freeze_first_n} but the model has {n_blocks} blocks"
            )
        trained_blocks = blocks[config.freeze_first_n :]
    else:
        assert config.train_last_n is not None
        if config.train_last_n > n_blocks:
            raise ConfigError(
                f"train_last_n={config.train_last_n} but the model has {n_blocks} blocks"
            )
        trained_blocks = blocks[n_blocks - config.train_last_n :] if config.train_last_n else []

    def in_blocks(name: str, which: list[str]) -> bool:
        return any(name.startswith(b + ".") for b in which)

    block_params = [i for i, n in enumerate(params) if in_blocks(n, blocks)]
    last_block_param = block_params[-1] if block_params else -1
    chosen = [n for n in params if in_blocks(n, trained_blocks)]
    if config.train_head:
        chosen += [
            n for i, n in enumerate(params) if i > last_block_param and not in_blocks(n, blocks)
        ]
    return chosen


def inject_freeze(model: nn.Module, config: FreezeConfig, adapter_name: str) -> None:
    from deltatune.model import state_of

    trained = set(select_trainable(model, config))
    for name, p in model.named_parameters():
        p.requires_grad_(name in trained)
    state_of(model).in_place_params[adapter_name] = [
        n for n, _ in model.named_parameters() if n in trained
    ]


register(
    MethodSpec(
        name="freeze",
        config_cls=FreezeConfig,
        inject=inject_freeze,
        capabilities=Capabilities(merge=False),
        default_lr=1e-4,
        summary="Freeze the early blocks, train the later ones and the head",
        family="classic",
    )
)

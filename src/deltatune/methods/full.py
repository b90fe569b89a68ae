r"""Full fine-tuning: every parameter trains, in place.

::

    θ ← θ − lr · ∇L(θ)      for all θ (optionally all but ``exclude_modules``)

The default learning rate (1e-4) is ten times lower than LoRA's (1e-3): the
pretrained weights move directly and large steps destroy what pretraining learned.
Saving writes the trained parameters (the whole model) in the adapter file layout.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from torch import nn

from deltatune.registry import Capabilities, MethodConfig, MethodSpec, register
from deltatune.targeting import select_modules


@dataclasses.dataclass
class FullConfig(MethodConfig):
    """Full fine-tuning. ``exclude_modules``: modules kept frozen (e.g. ``[embeddings]``)."""

    method_name: ClassVar[str] = "full"
    peft_type: ClassVar[str] = "DELTATUNE_FULL"

    exclude_modules: str | list[str] | None = None


def inject_full(model: nn.Module, config: FullConfig, adapter_name: str) -> None:
    from deltatune.model import state_of

    frozen: set[str] = set()
    if config.exclude_modules:
        for name in select_modules(model, config.exclude_modules, field="exclude_modules"):
            frozen.update(f"{name}.{p}" for p, _ in model.get_submodule(name).named_parameters())
    trained = []
    for name, p in model.named_parameters():
        p.requires_grad_(name not in frozen)
        if name not in frozen:
            trained.append(name)
    state_of(model).in_place_params[adapter_name] = trained


register(
    MethodSpec(
        name="full",
        config_cls=FullConfig,
        inject=inject_full,
        capabilities=Capabilities(merge=False),
        default_lr=1e-4,
        summary="Train every parameter (lr 10x below the adapters')",
        family="classic",
    )
)

r"""BitFit (Ben Zaken et al., 2022): train only the bias terms.

::

    y = f(x; W, b + Δb)        only Δb (one vector per module) is trained

deltatune keeps the pretrained bias frozen and trains a delta ``Δb`` (zero at start), so BitFit
behaves like every other adapter: it can be disabled (the base output comes back exactly), kept
as several named adapters, saved alone (a few KB) and merged (``b ← b + Δb``). The delta is added
to the module's output on the bias axis: the last axis for Linear / Conv1D / LayerNorm, the
channel axis (1) for convolutions and batch/group norms.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import torch
from torch import nn

from deltatune.errors import ConfigError, DeltatuneError
from deltatune.layers import AdapterLayer
from deltatune.registry import Capabilities, MethodConfig, MethodSpec, register
from deltatune.targeting import select_modules, set_submodule

_CHANNEL_FIRST = (nn.modules.conv._ConvNd, nn.modules.batchnorm._BatchNorm, nn.GroupNorm)


@dataclasses.dataclass
class BitFitConfig(MethodConfig):
    """BitFit settings.

    - ``target_modules`` (None = every module with a bias): names or regex, PEFT semantics.
    - ``exclude_modules``, ``layers_to_transform``, ``layers_pattern``: narrow the targets.
    - ``modules_to_save``: modules trained whole (e.g. a new classification head).
    """

    method_name: ClassVar[str] = "bitfit"
    peft_type: ClassVar[str] = "DELTATUNE_BITFIT"

    target_modules: str | list[str] | None = None
    exclude_modules: str | list[str] | None = None
    layers_to_transform: int | list[int] | None = None
    layers_pattern: str | list[str] | None = None
    modules_to_save: list[str] | None = None


class BitFitLayer(AdapterLayer):
    """Adds a trainable bias delta to a module's output."""

    adapter_attributes = ("bitfit_bias",)

    def __init__(self, base_layer: nn.Module) -> None:
        bias = getattr(base_layer, "bias", None)
        if not isinstance(bias, torch.Tensor):
            raise ConfigError(
                f"{type(base_layer).__name__} has no bias for BitFit to train; exclude it"
            )
        super().__init__(base_layer)
        self.bitfit_bias = nn.ParameterDict()
        self.channel_first = isinstance(base_layer, _CHANNEL_FIRST)

    def add_adapter(self, adapter_name: str, config: Any = None) -> None:
        bias: torch.Tensor = self.base_layer.bias  # type: ignore[assignment]
        self.bitfit_bias[adapter_name] = nn.Parameter(torch.zeros_like(bias))

    def adapter_tensors(self, adapter_name: str) -> dict[str, torch.Tensor]:
        return {"bitfit_bias": self.bitfit_bias[adapter_name]}

    def _merge_one(self, adapter_name: str, safe_merge: bool) -> None:
        bias: torch.Tensor = self.base_layer.bias  # type: ignore[assignment]
        merged = bias.data + self.bitfit_bias[adapter_name].data
        if safe_merge and not torch.isfinite(merged).all():
            raise DeltatuneError(
                f"merging BitFit adapter '{adapter_name}' would put NaN/Inf into a bias"
            )
        bias.data.copy_(merged)

    def _unmerge_one(self, adapter_name: str) -> None:
        self.base_layer.bias.data -= self.bitfit_bias[adapter_name].data  # type: ignore[union-attr]

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        out = self.base_layer(x, *args, **kwargs)
        for name in self.adapters_to_run():
            delta = self.bitfit_bias[name].to(out.dtype)
            if self.channel_first:
                delta = delta.view(1, -1, *([1] * (out.dim() - 2)))
            out = out + delta
        return out


def inject_bitfit(model: nn.Module, config: BitFitConfig, adapter_name: str) -> None:
    explicit = config.target_modules is not None
    if explicit:
        names = select_modules(
            model,
            config.target_modules,
            exclude_modules=config.exclude_modules,
            layers_to_transform=config.layers_to_transform,
            layers_pattern=config.layers_pattern,
        )
    else:
        # Existing BitFit layers count too, so that a second named adapter reaches them.
        names = [
            n
            for n, m in model.named_modules()
            if n
            and (
                isinstance(m, BitFitLayer)
                or (
                    isinstance(getattr(m, "bias", None), torch.Tensor)
                    and not isinstance(m, AdapterLayer)
                )
            )
        ]
        if config.exclude_modules or config.layers_to_transform is not None:
            names = select_modules(
                model,
                names,
                exclude_modules=config.exclude_modules,
                layers_to_transform=config.layers_to_transform,
                layers_pattern=config.layers_pattern,
            )
    from deltatune.model import modules_to_save_of

    heads = modules_to_save_of(config)
    names = [n for n in names if not any(n == h or n.endswith("." + h) for h in heads)]
    parts_of = {n: n.split(".") for n in names}
    added = 0
    for name in names:
        # Skip modules nested in another adapter (e.g. a LoRA layer's base_layer).
        parts = parts_of[name]
        if any(
            isinstance(model.get_submodule(".".join(parts[:i])), AdapterLayer)
            for i in range(1, len(parts))
        ):
            continue
        module = model.get_submodule(name)
        if isinstance(module, BitFitLayer):
            module.add_adapter(adapter_name)
            added += 1
            continue
        if isinstance(module, AdapterLayer):
            raise ConfigError(f"module '{name}' already carries a {type(module).__name__} adapter")
        if not isinstance(getattr(module, "bias", None), torch.Tensor):
            if explicit:
                raise ConfigError(f"BitFit target '{name}' ({type(module).__name__}) has no bias")
            continue
        layer = BitFitLayer(module)
        layer.add_adapter(adapter_name)
        set_submodule(model, name, layer)
        added += 1
    if not added:
        raise ConfigError(
            f"BitFit found no bias to train in {type(model).__name__} (its layers have no bias terms, "
            "as in LLaMA-style models); choose another method such as lora"
        )


register(
    MethodSpec(
        name="bitfit",
        config_cls=BitFitConfig,
        inject=inject_bitfit,
        capabilities=Capabilities(merge=True, multi_adapter=True, disable=True),
        default_lr=2e-3,
        summary="Train bias terms only (a mergeable bias delta)",
        family="selective",
    )
)

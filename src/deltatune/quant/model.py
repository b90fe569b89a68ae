"""Quantise (or dequantise) every linear layer of a model in place, and measure what it holds.

``quantize_model(model, "nf4")`` swaps each ``nn.Linear`` / GPT-2 ``Conv1D`` for a
:class:`~deltatune.quant.linear.QuantLinear`, except the output layer(s) (``lm_head``,
``classifier``, ... as :func:`deltatune.targeting.output_layer_names` finds them) and any name
in ``skip``. Layers it cannot quantise (NF4 needs a multiple of 64 elements) stay float and are
listed in the returned report, and logged: nothing is left float silently.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterable

import torch
from torch import nn

from deltatune.errors import ConfigError
from deltatune.quant.linear import NF4_BLOCK, SCHEMES, QuantLinear, Scheme
from deltatune.targeting import is_conv1d, output_layer_names, set_submodule

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class QuantizeReport:
    """What :func:`quantize_model` did: quantised module names and the ones left float (why)."""

    scheme: str
    quantized: list[str]
    skipped: dict[str, str]

    def __str__(self) -> str:
        line = f"{self.scheme}: {len(self.quantized)} linear layers quantised"
        if self.skipped:
            line += "; left float: " + ", ".join(f"{n} ({why})" for n, why in self.skipped.items())
        return line


def _enclosing_adapter(model: nn.Module, name: str) -> nn.Module | None:
    """The innermost adapter wrapper that ``name`` sits inside, if any."""
    from deltatune.layers import AdapterLayer

    parts = name.split(".")
    found = None
    for i in range(1, len(parts)):
        module = model.get_submodule(".".join(parts[:i]))
        if isinstance(module, AdapterLayer):
            found = module
    return found


def quantize_model(
    model: nn.Module,
    scheme: Scheme = "nf4",
    *,
    compute_dtype: str | torch.dtype = "auto",
    skip: Iterable[str] = (),
) -> QuantizeReport:
    """Replace the model's linear layers by frozen NF4 / int8 ones, in place (see module doc).

    Layers already quantised are left as they are. A float linear layer that an adapter already
    wraps is an error (quantise the base before adding adapters).
    """
    if scheme not in SCHEMES:
        raise ConfigError(
            f"quantize={scheme!r} is not a quantisation scheme; use one of {', '.join(SCHEMES)} "
            "(or null for a float base)"
        )
    heads = output_layer_names(model)
    skip = set(skip)
    quantized: list[str] = []
    skipped: dict[str, str] = {}
    for name, module in list(model.named_modules()):
        if not name or not (type(module) is nn.Linear or is_conv1d(module)):
            continue
        if name in heads or name in skip:
            skipped[name] = "output layer" if name in heads else "skipped"
            continue
        if any(name.startswith(s + ".") for s in skip):
            continue
        wrapper = _enclosing_adapter(model, name)
        if wrapper is not None:
            from deltatune.layers import ModulesToSave

            if name.endswith(".base_layer") and not isinstance(wrapper, ModulesToSave):
                raise ConfigError(
                    f"module '{name[: -len('.base_layer')]}' already carries an adapter over a "
                    "float weight; quantise the base (model.quantize / method qlora) before "
                    "adding adapters"
                )
            continue  # an adapter's own Linear (lora_A, ...) or a head trained whole
        weight = module.weight
        assert isinstance(weight, torch.Tensor)
        if scheme == "nf4" and weight.numel() % NF4_BLOCK:
            skipped[name] = f"{weight.numel()} elements, not a multiple of {NF4_BLOCK}"
            continue
        set_submodule(model, name, QuantLinear.from_linear(module, scheme, compute_dtype))
        quantized.append(name)
    report = QuantizeReport(scheme, quantized, skipped)
    odd = {n: w for n, w in skipped.items() if w not in ("output layer", "skipped")}
    if odd:
        logger.warning("left float (cannot be %s-quantised): %s", scheme, odd)
    return report


def dequantize_model(model: nn.Module, dtype: torch.dtype = torch.float32) -> list[str]:
    """Replace every :class:`QuantLinear` (outside adapter wrappers) by a float ``nn.Linear``."""
    names = [n for n, m in model.named_modules() if isinstance(m, QuantLinear) and n]
    for name in names:
        layer = model.get_submodule(name)
        assert isinstance(layer, QuantLinear)
        set_submodule(model, name, layer.to_linear(dtype))
    return names


@dataclasses.dataclass
class QuantMemory:
    """Resident bytes of the quantised linear weights of a model."""

    params: int
    bytes: int

    @property
    def bytes_per_param(self) -> float:
        return self.bytes / max(self.params, 1)


def quantized_memory(model: nn.Module) -> QuantMemory:
    """Bytes held by quantised weights (codes + constants) over the weights they stand for."""
    params = nbytes = 0
    for module in model.modules():
        if isinstance(module, QuantLinear):
            params += module.in_features * module.out_features
            nbytes += module.quantized_bytes()
    return QuantMemory(params, nbytes)


def quantized_layers(model: nn.Module) -> list[tuple[str, QuantLinear]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, QuantLinear)]


__all__ = [
    "QuantMemory",
    "QuantizeReport",
    "dequantize_model",
    "quantize_model",
    "quantized_layers",
    "quantized_memory",
]

r"""Merge LoRA adapters into a quantised base, and say how much the outputs move.

A 4-bit base cannot absorb ``s·B·A`` exactly: the sum is not on the NF4 grid. Two honest
options, both ending in a plain model with no adapter wrappers::

    dequantize:  W' = Ŵ + s·B·A                 in a float copy (float32, or bfloat16/float16)
                 exact up to float rounding; the model grows to 2 or 4 bytes per weight
    requantize:  W' = Q(Ŵ + s·B·A)              re-quantised with the layer's own scheme
                 keeps 4-bit (or 8-bit) size; adds a fresh quantisation error on top

    (DoRA adapters: W' = m ⊙ (Ŵ + s·B·A) / ‖Ŵ + s·B·A‖_row before the float copy / Q.)

:func:`merge_quantized` runs the model on a sample before and after and returns the max and
mean absolute difference of the outputs (:class:`MergeReport`); it also logs them. ``Ŵ`` is
the dequantised weight the unmerged model computes with, so "dequantize" differs from the
unmerged model only by rounding (more with a bfloat16 compute dtype, whose rounding the
unmerged model had and the float32 copy has not).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from typing import Any, Literal

import torch
from torch import nn

from deltatune.errors import ConfigError, DeltatuneError
from deltatune.quant.linear import QuantLinear
from deltatune.quant.model import dequantize_model

logger = logging.getLogger(__name__)

MERGE_MODES = ("dequantize", "requantize")


@dataclasses.dataclass
class MergeReport:
    """The output change a quantised merge introduced, measured on a sample."""

    mode: str
    layers: int
    max_abs_diff: float
    mean_abs_diff: float
    dtype: str

    def __str__(self) -> str:
        target = f"{self.dtype} copy" if self.mode == "dequantize" else "re-quantised base"
        return (
            f"merged {self.layers} quantised layers into a {target}: output change on the sample "
            f"max |Δ| = {self.max_abs_diff:.3g}, mean |Δ| = {self.mean_abs_diff:.3g}"
        )


def _output(model: nn.Module, sample: Any) -> torch.Tensor:
    out = model(**sample) if isinstance(sample, Mapping) else model(sample)
    if not isinstance(out, torch.Tensor):
        out = out.logits
    assert isinstance(out, torch.Tensor)
    return out.detach().float()


def _cast_floats(sample: Any, dtype: torch.dtype) -> Any:
    if isinstance(sample, torch.Tensor):
        return sample.to(dtype) if sample.is_floating_point() else sample
    return {k: _cast_floats(v, dtype) for k, v in sample.items()}


def merged_weight(layer: nn.Module, adapter_names: list[str]) -> torch.Tensor:
    """``Ŵ`` plus the named LoRA/DoRA adapters of a :class:`LoraLinear`, float32 ``(out, in)``."""
    from deltatune.methods.lora import LoraLinear

    assert isinstance(layer, LoraLinear)
    with torch.no_grad():
        w = layer.base_weight().to(torch.float32)
        for name in adapter_names:
            lora = layer.scaling[name] * layer._lora_weight(name).to(torch.float32)
            if name in layer.lora_magnitude_vector:
                combined = w + lora
                mag = layer.lora_magnitude_vector[name].to(torch.float32)
                w = (mag / combined.norm(p=2, dim=1)).unsqueeze(1) * combined
            else:
                w = w + lora
    return w


def merge_quantized(
    model: nn.Module,
    sample: Mapping[str, torch.Tensor] | torch.Tensor,
    mode: Literal["dequantize", "requantize"] = "dequantize",
    dtype: torch.dtype = torch.float32,
) -> MergeReport:
    """Merge the active adapters into the (quantised) base and unload them, in place.

    ``mode="dequantize"``: every quantised layer becomes a float ``nn.Linear`` in ``dtype``
    (adapted or not) and the whole model is cast to ``dtype``, so the result is a plain float
    model that ``save_pretrained`` writes (float inputs in ``sample`` are cast to match).
    ``mode="requantize"``: adapted layers are re-quantised with their scheme after merging; the
    others stay as they were. Adapters on float layers (heads, layers left float) are merged
    exactly as :func:`deltatune.merge` does. ``sample``: model inputs (a dict for transformers
    models) on which the output change is measured and returned.
    """
    from deltatune.compose import remove_hooks
    from deltatune.layers import AdapterLayer
    from deltatune.methods.lora import LoraLinear
    from deltatune.model import STATE_ATTR, adapter_layers, state_of
    from deltatune.registry import get_method
    from deltatune.targeting import set_submodule

    if mode not in MERGE_MODES:
        raise ConfigError(f"mode={mode!r} is not one of {', '.join(MERGE_MODES)}")
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ConfigError(f"dtype={dtype} must be torch.float32, torch.bfloat16 or torch.float16")
    state = state_of(model)
    for name in state.active:
        spec = get_method(state.configs[name].method_name)
        if not (spec.capabilities.merge or spec.name == "qlora"):
            raise DeltatuneError(
                f"adapter '{name}' ({spec.name}) cannot be merged into the base weights"
            )
    was_training = model.training
    model.eval()
    with torch.no_grad():
        before = _output(model, sample)
    layers = 0
    for name, layer in reversed(list(adapter_layers(model))):
        base = layer.base_layer
        if isinstance(layer, LoraLinear) and isinstance(base, QuantLinear):
            w = merged_weight(layer, layer.adapters_to_run())
            new: nn.Module
            if mode == "dequantize":
                new = nn.Linear(
                    base.in_features,
                    base.out_features,
                    bias=base.bias is not None,
                    device=w.device,
                    dtype=dtype,
                )
                with torch.no_grad():
                    new.weight.copy_(w.to(dtype))
                    if base.bias is not None:
                        new.bias.copy_(base.bias.to(dtype))
            else:
                new = QuantLinear.from_weight(w, base.bias, base.scheme, base.compute_dtype)
            set_submodule(model, name, new)
            layers += 1
        elif isinstance(layer, AdapterLayer):
            set_submodule(model, name, layer.unloaded(merge=True))
    if mode == "dequantize":
        dequantize_model(model, dtype)
        model.to(dtype)  # a 16-bit copy is a 16-bit model: float inputs follow below
    remove_hooks(model)
    model.__dict__.pop(STATE_ATTR, None)
    with torch.no_grad():
        after = _output(model, _cast_floats(sample, dtype) if mode == "dequantize" else sample)
    model.train(was_training)
    diff = (after - before).abs()
    report = MergeReport(
        mode,
        layers,
        float(diff.max()),
        float(diff.mean()),
        str(dtype).replace("torch.", "") if mode == "dequantize" else "quantised",
    )
    logger.warning("%s", report)
    return report


__all__ = ["MERGE_MODES", "MergeReport", "merge_quantized", "merged_weight"]

"""Fused kernels for the hot paths of delta methods (autograd Functions, no custom C++).

- :mod:`deltatune.kernels.lora_linear`: LoRA with dropout on Linear layers that keeps the input
  and a seed instead of a dropped copy (see its docstring for the math). Used by
  :class:`deltatune.methods.lora.LoraLinear` whenever ``lora_dropout > 0`` in training;
  ``with fast_lora(False):`` switches back to the plain autograd path. Where the input is the
  fresh output of GELU, SiLU, a product or a LayerNorm, it is rebuilt in backward from what that op already
  keeps (``with rebuild_inputs(False):`` keeps it instead).
"""

from deltatune.kernels.lora_linear import (
    dora_delta_reference,
    dora_dropout_delta,
    draw_seed,
    dropout_keep_mask,
    dropout_p,
    fast_lora,
    fast_lora_enabled,
    fusable_base,
    linear_lora_dropout,
    lora_dropout_linear,
    lora_linear_reference,
    rebuild_inputs,
    rebuild_inputs_enabled,
    register_layer_norms,
    set_fast_lora,
    set_rebuild_inputs,
)

__all__ = [
    "dora_delta_reference",
    "dora_dropout_delta",
    "draw_seed",
    "dropout_keep_mask",
    "dropout_p",
    "fast_lora",
    "fast_lora_enabled",
    "fusable_base",
    "linear_lora_dropout",
    "lora_dropout_linear",
    "lora_linear_reference",
    "rebuild_inputs",
    "rebuild_inputs_enabled",
    "register_layer_norms",
    "set_fast_lora",
    "set_rebuild_inputs",
]

"""Fused kernels for the hot paths of delta methods (autograd Functions, no custom C++).

- :mod:`deltatune.kernels.lora_linear`: LoRA with dropout on Linear layers that keeps the input
  and a seed instead of a dropped copy (see its docstring for the math). Used by
  :class:`deltatune.methods.lora.LoraLinear` whenever ``lora_dropout > 0`` in training;
  ``with fast_lora(False):`` switches back to the plain autograd path.
"""

from deltatune.kernels.lora_linear import (
    draw_seed,
    dropout_keep_mask,
    fast_lora,
    fast_lora_enabled,
    lora_dropout_linear,
    lora_linear_reference,
    set_fast_lora,
)

__all__ = [
    "draw_seed",
    "dropout_keep_mask",
    "fast_lora",
    "fast_lora_enabled",
    "lora_dropout_linear",
    "lora_linear_reference",
    "set_fast_lora",
]

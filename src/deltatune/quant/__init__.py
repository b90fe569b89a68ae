"""Quantised frozen bases for QLoRA: NF4 (torchao) and int8 linear layers, merging, memory.

- :mod:`deltatune.quant.linear`: :class:`QuantLinear`, the frozen 4-bit/8-bit Linear.
- :mod:`deltatune.quant.model`: :func:`quantize_model` / :func:`dequantize_model` and
  :func:`quantized_memory` (resident bytes per quantised weight).
- :mod:`deltatune.quant.merge`: :func:`merge_quantized`, merging adapters into a dequantised
  float copy or a re-quantised base, with the output error each introduces.
- :mod:`deltatune.quant.paged`: paged optimiser states (bitsandbytes, CUDA) and gradient
  checkpointing switches.
"""

from deltatune.quant.linear import (
    COMPUTE_DTYPES,
    NF4_BLOCK,
    NF4_SCALER_BLOCK,
    SCHEMES,
    QuantLinear,
    bf16_available,
    is_quantized,
    nf4_scaler_block,
    resolve_compute_dtype,
)
from deltatune.quant.merge import MERGE_MODES, MergeReport, merge_quantized
from deltatune.quant.model import (
    QuantizeReport,
    QuantMemory,
    dequantize_model,
    quantize_model,
    quantized_layers,
    quantized_memory,
)

__all__ = [
    "COMPUTE_DTYPES",
    "MERGE_MODES",
    "NF4_BLOCK",
    "NF4_SCALER_BLOCK",
    "SCHEMES",
    "MergeReport",
    "QuantLinear",
    "QuantMemory",
    "QuantizeReport",
    "bf16_available",
    "dequantize_model",
    "is_quantized",
    "merge_quantized",
    "nf4_scaler_block",
    "quantize_model",
    "quantized_layers",
    "quantized_memory",
    "resolve_compute_dtype",
]

r"""LoftQ (Li et al., 2023): quantise the base and initialise LoRA jointly, so that Q + s·B A ≈ W.

Plain QLoRA starts from ``Ŵ = Q(W)`` and ``B = 0``: the model at step 0 is the quantised base,
``‖W − Ŵ‖`` away from the pretrained one, and training must learn that error back. LoftQ
(Algorithm 1 of the paper) picks the quantised weight and the low-rank factors together::

    L_0 = 0
    for t = 1 .. T:
        Q_t = quantize(W − L_{t−1})                       (NF4 or int8, the layer's scheme)
        R_t = W − dequantize(Q_t)                         (what the 4-bit base misses)
        U Σ Vᵀ = SVD(R_t);   L_t = U_r Σ_r V_rᵀ           (best rank-r fit of R_t, Eckart–Young)

    base = Q_T,   s·B·A = L_T  with  B = U_r Σ_r^½ / √s,   A = Σ_r^½ V_rᵀ / √s

so that at initialisation ``y = Q_T x + s·B A x ≈ W x``. ``s`` is the layer's LoRA scaling
(``lora_alpha / r``, or ``/ √r`` with rsLoRA): the factors are divided by it so that the
*scaled* update equals ``L_T``, and the singular values are split evenly (``Σ^½`` each, then
``1/√s`` each) so that A and B start with equal norms. (PEFT 0.21's ``loftq_init`` sets
``B A = L_T`` and ignores ``s``; with the usual ``alpha = 2r`` its scaled update is ``2·L_T``.)

Each iteration fits the best rank-r correction to the current quantisation error, so
``‖W − Q_t − L_t‖_F ≤ ‖W − Q_t‖_F`` always; that the error also falls from one iteration to the
next is what the paper reports and what happens in practice (NF4's absmax grid moves with its
input, so it is not a theorem). With ``T = 1``, ``Q_1 = quantize(W)``: the base is exactly plain
QLoRA's and only the LoRA factors differ; for ``T > 1`` the base itself differs.

Saving and loading (deltatune's choice; PEFT saves a float copy of the base for ``T > 1``):
the adapter folder holds the LoRA tensors and the config (``init_lora_weights: loftq``,
``loftq_config``). Loading it onto the *float* base re-runs LoftQ, which is deterministic
(the same float weights give the same codes, bit for bit, on the same torch build), then
overwrites A and B with the saved ones: for ``T = 1`` the rebuilt base is ``quantize(W)``
whatever the SVD does, for ``T > 1`` it is ``Q_T`` again. A base that is already quantised
(``model.quantize: nf4``) has lost ``W``: LoftQ cannot run on it and injecting is an error.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping

import torch
from torch import nn

from deltatune.errors import ConfigError
from deltatune.quant.linear import QuantLinear, Scheme

#: Bits each quantisation scheme stores per weight (PEFT's ``loftq_bits``).
SCHEME_BITS: dict[str, int] = {"nf4": 4, "int8": 8}


@dataclasses.dataclass
class LoftQResult:
    """One layer's LoftQ initialisation.

    ``base`` is the quantised layer holding ``Q_T``; ``lora_A`` (r × in) and ``lora_B``
    (out × r) satisfy ``scaling · lora_B @ lora_A = L_T``. ``errors[t−1]`` is
    ``‖W − dequantize(Q_t) − L_t‖_F`` after iteration t, and ``quantization_error`` is
    ``‖W − dequantize(quantize(W))‖_F``, plain QLoRA's error at initialisation.
    """

    base: QuantLinear
    lora_A: torch.Tensor
    lora_B: torch.Tensor
    errors: list[float]
    quantization_error: float


@torch.no_grad()
def loftq_init(
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    *,
    scheme: Scheme,
    rank: int,
    scaling: float,
    num_iter: int = 1,
    compute_dtype: str | torch.dtype = "auto",
) -> LoftQResult:
    """LoftQ on one ``(out, in)`` weight (see the module docstring for the algorithm)."""
    if num_iter < 1:
        raise ConfigError(f"loftq_iter={num_iter} must be a positive integer (try 1)")
    if rank < 1 or rank > min(weight.shape):
        raise ConfigError(
            f"LoftQ rank r={rank} must be in [1, {min(weight.shape)}] for a "
            f"{weight.shape[0]}x{weight.shape[1]} weight; lower r"
        )
    if scaling <= 0:
        raise ConfigError(f"LoftQ needs a positive LoRA scaling, got {scaling} (lora_alpha > 0)")
    w = weight.detach().to(torch.float32)
    low_rank = torch.zeros_like(w)
    errors: list[float] = []
    quantization_error = 0.0
    base: QuantLinear | None = None
    a = b = torch.empty(0)
    for step in range(num_iter):
        base = QuantLinear.from_weight(w - low_rank, bias, scheme, compute_dtype)
        residual = w - base.dequantize(torch.float32)
        if step == 0:
            quantization_error = float(residual.norm())
        u, sigma, vh = torch.linalg.svd(residual, full_matrices=False)
        root = sigma[:rank].sqrt() / math.sqrt(scaling)
        b = u[:, :rank] * root
        a = root.unsqueeze(1) * vh[:rank]
        low_rank = scaling * (b @ a)
        errors.append(float((residual - low_rank).norm()))
    assert base is not None
    return LoftQResult(base, a.contiguous(), b.contiguous(), errors, quantization_error)


def float_weights(model: nn.Module, names: list[str]) -> dict[str, torch.Tensor]:
    """The ``(out, in)`` float weights of the named layers (GPT-2 ``Conv1D`` transposed).

    References, not copies: :func:`deltatune.quant.quantize_model` drops the float layers, and
    these keep their weights alive only until LoftQ has read them.
    """
    from deltatune.layers import AdapterLayer
    from deltatune.targeting import is_conv1d, is_quant_linear

    out: dict[str, torch.Tensor] = {}
    for name in names:
        module = model.get_submodule(name)
        if isinstance(module, AdapterLayer):
            module = module.base_layer
        if is_quant_linear(module):
            raise ConfigError(
                f"init_lora_weights='loftq' needs the float weights, but '{name}' is already "
                f"{module.scheme}-quantised (model.quantize, or an earlier qlora adapter); "
                "load the float base (model.quantize: null) and let qlora quantise it"
            )
        weight = module.weight
        if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
            continue  # not a linear layer (LoRA on an Embedding keeps its plain init)
        out[name] = (weight.t() if is_conv1d(module) else weight).detach()
    return out


@torch.no_grad()
def apply_loftq(
    model: nn.Module,
    adapter_name: str,
    weights: Mapping[str, torch.Tensor],
    num_iter: int,
) -> dict[str, LoftQResult]:
    """Re-initialise every LoRA layer of ``adapter_name`` over a quantised base by LoftQ.

    ``weights`` maps each layer's path to its float ``(out, in)`` weight, read before
    quantisation (:func:`float_weights`). The layer's base is replaced by ``Q_T`` (same scheme,
    compute dtype and bias) and its ``lora_A`` / ``lora_B`` by LoftQ's factors.
    """
    from deltatune.methods.lora import LoraLinear

    results: dict[str, LoftQResult] = {}
    for name, layer in model.named_modules():
        if not isinstance(layer, LoraLinear) or adapter_name not in layer.lora_A:
            continue
        base = layer.base_layer
        if not isinstance(base, QuantLinear) or name not in weights:
            continue
        if adapter_name in layer.lora_magnitude_vector:
            raise ConfigError(
                "init_lora_weights='loftq' with use_dora=true is not supported; "
                "set use_dora: false (or init_lora_weights: true)"
            )
        result = loftq_init(
            weights[name],
            base.bias,
            scheme=base.scheme,
            rank=layer.rank[adapter_name],
            scaling=layer.scaling[adapter_name],
            num_iter=num_iter,
            compute_dtype=base.compute_dtype,
        )
        layer.base_layer = result.base  # built on the float weight's device
        lora_a = layer.lora_A[adapter_name].weight
        lora_b = layer.lora_B[adapter_name].weight
        assert isinstance(lora_a, torch.Tensor) and isinstance(lora_b, torch.Tensor)
        lora_a.copy_(result.lora_A)
        lora_b.copy_(result.lora_B)
        results[name] = result
    return results


__all__ = ["SCHEME_BITS", "LoftQResult", "apply_loftq", "float_weights", "loftq_init"]

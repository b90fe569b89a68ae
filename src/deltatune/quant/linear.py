r"""Frozen quantised Linear layers for QLoRA: 4-bit NormalFloat (NF4) or 8-bit absmax bases.

NF4 (Dettmers et al., 2023, QLoRA §3), stored by torchao's ``NF4Tensor``::

    code  q_0..q_15 : the 16 NF4 levels, quantiles of N(0, 1) scaled to [-1, 1] with an exact 0
    block b of 64 weights:   c_b = max_i |W_i|          (absmax, first-level constant)
    index  k_i = argmin_k | W_i / c_b − q_k |           (4 bits, two per byte)
    double quantisation of the constants, blocks of 256 (scaler blocks):
        μ = mean_b c_b,   a_j = max_{b∈j} |c_b − μ|,   ĉ_b = round((c_b − μ)·128/a_j)·a_j/128 + μ
        (int8 codes, one fp32 factor per scaler block, one fp32 mean per tensor)
    dequantised  Ŵ_i = q_{k_i} · ĉ_b

Storage: 4 bits + 8/64 bits + 32/(64·256) bits per weight ≈ 4.13 bits ≈ 0.516 bytes.

Int8 (written here; per output row absmax, as LLM.int8()'s weight quantisation without the
outlier split)::

    s_o = max_i |W_oi| / 127,   Q_oi = round(W_oi / s_o) ∈ [−127, 127],   Ŵ_oi = Q_oi · s_o

Forward of either, with compute dtype ``d`` (bf16 where the device has it, else fp32)::

    y = (x in d) · Ŵ(in d)ᵀ + bias      returned in x's dtype

Ŵ is rebuilt for each matmul (forward and backward) and freed after it: the layer keeps only
the packed codes and constants (buffers, not parameters: they never train). The backward pass
gives the input gradient ``g Ŵ`` only, so LoRA adapters upstream still learn.

Why buffers and a module of our own rather than torchao's weight-subclass-on-``nn.Linear``:
``model.to(torch.bfloat16)`` would dequantise such a weight silently (torchao's ``to(dtype)``
returns a plain tensor) and torch.equal / state-dict comparisons are not implemented on it.
Here the codes are ordinary uint8/int8 buffers, the fp32 constants are kept fp32 across
``.to(dtype)``, and the torchao ``NF4Tensor`` is a zero-copy view rebuilt on each call.

torchao requires the number of 64-blocks to be a multiple of the scaler block; for shapes where
256 does not divide it (e.g. 576×576 in SmolLM2) the scaler block is the largest divisor of the
block count that is at most 256 (216 there), which costs a few more fp32 factors.
"""

from __future__ import annotations

import logging
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from deltatune.errors import ConfigError

Scheme = Literal["nf4", "int8"]
SCHEMES = ("nf4", "int8")
COMPUTE_DTYPES = ("auto", "bfloat16", "float32")
NF4_BLOCK = 64
NF4_SCALER_BLOCK = 256

logger = logging.getLogger(__name__)


def _nf4_module() -> Any:
    # torchao prints notices about optional CUDA extensions at import; they are not errors here.
    logging.getLogger("torchao").setLevel(logging.ERROR)
    from torchao.quantization.quantize_.workflows.nf4 import nf4_tensor

    return nf4_tensor


def bf16_available(device: torch.device) -> bool:
    """Whether matmuls in bfloat16 run natively on ``device`` (CUDA sm80+, CPUs with AVX512-BF16/AMX)."""
    if device.type == "cuda":
        return bool(torch.cuda.is_bf16_supported())
    if device.type == "cpu":
        try:
            return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
        except (AttributeError, RuntimeError):
            return False
    return False


def resolve_compute_dtype(name: str | torch.dtype, device: torch.device) -> torch.dtype:
    """``"auto"`` → bfloat16 where the device computes it natively, else float32."""
    if isinstance(name, torch.dtype):
        return name
    if name == "auto":
        return torch.bfloat16 if bf16_available(device) else torch.float32
    if name in ("bfloat16", "float32"):
        return getattr(torch, name)  # type: ignore[no-any-return]
    raise ConfigError(
        f"compute_dtype={name!r} is not one of {', '.join(COMPUTE_DTYPES)} (try 'auto')"
    )


def nf4_scaler_block(n_blocks: int) -> int:
    """256, or the largest divisor of ``n_blocks`` below it (torchao needs an exact division)."""
    for size in range(min(NF4_SCALER_BLOCK, n_blocks), 0, -1):
        if n_blocks % size == 0:
            return size
    return 1


class _Int8Linear(torch.autograd.Function):
    """``y = x (Q · s)ᵀ`` with the dequantised weight rebuilt in backward instead of kept."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(q, scale)
        return F.linear(x, q.to(x.dtype) * scale.to(x.dtype).unsqueeze(1))

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor | None, None, None]:  # type: ignore[override]
        q, scale = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return None, None, None
        return g @ (q.to(g.dtype) * scale.to(g.dtype).unsqueeze(1)), None, None


class QuantLinear(nn.Module):
    """A frozen ``nn.Linear`` whose weight is stored as NF4 (torchao) or int8; see module doc.

    ``weight`` is a read-only view: an ``NF4Tensor`` (NF4) or the int8 codes (int8), with the
    Linear's ``(out, in)`` shape. :meth:`dequantize` gives ``Ŵ`` as a float tensor.
    """

    # Buffers (registered by from_weight): nf4 ...
    quantized_data: torch.Tensor
    quantized_scalers: torch.Tensor
    quantization_factor: torch.Tensor
    scaler_mean: torch.Tensor
    nf4_code: torch.Tensor
    # ... or int8.
    qweight: torch.Tensor
    weight_scale: torch.Tensor

    #: The buffers (codes, constants) never change in training: the trainer neither copies
    #: them for early stopping nor writes them into checkpoints.
    constant_buffers = True
    #: Float buffers that must stay float32 whatever ``.to(dtype)`` the model gets.
    _fp32_buffers = ("quantization_factor", "scaler_mean", "nf4_code", "weight_scale")

    def __init__(
        self,
        in_features: int,
        out_features: int,
        scheme: Scheme,
        compute_dtype: torch.dtype,
        bias: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        if scheme not in SCHEMES:
            raise ConfigError(f"quantize={scheme!r} is not one of {', '.join(SCHEMES)}")
        self.in_features = in_features
        self.out_features = out_features
        self.scheme: Scheme = scheme
        self.compute_dtype = compute_dtype
        self.scaler_block_size = 0
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)

    # --- construction --------------------------------------------------------------------------
    @classmethod
    @torch.no_grad()
    def from_weight(
        cls,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        scheme: Scheme,
        compute_dtype: str | torch.dtype = "auto",
    ) -> QuantLinear:
        """Quantise a ``(out, in)`` weight (any float dtype; quantised from its fp32 values)."""
        out_f, in_f = (int(n) for n in weight.shape)
        dtype = resolve_compute_dtype(compute_dtype, weight.device)
        bias_t = None if bias is None else bias.detach().clone()
        layer = cls(in_f, out_f, scheme, dtype, bias_t)
        w = weight.detach().to(torch.float32).contiguous()
        if scheme == "nf4":
            if w.numel() % NF4_BLOCK:
                raise ConfigError(
                    f"a {out_f}x{in_f} weight has {w.numel()} elements, not a multiple of the NF4 "
                    f"block ({NF4_BLOCK}); leave this layer unquantised (exclude it)"
                )
            nf4 = _nf4_module()
            layer.scaler_block_size = nf4_scaler_block(w.numel() // NF4_BLOCK)
            t = nf4.to_nf4(w, NF4_BLOCK, layer.scaler_block_size)
            layer.register_buffer("quantized_data", t.quantized_data)
            layer.register_buffer("quantized_scalers", t.quantized_scalers)
            layer.register_buffer("quantization_factor", t.quantization_factor)
            layer.register_buffer("scaler_mean", t.scaler_mean.reshape(()))
            layer.register_buffer("nf4_code", t.nf4, persistent=False)
        else:
            scale = w.abs().amax(dim=1).clamp_min(torch.finfo(torch.float32).tiny) / 127.0
            q = torch.round(w / scale.unsqueeze(1)).clamp_(-127, 127).to(torch.int8)
            layer.register_buffer("qweight", q)
            layer.register_buffer("weight_scale", scale)
        return layer

    @classmethod
    def from_linear(
        cls, linear: nn.Module, scheme: Scheme, compute_dtype: str | torch.dtype = "auto"
    ) -> QuantLinear:
        """Quantise an ``nn.Linear`` or a GPT-2 ``Conv1D`` (whose ``(in, out)`` weight is transposed)."""
        from deltatune.targeting import is_conv1d

        weight = linear.weight
        assert isinstance(weight, torch.Tensor)
        w = weight.t() if is_conv1d(linear) else weight
        bias = getattr(linear, "bias", None)
        return cls.from_weight(w, bias, scheme, compute_dtype)

    # --- views ---------------------------------------------------------------------------------
    def _nf4_tensor(self) -> torch.Tensor:
        nf4 = _nf4_module()
        meta = nf4.SubclassTensorArgs(
            torch.Size((self.out_features, self.in_features)),
            (self.in_features, 1),
            0,
            torch.float32,
            self.quantized_data.device,
            False,
        )
        return nf4.NF4Tensor(  # type: ignore[no-any-return]
            meta,
            NF4_BLOCK,
            self.quantized_scalers.numel(),
            self.scaler_block_size,
            self.quantized_scalers,
            self.quantization_factor,
            self.scaler_mean,
            self.quantized_data,
            self.nf4_code,
        )

    @property
    def weight(self) -> torch.Tensor:
        """Read-only view of the stored weight: ``NF4Tensor`` (nf4) or int8 codes (int8)."""
        if self.scheme == "nf4":
            return self._nf4_tensor()
        q = self.qweight
        assert isinstance(q, torch.Tensor)
        return q

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``Ŵ``, the weight the layer computes with, as a new ``(out, in)`` tensor."""
        if self.scheme == "nf4":
            return self._nf4_tensor().get_original_weight().to(dtype)  # type: ignore[attr-defined, no-any-return]
        return (self.qweight.to(torch.float32) * self.weight_scale.unsqueeze(1)).to(dtype)

    def to_linear(self, dtype: torch.dtype = torch.float32) -> nn.Linear:
        """A plain ``nn.Linear`` holding ``Ŵ`` (and the bias) in ``dtype``."""
        dev = self.quantized_data.device if self.scheme == "nf4" else self.qweight.device
        out = nn.Linear(
            self.in_features, self.out_features, bias=self.bias is not None, device=dev, dtype=dtype
        )
        with torch.no_grad():
            out.weight.copy_(self.dequantize(dtype))
            if self.bias is not None:
                out.bias.copy_(self.bias.to(dtype))
        return out

    def quantized_bytes(self) -> int:
        """Resident bytes of the quantised weight (codes and constants; bias not counted)."""
        names = (
            ("quantized_data", "quantized_scalers", "quantization_factor", "scaler_mean")
            if self.scheme == "nf4"
            else ("qweight", "weight_scale")
        )
        return sum(int(getattr(self, n).nbytes) for n in names)

    # --- module plumbing ----------------------------------------------------------------------
    def _apply(self, fn: Any, recurse: bool = True) -> QuantLinear:
        # ``model.to(bfloat16)`` must move the quantisation constants, not round them.
        kept = {n: b for n, b in self._buffers.items() if n in self._fp32_buffers and b is not None}
        super()._apply(fn, recurse)
        for name, old in kept.items():
            moved = self._buffers[name]
            assert moved is not None
            if moved.dtype != old.dtype:
                self._buffers[name] = old.to(moved.device)
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = self.compute_dtype
        xc = x.to(dtype)
        if self.scheme == "nf4":
            y = _nf4_module().linear_nf4(xc, self._nf4_tensor())
        else:
            y = _Int8Linear.apply(xc, self.qweight, self.weight_scale)
        if self.bias is not None:
            y = y + self.bias.to(dtype)
        return y.to(x.dtype)  # type: ignore[no-any-return]

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, scheme={self.scheme}, "
            f"compute_dtype={str(self.compute_dtype).replace('torch.', '')}"
        )


def is_quantized(module: nn.Module) -> bool:
    return isinstance(module, QuantLinear)


__all__ = [
    "COMPUTE_DTYPES",
    "NF4_BLOCK",
    "NF4_SCALER_BLOCK",
    "SCHEMES",
    "QuantLinear",
    "bf16_available",
    "is_quantized",
    "nf4_scaler_block",
    "resolve_compute_dtype",
]

r"""LoRA (Hu et al., 2021), rsLoRA (Kalajdzievski, 2023) and DoRA (Liu et al., 2024).

::

            ┌──────────────┐
    x ──┬──►│ W (frozen)   │──────────────────────────┐
        │   └──────────────┘                          ▼
        └──► dropout ──► A (r × in) ──► B (out × r) ──► × s ──► (+) ──► y

    y = W x + s · B A dropout(x),   s = alpha / r   (rsLoRA: s = alpha / sqrt(r))

A starts Kaiming-uniform and B at zero, so an injected model starts equal to its base. Merging
adds ``s · B A`` to ``W`` (``merge``) and ``unmerge`` subtracts it again.

DoRA splits the merged weight into a magnitude and a direction::

    W' = m ⊙ (W + s B A) / ‖W + s B A‖_row,      m initialised to ‖W‖_row

with the norm treated as a constant in the backward pass (paper §4.3), computed per output
row as Hugging Face PEFT does, so that adapters move between the two libraries.

Quantised bases (:class:`deltatune.quant.QuantLinear`, NF4 or int8; see ``methods/qlora.py``):
the base runs through its own dequantising matmul (never the fused float kernel), the LoRA
tensors stay float32, and ``base_weight()`` gives the dequantised ``Ŵ`` where DoRA needs it.
``merge`` refuses such a layer (``Ŵ + s·B·A`` is not on the 4-bit grid): merge with
:func:`deltatune.quant.merge_quantized`, which reports the output error it introduces.

Supported base layers: ``nn.Linear``, GPT-2 ``Conv1D`` (its weight is ``(in, out)``; LoRA tensors
stay in the Linear layout, as PEFT stores them), ``nn.Embedding`` (``lora_embedding_A (r, vocab)``,
``lora_embedding_B (dim, r)``; no dropout) and ``nn.Conv2d`` (A a full convolution to ``r``
channels, B a 1×1 convolution). DoRA applies to Linear and Conv1D.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, ClassVar, Literal, cast

import torch
import torch.nn.functional as F
from torch import nn

from deltatune.errors import ConfigError, DeltatuneError
from deltatune.kernels import (
    dora_dropout_delta,
    dropout_p,
    fast_lora_enabled,
    fusable_base,
    linear_lora_dropout,
    lora_dropout_linear,
    register_layer_norms,
)
from deltatune.layers import AdapterLayer, refuse_wrapped_target
from deltatune.registry import Capabilities, MethodConfig, MethodSpec, register
from deltatune.targeting import is_conv1d, is_quant_linear, select_modules, set_submodule

#: Default targets by ``config.model_type``, as PEFT chooses them.
DEFAULT_TARGETS: dict[str, list[str]] = {
    "bert": ["query", "value"],
    "roberta": ["query", "value"],
    "distilbert": ["q_lin", "v_lin"],
    "gpt2": ["c_attn"],
    "llama": ["q_proj", "v_proj"],
    "mistral": ["q_proj", "v_proj"],
    "qwen2": ["q_proj", "v_proj"],
}


@dataclasses.dataclass
class LoraConfig(MethodConfig):
    """LoRA settings; field names and meanings are Hugging Face PEFT's.

    - ``r`` (8): rank of the update. ``lora_alpha`` (16): scale numerator.
    - ``lora_dropout`` (0.0): dropout on the adapter's input.
    - ``target_modules`` (None = the model type's default, e.g. query/value for BERT):
      list of name suffixes, a full-match regex, or ``"all-linear"``.
    - ``exclude_modules``, ``layers_to_transform``, ``layers_pattern``: narrow the targets.
    - ``modules_to_save``: modules trained whole and saved with the adapter (a new head).
    - ``use_rslora`` (False): scale by ``alpha / sqrt(r)``. ``use_dora`` (False): DoRA.
    - ``init_lora_weights`` (True): B = 0 (start at the base); ``"gaussian"``: A ~ N(0, 1/r),
      B = 0; ``False``: both random (for tests; the model no longer starts at its base).
    - ``rank_pattern`` / ``alpha_pattern``: per-module overrides, keys are regexes on names.
    - ``fan_in_fan_out``: PEFT's flag for transposed weights; forced on for GPT-2 Conv1D.
    """

    method_name: ClassVar[str] = "lora"
    peft_type: ClassVar[str] = "LORA"

    r: int = 8
    lora_alpha: float = 16
    lora_dropout: float = 0.0
    target_modules: str | list[str] | None = None
    exclude_modules: str | list[str] | None = None
    layers_to_transform: int | list[int] | None = None
    layers_pattern: str | list[str] | None = None
    modules_to_save: list[str] | None = None
    fan_in_fan_out: bool = False
    bias: Literal["none"] = "none"
    use_rslora: bool = False
    use_dora: bool = False
    init_lora_weights: bool | Literal["gaussian"] = True
    rank_pattern: dict[str, int] = dataclasses.field(default_factory=dict)
    alpha_pattern: dict[str, float] = dataclasses.field(default_factory=dict)

    def validate(self) -> None:
        if self.r <= 0:
            raise ConfigError(f"r={self.r} must be a positive integer (try 8)")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ConfigError(f"lora_dropout={self.lora_dropout} must be in [0, 1) (try 0.05)")
        for key, rank in self.rank_pattern.items():
            if rank <= 0:
                raise ConfigError(f"rank_pattern['{key}']={rank} must be a positive integer")

    def rank_and_alpha(self, module_name: str) -> tuple[int, float]:
        """Per-module (r, alpha) after ``rank_pattern`` / ``alpha_pattern`` (PEFT's matching)."""

        def lookup(pattern: dict[str, Any], default: Any) -> Any:
            for key, value in pattern.items():
                if re.match(rf"(.*\.)?{key}$", module_name):
                    return value
            return default

        return lookup(self.rank_pattern, self.r), lookup(self.alpha_pattern, self.lora_alpha)

    def scale(self, r: int, alpha: float) -> float:
        return alpha / math.sqrt(r) if self.use_rslora else alpha / r


def lora_delta(
    x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: float, dropout: nn.Module
) -> torch.Tensor:
    """``scale · dropout(x) Aᵀ Bᵀ`` — the LoRA branch of a linear layer (the plain path)."""
    return F.linear(F.linear(dropout(x), a), b).mul_(scale)


def _weight(module: nn.Module) -> torch.Tensor:
    """``module.weight`` typed as a tensor (ModuleDict entries are typed as plain Modules)."""
    weight = module.weight
    assert isinstance(weight, torch.Tensor)
    return weight


def _init_ab(a: torch.Tensor, b: torch.Tensor, init: bool | str, r: int) -> None:
    with torch.no_grad():
        if init is False:
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))
            nn.init.kaiming_uniform_(b, a=math.sqrt(5))
        elif init == "gaussian":
            nn.init.normal_(a, std=1 / r)
            nn.init.zeros_(b)
        else:
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))
            nn.init.zeros_(b)


class _LoraBase(AdapterLayer):
    """Shared bookkeeping of the three LoRA layer kinds (scaling, dropout, rank per adapter)."""

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.lora_dropout = nn.ModuleDict()
        self.scaling: dict[str, float] = {}
        self.rank: dict[str, int] = {}

    def add_adapter(
        self, adapter_name: str, config: Any, r: int | None = None, alpha: float | None = None
    ) -> None:
        raise NotImplementedError

    def _add_common(self, name: str, r: int, scale: float, dropout: float) -> None:
        self.rank[name] = r
        self.scaling[name] = scale
        self.lora_dropout[name] = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def delete_adapter(self, adapter_name: str) -> None:
        super().delete_adapter(adapter_name)
        if adapter_name in self.lora_dropout:
            del self.lora_dropout[adapter_name]
        self.scaling.pop(adapter_name, None)
        self.rank.pop(adapter_name, None)

    def _like_base(self, tensor: torch.Tensor) -> torch.Tensor:
        w = self.base_weight_param
        return tensor.to(device=w.device, dtype=w.dtype if w.is_floating_point() else torch.float32)


class LoraLinear(_LoraBase):
    """LoRA (and DoRA) on ``nn.Linear`` or GPT-2 ``Conv1D``."""

    adapter_attributes = ("lora_A", "lora_B", "lora_magnitude_vector")

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.fan_in_fan_out = is_conv1d(base_layer)
        rows, cols = (int(n) for n in _weight(base_layer).shape)
        self.out_features, self.in_features = (cols, rows) if self.fan_in_fan_out else (rows, cols)
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.lora_magnitude_vector = nn.ParameterDict()
        self._dora_scale: dict[str, torch.Tensor] = {}

    def base_weight(self) -> torch.Tensor:
        """The base weight in ``(out, in)`` layout (dequantised, a new tensor, for 4/8-bit bases)."""
        if is_quant_linear(self.base_layer):
            return self.base_layer.dequantize()  # type: ignore[operator, no-any-return]
        w = self.base_weight_param
        return w.t() if self.fan_in_fan_out else w

    def add_adapter(
        self,
        adapter_name: str,
        config: LoraConfig,
        r: int | None = None,
        alpha: float | None = None,
    ) -> None:
        r, alpha = (config.r if r is None else r), (config.lora_alpha if alpha is None else alpha)
        a = nn.Linear(self.in_features, r, bias=False)
        b = nn.Linear(r, self.out_features, bias=False)
        _init_ab(a.weight, b.weight, config.init_lora_weights, r)
        self.lora_A[adapter_name] = a.to(self._like_base(a.weight).dtype).to(
            self.base_weight_param.device
        )
        self.lora_B[adapter_name] = b.to(self._like_base(b.weight).dtype).to(
            self.base_weight_param.device
        )
        self._add_common(adapter_name, r, config.scale(r, alpha), config.lora_dropout)
        if config.use_dora:
            with torch.no_grad():
                norm = self._merged_weight(adapter_name, detach=True).norm(p=2, dim=1)
            self.lora_magnitude_vector[adapter_name] = nn.Parameter(norm.clone())

    def _lora_weight(self, name: str) -> torch.Tensor:
        return _weight(self.lora_B[name]) @ _weight(self.lora_A[name])

    def _merged_weight(self, name: str, detach: bool) -> torch.Tensor:
        lora = self._lora_weight(name)
        if detach:
            lora = lora.detach()
        w = self.base_weight()
        return w + self.scaling[name] * lora.to(w.dtype)

    def adapter_tensors(self, adapter_name: str) -> dict[str, torch.Tensor]:
        out = {
            "lora_A.weight": _weight(self.lora_A[adapter_name]),
            "lora_B.weight": _weight(self.lora_B[adapter_name]),
        }
        if adapter_name in self.lora_magnitude_vector:
            out["lora_magnitude_vector"] = self.lora_magnitude_vector[adapter_name]
        return out

    def delta_weight(self, adapter_name: str) -> torch.Tensor:
        delta = self.scaling[adapter_name] * self._lora_weight(adapter_name)
        return delta.t() if self.fan_in_fan_out else delta

    def _merge_one(self, adapter_name: str, safe_merge: bool) -> None:
        if is_quant_linear(self.base_layer):
            raise DeltatuneError(
                f"the base of adapter '{adapter_name}' is {self.base_layer.scheme}-quantised and "
                "cannot absorb it exactly; use deltatune.quant.merge_quantized(model, sample, "
                "mode='dequantize' or 'requantize'), which reports the error it introduces"
            )
        if adapter_name not in self.lora_magnitude_vector:
            super()._merge_one(adapter_name, safe_merge)
            return
        with torch.no_grad():
            combined = self._merged_weight(adapter_name, detach=True)
            scale = self.lora_magnitude_vector[adapter_name] / combined.norm(p=2, dim=1)
            new = scale.view(-1, 1) * combined
            if safe_merge and not torch.isfinite(new).all():
                raise DeltatuneError(
                    f"merging DoRA adapter '{adapter_name}' would put NaN/Inf into the weights"
                )
            self.base_weight_param.data.copy_(new.t() if self.fan_in_fan_out else new)
            self._dora_scale[adapter_name] = scale

    def _unmerge_one(self, adapter_name: str) -> None:
        if adapter_name not in self.lora_magnitude_vector:
            super()._unmerge_one(adapter_name)
            return
        with torch.no_grad():
            scale = self._dora_scale.pop(adapter_name)
            w = self.base_weight() / scale.view(-1, 1) - self.scaling[
                adapter_name
            ] * self._lora_weight(adapter_name)
            self.base_weight_param.data.copy_(w.t() if self.fan_in_fan_out else w)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        adapters = self.adapters_to_run()
        if not adapters:
            return self.base_layer(x, *args, **kwargs)
        autocast = torch.is_autocast_enabled(x.device.type)
        fast = fast_lora_enabled()
        first = adapters[0]
        a, b = _weight(self.lora_A[first]), _weight(self.lora_B[first])
        p = dropout_p(self.lora_dropout[first])
        in_out = None
        dora = any(name in self.lora_magnitude_vector for name in adapters)
        if fast and p > 0.0 and not (args or kwargs or dora):
            in_out = fusable_base(self.base_layer, x, a.dtype)
        if in_out is not None:
            # One Function for the frozen base matmul and the first adapter: backward reads the
            # output gradient once and adds g·W straight into dx (deltatune.kernels.lora_linear).
            base = self.base_layer
            s = self.scaling[first]
            result = linear_lora_dropout(
                x,
                _weight(base),
                cast("torch.Tensor | None", base.bias),
                a,
                b,
                s,
                p,
                weight_in_out=in_out,
            )
            adapters = adapters[1:]
        else:
            result = self.base_layer(x, *args, **kwargs)
        base_out = result
        out_dtype = result.dtype
        # Without autograd, add into the base layer's fresh output (same values, fewer buffers).
        in_place = not torch.is_grad_enabled() and not dora
        in_place = in_place and (type(self.base_layer) is nn.Linear or self.fan_in_fan_out)
        for name in adapters:
            a = _weight(self.lora_A[name])
            b = _weight(self.lora_B[name])
            xa = x if autocast else x.to(a.dtype)
            if name in self.lora_magnitude_vector:
                result = result + self._dora_delta(name, xa, base_out).to(out_dtype)
                continue
            p = dropout_p(self.lora_dropout[name])
            if fast and p > 0.0:
                # Keeps x and a seed instead of a dropped copy (deltatune.kernels.lora_linear).
                result = lora_dropout_linear(xa, result, a, b, self.scaling[name], p)
            else:
                delta = lora_delta(xa, a, b, self.scaling[name], self.lora_dropout[name])
                if in_place:
                    result.add_(delta.to(out_dtype))
                else:
                    result = result + delta.to(out_dtype)
        return result

    def _dora_delta(self, name: str, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        """DoRA's addition to the base output: ``(m/‖W'‖ − 1)·W x + (m/‖W'‖)·s·B A x``."""
        dropout = self.lora_dropout[name]
        a, b = _weight(self.lora_A[name]), _weight(self.lora_B[name])
        weight = self.base_weight()
        lora_w = (b @ a).detach().to(weight.dtype)
        weight_norm = (weight + self.scaling[name] * lora_w).norm(p=2, dim=1).detach()
        magnitude = self.lora_magnitude_vector[name]
        p = dropout_p(dropout)
        if p > 0.0 and fast_lora_enabled():
            # Keeps x, a seed and one (N × out) tensor (deltatune.kernels.lora_linear).
            return dora_dropout_delta(
                x, weight, a, b, magnitude, weight_norm, self.scaling[name], p
            )
        mag_scale = (magnitude / weight_norm).view(1, -1)
        if isinstance(dropout, nn.Identity) or not self.training:
            bias = getattr(self.base_layer, "bias", None)
            base = base_out - bias if bias is not None else base_out
            x_in = x
        else:
            x_in = dropout(x)
            base = F.linear(x_in, weight.to(x_in.dtype))
        lora_out = F.linear(F.linear(x_in, a), b)
        return (mag_scale - 1) * base + mag_scale * lora_out * self.scaling[name]


class LoraEmbedding(_LoraBase):
    """LoRA on ``nn.Embedding``: ``E' = E + s · (B A)ᵀ`` looked up by token id."""

    adapter_attributes = ("lora_embedding_A", "lora_embedding_B")

    def __init__(self, base_layer: nn.Embedding) -> None:
        super().__init__(base_layer)
        self.lora_embedding_A = nn.ParameterDict()
        self.lora_embedding_B = nn.ParameterDict()

    def add_adapter(
        self,
        adapter_name: str,
        config: LoraConfig,
        r: int | None = None,
        alpha: float | None = None,
    ) -> None:
        r, alpha = (config.r if r is None else r), (config.lora_alpha if alpha is None else alpha)
        if config.use_dora:
            raise ConfigError(
                "use_dora=true is supported on Linear/Conv1D layers, not Embedding; exclude it"
            )
        base: nn.Embedding = self.base_layer  # type: ignore[assignment]
        a = torch.randn(r, base.num_embeddings)
        b = torch.randn(base.embedding_dim, r)
        if config.init_lora_weights is not False:
            nn.init.zeros_(a)
            nn.init.normal_(b)
        self.lora_embedding_A[adapter_name] = nn.Parameter(self._like_base(a))
        self.lora_embedding_B[adapter_name] = nn.Parameter(self._like_base(b))
        self._add_common(adapter_name, r, config.scale(r, alpha), 0.0)

    def adapter_tensors(self, adapter_name: str) -> dict[str, torch.Tensor]:
        return {
            "lora_embedding_A": self.lora_embedding_A[adapter_name],
            "lora_embedding_B": self.lora_embedding_B[adapter_name],
        }

    def delta_weight(self, adapter_name: str) -> torch.Tensor:
        b, a = self.lora_embedding_B[adapter_name], self.lora_embedding_A[adapter_name]
        return (b @ a).t() * self.scaling[adapter_name]

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        base: nn.Embedding = self.base_layer  # type: ignore[assignment]
        for name in self.adapters_to_run():
            after_a = F.embedding(
                x,
                self.lora_embedding_A[name].t(),
                base.padding_idx,
                base.max_norm,
                base.norm_type,
                base.scale_grad_by_freq,
                base.sparse,
            )
            result = result + (after_a @ self.lora_embedding_B[name].t()) * self.scaling[name]
        return result


class LoraConv2d(_LoraBase):
    """LoRA on ``nn.Conv2d``: A is a k×k convolution to ``r`` channels, B a 1×1 back up."""

    adapter_attributes = ("lora_A", "lora_B")

    def __init__(self, base_layer: nn.Conv2d) -> None:
        if base_layer.groups != 1:
            raise ConfigError(
                f"LoRA on grouped/depthwise Conv2d (groups={base_layer.groups}) is not supported; "
                "exclude it with exclude_modules"
            )
        super().__init__(base_layer)
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()

    def add_adapter(
        self,
        adapter_name: str,
        config: LoraConfig,
        r: int | None = None,
        alpha: float | None = None,
    ) -> None:
        r, alpha = (config.r if r is None else r), (config.lora_alpha if alpha is None else alpha)
        if config.use_dora:
            raise ConfigError(
                "use_dora=true is supported on Linear/Conv1D layers, not Conv2d; exclude it"
            )
        base: nn.Conv2d = self.base_layer  # type: ignore[assignment]
        a = nn.Conv2d(
            base.in_channels,
            r,
            cast(tuple[int, int], base.kernel_size),
            cast(tuple[int, int], base.stride),
            cast(tuple[int, int], base.padding),
            cast(tuple[int, int], base.dilation),
            bias=False,
        )
        b = nn.Conv2d(r, base.out_channels, 1, 1, bias=False)
        _init_ab(a.weight, b.weight, config.init_lora_weights, r)
        self.lora_A[adapter_name] = a.to(base.weight.device, base.weight.dtype)
        self.lora_B[adapter_name] = b.to(base.weight.device, base.weight.dtype)
        self._add_common(adapter_name, r, config.scale(r, alpha), config.lora_dropout)

    def adapter_tensors(self, adapter_name: str) -> dict[str, torch.Tensor]:
        return {
            "lora_A.weight": _weight(self.lora_A[adapter_name]),
            "lora_B.weight": _weight(self.lora_B[adapter_name]),
        }

    def delta_weight(self, adapter_name: str) -> torch.Tensor:
        a, b = _weight(self.lora_A[adapter_name]), _weight(self.lora_B[adapter_name])
        if a.shape[2:] == (1, 1):
            w = (b.squeeze(3).squeeze(2) @ a.squeeze(3).squeeze(2)).unsqueeze(2).unsqueeze(3)
        else:
            w = F.conv2d(a.permute(1, 0, 2, 3), b).permute(1, 0, 2, 3)
        return w * self.scaling[adapter_name]

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        for name in self.adapters_to_run():
            a, b = self.lora_A[name], self.lora_B[name]
            xa = x.to(_weight(a).dtype) if not torch.is_autocast_enabled() else x
            result = result + (b(a(self.lora_dropout[name](xa))) * self.scaling[name]).to(
                result.dtype
            )
        return result


LORA_LAYER_TYPES = (LoraLinear, LoraEmbedding, LoraConv2d)


def _new_layer(name: str, module: nn.Module) -> _LoraBase:
    if isinstance(module, nn.Linear) or is_conv1d(module) or is_quant_linear(module):
        return LoraLinear(module)
    if isinstance(module, nn.Embedding):
        return LoraEmbedding(module)
    if isinstance(module, nn.Conv2d):
        return LoraConv2d(module)
    raise ConfigError(
        f"target module '{name}' is a {type(module).__name__}; LoRA wraps Linear, Conv1D, Embedding "
        "and Conv2d (adjust target_modules or add it to exclude_modules)"
    )


def default_targets(model: nn.Module) -> list[str]:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type in DEFAULT_TARGETS:
        return DEFAULT_TARGETS[model_type]
    raise ConfigError(
        f"target_modules is not set and there is no default for model type {model_type!r}; "
        "set target_modules (e.g. [q_proj, v_proj] or all-linear)"
    )


def _modules_to_save_names(model: nn.Module, config: LoraConfig) -> set[str]:
    from deltatune.model import modules_to_save_of

    patterns = modules_to_save_of(config)
    return {
        n
        for n, _ in model.named_modules()
        if n and any(n == p or n.endswith("." + p) for p in patterns)
    }


def inject_lora(model: nn.Module, config: LoraConfig, adapter_name: str) -> None:
    targets = config.target_modules if config.target_modules is not None else default_targets(model)
    skip = _modules_to_save_names(model, config)
    for name in select_modules(
        model,
        targets,
        exclude_modules=config.exclude_modules,
        layers_to_transform=config.layers_to_transform,
        layers_pattern=config.layers_pattern,
        skip=skip,
    ):
        if refuse_wrapped_target(model, name, "lora"):
            continue
        module = model.get_submodule(name)
        if isinstance(module, AdapterLayer) and not isinstance(module, LORA_LAYER_TYPES):
            raise ConfigError(f"module '{name}' already carries a {type(module).__name__} adapter")
        layer = module if isinstance(module, LORA_LAYER_TYPES) else _new_layer(name, module)
        r, alpha = config.rank_and_alpha(name)
        layer.add_adapter(adapter_name, config, r, alpha)
        if layer is not module:
            set_submodule(model, name, layer)
    register_layer_norms(model)


register(
    MethodSpec(
        name="lora",
        config_cls=LoraConfig,
        inject=inject_lora,
        capabilities=Capabilities(
            # qlora: runs over a 4/8-bit base (model.quantize); merging there: merge_quantized.
            merge=True,
            peft_compatible=True,
            qlora=True,
            multi_adapter=True,
            disable=True,
        ),
        default_lr=1e-3,
        summary="Low-rank update B·A beside frozen weights (rsLoRA and DoRA as options)",
        family="low-rank",
    )
)

__all__ = ["LoraConfig", "LoraConv2d", "LoraEmbedding", "LoraLinear", "inject_lora", "lora_delta"]

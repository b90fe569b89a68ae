r"""The bottleneck adapter shared by Houlsby, Pfeiffer and the parallel adapter.

One adapter is a small two-layer network on the hidden size ``d`` with a bottleneck ``m``::

    h ──► [LayerNorm] ──► down (d → m) ──► act ──► up (m → d) ──► dropout ──► × s ──► Δ(h)

    Δ(h) = s · up(act(down(LN_before(h))))     LN_before only with ln_before=true

Two placements use it, each as an :class:`~deltatune.layers.AdapterLayer` wrapping one module:

- :class:`SerialAdapterLayer` (Houlsby, Pfeiffer) wraps a sublayer's output projection and
  rewrites its output ``h`` in place: ``h ← h + Δ(h)`` (then ``LayerNorm(h)`` with
  ``ln_after=true``). Several active adapters are applied one after another, in the order of
  the active list (a stack).
- :class:`ParallelAdapterLayer` (He et al.) wraps the whole feed-forward module and adds the
  adapter of its *input* to its output: ``y = ffn(x) + Σ_a Δ_a(x)``.

``up`` starts at zero (``init_weights="zero"``), so a new adapter leaves the model exactly as
it was; ``init_weights="bert"`` draws both projections from N(0, 0.01²) with zero biases
(Houlsby et al.'s near-identity start). Bottleneck adapters change the computation
non-linearly, so they cannot be merged into the base weights.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any, ClassVar, Protocol, cast

import torch
from torch import nn

from deltatune.arch import (
    ArchConfig,
    block_submodule,
    resolve_arch,
    select_blocks,
    transformer_blocks,
)
from deltatune.errors import ConfigError
from deltatune.layers import AdapterLayer
from deltatune.targeting import is_conv1d, set_submodule

ACTIVATIONS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU,
    "gelu": nn.GELU,
    "silu": nn.SiLU,
    "tanh": nn.Tanh,
}


class BottleneckSettings(Protocol):
    """The config fields the bottleneck layers read (each method's config has them)."""

    default_reduction: ClassVar[float]

    @property
    def reduction_factor(self) -> float | None: ...
    @property
    def bottleneck_size(self) -> int | None: ...
    @property
    def non_linearity(self) -> str: ...
    @property
    def ln_before(self) -> bool: ...
    @property
    def dropout(self) -> float: ...
    @property
    def init_weights(self) -> str: ...
    @property
    def layers_to_transform(self) -> int | list[int] | None: ...
    @property
    def arch(self) -> ArchConfig: ...


def check_settings(config: Any) -> None:
    """Shared ``validate`` of the bottleneck configs: a ConfigError names the field and the fix."""
    if config.reduction_factor is not None and config.bottleneck_size is not None:
        raise ConfigError(
            f"set reduction_factor ({config.reduction_factor}) or bottleneck_size "
            f"({config.bottleneck_size}), not both"
        )
    if config.reduction_factor is not None and not config.reduction_factor > 0:
        raise ConfigError(
            f"reduction_factor={config.reduction_factor} must be > 0 (hidden size / bottleneck "
            f"size; try {config.default_reduction:g})"
        )
    if config.bottleneck_size is not None and config.bottleneck_size <= 0:
        raise ConfigError(
            f"bottleneck_size={config.bottleneck_size} must be a positive integer (try 64)"
        )
    if not 0.0 <= config.dropout < 1.0:
        raise ConfigError(f"dropout={config.dropout} must be in [0, 1) (try 0.1)")
    if isinstance(config.layers_to_transform, list) and not config.layers_to_transform:
        raise ConfigError("layers_to_transform=[] selects no block; leave it null for all blocks")


def bottleneck_size(config: BottleneckSettings, dim: int) -> int:
    """``bottleneck_size``, or ``dim // reduction_factor`` (at least 1)."""
    if config.bottleneck_size is not None:
        return config.bottleneck_size
    factor = config.reduction_factor or config.default_reduction
    return max(1, int(dim // factor))


class Bottleneck(nn.Module):
    """``down → act → up`` on the last axis, with optional LayerNorms (one adapter)."""

    def __init__(
        self, dim: int, config: BottleneckSettings, *, ln_after: bool, scaling: float
    ) -> None:
        super().__init__()
        size = bottleneck_size(config, dim)
        self.ln_before = nn.LayerNorm(dim) if config.ln_before else None
        self.down = nn.Linear(dim, size)
        self.act = ACTIVATIONS[config.non_linearity]()
        self.up = nn.Linear(size, dim)
        self.ln_after = nn.LayerNorm(dim) if ln_after else None
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        self.scaling = scaling
        with torch.no_grad():
            if config.init_weights == "bert":
                nn.init.normal_(self.down.weight, std=1e-2)
                nn.init.normal_(self.up.weight, std=1e-2)
                nn.init.zeros_(self.down.bias)
            else:
                nn.init.zeros_(self.up.weight)
            nn.init.zeros_(self.up.bias)

    def delta(self, h: torch.Tensor) -> torch.Tensor:
        """``s · dropout(up(act(down(LN_before(h)))))`` in ``h``'s dtype."""
        x = h.to(self.down.weight.dtype)
        if self.ln_before is not None:
            x = self.ln_before(x)
        out = self.dropout(self.up(self.act(self.down(x))))
        if self.scaling != 1.0:
            out = out * self.scaling
        return out.to(h.dtype)

    def serial(self, h: torch.Tensor) -> torch.Tensor:
        """``h + Δ(h)``, then ``LN_after`` if configured."""
        out = h + self.delta(h)
        if self.ln_after is not None:
            out = self.ln_after(out.to(self.ln_after.weight.dtype)).to(h.dtype)
        return out


def output_features(module: nn.Module, what: str) -> int:
    """The output width of a Linear / Conv1D (or a module with an int ``out_features``)."""
    while isinstance(module, AdapterLayer):
        module = module.base_layer
    if isinstance(module, nn.Linear):
        return module.out_features
    if is_conv1d(module):
        return int(module.nf)  # type: ignore[arg-type]
    features = getattr(module, "out_features", None)
    if isinstance(features, int):
        return features
    raise ConfigError(
        f"{what} is a {type(module).__name__}; bottleneck adapters need a Linear or Conv1D there "
        "(or a module with an int `out_features`) to know the hidden size"
    )


def _like(module: nn.Module, new: nn.Module) -> nn.Module:
    """``new`` moved to ``module``'s device and (floating) dtype."""
    ref = next(module.parameters(), None)
    if ref is None:
        return new
    dtype = ref.dtype if ref.is_floating_point() else torch.float32
    return new.to(device=ref.device, dtype=dtype)


class _BottleneckLayer(AdapterLayer):
    """Bookkeeping shared by the two placements: a ``ModuleDict`` of :class:`Bottleneck`."""

    adapter_attributes: tuple[str, ...] = ("adapter",)

    def __init__(self, base_layer: nn.Module, dim: int) -> None:
        super().__init__(base_layer)
        self.dim = dim
        self.adapter = nn.ModuleDict()

    def bottleneck(self, adapter_name: str) -> Bottleneck:
        return cast(Bottleneck, self.adapter[adapter_name])

    def adapter_tensors(self, adapter_name: str) -> dict[str, torch.Tensor]:
        return {f"adapter.{k}": p for k, p in self.adapter[adapter_name].named_parameters()}


class SerialAdapterLayer(_BottleneckLayer):
    """Wraps a sublayer output projection: ``h = base(x)``, then ``h ← h + Δ_a(h)`` per adapter.

    ``fusion`` holds composite adapters over this layer's adapters (AdapterFusion, see
    :mod:`deltatune.methods.fusion`): an active name found there is applied as
    ``h ← fusion[name](h, self)``, in its place in the active order.
    """

    adapter_attributes: tuple[str, ...] = ("adapter", "fusion")

    def __init__(self, base_layer: nn.Module, what: str = "the wrapped module") -> None:
        super().__init__(base_layer, output_features(base_layer, what))
        self.fusion = nn.ModuleDict()

    def add_adapter(self, adapter_name: str, config: Any) -> None:
        ln_after = bool(getattr(config, "ln_after", False))
        self.adapter[adapter_name] = _like(
            self.base_layer, Bottleneck(self.dim, config, ln_after=ln_after, scaling=1.0)
        )

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        out = self.base_layer(*args, **kwargs)
        names = self.adapters_to_run()
        if not names:
            return out
        h = out[0] if isinstance(out, tuple) else out
        for name in names:
            h = (
                self.fusion[name](h, self)
                if name in self.fusion
                else self.bottleneck(name).serial(h)
            )
        return (h, *out[1:]) if isinstance(out, tuple) else h

    def adapter_tensors(self, adapter_name: str) -> dict[str, torch.Tensor]:
        if adapter_name in self.fusion:
            return {f"fusion.{k}": p for k, p in self.fusion[adapter_name].named_parameters()}
        return super().adapter_tensors(adapter_name)


class ParallelAdapterLayer(_BottleneckLayer):
    """Wraps a feed-forward module: ``y = ffn(x) + Σ_a s · A_a(x)``.

    With ``residual=True`` the module is a BERT-style ``output(hidden, x)`` that returns
    ``LayerNorm(W hidden + x)``; the adapter output joins the residual argument instead, which
    is the same sum inside the LayerNorm.
    """

    def __init__(self, base_layer: nn.Module, dim: int, residual: bool) -> None:
        super().__init__(base_layer, dim)
        self.residual = residual
        self.input_index = 1 if residual else 0
        try:
            params = list(inspect.signature(base_layer.forward).parameters)
        except (TypeError, ValueError):
            params = []
        self.input_name = params[self.input_index] if len(params) > self.input_index else None

    def add_adapter(self, adapter_name: str, config: Any) -> None:
        self.adapter[adapter_name] = _like(
            self.base_layer,
            Bottleneck(self.dim, config, ln_after=False, scaling=float(config.scaling)),
        )

    def _input(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor:
        if len(args) > self.input_index:
            return args[self.input_index]  # type: ignore[no-any-return]
        if self.input_name is not None and self.input_name in kwargs:
            return kwargs[self.input_name]  # type: ignore[no-any-return]
        raise TypeError(
            f"parallel adapter: cannot find the feed-forward input (argument {self.input_index} "
            f"of {type(self.base_layer).__name__}.forward)"
        )

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        names = self.adapters_to_run()
        if not names:
            return self.base_layer(*args, **kwargs)
        x = self._input(args, kwargs)
        delta = self.bottleneck(names[0]).delta(x)
        for name in names[1:]:
            delta = delta + self.bottleneck(name).delta(x)
        if not self.residual:
            return self.base_layer(*args, **kwargs) + delta
        if len(args) > self.input_index:
            args = (*args[: self.input_index], x + delta, *args[self.input_index + 1 :])
        else:
            kwargs = {**kwargs, str(self.input_name): x + delta}
        return self.base_layer(*args, **kwargs)


def inject_bottleneck(
    model: nn.Module,
    config: BottleneckSettings,
    adapter_name: str,
    *,
    method: str,
    places: Sequence[str],
    parallel: bool = False,
) -> None:
    """Add one bottleneck adapter at ``places`` (arch fields) of every selected block."""
    needed = ["layers", *places, *(["ffn_out"] if parallel else [])]
    arch = resolve_arch(model, config.arch, needed, method)
    blocks = select_blocks(transformer_blocks(model, arch), config.layers_to_transform)
    layer_cls = ParallelAdapterLayer if parallel else SerialAdapterLayer
    for block_name, block in blocks:
        for field in places:
            name, module = block_submodule(block_name, block, getattr(arch, field), field)
            if isinstance(module, AdapterLayer) and not isinstance(module, layer_cls):
                raise ConfigError(
                    f"{method}: module '{name}' (arch.{field}) already carries a "
                    f"{type(module).__name__} adapter; delete that adapter first"
                )
            what = f"arch.{field}={getattr(arch, field)!r} ('{name}')"
            layer: _BottleneckLayer
            if isinstance(module, layer_cls):
                layer = module
            elif parallel:
                _, out_proj = block_submodule(block_name, block, arch.ffn_out, "ffn_out")
                dim = output_features(out_proj, f"arch.ffn_out={arch.ffn_out!r}")
                layer = ParallelAdapterLayer(module, dim, residual=bool(arch.ffn_residual))
            else:
                layer = SerialAdapterLayer(module, what)
            layer.add_adapter(adapter_name, config)
            if layer is not module:
                set_submodule(model, name, layer)


__all__ = [
    "ACTIVATIONS",
    "Bottleneck",
    "ParallelAdapterLayer",
    "SerialAdapterLayer",
    "bottleneck_size",
    "check_settings",
    "inject_bottleneck",
]

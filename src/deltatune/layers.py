"""``AdapterLayer``: one wrapped module plus named adapters.

::

    x ──► base_layer ──────────────┐
      └─► adapter["a"] (if active) ─┴─► + ──► y        (each method defines its own combination)

The wrapped module stays at ``base_layer`` (so its parameters keep PEFT's key names, e.g.
``...query.base_layer.weight``). Each method keeps its per-adapter tensors in ``ModuleDict`` /
``ParameterDict`` attributes keyed by adapter name (``lora_A["default"]``). A layer knows:

- ``active_adapters``: which adapters its forward uses (several are summed);
- ``merged_adapters``: which adapters are folded into ``base_layer``'s weights;
- ``disabled``: forward is exactly ``base_layer``'s (merged adapters are unmerged first);
- ``dropped``: AdapterDrop (:func:`deltatune.adapter_drop`) switched this layer's adapters off,
  so its forward runs ``base_layer`` alone;
- ``routing``: set by :func:`deltatune.route` (per-example adapters) and by an active
  :class:`~deltatune.compose.Parallel`: the call is split by example into groups, each run with
  its own adapters (see :mod:`deltatune.routing`).

Subclasses implement ``add_adapter``, ``forward``, ``adapter_tensors`` (their PEFT-named
tensors for one adapter) and, where the math allows, ``delta_weight`` for merging.
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from deltatune.errors import DeltatuneError

if TYPE_CHECKING:
    from deltatune.routing import Route


class AdapterLayer(nn.Module):
    """Base for layers that wrap one module and hold named adapters."""

    #: Names of the ModuleDict/ParameterDict attributes that hold per-adapter tensors.
    adapter_attributes: tuple[str, ...] = ()
    #: When true, :meth:`adapter_tensors` returns complete saved keys (PEFT's prompt-learning
    #: formats store e.g. ``prompt_embeddings`` at the top level, not under the module path).
    absolute_keys: bool = False

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.active_adapters: list[str] = []
        self.merged_adapters: list[str] = []
        self.disabled = False
        self.dropped = False
        self.routing: Route | None = None

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.routing is None or self.disabled or self.dropped:
            return super().__call__(*args, **kwargs)
        from deltatune.routing import routed_call

        return routed_call(self, args, kwargs)

    # --- bookkeeping -------------------------------------------------------------------------
    @property
    def adapter_names(self) -> list[str]:
        names: list[str] = []
        for attr in self.adapter_attributes:
            for key in getattr(self, attr):
                if key not in names:
                    names.append(key)
        return names

    def add_adapter(self, adapter_name: str, config: Any) -> None:
        raise NotImplementedError(f"{type(self).__name__} must implement add_adapter")

    def delete_adapter(self, adapter_name: str) -> None:
        if adapter_name in self.merged_adapters:
            raise DeltatuneError(
                f"adapter '{adapter_name}' is merged; unmerge it before deleting it"
            )
        for attr in self.adapter_attributes:
            container = getattr(self, attr)
            if adapter_name in container:
                del container[adapter_name]
        self.active_adapters = [a for a in self.active_adapters if a != adapter_name]

    def set_active(self, adapter_names: list[str]) -> None:
        """Make exactly these adapters active (ones this layer lacks are skipped)."""
        self.active_adapters = [a for a in adapter_names if a in self.adapter_names]
        for attr in self.adapter_attributes:
            for name, holder in getattr(self, attr).items():
                trainable = name in self.active_adapters
                params = [holder] if isinstance(holder, nn.Parameter) else list(holder.parameters())
                for p in params:
                    p.requires_grad_(trainable)

    def adapter_tensors(self, adapter_name: str) -> dict[str, torch.Tensor]:
        """This adapter's tensors under their saved (PEFT) local names, e.g. ``lora_A.weight``."""
        raise NotImplementedError

    def load_adapter_tensors(self, adapter_name: str, tensors: dict[str, torch.Tensor]) -> None:
        """Copy saved tensors in; shapes must match (checked by the caller's key/shape report)."""
        own = self.adapter_tensors(adapter_name)
        with torch.no_grad():
            for key, value in tensors.items():
                own[key].copy_(value.to(dtype=own[key].dtype, device=own[key].device))

    # --- merging ------------------------------------------------------------------------------
    def delta_weight(self, adapter_name: str) -> torch.Tensor:
        """The change this adapter makes to ``base_layer.weight`` (same shape), if mergeable."""
        raise DeltatuneError(
            f"{type(self).__name__} adapters cannot be merged into the base weights"
        )

    def merge(self, adapter_names: list[str] | None = None, safe_merge: bool = False) -> None:
        names = adapter_names if adapter_names is not None else list(self.active_adapters)
        for name in names:
            if name in self.merged_adapters or name not in self.adapter_names:
                continue
            self._merge_one(name, safe_merge)
            self.merged_adapters.append(name)

    @property
    def base_weight_param(self) -> torch.Tensor:
        """``base_layer.weight`` (typed: every mergeable wrapped module has one)."""
        weight = self.base_layer.weight
        assert isinstance(weight, torch.Tensor)
        return weight

    def _merge_one(self, adapter_name: str, safe_merge: bool) -> None:
        weight = self.base_weight_param
        delta = self.delta_weight(adapter_name).to(weight.dtype)
        if safe_merge:
            merged = weight.data + delta
            if not torch.isfinite(merged).all():
                raise DeltatuneError(
                    f"merging adapter '{adapter_name}' would put NaN/Inf into {type(self.base_layer).__name__}"
                    " weights; the adapter is probably broken (check its training loss)"
                )
            weight.data.copy_(merged)
        else:
            weight.data += delta

    def unmerge(self) -> None:
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            self._unmerge_one(name)

    def _unmerge_one(self, adapter_name: str) -> None:
        weight = self.base_weight_param
        weight.data -= self.delta_weight(adapter_name).to(weight.dtype)

    def unloaded(self, merge: bool) -> nn.Module:
        """The plain module to put back in the model (with the active adapters merged if asked)."""
        if merge:
            self.merge()
        return self.base_layer

    # --- forward helpers ---------------------------------------------------------------------
    def adapters_to_run(self) -> list[str]:
        """Active adapters not already merged; empty when disabled or dropped (AdapterDrop)."""
        if self.disabled or self.dropped:
            return []
        return [a for a in self.active_adapters if a not in self.merged_adapters]


class ModulesToSave(AdapterLayer):
    """Train a whole module (e.g. a replaced classification head) as part of an adapter.

    Each adapter gets its own trainable copy; the original stays in ``base_layer`` and is what a
    disabled model uses. Saved under the plain module key, as Hugging Face PEFT does
    (``base_model.model.classifier.weight``).
    """

    adapter_attributes = ("modules_to_save",)

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.modules_to_save = nn.ModuleDict()
        for p in base_layer.parameters():
            p.requires_grad_(False)

    def add_adapter(self, adapter_name: str, config: Any = None) -> None:
        trainable = copy.deepcopy(self.base_layer)
        for p in trainable.parameters():
            p.requires_grad_(True)
        self.modules_to_save[adapter_name] = trainable

    def set_active(self, adapter_names: list[str]) -> None:
        super().set_active(adapter_names)

    def adapter_tensors(self, adapter_name: str) -> dict[str, torch.Tensor]:
        return dict(self.modules_to_save[adapter_name].state_dict(keep_vars=True))

    def merge(self, adapter_names: list[str] | None = None, safe_merge: bool = False) -> None:
        # The copy replaces the original wholesale; nothing to fold. ``unloaded`` picks it.
        return None

    def unmerge(self) -> None:
        return None

    def unloaded(self, merge: bool) -> nn.Module:
        active = self.adapters_to_run()
        if merge and active:
            return self.modules_to_save[active[0]]
        return self.base_layer

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        active = self.adapters_to_run()
        if not active:
            return self.base_layer(*args, **kwargs)
        return self.modules_to_save[active[0]](*args, **kwargs)


def adapter_path_kind(model: nn.Module, name: str) -> tuple[str, str | None]:
    """Where module ``name`` sits relative to the model's adapter wrappers.

    Returns ``("free", None)`` for a module outside every :class:`AdapterLayer`;
    ``("adapter", outer)`` for a module that belongs to an adapter (its ``lora_A``, a
    ``modules_to_save`` copy, ...) or is a wrapper's own ``base_layer`` (the wrapper stands
    for it); ``("wrapped", outer)`` for a base module deeper inside another wrapper's
    ``base_layer`` (e.g. a query projection inside an attention module that prefix tuning
    wrapped), where ``outer`` names that wrapper.
    """
    parts = name.split(".")
    wrapper: str | None = None
    for i in range(1, len(parts)):
        prefix = ".".join(parts[:i])
        if isinstance(model.get_submodule(prefix), AdapterLayer):
            if parts[i] != "base_layer" or i == len(parts) - 1:
                return "adapter", prefix
            wrapper = wrapper or prefix
    return ("wrapped", wrapper) if wrapper is not None else ("free", None)


def refuse_wrapped_target(model: nn.Module, name: str, method: str) -> bool:
    """True when ``name`` belongs to an adapter (skip it); raise when it is wrapped by another.

    A target inside another method's wrapper cannot be adapted there without changing that
    wrapper's saved key names, so injecting in the other order is the fix the error names.
    """
    from deltatune.errors import ConfigError
    from deltatune.model import state_of

    kind, outer = adapter_path_kind(model, name)
    if kind == "adapter":
        return True
    if kind == "wrapped":
        wrapper = model.get_submodule(str(outer))
        owners = [
            f"{n} ({getattr(state_of(model).configs.get(n), 'method_name', '?')})"
            for n in getattr(wrapper, "adapter_names", [])
        ]
        raise ConfigError(
            f"{method} target '{name}' lies inside '{outer}', which adapter "
            f"{', '.join(owners) or type(wrapper).__name__} wraps; inject {method} first and "
            f"that adapter after it (in a combine config: list {method} before it)"
        )
    return False

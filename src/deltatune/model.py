"""Functions that act on a plain ``nn.Module``: inject, switch, disable, delete, merge, unload.

The model stays the user's own module; deltatune only swaps target submodules for
:class:`~deltatune.layers.AdapterLayer` wrappers and keeps a small record of the adapters it
added in ``model._deltatune`` (configs, the active set, and the parameters that selection-style
methods such as full fine-tuning train in place).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from deltatune.errors import ConfigError, DeltatuneError
from deltatune.layers import AdapterLayer, ModulesToSave
from deltatune.registry import MethodConfig, get_method
from deltatune.targeting import set_submodule

if TYPE_CHECKING:
    from deltatune.compose import AdapterSetup

STATE_ATTR = "_deltatune"
SEQ_CLS_HEADS = ("classifier", "score")


@dataclasses.dataclass
class DeltaState:
    """What deltatune added to a model."""

    configs: dict[str, MethodConfig] = dataclasses.field(default_factory=dict)
    active: list[str] = dataclasses.field(default_factory=list)
    #: adapter name -> parameter names trained in place (full fine-tuning, freezing).
    in_place_params: dict[str, list[str]] = dataclasses.field(default_factory=dict)
    disabled: bool = False
    #: The Stack / Parallel / Fuse last given to ``set_active`` (None for names).
    composition: Any = None


def state_of(model: nn.Module) -> DeltaState:
    state = model.__dict__.get(STATE_ATTR)
    if state is None:
        state = DeltaState()
        model.__dict__[STATE_ATTR] = state
    return state


def adapter_layers(model: nn.Module) -> Iterator[tuple[str, AdapterLayer]]:
    """``(module name, layer)`` for every AdapterLayer in the model, outermost first."""
    for name, module in model.named_modules():
        if isinstance(module, AdapterLayer):
            yield name, module


def modules_to_save_of(config: MethodConfig) -> list[str]:
    names = list(getattr(config, "modules_to_save", None) or [])
    if config.task_type == "SEQ_CLS":
        names += [h for h in SEQ_CLS_HEADS if h not in names]
    return names


def _wrap_modules_to_save(
    model: nn.Module, patterns: list[str], adapter_name: str, explicit: int
) -> None:
    found = 0
    for name, module in list(model.named_modules()):
        if not name or not any(name == p or name.endswith("." + p) for p in patterns):
            continue
        if isinstance(module, ModulesToSave):
            module.add_adapter(adapter_name)
            found += 1
        elif isinstance(module, AdapterLayer) or _inside_adapter_layer(model, name):
            continue
        else:
            wrapper = ModulesToSave(module)
            wrapper.add_adapter(adapter_name)
            set_submodule(model, name, wrapper)
            found += 1
    if explicit and found == 0:
        raise ConfigError(
            f"modules_to_save={patterns[:explicit]!r} matches no module of {type(model).__name__}"
        )


def _inside_adapter_layer(model: nn.Module, name: str) -> bool:
    parts = name.split(".")
    return any(
        isinstance(model.get_submodule(".".join(parts[:i])), AdapterLayer)
        for i in range(1, len(parts))
    )


def inject(model: nn.Module, config: MethodConfig, adapter_name: str = "default") -> nn.Module:
    """Add a method's adapter to ``model`` in place, freeze the base, make the adapter active.

    Returns the same ``model`` object, for chaining.
    """
    if not isinstance(config, MethodConfig):
        raise ConfigError(
            f"inject needs a method config (e.g. LoraConfig), got {type(config).__name__}"
        )
    spec = get_method(config.method_name)
    state = state_of(model)
    if adapter_name in state.configs:
        raise ConfigError(
            f"adapter '{adapter_name}' already exists; pick another adapter_name or delete it"
        )
    if state.in_place_params:
        raise ConfigError(
            "this model is being trained in place (full fine-tuning / layer freezing); "
            "adapters cannot be added on top of it"
        )
    # Freeze the base (every parameter that is not another adapter's).
    requires_grad = {id(p): p.requires_grad for p in model.parameters()}
    adapter_params = {
        id(p) for _, layer in adapter_layers(model) for p in _adapter_parameters(layer)
    }
    for p in model.parameters():
        if id(p) not in adapter_params:
            p.requires_grad_(False)
    try:
        spec.inject(model, config, adapter_name)
        extra = modules_to_save_of(config)
        if extra:
            explicit = len(getattr(config, "modules_to_save", None) or [])
            _wrap_modules_to_save(model, extra, adapter_name, explicit)
    except Exception:
        # Leave the model as it was: no half-injected wrappers, requires_grad as before.
        _strip_adapter(model, adapter_name)
        state.in_place_params.pop(adapter_name, None)
        for p in model.parameters():
            p.requires_grad_(requires_grad.get(id(p), p.requires_grad))
        raise
    _match_training_mode(model)
    state.configs[adapter_name] = config
    if spec.capabilities.multi_adapter:
        set_active(model, adapter_name)
    else:
        state.active = [adapter_name]
    return model


def _strip_adapter(model: nn.Module, adapter_name: str) -> None:
    """Remove one adapter from every layer; unwrap layers left with no adapter."""
    # Innermost first: unwrapping an outer layer first would invalidate the inner one's path.
    for name, layer in reversed(list(adapter_layers(model))):
        if adapter_name in layer.adapter_names:
            layer.delete_adapter(adapter_name)
        if not layer.adapter_names:
            set_submodule(model, name, layer.base_layer)


def _match_training_mode(model: nn.Module) -> None:
    """New adapter modules (created in training mode) follow their wrapped module's mode, so
    that e.g. LoRA dropout is off in a model that was in eval mode when the adapter was added."""
    for _, layer in adapter_layers(model):
        mode = layer.base_layer.training
        layer.training = mode
        for child_name, child in layer.named_children():
            if child_name != "base_layer":
                child.train(mode)


def _adapter_parameters(layer: AdapterLayer) -> list[nn.Parameter]:
    out: list[nn.Parameter] = []
    for attr in layer.adapter_attributes:
        holder = getattr(layer, attr)
        out.extend(holder.parameters())
    return out


def adapter_names(model: nn.Module) -> list[str]:
    return list(state_of(model).configs)


def _check_names(model: nn.Module, names: list[str]) -> None:
    known = adapter_names(model)
    for n in names:
        if n not in known:
            raise ConfigError(
                f"no adapter named '{n}' on this model (adapters: {', '.join(known) or 'none'})"
            )


def set_active(model: nn.Module, adapter_name: str | Sequence[str] | AdapterSetup) -> None:
    """Make these adapters the active ones (their parameters trainable, the others frozen).

    A list applies its adapters in order (a stack); ``Stack``, ``Parallel`` and ``Fuse``
    compositions are described in :mod:`deltatune.compose`.
    """
    from deltatune import compose

    names, parallel = compose.resolve_active(model, adapter_name)
    _check_names(model, names)
    for _, layer in adapter_layers(model):
        layer.set_active(names)
    state = state_of(model)
    state.active = names
    state.composition = adapter_name if isinstance(adapter_name, compose.AdapterSetup) else None
    compose.set_parallel(model, parallel)


def active_adapters(model: nn.Module) -> list[str]:
    return list(state_of(model).active)


def _set_disabled(model: nn.Module, disabled: bool) -> None:
    state = state_of(model)
    if state.in_place_params:
        raise DeltatuneError(
            "full fine-tuning / layer freezing change the base weights in place; there is no "
            "adapter to disable (keep a copy of the base model to compare against)"
        )
    for _, layer in adapter_layers(model):
        if disabled and layer.merged_adapters:
            layer.unmerge()
        layer.disabled = disabled
    state.disabled = disabled


def disable(model: nn.Module) -> None:
    """Run the plain base model (merged adapters are unmerged first)."""
    _set_disabled(model, True)


def enable(model: nn.Module) -> None:
    _set_disabled(model, False)


@contextmanager
def disabled(model: nn.Module) -> Iterator[nn.Module]:
    """``with disabled(model): ...`` runs the base model, then restores the adapters."""
    was = state_of(model).disabled
    disable(model)
    try:
        yield model
    finally:
        if not was:
            enable(model)


def depends_on(config: MethodConfig) -> list[str]:
    """Adapters that an adapter of this config builds on (a fusion's fused adapters)."""
    fn = getattr(config, "depends_on", None)
    return list(fn()) if callable(fn) else []


def delete(model: nn.Module, adapter_name: str) -> None:
    """Remove one adapter's layers and record; wrappers left with no adapter are unwrapped."""
    _check_names(model, [adapter_name])
    state = state_of(model)
    users = [n for n, c in state.configs.items() if adapter_name in depends_on(c)]
    if users:
        raise DeltatuneError(
            f"adapter '{adapter_name}' is used by {', '.join(repr(u) for u in users)}; "
            "delete that first"
        )
    if state.composition is not None:
        from deltatune.compose import set_parallel

        set_parallel(model, None)
        state.composition = None
    for name, layer in reversed(list(adapter_layers(model))):  # innermost first, as above
        layer.delete_adapter(adapter_name)
        if not layer.adapter_names:
            set_submodule(model, name, layer.base_layer)
    del state.configs[adapter_name]
    state.active = [a for a in state.active if a != adapter_name]
    state.in_place_params.pop(adapter_name, None)


def merge(model: nn.Module, adapter_names: list[str] | None = None, safe: bool = True) -> None:
    """Fold adapters (default: the active ones) into the base weights.

    ``safe`` checks the merged weights for NaN/Inf before writing them.
    """
    names = adapter_names if adapter_names is not None else active_adapters(model)
    _check_names(model, names)
    for n in names:
        if n in state_of(model).in_place_params:
            continue  # trained in place: the base weights already are the result
        blocker = getattr(state_of(model).configs[n], "unmergeable_part", None)
        part = blocker() if callable(blocker) else None  # a combination (methods/combine.py)
        if part is not None:
            raise DeltatuneError(
                f"adapter '{n}' (combine): part {part} cannot be merged into the base weights; "
                "merge only combinations of mergeable methods (lora, ia3, bitfit)"
            )
        spec = get_method(state_of(model).configs[n].method_name)
        if not spec.capabilities.merge:
            raise DeltatuneError(
                f"adapter '{n}' ({spec.name}) cannot be merged into the base weights"
            )
    done: list[tuple[AdapterLayer, int]] = []
    for layer_name, layer in adapter_layers(model):
        before = len(layer.merged_adapters)
        try:
            layer.merge([n for n in names if n in layer.adapter_names], safe_merge=safe)
        except DeltatuneError as exc:
            # Leave no half-merged model behind: unmerge what this call merged, then report.
            for merged_layer, count in [(layer, before), *reversed(done)]:
                while len(merged_layer.merged_adapters) > count:
                    merged_layer._unmerge_one(merged_layer.merged_adapters.pop())
            raise DeltatuneError(f"{exc} (in module '{layer_name}'; nothing was merged)") from None
        done.append((layer, before))


def unmerge(model: nn.Module) -> None:
    for _, layer in adapter_layers(model):
        layer.unmerge()


def unload(model: nn.Module, merge: bool = False) -> nn.Module:
    """Remove every adapter wrapper; with ``merge=True`` the active adapters are merged first.

    Returns the same model object, now a plain base model (all parameters trainable again is
    left to the caller; ``requires_grad`` is restored to True for base parameters).
    """
    if merge:
        globals()["merge"](model)
    from deltatune.compose import remove_hooks

    remove_hooks(model)  # Parallel replication, AdapterDrop
    # Innermost first so that nested wrappers unwrap cleanly.
    for name, layer in reversed(list(adapter_layers(model))):
        set_submodule(model, name, layer.unloaded(merge=merge))
    model.__dict__.pop(STATE_ATTR, None)
    for p in model.parameters():
        p.requires_grad_(True)
    return model


@dataclasses.dataclass
class TrainableReport:
    trainable: int
    total: int
    by_group: dict[str, int]

    @property
    def percent(self) -> float:
        return 100.0 * self.trainable / max(self.total, 1)

    def __str__(self) -> str:
        lines = [
            f"trainable params: {self.trainable:,} || all params: {self.total:,} "
            f"|| trainable%: {self.percent:.4f}"
        ]
        for group, count in self.by_group.items():
            lines.append(f"  {group:<40} {count:>12,}")
        return "\n".join(lines)


def trainable_report(model: nn.Module) -> TrainableReport:
    """Count trainable and total parameters, grouped by the kind of tensor trained.

    Parameters shared between modules are counted once. The weights of a quantised (QLoRA)
    base are packed codes in buffers, not parameters; they count as the
    ``in_features x out_features`` weights they stand for, so the total (and the trainable
    percentage) is the same as for the float model.
    """
    from deltatune.quant.linear import QuantLinear

    seen: set[int] = set()
    trainable = total = 0
    groups: dict[str, int] = {}
    for name, p in model.named_parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        if p.requires_grad:
            trainable += p.numel()
            group = _group_name(name)
            groups[group] = groups.get(group, 0) + p.numel()
    for module in model.modules():
        if isinstance(module, QuantLinear):
            total += module.in_features * module.out_features
    return TrainableReport(trainable, total, groups)


def _group_name(param_name: str) -> str:
    parts = param_name.split(".")
    for part in parts:
        if part in (
            "lora_A",
            "lora_B",
            "lora_embedding_A",
            "lora_embedding_B",
            "lora_magnitude_vector",
            "modules_to_save",
        ) or part.startswith(("bitfit", "ia3", "adapter", "fusion")):
            return part
    return ".".join(p for p in parts if not p.isdigit())[:40]


def trainable_parameters(model: nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]

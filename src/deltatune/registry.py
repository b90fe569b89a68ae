"""Method registry: method name -> :class:`MethodSpec` (config class, injector, capabilities).

The CLI (``deltatune methods``, ``train``), the adapter loader and the test matrix all enumerate
this registry, so a new method is one file in ``methods/`` that calls :func:`register`, plus one
import line in ``methods/__init__.py``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any, ClassVar

from torch import nn

from deltatune.config import BaseConfig
from deltatune.errors import ConfigError, did_you_mean


@dataclasses.dataclass
class MethodConfig(BaseConfig):
    """Fields every method config has. ``method_name`` and ``peft_type`` are class constants."""

    method_name: ClassVar[str] = ""
    peft_type: ClassVar[str] = ""
    #: Fields that are written to ``adapter_config.json`` for readers but not read back.
    ignored_keys: ClassVar[frozenset[str]] = frozenset({"peft_type", "deltatune_method"})

    task_type: str | None = None
    base_model_name_or_path: str | None = None


@dataclasses.dataclass(frozen=True)
class Capabilities:
    """What a method supports; shown by ``deltatune methods`` and the README table."""

    train: bool = True
    merge: bool = False
    save: bool = True
    peft_compatible: bool = False
    qlora: bool = False
    multi_adapter: bool = False
    disable: bool = False


@dataclasses.dataclass(frozen=True)
class MethodSpec:
    """One registered method.

    ``inject(model, config, adapter_name)`` modifies ``model`` in place (wrapping target modules
    and setting ``requires_grad``) and returns nothing.
    """

    name: str
    config_cls: type[MethodConfig]
    inject: Callable[[nn.Module, Any, str], None]
    capabilities: Capabilities
    default_lr: float
    summary: str
    family: str = "other"
    #: For methods fitted in closed form rather than by gradient steps (feature-based):
    #: ``fit(model, config, batches) -> metrics``; ``batches`` yields input dicts with ``labels``.
    fit: Callable[..., dict[str, float]] | None = None


_METHODS: dict[str, MethodSpec] = {}


def register(spec: MethodSpec) -> MethodSpec:
    if spec.name in _METHODS:
        raise ValueError(f"method '{spec.name}' is registered twice")
    if spec.config_cls.method_name != spec.name:
        raise ValueError(f"{spec.config_cls.__name__}.method_name must be '{spec.name}'")
    _METHODS[spec.name] = spec
    return spec


def _ensure_loaded() -> None:
    import deltatune.methods  # noqa: F401  (importing registers the built-in methods)


def methods() -> dict[str, MethodSpec]:
    """All registered methods by name, in registration order."""
    _ensure_loaded()
    return dict(_METHODS)


def get_method(name: str) -> MethodSpec:
    _ensure_loaded()
    if name not in _METHODS:
        raise ConfigError(
            f"unknown method '{name}'"
            + did_you_mean(name, _METHODS)
            + f" (registered: {', '.join(_METHODS)}; `deltatune methods` lists them)"
        )
    return _METHODS[name]


def method_for_peft_type(peft_type: str) -> MethodSpec:
    _ensure_loaded()
    for spec in _METHODS.values():
        if spec.config_cls.peft_type == peft_type:
            return spec
    raise ConfigError(
        f"adapter_config.json has peft_type '{peft_type}', which deltatune does not implement "
        f"(known: {', '.join(s.config_cls.peft_type for s in _METHODS.values())})"
    )


def config_from_dict(data: Mapping[str, Any], *, where: str = "method") -> MethodConfig:
    """Build a method config from ``{"name": "lora", "r": 8, ...}`` (the YAML ``method:`` section)."""
    data = dict(data)
    name = data.pop("name", None)
    if name is None:
        raise ConfigError(
            f"{where}: missing 'name' (e.g. name: lora; `deltatune methods` lists them)"
        )
    spec = get_method(str(name))
    return spec.config_cls.from_dict(data, where=where)

r"""Free combination: several methods on one model, trained, saved and loaded as one adapter.

::

    layer 0  ─ attention ─ query  ──► LoraLinear      ["default"]   (part 0: lora)
                         ─ value  ──► LoraLinear      ["default"]
             ─ ffn_out            ──► SerialAdapter   ["default"]   (part 1: pfeiffer)
    ...
    classifier                    ──► ModulesToSave   ["default"]   (the combination's head)

Each part is an ordinary method config (``{name: lora, target_modules: [query, value]}``)
with its own targets; every part is injected under the combination's adapter name, so the
model computes, per wrapped module ``m``,

    y_m = part_m(x)          (the one part that wraps ``m``; unwrapped modules are unchanged)

which is exactly the model obtained by injecting each part by hand one after the other. One
adapter name means one switch for everything: ``set_active``, ``disable``, ``delete``,
``save_adapter`` / ``load_adapter`` (one folder, one ``adapter_model.safetensors`` with PEFT-style
keys from every part) and ``trainable_report`` act on all parts together.

Rules:

- Parts are module-level methods (``PART_METHODS``); a part may not set ``modules_to_save`` or
  ``task_type`` (give them on the combination: one head for the whole model).
- Two parts may not wrap the same module (each module's wrapper belongs to one method); the
  error names the module and both parts.
- ``merge`` folds every part when every part is mergeable (LoRA, IA3, BitFit), else it refuses
  before touching any weight, naming the first part that cannot be merged.
- :func:`export_parts` writes each part alone into ``<dir>/<index>-<method>/`` in its own
  on-disk format (PEFT's for LoRA / IA3), loadable by ``peft`` or by :func:`deltatune.load_adapter`.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, ClassVar

from torch import nn

from deltatune.errors import CheckpointError, ConfigError
from deltatune.layers import AdapterLayer
from deltatune.registry import (
    Capabilities,
    MethodConfig,
    MethodSpec,
    config_from_dict,
    get_method,
    register,
)

#: Methods that can be a part: they wrap modules by name and keep per-adapter tensors there.
PART_METHODS = ("lora", "ia3", "bitfit", "houlsby", "pfeiffer", "parallel_adapter")
#: Model attribute: adapter name -> one set of wrapped module names per part (for export_parts).
PARTS_ATTR = "_deltatune_combine_parts"


@dataclasses.dataclass
class CombineConfig(MethodConfig):
    """A combination of methods (every field, with its default).

    - ``methods`` (required): the parts, each a method section ``{name: <method>, ...}`` as in
      a YAML ``method:`` (or a method config object, stored as its dict). Parts are injected in
      this order.
    - ``modules_to_save`` (None): modules trained whole and saved too (a new head); with
      ``task_type: SEQ_CLS`` the heads ``classifier`` / ``score`` are added, as in every method.
    - ``task_type``, ``base_model_name_or_path`` (None): as in every method config.
    """

    method_name: ClassVar[str] = "combine"
    peft_type: ClassVar[str] = "DELTATUNE_COMBINE"

    methods: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    modules_to_save: list[str] | None = None

    def validate(self) -> None:
        if not isinstance(self.methods, list) or not self.methods:
            raise ConfigError(
                "combine: methods is empty; list the parts, e.g. methods: "
                "[{name: lora, target_modules: [query, value]}, {name: pfeiffer}]"
            )
        normalised: list[dict[str, Any]] = []
        for i, entry in enumerate(self.methods):
            if isinstance(entry, MethodConfig):
                entry = {"name": entry.method_name, **entry.to_dict()}
            if not isinstance(entry, dict):
                raise ConfigError(
                    f"combine: methods[{i}]={entry!r} must be a method section "
                    "such as {name: lora, r: 8}"
                )
            normalised.append(dict(entry))
        self.methods = normalised
        self.parts()  # part names, keys and values are checked here

    def parts(self) -> list[MethodConfig]:
        """The parts as method configs (validated)."""
        out: list[MethodConfig] = []
        for i, entry in enumerate(self.methods):
            where = f"combine: methods[{i}]"
            name = entry.get("name")
            if name not in PART_METHODS:
                known = ", ".join(PART_METHODS)
                if name == "combine":
                    raise ConfigError(f"{where}: a combination cannot contain a combination")
                get_method(str(name))  # an unknown name: the registry's did-you-mean error
                raise ConfigError(
                    f"{where}: name={name!r} cannot be a part (parts are module-level "
                    f"methods: {known})"
                )
            cfg = config_from_dict(entry, where=where)
            for field in ("modules_to_save", "task_type"):
                if getattr(cfg, field, None):
                    raise ConfigError(
                        f"{where}: {field}={getattr(cfg, field)!r} belongs on the combination "
                        f"(method.{field}), not on a part"
                    )
            out.append(cfg)
        return out

    def unmergeable_part(self) -> str | None:
        """``"methods[i] (<name>)"`` for the first part that cannot be merged, or None."""
        for i, part in enumerate(self.parts()):
            if not get_method(part.method_name).capabilities.merge:
                return f"methods[{i}] ({part.method_name})"
        return None


def _owned(model: nn.Module, adapter_name: str) -> dict[str, set[int]]:
    """Module name -> ids of this adapter's tensors there, for every layer that holds it."""
    from deltatune.model import adapter_layers

    return {
        name: {id(t) for t in layer.adapter_tensors(adapter_name).values()}
        for name, layer in adapter_layers(model)
        if adapter_name in layer.adapter_names
    }


def inject_combine(model: nn.Module, config: CombineConfig, adapter_name: str) -> None:
    from deltatune.model import modules_to_save_of

    heads = modules_to_save_of(config)
    owner: dict[str, int] = {}
    per_part: list[set[str]] = []
    for i, part in enumerate(config.parts()):
        if heads and "modules_to_save" in part.field_types():
            # The part's own injector then leaves the head alone (LoRA "all-linear" would
            # otherwise wrap the classifier that the combination trains whole).
            part = part.replace(modules_to_save=heads)
        before = _owned(model, adapter_name)
        try:
            get_method(part.method_name).inject(model, part, adapter_name)
        except ConfigError as exc:
            raise ConfigError(f"combine: methods[{i}] ({part.method_name}): {exc}") from None
        after = _owned(model, adapter_name)
        for name, ids in before.items():
            if after.get(name) != ids:  # the part replaced an earlier part's tensors there
                raise ConfigError(
                    f"combine: methods[{i}] ({part.method_name}) and methods[{owner[name]}] "
                    f"both target module '{name}'; give the parts disjoint targets"
                )
        new = set(after) - set(before)
        if not new:
            raise ConfigError(
                f"combine: methods[{i}] ({part.method_name}) wraps no module of "
                f"{type(model).__name__}; check its targets"
            )
        for name in new:
            owner[name] = i
        per_part.append(new)
    model.__dict__.setdefault(PARTS_ATTR, {})[adapter_name] = per_part


def export_parts(
    model: nn.Module, save_dir: str | os.PathLike[str], adapter_name: str = "default"
) -> list[Path]:
    """Write each part of a combination alone: ``<save_dir>/<i>-<method>/`` (config + tensors).

    A LoRA or IA3 part's folder is in PEFT's format (load it with ``PeftModel.from_pretrained``
    on the base model); the combination's head is not in any part. Returns the folders.
    """
    from deltatune.checkpoint import CONFIG_NAME, PREFIX, WEIGHTS_NAME, config_to_peft_dict
    from deltatune.io import save_safetensors, write_json
    from deltatune.model import state_of

    config = state_of(model).configs.get(adapter_name)
    modules = model.__dict__.get(PARTS_ATTR, {}).get(adapter_name)
    if not isinstance(config, CombineConfig) or modules is None:
        raise CheckpointError(f"adapter '{adapter_name}' is not a combination (method combine)")
    out: list[Path] = []
    for i, (part, names) in enumerate(zip(config.parts(), modules, strict=True)):
        part = part.replace(base_model_name_or_path=config.base_model_name_or_path)
        if getattr(part, "target_modules", None) == "all-linear":
            # Expanded to this part's own modules (the generic expansion would list every
            # module that holds the combination's adapter name, other parts' too).
            part = part.replace(target_modules=sorted(names))
        mine: dict[str, Any] = {}
        for name in sorted(names):
            layer = model.get_submodule(name)
            assert isinstance(layer, AdapterLayer)
            for local, tensor in layer.adapter_tensors(adapter_name).items():
                mine[local if layer.absolute_keys else f"{PREFIX}{name}.{local}"] = tensor
        folder = Path(save_dir) / f"{i}-{part.method_name}"
        save_safetensors(folder / WEIGHTS_NAME, mine, metadata={"format": "pt"})
        write_json(folder / CONFIG_NAME, config_to_peft_dict(model, part, adapter_name))
        out.append(folder)
    return out


register(
    MethodSpec(
        name="combine",
        config_cls=CombineConfig,
        inject=inject_combine,
        # merge: when every part merges (else merge refuses naming the part; see model.merge).
        capabilities=Capabilities(merge=True, multi_adapter=True, disable=True),
        default_lr=1e-3,
        summary="Several methods on one model, each with its own targets, as one adapter "
        "(merges when every part does)",
        family="combined",
    )
)

__all__ = ["PART_METHODS", "CombineConfig", "export_parts", "inject_combine"]

"""Save and load adapters in the Hugging Face PEFT on-disk format; export merged models.

A saved adapter is a folder with two files:

- ``adapter_config.json``: the method config with PEFT's field names and ``peft_type``
  (``LORA`` for LoRA/DoRA/rsLoRA; deltatune's own ``DELTATUNE_*`` types for methods PEFT lacks);
- ``adapter_model.safetensors``: tensors keyed ``base_model.model.<module path>.<local name>``
  with the adapter name left out (``...query.lora_A.weight``), as PEFT writes them.

``save_adapters`` writes every adapter of a model: ``default`` at the root, others in
``<dir>/<name>/`` (PEFT's layout). Loading checks keys and shapes both ways and refuses a
partial load with the lists of missing, unexpected and mis-shaped keys. Files are written
atomically; nothing is ever unpickled.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from deltatune.errors import CheckpointError, ConfigError
from deltatune.io import save_safetensors, write_json
from deltatune.layers import ModulesToSave
from deltatune.model import active_adapters, adapter_layers, delete, inject, set_active, state_of
from deltatune.registry import MethodConfig, method_for_peft_type, methods

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."

#: Fields that PEFT writes and deltatune accepts at these values (they describe defaults or
#: metadata, not features). Any other unknown field must be null / false / empty.
PEFT_DEFAULTS: dict[str, Any] = {
    "megatron_core": "megatron.core",
    "qalora_group_size": 16,
    "runtime_config": {"ephemeral_gpu_offload": False},
}
PEFT_METADATA = frozenset(
    {"auto_mapping", "revision", "inference_mode", "peft_version", "peft_type"}
)


def _is_default(value: Any) -> bool:
    return value is None or value is False or value == {} or value == [] or value == ""


def config_to_peft_dict(
    model: nn.Module, config: MethodConfig, adapter_name: str
) -> dict[str, Any]:
    data = config.to_dict()
    if data.get("target_modules") == "all-linear":
        # PEFT writes the expanded list of module paths; do the same so both libraries agree.
        data["target_modules"] = sorted(
            {
                name
                for name, layer in adapter_layers(model)
                if adapter_name in layer.adapter_names and not isinstance(layer, ModulesToSave)
            }
        )
    from deltatune.model import modules_to_save_of

    if "modules_to_save" in data or config.task_type == "SEQ_CLS":
        data["modules_to_save"] = modules_to_save_of(config) or None
    data["peft_type"] = config.peft_type
    if method_for_peft_type(config.peft_type).name != config.method_name:
        # A method saved under another's PEFT type (qlora as LORA) names itself for deltatune.
        data["deltatune_method"] = config.method_name
    if not config.peft_type.startswith("DELTATUNE_") or "inference_mode" in data:
        # PEFT's flag; for the prefix-bearing methods (MAM, UniPELT too) it also says that the
        # saved tensors are the folded prefix P, so loading builds a direct P.
        data["inference_mode"] = True
    return data


def config_from_peft_dict(raw: dict[str, Any], where: str) -> MethodConfig:
    peft_type = raw.get("peft_type")
    if not isinstance(peft_type, str):
        raise CheckpointError(f"{where}: no 'peft_type' field; is this an adapter folder?")
    try:
        spec = method_for_peft_type(peft_type)
    except Exception as exc:
        raise CheckpointError(f"{where}: {exc}") from None
    named = raw.get("deltatune_method")
    if isinstance(named, str) and named != spec.name:
        own = methods().get(named)
        if own is not None and own.config_cls.peft_type == peft_type:
            spec = own
    fields = spec.config_cls.field_types()
    clean: dict[str, Any] = {}
    for key, value in raw.items():
        if key in fields:
            clean[key] = value
        elif (
            key in PEFT_METADATA
            or key in spec.config_cls.ignored_keys
            or (key in PEFT_DEFAULTS and value == PEFT_DEFAULTS[key])
        ):
            continue
        elif not _is_default(value):
            raise CheckpointError(
                f"{where}: field '{key}'={value!r} asks for a {peft_type} feature deltatune does not "
                "implement; remove it or re-save the adapter without it"
            )
    try:
        return spec.config_cls.from_dict(clean, where=where)
    except Exception as exc:
        raise CheckpointError(str(exc)) from None


def adapter_state_dict(model: nn.Module, adapter_name: str = "default") -> dict[str, torch.Tensor]:
    """This adapter's tensors under PEFT's saved key names."""
    state = state_of(model)
    if adapter_name not in state.configs:
        raise CheckpointError(
            f"no adapter named '{adapter_name}' (adapters: {', '.join(state.configs) or 'none'})"
        )
    out: dict[str, torch.Tensor] = {}
    params = dict(model.named_parameters())
    trained = state.in_place_params.get(adapter_name, [])
    for pname in trained:
        out[PREFIX + pname] = params[pname]
    if trained:
        # Persistent buffers (BatchNorm running statistics) of modules trained in place go along.
        persistent = model.state_dict(keep_vars=True)
        for mname, module in model.named_modules():
            own = [
                f"{mname}.{p}" if mname else p for p, _ in module.named_parameters(recurse=False)
            ]
            if own and all(n in params and n in trained for n in own):
                for bname, _ in module.named_buffers(recurse=False):
                    key = f"{mname}.{bname}" if mname else bname
                    if key in persistent:
                        out[PREFIX + key] = persistent[key]
    for path, layer in adapter_layers(model):
        if adapter_name in layer.adapter_names:
            for local, tensor in layer.adapter_tensors(adapter_name).items():
                key = local if layer.absolute_keys else f"{PREFIX}{path}.{local}"
                if key in out:
                    raise CheckpointError(f"adapter '{adapter_name}': two layers save '{key}'")
                out[key] = tensor
    return out


def save_adapter(
    model: nn.Module, save_dir: str | os.PathLike[str], adapter_name: str = "default"
) -> Path:
    """Write one adapter (config + tensors) into ``save_dir``. Returns the folder."""
    state = state_of(model)
    if adapter_name not in state.configs:
        raise CheckpointError(
            f"no adapter named '{adapter_name}' (adapters: {', '.join(state.configs) or 'none'})"
        )
    out = Path(save_dir)
    tensors = adapter_state_dict(model, adapter_name)
    config = state.configs[adapter_name]
    save_safetensors(out / WEIGHTS_NAME, tensors, metadata={"format": "pt"})
    write_json(out / CONFIG_NAME, config_to_peft_dict(model, config, adapter_name))
    return out


def save_adapters(model: nn.Module, save_dir: str | os.PathLike[str]) -> Path:
    """Write every adapter: ``default`` at the root, others in ``<save_dir>/<name>/``."""
    out = Path(save_dir)
    for name in state_of(model).configs:
        save_adapter(model, out if name == "default" else out / name, name)
    return out


def read_adapter_config(path: str | os.PathLike[str]) -> MethodConfig:
    folder = Path(path)
    cfg_path = folder / CONFIG_NAME
    if not cfg_path.is_file():
        raise CheckpointError(
            f"'{folder}' holds no {CONFIG_NAME}; give the folder an adapter was saved to"
        )
    try:
        raw = json.loads(cfg_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{cfg_path} is not valid JSON ({exc})") from None
    if not isinstance(raw, dict):
        raise CheckpointError(f"{cfg_path} must hold a JSON object")
    return config_from_peft_dict(raw, str(cfg_path))


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise CheckpointError(f"'{path}' does not exist")
    try:
        with safe_open(str(path), framework="pt") as fh:
            return {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118 (safe_open has no __iter__)
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise CheckpointError(
            f"'{path}' is corrupt or not a safetensors file ({exc}); re-save the adapter"
        ) from None


def _key_report(missing: list[str], unexpected: list[str], mismatched: list[str]) -> str:
    parts = []
    for label, keys in (
        ("missing", missing),
        ("unexpected", unexpected),
        ("shape mismatch", mismatched),
    ):
        if keys:
            shown = ", ".join(keys[:6]) + (f" (+{len(keys) - 6} more)" if len(keys) > 6 else "")
            parts.append(f"{len(keys)} {label}: {shown}")
    return "; ".join(parts)


def load_adapter(
    model: nn.Module,
    path: str | os.PathLike[str],
    adapter_name: str = "default",
    *,
    is_trainable: bool = False,
) -> nn.Module:
    """Inject the saved adapter into ``model`` and load its tensors (strict, both ways).

    The adapter becomes active. With ``is_trainable=False`` its parameters are frozen.
    """
    folder = Path(path)
    config = read_adapter_config(folder)
    tensors = read_tensors(folder / WEIGHTS_NAME)
    base_extra = {
        k: v
        for k, v in tensors.items()
        if k.endswith(".base_layer.weight") or k.endswith(".base_layer.bias")
    }
    requires_grad = {id(p): p.requires_grad for p in model.parameters()}
    active = active_adapters(model)
    try:
        inject(model, config, adapter_name)
    except ConfigError as exc:  # e.g. its target modules are not in this model
        raise CheckpointError(
            f"adapter at '{folder}' does not fit this {type(model).__name__}: {exc}"
        ) from None
    expected = adapter_state_dict(model, adapter_name)
    module_params = dict(model.named_parameters())
    missing = sorted(k for k in expected if k not in tensors)
    unexpected = sorted(
        k
        for k in tensors
        if k not in expected and not (k in base_extra and k[len(PREFIX) :] in module_params)
    )
    mismatched = sorted(
        f"{k} {tuple(tensors[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in expected
        if k in tensors and tensors[k].shape != expected[k].shape
    ) + sorted(
        f"{k} {tuple(v.shape)} vs model {tuple(module_params[k[len(PREFIX) :]].shape)}"
        for k, v in base_extra.items()
        if k[len(PREFIX) :] in module_params and v.shape != module_params[k[len(PREFIX) :]].shape
    )
    if missing or unexpected or mismatched:
        # Leave the model as it was: without this adapter, the same adapters active and trainable.
        delete(model, adapter_name)
        if active:
            set_active(model, active)
        for p in model.parameters():
            p.requires_grad_(requires_grad.get(id(p), p.requires_grad))
        raise CheckpointError(
            f"adapter at '{folder}' does not fit this {type(model).__name__}: "
            + _key_report(missing, unexpected, mismatched)
            + " (was it trained on another base model or with other target_modules?)"
        )
    with torch.no_grad():
        for key, target in expected.items():
            target.copy_(tensors[key].to(dtype=target.dtype, device=target.device))
        for key, value in base_extra.items():
            param = module_params[key[len(PREFIX) :]]
            param.copy_(value.to(dtype=param.dtype, device=param.device))
    if not is_trainable:
        for t in expected.values():
            if isinstance(t, nn.Parameter):
                t.requires_grad_(False)
    return model


def load_adapters(
    model: nn.Module, path: str | os.PathLike[str], *, is_trainable: bool = False
) -> list[str]:
    """Load every adapter of a :func:`save_adapters` folder; returns their names in load order.

    ``default`` (the root) comes first, then the subfolders by name, except that an adapter
    that builds on others of the folder (a fusion on its fused adapters) waits for them.
    """
    from deltatune.model import depends_on

    folder = Path(path)
    if not folder.is_dir():
        raise CheckpointError(f"adapter folder '{folder}' does not exist")
    entries: list[tuple[str, Path]] = []
    if (folder / CONFIG_NAME).is_file():
        entries.append(("default", folder))
    for sub in sorted(p for p in folder.iterdir() if p.is_dir() and (p / CONFIG_NAME).is_file()):
        entries.append((sub.name, sub))
    if not entries:
        raise CheckpointError(f"'{folder}' holds no adapter ({CONFIG_NAME} not found)")
    in_folder = {name for name, _ in entries}
    needs = {
        name: set(depends_on(read_adapter_config(where))) & in_folder for name, where in entries
    }
    names: list[str] = []
    while entries:
        ready = next(((n, w) for n, w in entries if needs[n] <= set(names)), None)
        if ready is None:
            raise CheckpointError(
                f"'{folder}': adapters {[n for n, _ in entries]} depend on each other in a cycle"
            )
        entries.remove(ready)
        load_adapter(model, ready[1], ready[0], is_trainable=is_trainable)
        names.append(ready[0])
    return names


def export_merged(model: nn.Module, out_dir: str | os.PathLike[str], tokenizer: Any = None) -> Path:
    """Merge the active adapters into a copy of ``model`` and save it with ``save_pretrained``.

    The result loads with transformers alone. Written into a temporary folder and renamed, so a
    crash leaves no half-written model.
    """
    import copy

    from deltatune.model import unload

    if not hasattr(model, "save_pretrained"):
        raise CheckpointError(
            f"{type(model).__name__} is not a transformers model; merge with deltatune.merge() and "
            "save its state_dict yourself"
        )
    merged = unload(copy.deepcopy(model), merge=True)
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        merged.save_pretrained(tmp)  # type: ignore[operator]
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return out


__all__ = [
    "adapter_state_dict",
    "export_merged",
    "load_adapter",
    "load_adapters",
    "read_adapter_config",
    "save_adapter",
    "save_adapters",
]

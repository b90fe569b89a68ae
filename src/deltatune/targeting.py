"""Choose modules by name, with Hugging Face PEFT's ``target_modules`` semantics.

- ``target_modules`` as a string: a regular expression that must match the *whole* module name.
- as a list: a module matches if its name equals an entry or ends with ``"." + entry``.
- ``"all-linear"``: every ``nn.Linear``, GPT-2 ``Conv1D`` and quantised
  :class:`~deltatune.quant.QuantLinear` except the output layer
  (``get_output_embeddings()``, or a final ``lm_head``/``classifier``/``score``/``fc`` head).
- ``exclude_modules``: same forms, removes matches.
- ``layers_to_transform``: keep only modules inside these layer indices; the index is the number
  after ``layers_pattern`` (e.g. ``layer``, ``layers``, ``h``) or, without a pattern, the first
  ``.<digits>.`` in the name.
A pattern that matches nothing is an error that lists names that exist.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

from torch import nn

from deltatune.errors import ConfigError

HEAD_NAMES = ("lm_head", "classifier", "score", "fc", "head", "cls", "qa_outputs")


def is_conv1d(module: nn.Module) -> bool:
    """GPT-2's ``transformers.pytorch_utils.Conv1D`` (a Linear with a transposed weight)."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def is_linear_like(module: nn.Module) -> bool:
    """A Linear or Conv1D, or an adapter wrapper around one (so a second adapter finds it)."""
    inner = getattr(module, "base_layer", None)
    if isinstance(inner, nn.Module) and type(module).__name__ != "ModulesToSave":
        return is_linear_like(inner)
    return isinstance(module, nn.Linear) or is_conv1d(module) or is_quant_linear(module)


def is_quant_linear(module: nn.Module) -> bool:
    """A frozen 4-bit / 8-bit :class:`deltatune.quant.QuantLinear` (a Linear for targeting)."""
    return type(module).__name__ == "QuantLinear" and hasattr(module, "scheme")


def _matches(name: str, pattern: str | Sequence[str]) -> bool:
    if isinstance(pattern, str):
        return re.fullmatch(pattern, name) is not None
    return any(name == p or name.endswith("." + p) for p in pattern)


def _layer_index(name: str, layers_pattern: str | Sequence[str] | None) -> int | None:
    patterns = [layers_pattern] if isinstance(layers_pattern, str) else list(layers_pattern or [])
    regexes = [rf"(?:^|.*\.){re.escape(p)}\.(\d+)(?:\.|$)" for p in patterns] or [
        r".*?\.(\d+)(?:\.|$)"
    ]
    for rx in regexes:
        m = re.match(rx, name)
        if m:
            return int(m.group(1))
    return None


def output_layer_names(model: nn.Module) -> set[str]:
    """Names of the model's output layer(s), which ``all-linear`` leaves alone."""
    names: set[str] = set()
    get_out = getattr(model, "get_output_embeddings", None)
    out = get_out() if callable(get_out) else None
    for name, module in model.named_modules():
        if (out is not None and module is out) or (
            name.split(".")[-1] in HEAD_NAMES and is_linear_like(module) and name.count(".") <= 1
        ):
            names.add(name)
    return names


def select_modules(
    model: nn.Module,
    target_modules: str | Sequence[str] | None,
    *,
    exclude_modules: str | Sequence[str] | None = None,
    layers_to_transform: int | Sequence[int] | None = None,
    layers_pattern: str | Sequence[str] | None = None,
    skip: Iterable[str] = (),
    field: str = "target_modules",
) -> list[str]:
    """Return the names of the modules selected by the PEFT-style arguments, in model order."""
    if target_modules is None or (not isinstance(target_modules, str) and len(target_modules) == 0):
        raise ConfigError(
            f"{field} is empty: give module names (e.g. [query, value]) or 'all-linear'"
        )
    skip = set(skip)
    named = [(n, m) for n, m in model.named_modules() if n and n not in skip]
    if target_modules == "all-linear":
        heads = output_layer_names(model)
        chosen = [n for n, m in named if is_linear_like(m) and n not in heads]
    else:
        chosen = [n for n, _ in named if _matches(n, target_modules)]
    if not chosen:
        leaf_names = sorted({n.split(".")[-1] for n, m in named if not list(m.children())})
        hint = ""
        if isinstance(target_modules, str) and "," in target_modules:
            # PEFT reads a string as one full-match regex; `key=a,b` on the CLI is such a string.
            names = ",".join(t.strip() for t in target_modules.split(","))
            hint = (
                f"; a string is one full-match regular expression (PEFT's rule): for several "
                f"names give a list, e.g. {field}=[{names}] on the command line"
            )
        raise ConfigError(
            f"{field}={target_modules!r} matches no module of {type(model).__name__}; "
            f"module names it has include: {', '.join(leaf_names[:25])}{hint}"
        )
    if exclude_modules:
        chosen = [n for n in chosen if not _matches(n, exclude_modules)]
        if not chosen:
            raise ConfigError(
                f"exclude_modules={exclude_modules!r} removes every module selected by {field}"
            )
    if layers_to_transform is not None:
        wanted = (
            {layers_to_transform}
            if isinstance(layers_to_transform, int)
            else set(layers_to_transform)
        )
        chosen = [n for n in chosen if _layer_index(n, layers_pattern) in wanted]
        if not chosen:
            raise ConfigError(
                f"layers_to_transform={sorted(wanted)} (layers_pattern={layers_pattern!r}) keeps none "
                f"of the modules matched by {field}={target_modules!r}"
            )
    return chosen


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def block_index(name: str) -> int | None:
    """Index of the transformer block / CNN stage a parameter or module name belongs to."""
    m = re.search(r"\.(?:layer|layers|h|blocks|block|stages|features)\.(\d+)(?:\.|$)", "." + name)
    return int(m.group(1)) if m else None

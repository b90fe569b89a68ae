r"""AdapterDrop (Rücklé et al., 2021, "AdapterDrop: On the Efficiency of Adapters in
Transformers"): no adapters in the lowest transformer blocks.

::

    block L-1  ─ adapters ✓
    …
    block k    ─ adapters ✓
    block k-1  ─ adapters ✗  (the wrappers call their base module only)
    …
    block 0    ─ adapters ✗

``adapter_drop(model, k)`` switches off every adapter layer (any method: bottleneck adapters,
LoRA, IA3, fusion) inside the lowest ``k`` blocks of the architecture map's ``layers``
container. A dropped layer's forward is exactly its base module's output, and costs no more
than the base (the wrapper sees no adapter to run), so inference gets faster the more blocks are
dropped, while the adapters above still see (and were trained on, see below) plain base
activations from below. Heads (``modules_to_save``) are never dropped. A list of block indices
drops exactly those blocks.

Robust AdapterDrop: with ``random_max=m`` each forward pass *in training mode* drops the lowest
``k`` blocks with ``k`` drawn uniformly from ``0 … m`` (the paper draws from all blocks:
``m = L − 1``), so one trained adapter works for any ``k`` at inference. In eval mode the fixed
``layers`` setting applies. Draws use a generator seeded with ``seed`` (or the global torch RNG
when ``seed`` is None), so a seeded run drops the same blocks at the same steps.

Call ``adapter_drop`` after the adapters are on the model (layers added later are not
dropped); ``adapter_drop(model, 0)`` restores every adapter. Merged adapters live in the base
weights and cannot be dropped (unmerge them first).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from deltatune.arch import ArchConfig, resolve_arch, transformer_blocks
from deltatune.compose import HOOK_MARK, remove_hooks
from deltatune.errors import ConfigError, DeltatuneError
from deltatune.layers import AdapterLayer, ModulesToSave

HOOK_KIND = "adapter_drop"


class _RandomDrop:
    """Forward pre-hook: in training mode, drop the lowest k blocks, k ~ U{0..random_max}."""

    def __init__(
        self,
        blocks: list[list[str]],
        fixed: set[int],
        random_max: int,
        seed: int | None,
    ) -> None:
        self.blocks = blocks
        self.fixed = fixed
        self.random_max = random_max
        self.generator = torch.Generator().manual_seed(seed) if seed is not None else None
        #: The number of blocks dropped by the last training-mode forward pass.
        self.last_k: int | None = None
        setattr(self, HOOK_MARK, HOOK_KIND)

    def __call__(self, module: nn.Module, args: Any) -> None:
        if module.training:
            k = int(torch.randint(0, self.random_max + 1, (1,), generator=self.generator))
            self.last_k = k
            dropped = set(range(k))
        else:
            dropped = self.fixed
        for i, names in enumerate(self.blocks):
            for name in names:
                layer = module.get_submodule(name)
                if isinstance(layer, AdapterLayer):
                    layer.dropped = i in dropped


def _layers_by_block(model: nn.Module, arch: ArchConfig | None) -> list[list[str]]:
    from deltatune.model import adapter_layers

    resolved = resolve_arch(model, arch, ["layers"], "adapter_drop")
    blocks = transformer_blocks(model, resolved)
    out: list[list[str]] = [[] for _ in blocks]
    for name, layer in adapter_layers(model):
        if isinstance(layer, ModulesToSave):
            continue
        for i, (block_name, _) in enumerate(blocks):
            if name.startswith(block_name + "."):
                out[i].append(name)
                break
    return out


def adapter_drop(
    model: nn.Module,
    layers: int | Sequence[int] = 0,
    *,
    random_max: int | None = None,
    seed: int | None = None,
    arch: ArchConfig | dict[str, Any] | None = None,
) -> list[str]:
    """Drop the adapters of the lowest ``layers`` blocks (an int) or of these block indices.

    ``random_max``: in training mode, drop the lowest ``k ~ U{0..random_max}`` blocks per
    forward pass instead (robust AdapterDrop); ``seed`` seeds those draws. ``arch`` gives the
    blocks container for a model without an architecture entry (``{"layers": "blocks"}``).
    Returns the names of the adapter layers dropped now (the fixed setting).
    """
    arch_cfg = ArchConfig.from_dict(arch, where="arch") if isinstance(arch, dict) else arch
    blocks = _layers_by_block(model, arch_cfg)
    n = len(blocks)
    if isinstance(layers, bool) or not isinstance(layers, int | Sequence):
        raise ConfigError(f"adapter_drop: layers={layers!r} must be a block count or block indices")
    if isinstance(layers, int):
        if not 0 <= layers <= n:
            raise ConfigError(
                f"adapter_drop: layers={layers} must be between 0 and the {n} blocks of the model"
            )
        fixed = set(range(layers))
    else:
        bad = [i for i in layers if not (isinstance(i, int) and 0 <= i < n)]
        if bad:
            raise ConfigError(
                f"adapter_drop: block indices {bad} are out of range; the model has {n} blocks "
                f"(0 to {n - 1})"
            )
        fixed = set(layers)
    if random_max is not None and not (isinstance(random_max, int) and 0 <= random_max <= n):
        raise ConfigError(
            f"adapter_drop: random_max={random_max!r} must be between 0 and {n} (blocks); "
            f"Rücklé et al. use {n - 1}"
        )
    reach = fixed | set(range(random_max or 0))
    for i in sorted(reach):
        for name in blocks[i]:
            layer = model.get_submodule(name)
            if isinstance(layer, AdapterLayer) and layer.merged_adapters:
                raise DeltatuneError(
                    f"adapter_drop: '{name}' has merged adapters {layer.merged_adapters}, which are "
                    "part of the base weights and cannot be dropped; unmerge first"
                )
    remove_hooks(model, HOOK_KIND)
    dropped: list[str] = []
    for i, names in enumerate(blocks):
        for name in names:
            layer = model.get_submodule(name)
            assert isinstance(layer, AdapterLayer)
            layer.dropped = i in fixed
            if layer.dropped:
                dropped.append(name)
    if random_max is not None:
        model.register_forward_pre_hook(_RandomDrop(blocks, fixed, random_max, seed))
    return dropped


def dropped_layers(model: nn.Module) -> list[str]:
    """Names of the adapter layers that are dropped right now."""
    from deltatune.model import adapter_layers

    return [name for name, layer in adapter_layers(model) if layer.dropped]


__all__ = ["adapter_drop", "dropped_layers"]

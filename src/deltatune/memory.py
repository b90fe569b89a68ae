"""Measure the memory of a training step by counting tensors, on any device.

CPU allocators do not report a usable peak, so the benchmarks count bytes directly: the weights
(unique storages, so tied weights count once), the gradients and optimizer state of the trainable
parameters, and the activations autograd saves for the backward pass, recorded by
``torch.autograd.graph.saved_tensors_hooks`` as unique storages (a tensor saved by several
operations, or views of one storage, count once; parameters and buffers are excluded because
they are weights)::

    peak ~= weights + grads + optimizer state + saved activations

This is the quantity that differs between fine-tuning methods; allocator fragmentation and the
transient buffers of single kernels are not in it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator

import torch

StorageKey = tuple[int, str]


def storage_key(t: torch.Tensor) -> StorageKey:
    """Identity of a tensor's storage (views and aliases share it)."""
    return (t.untyped_storage().data_ptr(), str(t.device))


def plain_tensors(t: torch.Tensor) -> list[torch.Tensor]:
    """The plain tensors holding ``t``'s bytes: ``t`` itself, or, for a wrapper subclass such as
    torchao's ``NF4Tensor`` (no storage of its own), its inner tensors, recursively."""
    flatten = getattr(type(t), "__tensor_flatten__", None)
    if flatten is None:
        return [t]
    names, _ = t.__tensor_flatten__()  # type: ignore[attr-defined]
    out: list[torch.Tensor] = []
    for name in names:
        inner = getattr(t, name)
        if isinstance(inner, torch.Tensor):
            out.extend(plain_tensors(inner))
    return out


def unique_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes of the distinct storages behind ``tensors``."""
    seen: dict[StorageKey, int] = {}
    for t in tensors:
        for leaf in plain_tensors(t):
            seen[storage_key(leaf)] = leaf.untyped_storage().nbytes()
    return sum(seen.values())


@contextlib.contextmanager
def count_saved(exclude: Iterable[StorageKey] = ()) -> Iterator[dict[StorageKey, int]]:
    """Record the unique storages saved for backward while the block runs (key -> bytes).

    ``exclude`` holds storages not to count (typically the parameters and buffers).
    """
    skip = set(exclude)
    seen: dict[StorageKey, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        for leaf in plain_tensors(t):
            if leaf.layout == torch.strided and not leaf.is_meta:
                key = storage_key(leaf)
                if key not in skip and key[0] != 0:
                    seen[key] = max(seen.get(key, 0), leaf.untyped_storage().nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield seen


def model_storages(model: torch.nn.Module) -> set[StorageKey]:
    """Storage keys of every parameter and buffer of ``model`` (what :func:`count_saved` skips)."""
    return {
        storage_key(leaf)
        for t in [*model.parameters(), *model.buffers()]
        for leaf in plain_tensors(t)
    }

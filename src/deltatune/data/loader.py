"""Batches in a reproducible order: the shuffle of each epoch is a function of (seed, epoch).

A resumed run rebuilds exactly the batches an uninterrupted run would have seen, because the
permutation depends on nothing but the seed and the epoch number, and the sampler can start
part-way through an epoch. The loader draws its worker seed from its own generator, so iterating
it never consumes the global torch RNG (which dropout uses and a checkpoint restores).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sized
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

#: Mixes the run seed and the epoch into one generator seed (a large odd multiplier keeps
#: (seed, epoch) pairs from colliding for any realistic seed and epoch count).
_EPOCH_MIX = 1_000_003


class SeededSampler(Sampler[int]):
    """Index sampler whose order for an epoch depends only on ``(seed, epoch)``.

    Call :meth:`set_epoch` before iterating each epoch; ``start`` skips the first ``start``
    indices of that epoch's order, which is how a resumed run continues mid-epoch.
    """

    def __init__(self, num_examples: int, *, shuffle: bool, seed: int) -> None:
        self.num_examples = num_examples
        self.shuffle = shuffle
        self.seed = seed
        self.epoch = 0
        self.start = 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Select the epoch whose order the next iteration yields, from index ``start`` on."""
        if start < 0:
            raise ValueError(f"start must be >= 0, got {start}")
        self.epoch = epoch
        self.start = start

    def order(self, epoch: int) -> list[int]:
        """The full index order of ``epoch`` (identity when not shuffling)."""
        if not self.shuffle:
            return list(range(self.num_examples))
        gen = torch.Generator()
        gen.manual_seed((self.seed * _EPOCH_MIX + epoch) % (2**63))
        return torch.randperm(self.num_examples, generator=gen).tolist()

    def __iter__(self) -> Iterator[int]:
        return iter(self.order(self.epoch)[self.start :])

    def __len__(self) -> int:
        return max(0, self.num_examples - self.start)


def make_loader(
    dataset: Dataset[Any],
    batch_size: int,
    shuffle: bool,
    seed: int,
    collate: Callable[[list[Any]], Any] | None = None,
    *,
    epoch: int = 0,
) -> DataLoader[Any]:
    """Build a single-process DataLoader over ``dataset`` with a :class:`SeededSampler`.

    The order of epoch ``e`` is fixed by ``(seed, e)``; select it with
    ``loader.sampler.set_epoch(e)``. Batches are not dropped, so every example is seen.
    """
    if not isinstance(dataset, Sized):
        raise TypeError("make_loader needs a map-style dataset with __len__")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    sampler = SeededSampler(len(dataset), shuffle=shuffle, seed=seed)
    sampler.set_epoch(epoch)
    # A private generator: DataLoader draws a base seed per iterator from it; with the default
    # (None) it would draw from the global RNG and shift dropout masks between runs.
    generator = torch.Generator()
    generator.manual_seed(seed)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        collate_fn=collate,
        num_workers=0,
        drop_last=False,
        generator=generator,
    )

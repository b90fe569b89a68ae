r"""Text data augmentation for training batches: token dropout, neighbour swap, masking.

Each augmentation acts on the tokenised example (``input_ids`` and the features aligned with
it, such as ``attention_mask`` and ``token_type_ids``) and never touches special tokens
(``[CLS]``, ``[SEP]``, padding, ...). With ``p`` the op's probability and ``w_1 .. w_n`` the
ordinary tokens of one example:

- ``token_dropout``: each ``w_i`` is deleted independently with probability ``p``
  (at least one ordinary token is always kept);
- ``swap``: walking left to right over the ordinary tokens, ``w_i`` trades places with
  ``w_{i+1}`` with probability ``p`` (a swapped pair is not swapped again);
- ``mask``: each ``w_i`` is replaced by the tokenizer's mask token with probability ``p``.

::

    [CLS] the  shares fell  sharply [SEP]       original
    [CLS] the  shares       sharply [SEP]       token_dropout (fell deleted)
    [CLS] shares the  fell  sharply [SEP]       swap (the <-> shares)
    [CLS] the  [MASK] fell  sharply [SEP]       mask

Ops run in the order listed in ``augment.text``. Draws come from the global torch RNG, which
the trainer seeds with ``train.seed`` and saves in its checkpoints, so an augmented run is
reproducible and resumes exactly (as image augmentation in :mod:`deltatune.vision.images`).
Only the training set is augmented; validation and test examples are used as they are.
Image augmentation (random crop, horizontal flip) is ``image.augment``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch.utils.data import Dataset

from deltatune.config import BaseConfig
from deltatune.errors import ConfigError, DeltatuneError, did_you_mean

#: The text augmentations, in the order the docs list them.
TEXT_AUGMENTATIONS = ("token_dropout", "swap", "mask")


@dataclasses.dataclass
class AugmentConfig(BaseConfig):
    """Training-time text augmentation (the ``augment:`` section of a run config).

    Fields:
        text: the ops to apply, in order, any of ``token_dropout``, ``swap``, ``mask``;
            ``[]`` turns augmentation off. Default ``[]``.
        token_dropout: probability that an ordinary token is deleted. Default ``0.1``.
        swap: probability that an ordinary token trades places with the next one.
            Default ``0.1``.
        mask: probability that an ordinary token becomes the mask token. Default ``0.1``.
    """

    text: list[str] = dataclasses.field(default_factory=list)
    token_dropout: float = 0.1
    swap: float = 0.1
    mask: float = 0.1

    def validate(self) -> None:
        for item in self.text:
            if item not in TEXT_AUGMENTATIONS:
                raise ConfigError(
                    f"augment.text: value {item!r} is not one of {', '.join(TEXT_AUGMENTATIONS)}"
                    + did_you_mean(str(item), TEXT_AUGMENTATIONS)
                    + " (e.g. augment.text=[token_dropout,swap])"
                )
        for name in TEXT_AUGMENTATIONS:
            p = getattr(self, name)
            if not 0.0 <= p <= 1.0:
                raise ConfigError(f"augment.{name}: value {p!r} must be a probability in [0, 1]")

    @property
    def enabled(self) -> bool:
        return bool(self.text)


def _ordinary_positions(ids: Sequence[int], special: set[int]) -> list[int]:
    return [i for i, t in enumerate(ids) if t not in special]


def augment_ids(
    ids: Sequence[int],
    cfg: AugmentConfig,
    special_ids: Iterable[int],
    mask_id: int | None = None,
    generator: torch.Generator | None = None,
) -> tuple[list[int], list[int]]:
    """Augment one example's token ids; return ``(new_ids, positions)``.

    ``positions[j]`` is the index in ``ids`` that output token ``j`` came from, so aligned
    features (attention mask, token types) follow with ``[feature[p] for p in positions]``.
    """
    special = set(special_ids)
    out = list(ids)
    positions = list(range(len(ids)))
    for op in cfg.text:
        ordinary = _ordinary_positions(out, special)
        if not ordinary:
            break
        if op == "token_dropout":
            drop = torch.rand(len(ordinary), generator=generator) < cfg.token_dropout
            if bool(drop.all()):
                drop[int(torch.randint(len(ordinary), (1,), generator=generator))] = False
            gone = {ordinary[k] for k in range(len(ordinary)) if bool(drop[k])}
            positions = [p for j, p in enumerate(positions) if j not in gone]
            out = [t for j, t in enumerate(out) if j not in gone]
        elif op == "swap":
            draws = torch.rand(len(ordinary), generator=generator) < cfg.swap
            k = 0
            while k < len(ordinary) - 1:
                if bool(draws[k]):
                    a, b = ordinary[k], ordinary[k + 1]
                    out[a], out[b] = out[b], out[a]
                    positions[a], positions[b] = positions[b], positions[a]
                    k += 2  # a swapped pair is not swapped again
                else:
                    k += 1
        elif op == "mask":
            if mask_id is None:
                raise DeltatuneError(
                    "augment.text: 'mask' needs a tokenizer with a mask token; use "
                    "token_dropout or swap instead"
                )
            hit = torch.rand(len(ordinary), generator=generator) < cfg.mask
            for k, j in enumerate(ordinary):
                if bool(hit[k]):
                    out[j] = mask_id
    return out, positions


class AugmentedTextDataset(Dataset[dict[str, Any]]):
    """A tokenised training set whose items are augmented afresh on every access.

    Wraps a dataset of dicts with ``input_ids`` (lists of ints, as
    :class:`~deltatune.data.TokenizedDataset` gives); every other list of the same length is
    reordered along with ``input_ids``; ``labels`` and other entries pass through.
    """

    def __init__(
        self,
        base: Dataset[dict[str, Any]],
        cfg: AugmentConfig,
        special_ids: Iterable[int],
        mask_id: int | None = None,
    ) -> None:
        if "mask" in cfg.text and mask_id is None:
            raise ConfigError(
                "augment.text: 'mask' needs a tokenizer with a mask token; this one has none "
                "(use token_dropout or swap)"
            )
        self.base = base
        self.cfg = cfg
        self.special_ids = set(special_ids)
        self.mask_id = mask_id

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> dict[str, Any]:
        item = dict(self.base[index])
        ids = item["input_ids"]
        new_ids, positions = augment_ids(ids, self.cfg, self.special_ids, self.mask_id)
        for key, value in item.items():
            if key != "input_ids" and isinstance(value, list) and len(value) == len(ids):
                item[key] = [value[p] for p in positions]
        item["input_ids"] = new_ids
        return item


def augment_text_dataset(
    dataset: Dataset[dict[str, Any]], cfg: AugmentConfig, tokenizer: Any
) -> Dataset[dict[str, Any]]:
    """``dataset`` wrapped for training-time augmentation, or itself when ``cfg`` has no ops."""
    if not cfg.enabled:
        return dataset
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    return AugmentedTextDataset(dataset, cfg, special, getattr(tokenizer, "mask_token_id", None))

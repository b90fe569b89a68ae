"""Text augmentation: token dropout, swap and mask on token ids; training batches only; seeded."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from deltatune.data.augment import (
    AugmentConfig,
    AugmentedTextDataset,
    augment_ids,
    augment_text_dataset,
)
from deltatune.errors import ConfigError, DeltatuneError
from deltatune.run import load_run_config

CLS, SEP, PAD, MASK = 101, 102, 0, 103
SPECIAL = {CLS, SEP, PAD, MASK}


def example(n: int = 10) -> list[int]:
    return [CLS, *range(1000, 1000 + n), SEP]


def test_zero_probability_is_the_identity() -> None:
    cfg = AugmentConfig(text=["token_dropout", "swap", "mask"], token_dropout=0, swap=0, mask=0)
    ids = example()
    out, positions = augment_ids(ids, cfg, SPECIAL, MASK)
    assert out == ids and positions == list(range(len(ids)))


def test_token_dropout_rate_and_special_tokens() -> None:
    torch.manual_seed(0)
    cfg = AugmentConfig(text=["token_dropout"], token_dropout=0.3)
    ids = example(2000)
    out, positions = augment_ids(ids, cfg, SPECIAL, MASK)
    assert out[0] == CLS and out[-1] == SEP
    dropped = 1 - (len(out) - 2) / 2000
    assert abs(dropped - 0.3) < 0.04, dropped
    # Kept tokens stay in order and positions point at them.
    assert positions == sorted(positions)
    assert [ids[p] for p in positions] == out


def test_token_dropout_keeps_one_token() -> None:
    cfg = AugmentConfig(text=["token_dropout"], token_dropout=1.0)
    out, _ = augment_ids(example(5), cfg, SPECIAL, MASK)
    assert len(out) == 3 and out[0] == CLS and out[-1] == SEP and out[1] >= 1000


def test_swap_with_probability_one_swaps_disjoint_neighbour_pairs() -> None:
    cfg = AugmentConfig(text=["swap"], swap=1.0)
    ids = [CLS, 1, 2, 3, 4, 5, SEP, PAD]
    out, positions = augment_ids(ids, cfg, SPECIAL, MASK)
    assert out == [CLS, 2, 1, 4, 3, 5, SEP, PAD]
    assert positions == [0, 2, 1, 4, 3, 5, 6, 7]


def test_swap_keeps_the_multiset_and_the_special_positions() -> None:
    torch.manual_seed(1)
    cfg = AugmentConfig(text=["swap"], swap=0.5)
    ids = example(50)
    out, _ = augment_ids(ids, cfg, SPECIAL, MASK)
    assert Counter(out) == Counter(ids) and out != ids
    assert out[0] == CLS and out[-1] == SEP
    # Each token moves at most one place.
    assert all(abs(out.index(t) - ids.index(t)) <= 1 for t in ids)


def test_mask_replaces_ordinary_tokens_only() -> None:
    cfg = AugmentConfig(text=["mask"], mask=1.0)
    out, _ = augment_ids(example(4), cfg, SPECIAL, MASK)
    assert out == [CLS, MASK, MASK, MASK, MASK, SEP]
    with pytest.raises(DeltatuneError, match="mask token"):
        augment_ids(example(4), cfg, SPECIAL, None)


def test_same_seed_same_augmentation() -> None:
    cfg = AugmentConfig(text=["token_dropout", "swap"], token_dropout=0.2, swap=0.3)
    ids = example(40)
    torch.manual_seed(7)
    a = augment_ids(ids, cfg, SPECIAL, MASK)
    b = augment_ids(ids, cfg, SPECIAL, MASK)
    torch.manual_seed(7)
    assert augment_ids(ids, cfg, SPECIAL, MASK) == a
    assert a != b  # fresh draws on every access


class _Items(torch.utils.data.Dataset):  # type: ignore[type-arg]
    def __init__(self) -> None:
        self.items = [
            {
                "input_ids": [CLS, 5, 6, 7, SEP],
                "attention_mask": [1, 1, 1, 1, 1],
                "token_type_ids": [0, 10, 20, 30, 0],  # distinct values follow their tokens
                "labels": 2,
            }
        ]

    def __len__(self) -> int:
        return 1

    def __getitem__(self, i: int) -> dict:
        return self.items[i]


def test_dataset_keeps_aligned_features_aligned() -> None:
    base = _Items()
    ds = AugmentedTextDataset(base, AugmentConfig(text=["swap"], swap=1.0), SPECIAL, MASK)
    item = ds[0]
    assert item["input_ids"] == [CLS, 6, 5, 7, SEP]
    assert item["token_type_ids"] == [0, 20, 10, 30, 0]
    assert item["labels"] == 2
    assert base.items[0]["input_ids"] == [CLS, 5, 6, 7, SEP]  # the base is not modified
    drop = AugmentedTextDataset(
        base, AugmentConfig(text=["token_dropout"], token_dropout=1.0), SPECIAL, MASK
    )
    item = drop[0]
    assert len(item["input_ids"]) == len(item["attention_mask"]) == len(item["token_type_ids"])
    assert len(item["input_ids"]) == 3


def test_disabled_config_returns_the_dataset_itself() -> None:
    from transformers import BertTokenizer

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "b"]
    tok = BertTokenizer(vocab={t: i for i, t in enumerate(vocab)})
    base = _Items()
    assert augment_text_dataset(base, AugmentConfig(), tok) is base
    wrapped = augment_text_dataset(base, AugmentConfig(text=["mask"]), tok)
    assert isinstance(wrapped, AugmentedTextDataset)
    assert wrapped.mask_id == 4 and {0, 2, 3, 4} <= wrapped.special_ids


def test_bad_config_errors_name_the_field() -> None:
    with pytest.raises(ConfigError, match=r"augment.text.*'swapp'.*did you mean 'swap'"):
        AugmentConfig(text=["swapp"])
    with pytest.raises(ConfigError, match=r"augment.token_dropout: value 1.5"):
        AugmentConfig(token_dropout=1.5)
    with pytest.raises(ConfigError, match=r"image.augment"):
        load_run_config(
            None,
            ["model.name_or_path=embedded-vgg16bn", "data.source=digits", "augment.text=[swap]"],
        )


def test_run_config_reads_the_augment_section() -> None:
    cfg = load_run_config(None, ["augment.text=[token_dropout,swap]", "augment.swap=0.2"])
    assert cfg.augment.text == ["token_dropout", "swap"] and cfg.augment.swap == 0.2

"""Semi-supervised fine-tuning: label budget split, pseudo-label selection, consistency loss."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F

import deltatune as dt
from deltatune.data import PadCollator, TextExamples, TokenizedDataset
from deltatune.data.augment import AugmentConfig
from deltatune.errors import ConfigError
from deltatune.strategies.semisup import (
    ConsistencyCollator,
    ConsistencyDataset,
    ConsistencyTask,
    SemisupOptions,
    select_pseudo_labels,
    split_labelled,
)
from test_strategies_unlabelled import soups, word_tokenizer


def examples(per_class: list[int]) -> TextExamples:
    texts, labels = [], []
    for label, count in enumerate(per_class):
        for i in range(count):
            texts.append(f"text {label} {i}")
            labels.append(label)
    return TextExamples(texts, labels)


def test_split_labelled_takes_the_budget_per_class_and_hides_the_rest() -> None:
    ex = examples([10, 6, 8])
    lab, pool = split_labelled(ex, ["a", "b", "c"], per_class=3, seed=0)
    assert sorted(lab.labels) == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert len(pool) == 24 - 9 and not set(lab.texts) & set(pool.texts)
    again, _ = split_labelled(ex, ["a", "b", "c"], per_class=3, seed=0)
    assert again.texts == lab.texts  # seeded
    _, capped = split_labelled(ex, ["a", "b", "c"], per_class=3, seed=0, max_unlabelled=5)
    assert len(capped) == 5
    with pytest.raises(
        ConfigError, match=r"labels_per_class: value 7 is larger than the 6 .* label 'b'"
    ):
        split_labelled(ex, ["a", "b", "c"], per_class=7, seed=0)
    with pytest.raises(ConfigError, match="leaves no unlabelled"):
        split_labelled(ex, ["a", "b", "c"], per_class=6, seed=0)
    with pytest.raises(ConfigError, match=r"semisup\.labels_per_class"):
        SemisupOptions(labels_per_class=0)


def test_select_pseudo_labels_threshold_balance_and_cap() -> None:
    probs = torch.tensor(
        [
            [0.95, 0.05, 0.00],  # 0: class 0, confident
            [0.10, 0.85, 0.05],  # 1: class 1, confident
            [0.60, 0.30, 0.10],  # 2: class 0, below threshold
            [0.99, 0.01, 0.00],  # 3: class 0, most confident
            [0.05, 0.05, 0.90],  # 4: class 2, confident
            [0.00, 0.92, 0.08],  # 5: class 1, confident
            [0.81, 0.19, 0.00],  # 6: class 0, confident (least)
        ]
    )
    idx, lab = select_pseudo_labels(probs, 0.8, class_balance=False)
    assert idx == [0, 1, 3, 4, 5, 6] and lab == [0, 1, 0, 2, 1, 0]
    # Balanced: class 2 has one confident example, so every class keeps its top 1.
    idx, lab = select_pseudo_labels(probs, 0.8, class_balance=True)
    assert idx == [3, 4, 5] and lab == [0, 2, 1]
    idx, lab = select_pseudo_labels(probs, 0.8, class_balance=False, max_per_class=2)
    assert idx == [0, 1, 3, 4, 5] and lab == [0, 1, 0, 2, 1]
    assert select_pseudo_labels(probs, 0.999) == ([], [])


def test_consistency_loss_matches_the_formula(bert: Any) -> None:
    tok = word_tokenizer()
    bert.train()
    for m in bert.modules():  # deterministic: no dropout, so the formula can be recomputed
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    lab = TokenizedDataset(TextExamples(soups(4), [0, 1, 2, 0]), tok, 16)
    pool = TokenizedDataset(TextExamples(soups(6, seed=5), [0] * 6), tok, 16)
    ds = ConsistencyDataset(lab, pool, AugmentConfig(text=["swap"], swap=0.5), tok)
    torch.manual_seed(0)
    batch = ConsistencyCollator(tok)([ds[i] for i in range(6)])
    assert batch["weak"]["input_ids"].shape[0] == 6 and batch["labelled"]["labels"].tolist() == [
        0,
        1,
        2,
        0,
        0,
        1,
    ]

    def logits(part: dict[str, torch.Tensor]) -> torch.Tensor:
        return bert(**{k: v for k, v in part.items() if k != "labels"}).logits.detach()

    # A threshold between the confidences, so that some examples pass and some do not.
    threshold, weight = float(logits(batch["weak"]).softmax(-1).max(-1).values.median()), 0.7
    task = ConsistencyTask(threshold, weight)
    loss = task.loss(bert, batch)

    sup = F.cross_entropy(logits(batch["labelled"]), batch["labelled"]["labels"])
    q = logits(batch["weak"]).softmax(-1)
    strong = logits(batch["strong"]).log_softmax(-1)
    terms = [
        -float(strong[i, int(q[i].argmax())]) if float(q[i].max()) >= threshold else 0.0
        for i in range(6)
    ]
    manual = float(sup) + weight * sum(terms) / 6
    assert abs(float(loss.detach()) - manual) < 1e-5
    assert 0.0 < task.last["mask_rate"] < 1.0


def test_consistency_gradient_flows_into_the_adapter_only(bert: Any) -> None:
    tok = word_tokenizer()
    dt.inject(
        bert, dt.LoraConfig(r=4, target_modules=["query", "value"], modules_to_save=["classifier"])
    )
    bert.train()
    lab = TokenizedDataset(TextExamples(soups(3), [0, 1, 2]), tok, 16)
    pool = TokenizedDataset(TextExamples(soups(4, seed=2), [0] * 4), tok, 16)
    ds = ConsistencyDataset(lab, pool, AugmentConfig(text=["token_dropout"]), tok)
    batch = ConsistencyCollator(tok)([ds[i] for i in range(4)])
    ConsistencyTask(0.0, 1.0).loss(bert, batch).backward()
    with_grad = {n for n, p in bert.named_parameters() if p.grad is not None}
    assert with_grad and all("lora_" in n or "modules_to_save" in n for n in with_grad)
    assert isinstance(PadCollator(tok), PadCollator)

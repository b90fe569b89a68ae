"""Forgetting: the figure, L2-SP and EWC against their formulas written out, the empirical
Fisher against per-example gradients computed by hand, replay proportions, parameter
isolation, config errors, and a class-incremental run where replay and isolation limit what
plain fine-tuning forgets."""

from __future__ import annotations

import csv
import json
import random
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
import yaml
from torch import nn
from torch.utils.data import Dataset

import deltatune as dt
from conftest import make_bert
from deltatune.cli import main
from deltatune.errors import ConfigError, DeltatuneError
from deltatune.train import ClassificationTask, evaluate_dataset
from deltatune.train.forgetting import (
    EWC,
    L2SP,
    ContinualConfig,
    PenalizedTask,
    estimate_fisher,
    forgetting,
    measure_isolated,
    replay_count,
    replay_dataset,
)


class Blobs(Dataset[dict[str, Any]]):
    def __init__(self, n: int, seed: int) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.y = torch.arange(n) % 3
        self.x = torch.randn(n, 5, generator=gen)

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"x": self.x[i], "labels": self.y[i]}


class Linear(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.body = nn.Linear(5, 5)
        self.head = nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.body(x)))


def test_the_forgetting_figure() -> None:
    fig = forgetting({"loss": 0.5, "accuracy": 0.9, "f1": 1}, {"loss": 0.8, "accuracy": 0.6})
    assert fig == pytest.approx(
        {
            "loss_before": 0.5,
            "loss_after": 0.8,
            "loss_increase": 0.3,
            "accuracy_before": 0.9,
            "accuracy_after": 0.6,
            "accuracy_drop": 0.3,
        }
    )
    # A decoder's reference: LM loss only.
    assert forgetting({"loss": 2.0}, {"loss": 2.5}) == {
        "loss_before": 2.0,
        "loss_after": 2.5,
        "loss_increase": 0.5,
    }
    with pytest.raises(DeltatuneError, match="neither"):
        forgetting({"f1": 1.0}, {"f1": 0.5})


def test_l2sp_is_the_formula_and_its_gradient() -> None:
    model = Linear()
    w0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    penalty = L2SP(model, alpha=0.3, exclude=["head"])
    assert set(penalty.params) == {"body.weight", "body.bias"}
    assert float(penalty().detach()) == 0.0
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))
    value = penalty()
    expected = (
        0.3
        / 2
        * sum(((p - w0[n]) ** 2).sum() for n, p in model.named_parameters() if n.startswith("body"))
    )
    assert float(value) == pytest.approx(float(expected), rel=1e-6)
    value.backward()
    # d/dw alpha/2 (w - w0)^2 = alpha (w - w0); the excluded head gets nothing.
    grad = model.body.weight.grad
    assert grad is not None
    assert torch.allclose(grad, 0.3 * (model.body.weight - w0["body.weight"]), atol=1e-6)
    assert model.head.weight.grad is None
    with pytest.raises(ConfigError, match="no trainable"):
        L2SP(model, 0.1, exclude=["body", "head"])


def test_empirical_fisher_and_ewc_match_the_formulas() -> None:
    model = Linear()
    model.body.requires_grad_(False)  # Fisher of the head: logistic regression on tanh features
    data = Blobs(7, 0)
    task = ClassificationTask(3)
    fisher = estimate_fisher(model, task, (data[i] for i in range(len(data))))
    # By hand: for softmax regression, d(-log p_y)/dW = (p - onehot(y)) h^T, d/db = p - onehot(y).
    w2, b2 = torch.zeros(3, 5), torch.zeros(3)
    for i in range(len(data)):
        h = torch.tanh(model.body(data.x[i]))
        p = F.softmax(model.head(h), dim=-1).detach()
        e = p - F.one_hot(data.y[i], 3).float()
        w2 += torch.outer(e, h.detach()) ** 2
        b2 += e**2
    assert set(fisher) == {"head.weight", "head.bias"}
    assert torch.allclose(fisher["head.weight"], w2 / 7, atol=1e-6)
    assert torch.allclose(fisher["head.bias"], b2 / 7, atol=1e-6)

    ewc = EWC(model, fisher, lam=50.0)
    w0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        model.head.weight.add_(0.1 * torch.randn(3, 5))
        model.head.bias.add_(0.2)
    expected = (
        50.0
        / 2
        * sum(
            (fisher[n] * (p - w0[n]) ** 2).sum() for n, p in model.named_parameters() if n in fisher
        )
    )
    assert float(ewc()) == pytest.approx(float(expected), rel=1e-6)
    # The penalised task adds it to the data loss; evaluation is the plain task's.
    batch = {"x": data.x[:4], "labels": data.y[:4]}
    combined = PenalizedTask(task, [ewc])
    assert float(combined.loss(model, batch)) == pytest.approx(
        float(task.loss(model, batch) + ewc()), rel=1e-6
    )
    assert combined.metric_names == task.metric_names


def test_replay_mixes_the_asked_fraction() -> None:
    assert replay_count(300, 0.25) == 100  # 100 of 400 = 25%
    train, ref = Blobs(300, 0), Blobs(40, 1)
    mixed = replay_dataset(train, ref, 0.25, seed=0)
    assert len(mixed) == 400  # type: ignore[arg-type]
    # The reference set (40) is repeated to give 100 examples, each 2 or 3 times.
    tail = [mixed[i]["x"] for i in range(300, 400)]
    hits = [sum(torch.equal(t, ref.x[j]) for t in tail) for j in range(40)]
    assert sorted(set(hits)) == [2, 3] and sum(hits) == 100
    assert replay_dataset(train, ref, 0.0) is train
    with pytest.raises(ConfigError, match="replay"):
        replay_count(10, 1.0)


def test_parameter_isolation_gives_back_the_base_exactly() -> None:
    model = make_bert()
    data = [{"input_ids": torch.randint(0, 100, (6,)), "labels": i % 3} for i in range(6)]

    def collate(items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        return {
            "input_ids": torch.stack([x["input_ids"] for x in items]),
            "labels": torch.tensor([x["labels"] for x in items]),
        }

    task = ClassificationTask(3)
    before = evaluate_dataset(model, task, data, collate_fn=collate)  # type: ignore[arg-type]
    dt.inject(model, dt.LoraConfig(r=2, target_modules=["query"], init_lora_weights=False))
    changed = evaluate_dataset(model, task, data, collate_fn=collate)  # type: ignore[arg-type]
    assert changed["loss"] != before["loss"]
    isolated = measure_isolated(model, task, data, collate_fn=collate)  # type: ignore[arg-type]
    assert isolated is not None and isolated["loss"] == pytest.approx(before["loss"], abs=1e-6)
    full = make_bert()
    dt.inject(full, dt.FullConfig())
    assert measure_isolated(full, task, data, collate_fn=collate) is None  # type: ignore[arg-type]


def test_continual_config_errors() -> None:
    with pytest.raises(ConfigError, match=r"continual\.reference_labels"):
        ContinualConfig(penalty="ewc", strength=1.0)
    with pytest.raises(ConfigError, match=r"continual\.strength"):
        ContinualConfig(penalty="l2sp")
    with pytest.raises(ConfigError, match=r"continual\.replay_fraction"):
        ContinualConfig(replay_fraction=1.5, reference_labels=["a"])
    with pytest.raises(ConfigError, match=r"continual\.reference_labels"):
        ContinualConfig(replay_fraction=0.2)
    assert not ContinualConfig().active


# --------------------------------------------------------------------------- a real run

WORDS = ["alpha", "bravo", "charlie", "delta"]
FILLER = [f"w{i}" for i in range(30)]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizer

    folder = tmp_path_factory.mktemp("tiny-bert")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS, *FILLER]
    BertTokenizer(vocab={t: i for i, t in enumerate(vocab)}).save_pretrained(folder)
    cfg = BertConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=32,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    torch.manual_seed(0)
    BertForSequenceClassification(cfg).save_pretrained(folder)
    rng = random.Random(0)
    data = tmp_path_factory.mktemp("data") / "kw.csv"
    with data.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["text", "label"])
        for i in range(240):
            words = [rng.choice(FILLER) for _ in range(2)]
            for _ in range(6):  # a strong signal: a random-init tiny BERT learns it in seconds
                words.insert(rng.randrange(len(words) + 1), WORDS[i % 4])
            writer.writerow([" ".join(words), WORDS[i % 4]])
    return folder, data


def run(tmp: Path, tiny: tuple[Path, Path], name: str, **extra: Any) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "model": {"name_or_path": str(tiny[0])},
        "data": {"source": str(tiny[1]), "max_length": 16},
        "method": {"name": "lora", "r": 4, "target_modules": "all-linear"},
        "train": {
            "epochs": 6,
            "batch_size": 16,
            "learning_rate": 1e-2,
            "head_lr_multiplier": 10.0,
            "progress": False,
            "device": "cpu",
            "eval_every_steps": None,
        },
        "output_dir": str(tmp / name),
    }
    for key, value in extra.items():
        merge = isinstance(value, dict) and key != "method"  # a method section replaces
        cfg[key] = {**cfg.get(key, {}), **value} if merge else value
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["train", str(path)]) == 0
    return json.loads((tmp / name / "metrics.json").read_text())


def test_class_incremental_run_measures_and_limits_forgetting(
    tiny: tuple[Path, Path], tmp_path: Path
) -> None:
    old, new = ["alpha", "bravo"], ["charlie", "delta"]
    first = run(tmp_path, tiny, "a", continual={"train_labels": old})
    assert first["test"]["accuracy"] > 0.9  # task A learnt (its test split has A's labels only)
    from deltatune.run import evaluate_run

    # `deltatune eval` of a train_labels run evaluates the same (filtered) test split.
    assert evaluate_run(tmp_path / "a", [])["loss"] == pytest.approx(
        first["test"]["loss"], abs=1e-6
    )
    # Task B: an IA3 adapter on top of task A's (merged) model; its copy of the shared head
    # learns the new labels.
    step: dict[str, Any] = {
        "init_from": str(tmp_path / "a"),
        "method": {"name": "ia3"},
        "continual": {"train_labels": new, "reference_labels": old},
    }
    plain = run(tmp_path, tiny, "plain", **step)
    fig = plain["forgetting"]
    # "Before" is the model task A ended with, on A's test examples.
    assert fig["accuracy_before"] == pytest.approx(first["test"]["accuracy"])
    assert fig["loss_before"] == pytest.approx(first["test"]["loss"])
    assert plain["test"]["accuracy"] > 0.9  # the new task is learnt...
    assert fig["accuracy_drop"] > 0.5  # ...and the shared head forgets the old one
    # Parameter isolation: the base (task A's model) never changed; with the adapter switched
    # off, task A is exactly as before.
    isolated = plain["forgetting_isolated"]
    assert isolated["accuracy_drop"] == pytest.approx(0.0, abs=1e-9)
    assert isolated["loss_increase"] == pytest.approx(0.0, abs=1e-5)
    replay = run(
        tmp_path,
        tiny,
        "replay",
        **{**step, "continual": {**step["continual"], "replay_fraction": 0.5}},
    )
    assert replay["test"]["accuracy"] > 0.9
    assert replay["forgetting"]["accuracy_drop"] < fig["accuracy_drop"] - 0.4

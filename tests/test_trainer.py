"""The training loop: config checks, optimizer groups, schedules, the classification task,
accumulation, early stopping with best-weight restore, the log, the plot, and checkpoints that
resume to bit-identical weights (with dropout on)."""

from __future__ import annotations

import json
import math
import os
import random
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from torch.utils.data import Dataset

import deltatune.train.trainer as trainer_mod
from deltatune.data import PadCollator, TextExamples, TokenizedDataset, make_loader
from deltatune.errors import CheckpointError, ConfigError, DeltatuneError
from deltatune.plot import plot_history, smooth
from deltatune.train import (
    ClassificationTask,
    TrainerConfig,
    build_scheduler,
    evaluate_dataset,
    fit,
    layer_index,
    lr_multiplier,
    param_groups,
    read_log,
    resolve_precision,
    warmup_steps_for,
)

WORDS = [
    "the",
    "cat",
    "sat",
    "on",
    "mat",
    "dog",
    "ran",
    "fast",
    "slow",
    "red",
    "blue",
    "green",
    "big",
    "small",
]


# --------------------------------------------------------------------------- fixtures


class VectorDataset(Dataset[dict[str, Any]]):
    """Gaussian blobs: class k is centred on 2 * e_k, so a linear model separates them."""

    def __init__(self, n: int, seed: int, num_classes: int = 3, dim: int = 8) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.labels = torch.arange(n) % num_classes
        self.x = torch.randn(n, dim, generator=gen) * 0.7
        self.x[torch.arange(n), self.labels] += 2.0

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"x": self.x[i], "labels": self.labels[i]}


class MLP(nn.Module):
    """x -> hidden -> logits; returns a plain tensor. ``frozen`` never trains."""

    def __init__(self, dim: int = 8, num_classes: int = 3, dropout: float = 0.0) -> None:
        super().__init__()
        self.frozen = nn.Linear(dim, dim)
        self.frozen.requires_grad_(False)
        self.hidden = nn.Linear(dim, 16)
        self.norm = nn.LayerNorm(16)
        self.drop = nn.Dropout(dropout)
        self.head = nn.Linear(16, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x + 0.1 * self.frozen(x)
        return self.head(self.drop(torch.relu(self.norm(self.hidden(h)))))


def make_mlp(dropout: float = 0.0) -> MLP:
    torch.manual_seed(0)
    return MLP(dropout=dropout)


def make_tiny_bert(dropout: float = 0.1) -> nn.Module:
    from transformers import BertConfig, BertForSequenceClassification

    cfg = BertConfig(
        vocab_size=100,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
        num_labels=3,
        hidden_dropout_prob=dropout,
        attention_probs_dropout_prob=dropout,
    )
    torch.manual_seed(0)
    return BertForSequenceClassification(cfg)


def text_data(n: int = 60, seed: int = 0) -> tuple[TokenizedDataset, TokenizedDataset, PadCollator]:
    """Random word soups whose label word is repeated; word-level BERT tokenizer."""
    from transformers import BertTokenizer

    vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS])}
    tok = BertTokenizer(vocab=vocab)
    rng = random.Random(seed)
    texts, labels = [], []
    for i in range(n):
        label = i % 3
        words = [rng.choice(WORDS) for _ in range(rng.randint(3, 12))] + [WORDS[label]] * 2
        rng.shuffle(words)
        texts.append(" ".join(words))
        labels.append(label)
    train = TokenizedDataset(TextExamples(texts, labels), tok, max_length=16)
    val = TokenizedDataset(TextExamples(texts[:24], labels[:24]), tok, max_length=16)
    return train, val, PadCollator(tok)


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def assert_all_equal(a: nn.Module, b: nn.Module) -> None:
    sa, sb = trainable_state(a), trainable_state(b)
    assert sa.keys() == sb.keys() and sa
    unequal = [n for n in sa if not torch.equal(sa[n], sb[n])]
    assert not unequal, f"differ: {unequal}"


def quick(**changes: Any) -> TrainerConfig:
    base: dict[str, Any] = {
        "epochs": 2,
        "batch_size": 8,
        "learning_rate": 1e-2,
        "progress": False,
        "device": "cpu",
    }
    return TrainerConfig(**{**base, **changes})


def without_time(rows: list[dict[str, float]]) -> list[dict[str, float]]:
    return [{k: v for k, v in r.items() if k != "elapsed_s"} for r in rows]


class Interrupt(Exception):
    pass


def interrupt_at(step: int) -> Any:
    def callback(row: dict[str, float]) -> None:
        if row["step"] == step:
            raise Interrupt

    return callback


# --------------------------------------------------------------------------- config


def test_trainer_config_defaults() -> None:
    cfg = TrainerConfig()
    assert (cfg.epochs, cfg.batch_size, cfg.eval_batch_size, cfg.learning_rate) == (3, 16, 64, None)
    assert (cfg.scheduler, cfg.precision, cfg.device, cfg.max_grad_norm) == (
        "linear",
        "fp32",
        "auto",
        1.0,
    )


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"epochs": 0}, "train.epochs"),
        ({"batch_size": 0}, "train.batch_size"),
        ({"grad_accum_steps": 0}, "train.grad_accum_steps"),
        ({"learning_rate": -1e-3}, "train.learning_rate"),
        ({"learning_rate": float("nan")}, "train.learning_rate"),
        ({"warmup_ratio": 1.0}, "train.warmup_ratio"),
        ({"weight_decay": -0.1}, "train.weight_decay"),
        ({"max_grad_norm": 0}, "train.max_grad_norm"),
        ({"layerwise_lr_decay": 1.5}, "train.layerwise_lr_decay"),
        ({"eval_every_steps": 0}, "train.eval_every_steps"),
        ({"early_stopping_patience": 0}, "train.early_stopping_patience"),
        ({"early_stopping_min_delta": -1}, "train.early_stopping_min_delta"),
        ({"max_steps": 0}, "train.max_steps"),
    ],
)
def test_trainer_config_validate_names_the_field(changes: dict[str, Any], field: str) -> None:
    with pytest.raises(ConfigError) as info:
        TrainerConfig.from_dict(changes)
    assert str(info.value).startswith(field)


def test_trainer_config_literal_suggests() -> None:
    with pytest.raises(ConfigError, match="did you mean 'cosine'"):
        TrainerConfig.from_dict({"scheduler": "cosin"})


def test_fit_refuses_bad_setups(tmp_path: Path) -> None:
    model, ds, task = make_mlp(), VectorDataset(12, 0), ClassificationTask(3)
    with pytest.raises(ConfigError, match=r"train.learning_rate: is null"):
        fit(model, task, ds, ds, quick(learning_rate=None))
    with pytest.raises(ConfigError, match=r"train.precision: 'fp16' needs a CUDA device"):
        fit(model, task, ds, ds, quick(precision="fp16"))
    with pytest.raises(ConfigError, match="early stopping needs a validation set"):
        fit(model, task, ds, None, quick(early_stopping_patience=2))
    with pytest.raises(ConfigError, match="checkpoint_every_steps needs an output directory"):
        fit(model, task, ds, ds, quick(checkpoint_every_steps=2))
    with pytest.raises(ConfigError, match=r"train.device"):
        fit(model, task, ds, ds, quick(device="tpu9"))
    with pytest.raises(DeltatuneError, match="training set is empty"):
        fit(model, task, VectorDataset(0, 0), ds, quick())
    with pytest.raises(
        ConfigError, match=r"metric_for_best: value 'acuracy' .* did you mean 'accuracy'"
    ):
        fit(model, task, ds, ds, quick(metric_for_best="acuracy"))
    with pytest.raises(
        DeltatuneError, match=r"cannot resume: no checkpoint in .*trainer_state.json is missing"
    ):
        fit(model, task, ds, ds, quick(), output_dir=tmp_path, resume=True)


def test_resolve_precision_on_cpu() -> None:
    cpu = torch.device("cpu")
    assert resolve_precision("auto", cpu) == "fp32"
    assert resolve_precision("bf16", cpu) == "bf16"
    with pytest.raises(ConfigError, match="fp16"):
        resolve_precision("fp16", cpu)


# --------------------------------------------------------------------------- optimizer groups


def test_layer_index_parsing() -> None:
    assert layer_index("bert.encoder.layer.3.attention.self.query.weight") == 3
    assert layer_index("model.layers.11.mlp.up_proj.weight") == 11
    assert layer_index("transformer.h.0.attn.c_attn.lora_A.default.weight") == 0
    assert layer_index("blocks.7.norm1.weight") == 7
    assert layer_index("classifier.weight") is None
    assert layer_index("highway.weight") is None  # "h" must be a whole path component


class RMSNormLike(nn.Module):
    """A custom norm (not an nn.LayerNorm) with a 2-D gain: caught by its name."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(1, 4))


class Stack(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embeddings = nn.Embedding(10, 4)
        self.layers = nn.ModuleList(nn.Linear(4, 4) for _ in range(3))
        self.final_norm = RMSNormLike()
        self.bn = nn.BatchNorm1d(4)
        self.head = nn.Linear(4, 2)
        self.layers[0].requires_grad_(False)


def test_param_groups_decay_and_trainability() -> None:
    model = Stack()
    names = {id(p): n for n, p in model.named_parameters()}
    groups = param_groups(model, 1e-3, 0.1)
    by_decay = {g["weight_decay"]: sorted(names[id(p)] for p in g["params"]) for g in groups}
    assert by_decay[0.1] == [
        "embeddings.weight",
        "head.weight",
        "layers.1.weight",
        "layers.2.weight",
    ]
    assert by_decay[0.0] == [
        "bn.bias",
        "bn.weight",
        "final_norm.scale",
        "head.bias",
        "layers.1.bias",
        "layers.2.bias",
    ]
    assert all(g["lr"] == 1e-3 for g in groups)
    assert not any(names[id(p)].startswith("layers.0") for g in groups for p in g["params"])


def test_layerwise_lr_decay() -> None:
    model = Stack()
    groups = param_groups(model, 1.0, 0.0, layerwise_lr_decay=0.5)
    lrs = {g["group_name"]: g["lr"] for g in groups}
    # 3 layers: layer i gets 0.5 ** (3 - i); embeddings 0.5 ** 4; head and norms 1.
    assert lrs == {
        "embeddings/decay": 0.0625,
        "layer_1/decay": 0.25,
        "layer_1/no_decay": 0.25,
        "layer_2/decay": 0.5,
        "layer_2/no_decay": 0.5,
        "head/no_decay": 1.0,
        "head/decay": 1.0,
    }


def test_param_groups_refuse_frozen_model() -> None:
    model = nn.Linear(2, 2).requires_grad_(False)
    with pytest.raises(DeltatuneError, match="no trainable parameters"):
        param_groups(model, 1e-3, 0.0)


# --------------------------------------------------------------------------- schedules


def test_schedules() -> None:
    total, warm = 20, warmup_steps_for(20, 0.1)
    assert warm == 2
    for name in ("linear", "cosine", "constant"):
        f = lr_multiplier(name, total, warm)
        assert [f(0), f(1)] == pytest.approx([1 / 3, 2 / 3])  # warmup never starts at 0
        assert f(2) == 1.0
        assert 0 < f(total - 1) <= 1
    linear, cosine = lr_multiplier("linear", total, warm), lr_multiplier("cosine", total, warm)
    assert linear(11) == pytest.approx(0.5) and cosine(11) == pytest.approx(0.5)
    assert linear(total - 1) == pytest.approx(1 / 18) and cosine(total - 1) < linear(total - 1)
    assert all(linear(s) > linear(s + 1) for s in range(2, total - 1))
    assert lr_multiplier("constant", total, warm)(total - 1) == 1.0
    with pytest.raises(ConfigError, match=r"train.scheduler"):
        lr_multiplier("step", total, warm)


def test_scheduler_drives_the_optimizer() -> None:
    opt = torch.optim.AdamW(nn.Linear(2, 2).parameters(), lr=0.1)
    sched = build_scheduler(opt, "linear", total_steps=4, warmup_steps=1)
    seen = []
    for _ in range(4):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert seen == pytest.approx([0.05, 0.1, 0.1 * 2 / 3, 0.1 / 3])


# --------------------------------------------------------------------------- task


class FixedLogits(nn.Module):
    def __init__(self, logits: torch.Tensor, wrap: bool) -> None:
        super().__init__()
        self.logits = logits
        self.wrap = wrap
        self.dummy = nn.Parameter(torch.zeros(()))

    def forward(self, idx: torch.Tensor) -> Any:
        out = self.logits[idx] + self.dummy
        return type("Out", (), {"logits": out})() if self.wrap else out


@pytest.mark.parametrize("wrap", [False, True])
def test_classification_task_metrics(wrap: bool) -> None:
    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 2.0, 0.0], [0.0, 2.0, 0.0], [0.0, 0.0, 2.0]])
    labels = torch.tensor([0, 1, 2, 2])
    model = FixedLogits(logits, wrap)
    batches = [
        {"idx": torch.tensor([0, 1]), "labels": labels[:2]},
        {"idx": torch.tensor([2, 3]), "labels": labels[2:]},
    ]
    metrics = ClassificationTask(num_labels=3).evaluate(model, batches)
    assert metrics["accuracy"] == 0.75
    # per-class F1: class0 1, class1 2/3 (P 1/2, R 1), class2 2/3 (P 1, R 1/2)
    assert metrics["macro_f1"] == pytest.approx((1 + 2 / 3 + 2 / 3) / 3)
    expected = torch.nn.functional.cross_entropy(logits, labels).item()
    assert metrics["loss"] == pytest.approx(expected)
    loss = ClassificationTask().loss(model, batches[0])
    assert loss.item() == pytest.approx(
        torch.nn.functional.cross_entropy(logits[:2], labels[:2]).item()
    )
    with pytest.raises(DeltatuneError, match="no 'labels'"):
        ClassificationTask().loss(model, {"idx": torch.tensor([0])})


# --------------------------------------------------------------------------- training


def test_fit_learns_logs_and_keeps_frozen_params(tmp_path: Path) -> None:
    model = make_mlp()
    frozen_before = model.frozen.weight.clone()
    train, val = VectorDataset(90, 0), VectorDataset(30, 1)
    task = ClassificationTask(3)
    before = evaluate_dataset(model, task, val)
    result = fit(model, task, train, val, quick(epochs=4, learning_rate=3e-2), output_dir=tmp_path)
    # 90 examples / 8 = 12 batches per epoch, 4 epochs
    assert result.steps == 48 and result.epochs == 4.0 and not result.stopped_early
    assert result.last_metrics["accuracy"] >= 0.9 > before["accuracy"]
    assert result.best_metric is not None and result.best_step in (12, 24, 36, 48)
    assert not result.restored_best
    assert torch.equal(model.frozen.weight, frozen_before) and not model.frozen.weight.requires_grad
    assert all(p.requires_grad for n, p in model.named_parameters() if not n.startswith("frozen"))
    rows = read_log(tmp_path / "log.jsonl")
    assert without_time(rows) == without_time(result.history)
    assert [r["step"] for r in rows] == list(range(1, 49))
    evals = [r["step"] for r in rows if "val_accuracy" in r]
    assert evals == [12, 24, 36, 48]  # once per epoch
    assert {"loss", "lr", "epoch", "grad_norm"} <= set(rows[0])
    assert {"val_loss", "val_accuracy", "val_macro_f1"} <= set(rows[11])
    assert rows[-1]["loss"] < rows[0]["loss"]
    assert rows[11]["epoch"] == 1.0 and rows[5]["epoch"] == 0.5
    assert not (tmp_path / "checkpoint").exists()  # none asked for


def test_eval_every_steps_and_max_steps() -> None:
    result = fit(
        make_mlp(),
        ClassificationTask(3),
        VectorDataset(40, 0),
        VectorDataset(10, 1),
        quick(eval_every_steps=4, max_steps=10),
    )
    assert result.steps == 10
    assert [r["step"] for r in result.history if "val_loss" in r] == [4, 8, 10]  # plus the last


def test_gradient_accumulation_matches_a_bigger_batch() -> None:
    # 20 examples: batches of 8 -> 8, 8, 4; micro-batches of 4 with accumulation 2 -> the same
    # examples per optimizer step (the order depends only on seed and epoch), the last window
    # holding a single micro-batch.
    train = VectorDataset(20, 0)
    big, small = make_mlp(), make_mlp()
    r1 = fit(big, ClassificationTask(3), train, None, quick(batch_size=8, scheduler="cosine"))
    r2 = fit(
        small,
        ClassificationTask(3),
        train,
        None,
        quick(batch_size=4, grad_accum_steps=2, scheduler="cosine"),
    )
    assert r1.steps == r2.steps == 6
    for (n, a), (_, b) in zip(big.named_parameters(), small.named_parameters()):
        assert torch.allclose(a, b, atol=1e-5), n
    assert [r["loss"] for r in r1.history] == pytest.approx(
        [r["loss"] for r in r2.history], abs=1e-5
    )


def test_early_stopping_restores_the_best_weights() -> None:
    # min_delta so large that nothing after the first evaluation counts as better: best is
    # step 2, evaluations at 4 and 6 exhaust a patience of 2, and the step-2 weights return.
    train, val = VectorDataset(48, 0), VectorDataset(12, 1)
    cfg = quick(epochs=5, scheduler="constant", warmup_ratio=0.0, eval_every_steps=2)
    stopped = make_mlp()
    result = fit(
        stopped,
        ClassificationTask(3),
        train,
        val,
        cfg.replace(early_stopping_patience=2, early_stopping_min_delta=10.0),
    )
    assert result.stopped_early and result.restored_best
    assert (result.steps, result.best_step) == (6, 2)
    reference = make_mlp()
    fit(reference, ClassificationTask(3), train, val, cfg.replace(max_steps=2))
    assert_all_equal(stopped, reference)
    # Without early stopping the final weights stay, though the best is still reported.
    final = make_mlp()
    plain = fit(
        final,
        ClassificationTask(3),
        train,
        val,
        cfg.replace(max_steps=6, metric_for_best="val_loss", greater_is_better=False),
    )
    assert not plain.restored_best and plain.best_step is not None
    assert plain.best_metric == min(r["val_loss"] for r in plain.history if "val_loss" in r)
    with pytest.raises(AssertionError):
        assert_all_equal(final, reference)


class BatchNormMLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.hidden = nn.Linear(8, 16)
        self.norm = nn.BatchNorm1d(16)
        self.head = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.norm(self.hidden(x))))


def test_early_stopping_restores_batchnorm_statistics_with_the_weights() -> None:
    # The best weights were evaluated with the running statistics of their own step; restoring
    # the weights with later statistics would give a model nobody evaluated.
    train, val = VectorDataset(48, 0), VectorDataset(12, 1)
    cfg = quick(epochs=5, scheduler="constant", warmup_ratio=0.0, eval_every_steps=2)
    torch.manual_seed(0)
    stopped = BatchNormMLP()
    result = fit(
        stopped,
        ClassificationTask(3),
        train,
        val,
        cfg.replace(early_stopping_patience=2, early_stopping_min_delta=10.0),
    )
    assert result.stopped_early and (result.steps, result.best_step) == (6, 2)
    torch.manual_seed(0)
    reference = BatchNormMLP()
    fit(reference, ClassificationTask(3), train, val, cfg.replace(max_steps=2))
    for (name, a), (_, b) in zip(
        stopped.state_dict().items(), reference.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), name
    assert int(stopped.norm.num_batches_tracked) == 2


def test_bf16_autocast_on_cpu() -> None:
    result = fit(
        make_mlp(),
        ClassificationTask(3),
        VectorDataset(32, 0),
        VectorDataset(8, 1),
        quick(precision="bf16", max_steps=4),
    )
    assert result.steps == 4 and all(math.isfinite(r["loss"]) for r in result.history)


def test_non_finite_loss_stops_with_a_clear_error() -> None:
    class Broken(MLP):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return super().forward(x) * float("nan")

    torch.manual_seed(0)
    with pytest.raises(DeltatuneError, match="training loss became nan at step 1"):
        fit(Broken(), ClassificationTask(3), VectorDataset(16, 0), None, quick())


# --------------------------------------------------------------------------- checkpoints


RESUME_CFG: dict[str, Any] = {
    "epochs": 3,
    "batch_size": 8,  # 60 examples -> 8 micro-batches per epoch (the last one 4 examples)
    "grad_accum_steps": 3,  # -> 3 optimizer steps per epoch, windows of 3, 3, 2: 9 steps in all
    "learning_rate": 2e-3,
    "scheduler": "cosine",
    "warmup_ratio": 0.2,
    "layerwise_lr_decay": 0.8,
    "eval_every_steps": 2,
    "early_stopping_patience": 50,
    "checkpoint_every_steps": 2,
    "progress": False,
    "device": "cpu",
}


def test_tiny_bert_trains_with_dropout_on() -> None:
    model = make_tiny_bert(dropout=0.1)
    train, _, collate = text_data()
    batch = collate([train[i] for i in range(4)])
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    model.train()
    assert not torch.equal(model(**inputs).logits, model(**inputs).logits)  # dropout is live


@pytest.mark.parametrize(
    ("stop_at", "checkpoint_step"),
    [(5, 4), (6, 6), (7, 6)],
    ids=["crash-mid-epoch", "crash-at-epoch-end", "crash-after-epoch-end"],
)
def test_resume_gives_bit_identical_weights(
    tmp_path: Path, stop_at: int, checkpoint_step: int
) -> None:
    train, val, collate = text_data()
    cfg = TrainerConfig(**RESUME_CFG)
    task = ClassificationTask(3)

    straight = make_tiny_bert(dropout=0.1)
    full = fit(straight, task, train, val, cfg, tmp_path / "straight", collate)
    assert full.steps == 9 and full.restored_best

    broken = make_tiny_bert(dropout=0.1)
    with pytest.raises(Interrupt):
        fit(
            broken,
            task,
            train,
            val,
            cfg,
            tmp_path / "run",
            collate,
            callbacks=[interrupt_at(stop_at)],
        )
    state = json.loads((tmp_path / "run/checkpoint/trainer_state.json").read_text())
    assert state["progress"]["step"] == checkpoint_step  # the last one before the crash
    assert len(read_log(tmp_path / "run/log.jsonl")) == stop_at  # rows past the checkpoint

    resumed = make_tiny_bert(dropout=0.1)
    again = fit(resumed, task, train, val, cfg, tmp_path / "run", collate, resume=True)
    assert again.steps == 9 and again.best_step == full.best_step
    assert_all_equal(straight, resumed)  # the restored best weights
    # The final checkpoints hold the final (pre-restore) weights, the optimizer moments, the
    # best-weight copy and the RNG states: all bit-identical too.
    for kind in ("model", "trainer"):
        a = load_file(str(tmp_path / f"straight/checkpoint/{kind}-00000009.safetensors"))
        b = load_file(str(tmp_path / f"run/checkpoint/{kind}-00000009.safetensors"))
        assert a.keys() == b.keys()
        assert [k for k in a if not torch.equal(a[k], b[k])] == []
    final = load_file(str(tmp_path / "run/checkpoint/model-00000009.safetensors"))
    initial = dict(make_tiny_bert(dropout=0.1).named_parameters())
    assert final.keys() == initial.keys()
    assert all(not torch.equal(t, initial[n]) for n, t in final.items())  # every tensor trained
    assert without_time(again.history) == without_time(full.history)
    logged = read_log(tmp_path / "run/log.jsonl")
    assert [r["step"] for r in logged] == list(range(1, 10))  # no duplicated steps


def test_resume_without_rng_restore_differs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The control for the test above: dropout masks depend on the restored RNG state.
    train, val, collate = text_data()
    cfg = TrainerConfig(**{**RESUME_CFG, "early_stopping_patience": None})  # keep final weights
    straight = make_tiny_bert(dropout=0.1)
    fit(straight, ClassificationTask(3), train, val, cfg, tmp_path / "a", collate)
    with pytest.raises(Interrupt):
        fit(
            make_tiny_bert(dropout=0.1),
            ClassificationTask(3),
            train,
            val,
            cfg,
            tmp_path / "b",
            collate,
            callbacks=[interrupt_at(5)],
        )
    monkeypatch.setattr(trainer_mod, "_restore_rng", lambda meta, tensors: None)
    resumed = make_tiny_bert(dropout=0.1)
    fit(resumed, ClassificationTask(3), train, val, cfg, tmp_path / "b", collate, resume=True)
    with pytest.raises(AssertionError, match="differ"):
        assert_all_equal(straight, resumed)


def test_checkpoint_files_are_safetensors_and_json_only(tmp_path: Path) -> None:
    model = make_mlp()
    fit(
        model,
        ClassificationTask(3),
        VectorDataset(40, 0),
        VectorDataset(10, 1),
        quick(checkpoint_every_steps=3),
        tmp_path,
    )
    ckpt = tmp_path / "checkpoint"
    names = sorted(p.name for p in ckpt.iterdir())
    # 40 / 8 = 5 steps per epoch, 2 epochs: the last checkpoint is at step 10; older removed.
    assert names == [
        "model-00000010.safetensors",
        "trainer-00000010.safetensors",
        "trainer_state.json",
    ]
    state = json.loads((ckpt / "trainer_state.json").read_text())
    assert state["files"] == {"model": names[0], "trainer": names[1]}
    umask = os.umask(0o022)
    os.umask(umask)
    for path in [*ckpt.iterdir(), tmp_path / "log.jsonl"]:  # readable as a plain open() makes it
        assert path.stat().st_mode & 0o777 == 0o666 & ~umask, path
    assert state["progress"]["finished"] and state["progress"]["step"] == 10
    weights = load_file(str(ckpt / names[0]))
    assert sorted(weights) == sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert torch.equal(weights["head.weight"], model.head.weight)
    extra = load_file(str(ckpt / names[1]))
    assert "rng.torch_cpu" in extra and "optimizer.0.exp_avg" in extra


def test_crash_while_writing_a_checkpoint_keeps_the_previous_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    train, val = VectorDataset(40, 0), VectorDataset(10, 1)
    cfg = quick(epochs=3, checkpoint_every_steps=2, eval_every_steps=3)
    straight = make_mlp(dropout=0.2)
    fit(straight, ClassificationTask(3), train, val, cfg, tmp_path / "a")

    real_write_text = trainer_mod.write_text

    def failing_write_text(path: Any, text: str) -> None:
        if Path(path).name == "trainer_state.json" and '"step": 6' in text:
            raise OSError("disk full")
        real_write_text(path, text)

    monkeypatch.setattr(trainer_mod, "write_text", failing_write_text)
    with pytest.raises(OSError, match="disk full"):
        fit(make_mlp(dropout=0.2), ClassificationTask(3), train, val, cfg, tmp_path / "b")
    monkeypatch.setattr(trainer_mod, "write_text", real_write_text)
    ckpt = tmp_path / "b/checkpoint"
    assert (
        json.loads((ckpt / "trainer_state.json").read_text())["progress"]["step"] == 5
    )  # step 5 ends epoch 1
    assert (ckpt / "model-00000006.safetensors").exists()  # written, but never referenced
    torn = ckpt / ".trainer-00000006.safetensors.x1y2.tmp"  # as a kill -9 mid-write leaves
    torn.write_bytes(b"half a file")
    resumed = make_mlp(dropout=0.2)
    result = fit(resumed, ClassificationTask(3), train, val, cfg, tmp_path / "b", resume=True)
    assert result.steps == 15
    assert_all_equal(straight, resumed)
    assert not (ckpt / "model-00000006.safetensors").exists()  # cleaned up by a later checkpoint
    assert not torn.exists()


def test_resuming_a_finished_run_changes_nothing(tmp_path: Path) -> None:
    cfg = quick(
        checkpoint_every_steps=4,
        eval_every_steps=2,
        early_stopping_patience=1,
        early_stopping_min_delta=10.0,
    )
    first = make_mlp()
    r1 = fit(
        first, ClassificationTask(3), VectorDataset(40, 0), VectorDataset(10, 1), cfg, tmp_path
    )
    assert r1.stopped_early and r1.steps == 4
    second = make_mlp()
    r2 = fit(
        second,
        ClassificationTask(3),
        VectorDataset(40, 0),
        VectorDataset(10, 1),
        cfg,
        tmp_path,
        resume=True,
    )
    assert (r2.steps, r2.stopped_early, r2.best_step) == (4, True, 2) and r2.restored_best
    assert_all_equal(first, second)


def test_resume_refuses_a_different_batch_order(tmp_path: Path) -> None:
    train, val = VectorDataset(40, 0), VectorDataset(10, 1)
    with pytest.raises(Interrupt):
        fit(
            make_mlp(),
            ClassificationTask(3),
            train,
            val,
            quick(checkpoint_every_steps=2),
            tmp_path,
            callbacks=[interrupt_at(3)],
        )
    with pytest.raises(
        CheckpointError, match=r"train.batch_size was 8 in the checkpoint and is 4 now"
    ):
        fit(
            make_mlp(),
            ClassificationTask(3),
            train,
            val,
            quick(checkpoint_every_steps=2, batch_size=4),
            tmp_path,
            resume=True,
        )
    with pytest.raises(CheckpointError, match="trained on 40 examples, this training set has 41"):
        fit(
            make_mlp(),
            ClassificationTask(3),
            VectorDataset(41, 0),
            val,
            quick(checkpoint_every_steps=2),
            tmp_path,
            resume=True,
        )
    other = nn.Sequential(nn.Linear(8, 3))
    with pytest.raises(CheckpointError, match="trainable parameters do not match"):
        fit(
            other,
            ClassificationTask(3),
            train,
            val,
            quick(checkpoint_every_steps=2),
            tmp_path,
            resume=True,
        )
    with pytest.warns(UserWarning, match=r"changed settings \(learning_rate: 0.01 -> 0.02\)"):
        fit(
            make_mlp(),
            ClassificationTask(3),
            train,
            val,
            quick(checkpoint_every_steps=2, learning_rate=2e-2),
            tmp_path,
            resume=True,
        )


def test_fresh_run_replaces_a_stale_checkpoint(tmp_path: Path) -> None:
    train = VectorDataset(40, 0)
    with pytest.raises(Interrupt):
        fit(
            make_mlp(),
            ClassificationTask(3),
            train,
            None,
            quick(checkpoint_every_steps=2),
            tmp_path,
            callbacks=[interrupt_at(3)],
        )
    with (
        pytest.warns(UserWarning, match="removing the previous checkpoint"),
        pytest.raises(Interrupt),
    ):
        fit(
            make_mlp(),
            ClassificationTask(3),
            train,
            None,
            quick(checkpoint_every_steps=2),
            tmp_path,
            callbacks=[interrupt_at(1)],
        )
    assert not (
        tmp_path / "checkpoint/trainer_state.json"
    ).exists()  # the old one cannot be resumed
    assert len(read_log(tmp_path / "log.jsonl")) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(DeltatuneError, match="cannot resume: no checkpoint"):
            fit(
                make_mlp(),
                ClassificationTask(3),
                train,
                None,
                quick(checkpoint_every_steps=2),
                tmp_path,
                resume=True,
            )


# --------------------------------------------------------------------------- plot


def test_plot_history_writes_a_png(tmp_path: Path) -> None:
    result = fit(
        make_mlp(),
        ClassificationTask(3),
        VectorDataset(90, 0),
        VectorDataset(30, 1),
        quick(epochs=4, eval_every_steps=4, learning_rate=3e-2),
    )
    out = plot_history(result.history, tmp_path / "plots" / "history.png", title="mlp")
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    assert not list(out.parent.glob("*.tmp"))
    # No evaluations at all still gives a readable figure.
    no_eval = plot_history([{"step": 1, "loss": 1.0}], tmp_path / "no_eval.png")
    assert no_eval.read_bytes()[:4] == b"\x89PNG"


def test_smooth_follows_the_trend() -> None:
    assert smooth([3.0, 1.0]) == [3.0, 1.0]  # short series shown as is
    values = [1.0 if i % 2 else 0.0 for i in range(200)]
    smoothed = smooth(values)
    assert len(smoothed) == 200 and all(0.3 < v < 0.7 for v in smoothed[50:])


def test_make_loader_is_what_fit_uses() -> None:
    # The training order of an epoch is exactly the seeded sampler's order.
    ds = VectorDataset(24, 0)
    seen: list[torch.Tensor] = []

    class Recorder(MLP):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            seen.append(x.detach().clone())
            return super().forward(x)

    torch.manual_seed(0)
    fit(Recorder(), ClassificationTask(3), ds, None, quick(epochs=1, seed=5))
    expected = [b["x"] for b in make_loader(ds, 8, shuffle=True, seed=5, collate=None)]
    assert len(seen) == 3 and all(torch.equal(a, b) for a, b in zip(seen, expected))

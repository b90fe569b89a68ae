"""Multi-task: sampling probabilities and batch counts (p_i ∝ n_i^(1/T)), per-task adapters and
heads that only learn from their own batches, training on a tiny BERT, one folder per task
(loadable alone, and by peft) and the combined folder, config errors."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.utils.data import Dataset

import deltatune as dt
from conftest import make_bert
from deltatune.errors import ConfigError
from deltatune.train import TrainerConfig, fit
from deltatune.train.multitask import (
    MultiTaskObjective,
    MultiTaskRunConfig,
    TaskBatches,
    TaskCollator,
    TaskConfig,
    add_task,
    batch_counts,
    load_multitask,
    load_multitask_config,
    make_all_trainable,
    save_multitask,
    task_parameters,
    task_probabilities,
)


class Tokens(Dataset[dict[str, Any]]):
    """Random token sequences whose label is a function of the first token (learnable)."""

    def __init__(self, n: int, num_labels: int, seed: int) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(1, 100, (n, 6), generator=gen)
        self.labels = (self.ids[:, 0] % num_labels).tolist()

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"input_ids": self.ids[i], "labels": self.labels[i]}


def stack(examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    return {
        "input_ids": torch.stack([e["input_ids"] for e in examples]),
        "labels": torch.tensor([e["labels"] for e in examples]),
    }


def two_task_model() -> torch.nn.Module:
    model = make_bert()  # its own head has 3 labels; the tasks have 4 and 2
    cfg = dt.LoraConfig(r=4, target_modules=["query", "value"])
    add_task(model, cfg, "a", 4)
    add_task(model, cfg, "b", 2)
    make_all_trainable(model, ["a", "b"])
    return model


def test_probabilities_follow_the_temperature_formula() -> None:
    sizes = {"big": 900, "small": 100}
    assert task_probabilities(sizes, 1.0) == pytest.approx({"big": 0.9, "small": 0.1})
    # T = 2: p ∝ sqrt(n) = 30 : 10.
    assert task_probabilities(sizes, 2.0) == pytest.approx({"big": 0.75, "small": 0.25})
    # T -> infinity: uniform.
    assert task_probabilities(sizes, 1e6) == pytest.approx({"big": 0.5, "small": 0.5}, abs=1e-5)
    with pytest.raises(ConfigError, match="temperature"):
        task_probabilities(sizes, 0.0)


def test_batch_counts_and_epoch_frequencies() -> None:
    # K = ceil(40/5) + ceil(10/5) = 10 batches per epoch.
    assert batch_counts({"a": 40, "b": 10}, 5, 1.0) == {"a": 8, "b": 2}
    # T = 2: p = (sqrt 40, sqrt 10) / sum = (2/3, 1/3) -> 6.67, 3.33 -> 7, 3.
    assert batch_counts({"a": 40, "b": 10}, 5, 2.0) == {"a": 7, "b": 3}
    data = {"a": Tokens(40, 4, 0), "b": Tokens(10, 2, 1)}
    batches = TaskBatches(data, 5, temperature=2.0, seed=0)
    assert len(batches) == 10
    for epoch in range(3):
        batches.set_epoch(epoch)
        tasks = [batches[i][0] for i in range(len(batches))]
        assert tasks.count("a") == 7 and tasks.count("b") == 3
        # Task b is up-sampled: 15 draws of its 10 examples, every example at least once.
        drawn_b = [id_ for name, idx in batches.plan if name == "b" for id_ in idx]
        assert len(drawn_b) == 15 and set(drawn_b) == set(range(10))
    # Proportional sampling sees each example exactly once per epoch; epochs differ in order.
    proportional = TaskBatches(data, 5, temperature=1.0, seed=0)
    drawn_a = [i for name, idx in proportional.plan if name == "a" for i in idx]
    assert sorted(drawn_a) == list(range(40))
    proportional.set_epoch(1)
    assert [i for name, idx in proportional.plan if name == "a" for i in idx] != drawn_a
    # Over a shuffled epoch order (what the trainer does), the frequencies are p_i exactly.
    counts = {"a": 0, "b": 0}
    for i in torch.randperm(len(batches)).tolist():
        counts[batches[i][0]] += 1
    assert counts["a"] / len(batches) == pytest.approx(0.7)


def test_each_task_gets_gradients_only_from_its_own_batches() -> None:
    model = two_task_model()
    objective = MultiTaskObjective({"a": 4, "b": 2})
    collate = TaskCollator(stack)
    batch = collate([("a", [Tokens(4, 4, 3)[i] for i in range(4)])])
    objective.loss(model, batch).backward()
    a_params, b_params = task_parameters(model, "a"), task_parameters(model, "b")
    assert a_params and b_params
    assert all(p.grad is not None for p in a_params)
    assert any(float(p.grad.abs().sum()) > 0 for p in a_params if p.grad is not None)
    assert all(p.grad is None for p in b_params)
    # The heads have each task's number of labels.
    logits_a = model(input_ids=batch["input_ids"]).logits
    dt.set_active(model, "b")
    assert logits_a.shape[-1] == 4 and model(input_ids=batch["input_ids"]).logits.shape[-1] == 2
    # The base weights stay frozen.
    base = [
        n for n, p in model.named_parameters() if "lora_" not in n and "modules_to_save" not in n
    ]
    assert all(p.grad is None for n, p in model.named_parameters() if n in base)


def test_training_saving_and_loading(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = two_task_model()
    start = {id(p): p.detach().clone() for p in model.parameters()}
    train = TaskBatches({"a": Tokens(48, 4, 0), "b": Tokens(24, 2, 1)}, 8, seed=0)
    val = TaskBatches({"a": Tokens(16, 4, 5), "b": Tokens(16, 2, 6)}, 8, shuffle=False)
    cfg = TrainerConfig(
        epochs=3, batch_size=1, eval_batch_size=1, learning_rate=5e-3, progress=False
    )
    result = fit(
        model,
        MultiTaskObjective({"a": 4, "b": 2}),
        train,
        val,
        cfg,
        tmp_path / "run",
        collate_fn=TaskCollator(stack),
    )
    assert result.steps == 27  # 9 batches per epoch (6 of a, 3 of b), 3 epochs
    for key in ("a_accuracy", "b_accuracy", "a_loss", "b_loss", "accuracy", "loss"):
        assert key in result.last_metrics
    assert result.last_metrics["accuracy"] == pytest.approx(
        (result.last_metrics["a_accuracy"] + result.last_metrics["b_accuracy"]) / 2
    )
    # Both tasks trained (their adapters moved), the base did not.
    for name in ("a", "b"):
        assert any(not torch.equal(p, start[id(p)]) for p in task_parameters(model, name))
    trained = {id(p) for n in ("a", "b") for p in task_parameters(model, n)}
    assert all(torch.equal(p, start[id(p)]) for p in model.parameters() if id(p) not in trained)

    out = save_multitask(model, tmp_path / "mt", {"a": ["0", "1", "2", "3"], "b": ["x", "y"]})
    ids = Tokens(5, 4, 9).ids
    expected = {}
    for name in ("a", "b"):
        dt.set_active(model, name)
        expected[name] = model(input_ids=ids).logits
    # One folder per task, loadable alone into a base whose head has that task's labels.
    from transformers import BertForSequenceClassification

    for name, n in (("a", 4), ("b", 2)):
        base = make_bert()
        fresh = BertForSequenceClassification(
            base.config.__class__(**{**base.config.to_dict(), "num_labels": n})
        )
        fresh.load_state_dict(
            {k: v for k, v in base.state_dict().items() if not k.startswith("classifier")},
            strict=False,
        )
        fresh.eval()
        dt.load_adapter(fresh, out / name)
        assert torch.allclose(fresh(input_ids=ids).logits, expected[name], atol=1e-5)
    # ... and by peft, the per-task folder being a PEFT LoRA adapter with its head.
    from peft import PeftModel

    base = make_bert()
    peft_base = BertForSequenceClassification(
        base.config.__class__(**{**base.config.to_dict(), "num_labels": 2})
    )
    peft_base.load_state_dict(
        {k: v for k, v in base.state_dict().items() if not k.startswith("classifier")}, strict=False
    )
    peft_model = PeftModel.from_pretrained(peft_base.eval(), str(out / "b")).eval()
    assert torch.allclose(peft_model(input_ids=ids).logits, expected["b"], atol=1e-5)
    # The combined folder loads every task into one base (whatever its head size).
    combined = make_bert()
    tasks = load_multitask(combined, out)
    assert tasks == {"a": ["0", "1", "2", "3"], "b": ["x", "y"]}
    for name in ("a", "b"):
        dt.set_active(combined, name)
        assert torch.allclose(combined(input_ids=ids).logits, expected[name], atol=1e-5)


def test_config_errors() -> None:
    with pytest.raises(ConfigError, match=r"method\.name: 'full'"):
        MultiTaskRunConfig(method={"name": "full"})
    with pytest.raises(ConfigError, match="names must differ"):
        MultiTaskRunConfig(tasks=[TaskConfig(name="x"), TaskConfig(name="x")])
    with pytest.raises(ConfigError, match=">= 2"):
        MultiTaskRunConfig(tasks=[TaskConfig(name="x")])
    with pytest.raises(ConfigError, match=r"tasks\[\]\.name"):
        TaskConfig(name="default")
    with pytest.raises(ConfigError, match="temperature"):
        MultiTaskRunConfig(temperature=-1)
    with pytest.raises(ConfigError, match="full"):
        add_task(make_bert(), dt.FullConfig(), "a", 2)


def test_shipped_config_and_per_task_overrides() -> None:
    cfg = load_multitask_config(
        Path(__file__).parent.parent / "configs" / "multitask.yaml",
        ["data.max_train_examples=20", "temperature=2"],
    )
    assert [t.name for t in cfg.tasks] == ["topic", "kind"]
    assert all(t.data.max_train_examples == 20 for t in cfg.tasks)
    assert cfg.temperature == 2.0 and math.isfinite(cfg.temperature)


def test_cli_multitask_run_writes_a_folder_per_task(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import csv
    import json
    import random

    import yaml
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizer

    from deltatune.cli import main

    words, filler = ["alpha", "bravo", "charlie"], [f"w{i}" for i in range(20)]
    model_dir = tmp_path / "tiny"
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words, *filler]
    BertTokenizer(vocab={t: i for i, t in enumerate(vocab)}).save_pretrained(model_dir)
    torch.manual_seed(0)
    BertForSequenceClassification(
        BertConfig(
            vocab_size=len(vocab),
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
            max_position_embeddings=32,
        )
    ).save_pretrained(model_dir)
    rng = random.Random(0)
    data = tmp_path / "kw.csv"
    with data.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["text", "label"])
        for i in range(60):
            text = [rng.choice(filler) for _ in range(2)] + [words[i % 3]] * 4
            writer.writerow([" ".join(text), words[i % 3]])
    source = {"source": str(data), "max_length": 12}
    cfg = {
        "model": {"name_or_path": str(model_dir)},
        "tasks": [
            {"name": "word", "data": source},
            {
                "name": "isalpha",
                "data": source,
                "label_map": {"alpha": "yes", "bravo": "no", "charlie": "no"},
            },
        ],
        "method": {"name": "lora", "r": 2, "target_modules": "all-linear"},
        "train": {"epochs": 1, "batch_size": 8, "learning_rate": 1e-2, "progress": False},
        "output_dir": str(tmp_path / "mt"),
    }
    path = tmp_path / "mt.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["multitask", str(path)]) == 0
    out = capsys.readouterr().out
    assert "word" in out and "isalpha" in out and "mean test accuracy" in out
    for name in ("word", "isalpha"):
        assert (tmp_path / "mt" / name / "adapter_model.safetensors").is_file()
    tasks = json.loads((tmp_path / "mt" / "multitask.json").read_text())["tasks"]
    assert tasks == [
        {"name": "word", "labels": words},
        {"name": "isalpha", "labels": ["no", "yes"]},
    ]
    metrics = json.loads((tmp_path / "mt" / "metrics.json").read_text())
    assert set(metrics["tasks"]) == {"word", "isalpha"}
    assert main(["multitask", str(path), "method.name=full"]) == 2

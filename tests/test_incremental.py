"""Incremental fine-tuning (``init_from``): continuing a saved adapter on new data, "fine-tune,
then freeze" (a full fine-tune, then only the head trains further), chains of runs that
rebuild exactly for eval, and clear errors."""

from __future__ import annotations

import csv
import json
import random
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from deltatune.cli import main
from deltatune.errors import ConfigError
from deltatune.run import build_model, evaluate_run, load_run, load_run_config

WORDS = ["alpha", "bravo", "charlie"]
FILLER = [f"w{i}" for i in range(30)]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """A tiny BERT folder and two keyword-labelled CSVs (old data, new data; same labels)."""
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
    paths = []
    for seed in (0, 1):
        rng = random.Random(seed)
        path = tmp_path_factory.mktemp("data") / f"kw{seed}.csv"
        with path.open("w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(["text", "label"])
            for i in range(90):
                words = [rng.choice(FILLER) for _ in range(2)]
                for _ in range(6):
                    words.insert(rng.randrange(len(words) + 1), WORDS[i % 3])
                writer.writerow([" ".join(words), WORDS[i % 3]])
        paths.append(path)
    return folder, paths[0], paths[1]


def write(tmp: Path, tiny: tuple[Path, Path, Path], name: str, **sections: Any) -> Path:
    cfg: dict[str, Any] = {
        "model": {"name_or_path": str(tiny[0])},
        "data": {"source": str(tiny[1]), "max_length": 16},
        "method": {"name": "lora", "r": 4, "target_modules": "all-linear"},
        "train": {
            "epochs": 3,
            "batch_size": 16,
            "learning_rate": 1e-2,
            "progress": False,
            "device": "cpu",
            "eval_every_steps": None,
        },
        "output_dir": str(tmp / name),
    }
    for key, value in sections.items():
        merge = isinstance(value, dict) and key != "method"
        cfg[key] = {**cfg.get(key, {}), **value} if merge else value
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def logits(model: torch.nn.Module) -> torch.Tensor:
    ids = torch.tensor([[2, 5, 5, 9, 3], [2, 6, 11, 6, 3], [2, 7, 7, 7, 3]])
    with torch.no_grad():
        return model.eval()(input_ids=ids).logits


def metrics(folder: Path) -> dict[str, Any]:
    return json.loads((folder / "metrics.json").read_text())


def test_continue_a_saved_adapter_on_new_data(
    tiny: tuple[Path, Path, Path], tmp_path: Path
) -> None:
    assert main(["train", str(write(tmp_path, tiny, "a"))]) == 0
    cont = write(tmp_path, tiny, "b", init_from=str(tmp_path / "a"), data={"source": str(tiny[2])})
    # The continued run starts exactly where run A ended (the adapter is loaded, trainable).
    cfg = load_run_config(cont, [])
    start = build_model(cfg, ["alpha", "bravo", "charlie"])
    _, model_a, _, _ = load_run(tmp_path / "a")
    assert torch.allclose(logits(start), logits(model_a), atol=1e-6)
    assert any(p.requires_grad for n, p in start.named_parameters() if "lora_" in n)
    assert main(["train", str(cont)]) == 0
    _, model_b, _, _ = load_run(tmp_path / "b")
    assert not torch.allclose(logits(model_b), logits(model_a), atol=1e-4)  # it trained on
    # Training on the new data lowered the loss on it (from run A's model to run B's).
    on_new = evaluate_run(tmp_path / "a", [f"data.source={tiny[2]}"])
    assert metrics(tmp_path / "b")["test"]["loss"] < on_new["loss"]
    # The run folder alone (with its init_from) rebuilds the trained model.
    assert evaluate_run(tmp_path / "b", [])["loss"] == pytest.approx(
        metrics(tmp_path / "b")["test"]["loss"], abs=1e-6
    )


def test_fine_tune_then_freeze_and_chains(tiny: tuple[Path, Path, Path], tmp_path: Path) -> None:
    full = write(tmp_path, tiny, "full", method={"name": "full"}, train={"learning_rate": 2e-3})
    assert main(["train", str(full)]) == 0
    # Then freeze everything but the head and train it further on the new data.
    frozen = write(
        tmp_path,
        tiny,
        "head",
        init_from=str(tmp_path / "full"),
        method={"name": "freeze", "trainable_patterns": ["classifier"]},
        data={"source": str(tiny[2])},
        train={"learning_rate": 5e-2},
    )
    assert main(["train", str(frozen)]) == 0
    _, model_full, _, _ = load_run(tmp_path / "full")
    _, model_head, _, _ = load_run(tmp_path / "head")
    full_state, head_state = model_full.state_dict(), model_head.state_dict()
    body = [k for k in full_state if not k.startswith("classifier")]
    assert body and all(torch.equal(full_state[k], head_state[k]) for k in body)
    assert not torch.equal(full_state["classifier.weight"], head_state["classifier.weight"])
    # The freeze run saved only the head: the rest comes from the init_from chain on eval.
    saved = json.loads((tmp_path / "head" / "adapter_config.json").read_text())
    assert saved["peft_type"] == "DELTATUNE_FREEZE"
    assert evaluate_run(tmp_path / "head", [])["loss"] == pytest.approx(
        metrics(tmp_path / "head")["test"]["loss"], abs=1e-6
    )
    # A third step (LoRA on top) replays full -> head before loading its own adapter.
    third = write(tmp_path, tiny, "third", init_from=str(tmp_path / "head"), train={"epochs": 1})
    assert main(["train", str(third)]) == 0
    assert evaluate_run(tmp_path / "third", [])["loss"] == pytest.approx(
        metrics(tmp_path / "third")["test"]["loss"], abs=1e-6
    )


def test_bad_init_from(
    tiny: tuple[Path, Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = write(tmp_path, tiny, "m", init_from=str(tmp_path / "nowhere"))
    assert main(["train", str(missing)]) == 2
    assert "init_from" in capsys.readouterr().err
    # A run trained on other labels cannot be continued on these.
    other = tmp_path / "other"
    other.mkdir()
    (other / "labels.json").write_text(json.dumps(["x", "y"]))
    (other / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA"}))
    from deltatune.train.incremental import check_labels

    with pytest.raises(ConfigError, match=r"init_from: run .* labels"):
        check_labels(other, ["alpha", "bravo", "charlie"])

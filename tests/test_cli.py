"""The ``deltatune`` CLI end to end on a tiny local model folder and a keyword-labelled CSV.

The model folder is a 2-layer random-init BERT saved with ``save_pretrained`` next to a small
WordPiece vocabulary, so ``model.name_or_path`` exercises the "local transformers folder" path.
The labels depend on which keyword a text holds, so a few epochs of LoRA learn them.
"""

from __future__ import annotations

import csv
import json
import random
from pathlib import Path

import pytest
import torch
import yaml

from deltatune.cli import main

WORDS = ["alpha", "bravo", "charlie"]  # one keyword per class
FILLER = [f"w{i}" for i in range(40)]


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizer

    folder = tmp_path_factory.mktemp("tiny-bert")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS, *FILLER]
    tok = BertTokenizer(vocab={t: i for i, t in enumerate(vocab)})
    tok.save_pretrained(folder)
    assert "[UNK]" not in tok.tokenize("alpha w1")  # the fixture must really tokenise
    cfg = BertConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    BertForSequenceClassification(cfg).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def csv_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    rng = random.Random(0)
    path = tmp_path_factory.mktemp("data") / "topics.csv"
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["body", "topic"])
        for i in range(150):
            label = WORDS[i % 3]
            words = [rng.choice(FILLER) for _ in range(8)]
            for _ in range(3):  # a random-init tiny BERT needs a strong signal to learn in seconds
                words.insert(rng.randrange(len(words) + 1), label)
            writer.writerow([" ".join(words), f"topic_{label}"])
    return path


def write_config(tmp_path: Path, model_dir: Path, data: Path, **method: object) -> Path:
    cfg = {
        "model": {"name_or_path": str(model_dir)},
        "data": {
            "source": str(data),
            "text_column": "body",
            "label_column": "topic",
            "max_length": 16,
        },
        "method": method
        or {"name": "lora", "r": 4, "lora_alpha": 8, "target_modules": "all-linear"},
        "train": {
            "epochs": 12,
            "batch_size": 16,
            "learning_rate": 2e-2,
            "progress": False,
            "device": "cpu",
        },
        "output_dir": str(tmp_path / "run"),
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def trained_run(
    tiny_model_dir: Path, csv_data: Path, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    tmp = tmp_path_factory.mktemp("train")
    cfg = write_config(tmp, tiny_model_dir, csv_data)
    assert main(["train", str(cfg), "train.eval_every_steps=5"]) == 0
    return tmp / "run"


def test_train_writes_every_output(trained_run: Path) -> None:
    for name in (
        "adapter_config.json",
        "adapter_model.safetensors",
        "metrics.json",
        "log.jsonl",
        "config.yaml",
        "labels.json",
        "training.png",
    ):
        assert (trained_run / name).is_file(), name
    metrics = json.loads((trained_run / "metrics.json").read_text())
    assert metrics["method"] == "lora"
    assert metrics["test"]["accuracy"] >= 0.9, metrics  # keyword task: LoRA must learn it
    assert 0 < metrics["trainable_percent"] < 100
    rows = [json.loads(line) for line in (trained_run / "log.jsonl").read_text().splitlines()]
    assert any("val_accuracy" in r for r in rows) and all("loss" in r for r in rows if "step" in r)
    resolved = yaml.safe_load((trained_run / "config.yaml").read_text())
    assert resolved["train"]["eval_every_steps"] == 5  # the override is part of the resolved config
    adapter_cfg = json.loads((trained_run / "adapter_config.json").read_text())
    assert adapter_cfg["peft_type"] == "LORA" and "classifier" in adapter_cfg["modules_to_save"]


def test_eval_matches_training_metrics(
    trained_run: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = run_cli(capsys, "eval", str(trained_run))
    assert code == 0
    metrics = json.loads((trained_run / "metrics.json").read_text())
    assert json.loads(out)["accuracy"] == pytest.approx(metrics["test"]["accuracy"])


def test_predict_labels_texts(
    trained_run: Path, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    code, out, _ = run_cli(
        capsys,
        "predict",
        str(trained_run),
        "--json",
        "--text",
        "w1 w2 alpha w3",
        "--text",
        "charlie w5 w6",
    )
    assert code == 0
    rows = [json.loads(line) for line in out.splitlines()]
    assert [r["label"] for r in rows] == ["topic_alpha", "topic_charlie"]
    f = tmp_path / "texts.txt"
    f.write_text("bravo w1\n\nw2 alpha\n")
    code, out, _ = run_cli(capsys, "predict", str(trained_run), "--file", str(f))
    assert code == 0 and len(out.splitlines()) == 2


def test_merge_loads_with_transformers_alone(
    trained_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from deltatune.run import load_run

    code, _, _ = run_cli(capsys, "merge", str(trained_run), str(tmp_path / "merged"))
    assert code == 0
    merged = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged").eval()
    tok = AutoTokenizer.from_pretrained(tmp_path / "merged")
    _, adapted, _, _ = load_run(trained_run)
    enc = tok(["alpha w1 w2", "bravo w3"], return_tensors="pt", padding=True)
    with torch.no_grad():
        diff = (merged(**enc).logits - adapted(**enc).logits).abs().max().item()
    assert diff <= 1e-5
    assert not any("lora" in k for k in merged.state_dict())


def test_methods_table_lists_registry(capsys: pytest.CaptureFixture[str]) -> None:
    import deltatune as dt

    code, out, _ = run_cli(capsys, "methods", "--json")
    assert code == 0
    assert {r["method"] for r in json.loads(out)} == set(dt.methods())


def test_print_config_shows_overrides(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_cli(
        capsys, "train", "--print-config", "method.name=bitfit", "train.epochs=7"
    )
    assert code == 0
    cfg = yaml.safe_load(out)
    assert cfg["method"] == {"name": "bitfit"} and cfg["train"]["epochs"] == 7


def test_overrides_may_follow_options(capsys: pytest.CaptureFixture[str]) -> None:
    # argparse alone refuses `key=value` after an option once a positional config was given.
    bitfit = str(Path(__file__).resolve().parents[1] / "configs" / "bitfit.yaml")
    code, out, _ = run_cli(
        capsys,
        "train",
        bitfit,
        "--output-dir",
        "/tmp/x",
        "train.epochs=7",
        "--print-config",
    )
    assert code == 0
    cfg = yaml.safe_load(out)
    assert cfg["train"]["epochs"] == 7 and cfg["output_dir"] == "/tmp/x"
    assert cfg["method"]["name"] == "bitfit"
    with pytest.raises(SystemExit) as exc:
        main(["train", bitfit, "--output-dir", "/tmp/x", "--bogus"])
    assert exc.value.code == 2
    assert "unrecognized arguments: --bogus" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["train", "--print-config", "method.name=lorra"], "did you mean 'lora'"),
        (
            ["train", "--print-config", "train.epochs=3", "train.learning_rat=1e-3"],
            "did you mean 'learning_rate'",
        ),
        (["train", "--print-config", "method.lora_alpah=8"], "did you mean 'lora_alpha'"),
        (["train", "--print-config", "train.epochs=many"], "train.epochs"),
        (["train", "no/such/config.yaml"], "does not exist"),
        (["predict", "no/such/run", "--text", "x"], "not a deltatune run folder"),
        (["eval", "no/such/run"], "not a deltatune run folder"),
    ],
)
def test_bad_input_is_one_clear_line(
    argv: list[str], needle: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _out, err = run_cli(capsys, *argv)
    assert code == 2
    assert err.startswith("error: ") and needle in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_bad_data_and_targets(
    tiny_model_dir: Path, csv_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = write_config(tmp_path, tiny_model_dir, csv_data)
    cases = [
        (["data.label_column=category"], "category"),
        (["data.source=" + str(tmp_path / "missing.csv")], "missing.csv"),
        (["method.target_modules=[nonexistent]"], "nonexistent"),
        (["model.name_or_path=" + str(tmp_path / "nope")], "model.name_or_path"),
    ]
    for overrides, needle in cases:
        code, _, err = run_cli(capsys, "train", str(cfg), *overrides)
        assert code == 2, (overrides, err)
        assert needle in err and len(err.strip().splitlines()) == 1, err


def test_corrupt_adapter_is_refused(
    trained_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(trained_run, broken)
    (broken / "adapter_model.safetensors").write_bytes(b"\x00garbage" * 10)
    code, _, err = run_cli(capsys, "predict", str(broken), "--text", "alpha")
    assert code == 2 and "corrupt" in err and "Traceback" not in err


def test_resume_of_a_finished_run_changes_nothing(
    tiny_model_dir: Path, csv_data: Path, tmp_path: Path
) -> None:
    cfg = write_config(tmp_path, tiny_model_dir, csv_data)
    args = ["train", str(cfg), "train.epochs=2", "train.checkpoint_every_steps=4"]
    assert main(args) == 0
    run = tmp_path / "run"
    assert (run / "checkpoint" / "trainer_state.json").is_file()
    before = (run / "adapter_model.safetensors").read_bytes()
    assert main([*args, "--resume"]) == 0
    assert (run / "adapter_model.safetensors").read_bytes() == before


def test_resume_without_checkpoint_is_a_clear_error(
    tiny_model_dir: Path, csv_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = write_config(tmp_path, tiny_model_dir, csv_data)
    code, _, err = run_cli(capsys, "train", str(cfg), "--resume")
    assert code == 2 and "checkpoint" in err and "Traceback" not in err

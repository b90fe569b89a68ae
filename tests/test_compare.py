"""``deltatune compare`` on a tiny random-init BERT folder and a keyword-labelled CSV.

The table's columns are checked against independent computations (parameter counts of a
freshly injected model, bytes on disk, the contrastive reference loss written out here), the
resume logic by what a second call re-trains, and the HTML report for self-containment and,
in headless Chromium, for rendering into a non-blank page.
"""

from __future__ import annotations

import base64
import csv
import json
import math
import random
import re
import shutil
import struct
import subprocess
import time
import zlib
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
import yaml

import deltatune as dt
from deltatune.cli import main
from deltatune.compare import (
    COMPARE_CSV,
    COMPARE_JSON,
    COMPARE_MD,
    REPORT_HTML,
    CompareConfig,
    compare,
    interleaved_latency,
    load_compare_config,
    train_time_from_log,
)

WORDS = ["alpha", "bravo", "charlie"]
FILLER = [f"w{i}" for i in range(40)]
CONFIGS = Path(__file__).resolve().parent.parent / "configs" / "compare"


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
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
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    BertForSequenceClassification(cfg).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def data_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(a keyword-labelled CSV, a JSONL of question -> answer pairs for the reference)."""
    rng = random.Random(0)
    folder = tmp_path_factory.mktemp("data")
    topics = folder / "topics.csv"
    with topics.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["body", "topic"])
        for i in range(90):
            label = WORDS[i % 3]
            words = [rng.choice(FILLER) for _ in range(8)]
            for _ in range(3):
                words.insert(rng.randrange(len(words) + 1), label)
            writer.writerow([" ".join(words), f"topic_{label}"])
    pairs = folder / "pairs.jsonl"
    rows = [
        {"prompt": f"w{i} w{(i * 7) % 40} alpha", "response": f"w{(i * 3) % 40} bravo w{i}"}
        for i in range(24)
    ]
    pairs.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return topics, pairs


def compare_dict(model_dir: Path, topics: Path, pairs: Path, out: Path) -> dict[str, Any]:
    return {
        "model": {"name_or_path": str(model_dir)},
        "data": {
            "source": str(topics),
            "text_column": "body",
            "label_column": "topic",
            "max_length": 16,
            "max_train_examples": 48,
        },
        "train": {"epochs": 3, "batch_size": 8, "device": "cpu", "progress": False},
        "methods": {
            "features": {"name": "features"},
            "full": {"name": "full", "train": {"learning_rate": 1e-3}},
            "lora": {"name": "lora", "r": 4, "lora_alpha": 8, "target_modules": "all-linear"},
        },
        "reference": {"source": str(pairs), "max_examples": 16, "batch_size": 8, "max_length": 12},
        "latency": {"batch_size": 4, "repeats": 2},
        "output_dir": str(out),
    }


def write_yaml(path: Path, data: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture(scope="module")
def compared(
    tiny_model_dir: Path, data_files: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, dict[str, Any]]:
    tmp = tmp_path_factory.mktemp("compare")
    config = write_yaml(
        tmp / "compare.yaml", compare_dict(tiny_model_dir, *data_files, tmp / "out")
    )
    summary = compare(load_compare_config(config), echo=lambda *_: None)
    return config, summary


def rows_by_name(summary: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {r["name"]: r for r in summary["rows"]}


# --------------------------------------------------------------------------- the numbers


def fresh_model(model_dir: Path, method: dict[str, Any]) -> torch.nn.Module:
    from transformers import BertForSequenceClassification

    model = BertForSequenceClassification.from_pretrained(
        str(model_dir), num_labels=3, ignore_mismatched_sizes=True
    )
    dt.inject(model, dt.config_from_dict(method))
    return model


def test_trained_params_equal_the_models_count(
    compared: tuple[Path, dict[str, Any]], tiny_model_dir: Path
) -> None:
    rows = rows_by_name(compared[1])
    lora = fresh_model(  # a run sets SEQ_CLS: the new head trains too (modules_to_save)
        tiny_model_dir,
        {
            "name": "lora",
            "r": 4,
            "lora_alpha": 8,
            "target_modules": "all-linear",
            "task_type": "SEQ_CLS",
        },
    )
    trained = sum(p.numel() for p in lora.parameters() if p.requires_grad)
    assert rows["lora"]["trainable_params"] == trained
    assert rows["lora"]["total_params"] == sum(p.numel() for p in lora.parameters())
    full = fresh_model(tiny_model_dir, {"name": "full"})
    assert rows["full"]["trainable_params"] == sum(p.numel() for p in full.parameters())
    assert rows["full"]["trainable_percent"] == pytest.approx(100.0)
    # features: the closed-form head, hidden (32) x labels (3) + bias
    assert rows["features"]["trainable_params"] == 32 * 3 + 3
    r = rows["lora"]
    assert r["trainable_percent"] == pytest.approx(100 * r["trainable_params"] / r["total_params"])


def test_adapter_size_is_the_bytes_on_disk(compared: tuple[Path, dict[str, Any]]) -> None:
    for row in compared[1]["rows"]:
        path = Path(row["run_dir"]) / "adapter_model.safetensors"
        assert row["adapter_bytes"] == path.stat().st_size > 0
    rows = rows_by_name(compared[1])
    assert rows["features"]["adapter_bytes"] < rows["lora"]["adapter_bytes"]
    assert rows["lora"]["adapter_bytes"] < rows["full"]["adapter_bytes"]


def test_score_is_the_runs_test_accuracy(compared: tuple[Path, dict[str, Any]]) -> None:
    for row in compared[1]["rows"]:
        metrics = json.loads((Path(row["run_dir"]) / "metrics.json").read_text())
        assert row["metric"] == "accuracy"
        assert row["score"] == row["test_accuracy"] == metrics["test"]["accuracy"]
    rows = rows_by_name(compared[1])
    assert rows["full"]["learning_rate"] == 1e-3  # the entry's own train: change
    assert rows["lora"]["learning_rate"] == dt.get_method("lora").default_lr


def reference_pairs(pairs: Path, tokenizer: Any, n: int = 16, batch: int = 8) -> list[Any]:
    """The reference batches, drawn as the comparison draws them (seed 0, distinct questions)."""
    rows = [json.loads(line) for line in pairs.read_text().splitlines()]
    picked = random.Random(0).sample(rows, n)
    enc = lambda texts: tokenizer(  # noqa: E731
        texts, truncation=True, max_length=12, padding=True, return_tensors="pt"
    )
    return [
        (
            enc([r["prompt"] for r in picked[i : i + batch]]),
            enc([r["response"] for r in picked[i : i + batch]]),
        )
        for i in range(0, n, batch)
    ]


def contrastive_loss(encoder: torch.nn.Module, batches: list[Any]) -> float:
    """all-MiniLM's objective written out: symmetric CE over 20 * cosine, mean-pooled states."""

    def embed(enc: Any) -> torch.Tensor:
        hidden = encoder(**enc).last_hidden_state
        m = enc["attention_mask"].unsqueeze(-1).float()
        return (hidden * m).sum(1) / m.sum(1)

    losses, sizes = [], []
    with torch.no_grad():
        for q_enc, a_enc in batches:
            q, a = F.normalize(embed(q_enc), dim=-1), F.normalize(embed(a_enc), dim=-1)
            s = 20.0 * q @ a.T
            y = torch.arange(len(q))
            losses.append(float(F.cross_entropy(s, y) + F.cross_entropy(s.T, y)) / 2)
            sizes.append(len(q))
    return sum(v * n for v, n in zip(losses, sizes)) / sum(sizes)


def test_forgetting_is_the_reference_loss_before_minus_after(
    compared: tuple[Path, dict[str, Any]], tiny_model_dir: Path, data_files: tuple[Path, Path]
) -> None:
    from transformers import AutoTokenizer, BertModel

    from deltatune.run import load_run

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    batches = reference_pairs(data_files[1], tokenizer)
    base = BertModel.from_pretrained(str(tiny_model_dir), add_pooling_layer=False).eval()
    before = contrastive_loss(base, batches)
    assert compared[1]["reference"]["base"]["loss"] == pytest.approx(before, rel=1e-5)
    rows = rows_by_name(compared[1])
    for name in ("lora", "full"):
        _, model, _, _ = load_run(rows[name]["run_dir"])
        after = contrastive_loss(model.bert, batches)  # the encoder alone, adapters in place
        f = rows[name]["forgetting"]
        assert f["loss_before"] == pytest.approx(before, rel=1e-5)
        assert f["loss_after"] == pytest.approx(after, rel=1e-5)
        assert f["loss_increase"] == pytest.approx(after - before, rel=1e-4, abs=1e-6)
        assert f["loss_increase"] != 0.0  # training did move the encoder
    # Feature extraction never changes the encoder: no forgetting at all.
    assert rows["features"]["forgetting"]["loss_increase"] == 0.0


def test_memory_time_and_latency_are_measured(
    compared: tuple[Path, dict[str, Any]], tiny_model_dir: Path
) -> None:
    rows = rows_by_name(compared[1])
    full = fresh_model(tiny_model_dir, {"name": "full"})
    weight_bytes = sum(t.numel() * t.element_size() for t in [*full.parameters(), *full.buffers()])
    m = rows["full"]["memory_bytes"]
    assert m["weights"] == weight_bytes
    assert m["grads"] == sum(p.numel() * 4 for p in full.parameters())
    assert m["optimizer"] == 2 * m["grads"]
    assert m["activations"] > 0
    assert rows["full"]["peak_memory_bytes"] == sum(v for k, v in m.items() if k != "peak")
    lora = rows["lora"]["memory_bytes"]
    assert lora["grads"] == 4 * rows["lora"]["trainable_params"]
    assert rows["features"]["memory_bytes"]["grads"] == 0  # no gradient step
    for row in compared[1]["rows"]:
        assert 0 < row["train_time_s"] <= row["run_time_s"] and row["run_cpu_s"] > 0
        assert row["latency_ms_per_example"] > 0 and row["latency_batch"] == 4
        assert row["latency_cpu_ms_per_example"] > 0
        saved = json.loads((Path(row["run_dir"]) / "compare_row.json").read_text())
        assert saved["latency_ms_per_example"] == row["latency_ms_per_example"]


class Sleeper(torch.nn.Module):
    """A model whose forward waits ``seconds`` (wall time, almost no CPU time)."""

    def __init__(self, seconds: float) -> None:
        super().__init__()
        self.seconds = seconds

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        time.sleep(self.seconds)
        return input_ids


def test_latency_is_timed_per_example_side_by_side() -> None:
    models = [Sleeper(0.01), Sleeper(0.03)]
    models[0].eval()  # modules start in training mode; model 1 stays so
    batches = [
        {"input_ids": torch.zeros(2, 3), "labels": torch.zeros(2)},
        {"input_ids": torch.zeros(5, 3)},
    ]
    fast, slow = interleaved_latency(models, batches, repeats=3)
    assert fast["batch"] == 2 and slow["batch"] == 5
    assert 10.0 / 2 <= fast["wall"] < 10.0 / 2 + 20  # ms per example
    assert 30.0 / 5 <= slow["wall"] < 30.0 / 5 + 20
    assert fast["cpu"] < fast["wall"] and slow["cpu"] < slow["wall"]  # sleeping costs no CPU
    assert not models[0].training and models[1].training  # modes restored


def test_train_time_leaves_out_validation_steps() -> None:
    rows = [
        {"step": 1, "elapsed_s": 1.0},
        {"step": 2, "elapsed_s": 3.0},
        {"step": 3, "elapsed_s": 13.0, "val_accuracy": 0.5},  # 10 s, most of it validation
        {"step": 4, "elapsed_s": 16.0},
    ]
    # plain steps take 1, 2 and 3 s (median 2); the evaluating step counts as 2
    assert train_time_from_log(rows) == pytest.approx(1 + 2 + 3 + 2)


# --------------------------------------------------------------------------- outputs and resume


def test_table_files(compared: tuple[Path, dict[str, Any]]) -> None:
    out = Path(compared[1]["rows"][0]["run_dir"]).parent.parent
    md = (out / COMPARE_MD).read_text()
    assert md.startswith("| method | test accuracy | trained params")
    assert md.count("\n") == 2 + 3
    with (out / COMPARE_CSV).open() as fh:
        table = list(csv.DictReader(fh))
    assert [r["name"] for r in table] == ["features", "full", "lora"]
    assert float(table[2]["adapter_bytes"]) == compared[1]["rows"][2]["adapter_bytes"]
    saved = json.loads((out / COMPARE_JSON).read_text())
    assert saved["rows"] == compared[1]["rows"]
    for name in ("compare_params.png", "compare_costs.png", "compare_forgetting.png"):
        assert (out / name).read_bytes().startswith(b"\x89PNG")


def test_report_is_self_contained(compared: tuple[Path, dict[str, Any]]) -> None:
    out = Path(compared[1]["rows"][0]["run_dir"]).parent.parent
    page = (out / REPORT_HTML).read_text()
    assert "<script" not in page.lower() and "<link" not in page.lower()
    assert "url(" not in page and "@import" not in page
    refs = re.findall(r"""(?:src|href)\s*=\s*["']([^"']*)["']""", page, flags=re.I)
    images = re.findall(r"<img\b[^>]*>", page)
    assert len(images) == 3 and len(refs) == 3
    for ref in refs:
        assert ref.startswith("data:image/png;base64,"), ref[:60]
        assert base64.b64decode(ref.split(",", 1)[1]).startswith(b"\x89PNG")
    assert "http://" not in page and "https://" not in page
    for row in compared[1]["rows"]:
        assert row["name"] in page


def test_resume_skips_finished_methods(
    compared: tuple[Path, dict[str, Any]], tmp_path: Path
) -> None:
    config, first = compared
    out = Path(first["rows"][0]["run_dir"]).parent.parent
    # A copy, so the other tests' folder stays as it was.
    copy = tmp_path / "out"
    shutil.copytree(out, copy)
    cfg = load_compare_config(config, [f"output_dir={copy}"])
    for row_path in copy.glob("runs/*/compare_row.json"):  # rows name their run folders
        row = json.loads(row_path.read_text())
        row["run_dir"] = str(row_path.parent)
        row_path.write_text(json.dumps(row))
    (copy / "runs" / "features" / "compare_row.json").unlink()  # as if interrupted there
    messages: list[str] = []
    again = compare(cfg, echo=messages.append)
    trained = [m for m in messages if "training" in m]
    assert len(trained) == 1 and "features" in trained[0]
    assert sum("skipped" in m for m in messages) == 2
    assert [r["name"] for r in again["rows"]] == ["features", "full", "lora"]
    before_rows = rows_by_name(first)
    assert rows_by_name(again)["full"]["score"] == before_rows["full"]["score"]
    # Changed settings for one method make that method (only) run again.
    changed = load_compare_config(config, [f"output_dir={copy}", "methods.features.C=0.5"])
    messages.clear()
    compare(changed, echo=messages.append)
    trained = [m for m in messages if "training" in m]
    assert len(trained) == 1 and "features" in trained[0]
    assert any("settings changed" in m for m in messages)


# --------------------------------------------------------------------------- the page in Chromium


def chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        path = shutil.which(name)
        if path:
            return path
    return None


def read_png(data: bytes) -> tuple[int, int, list[bytes]]:
    """(width, height, rows of raw pixel bytes) of an 8-bit non-interlaced PNG (zlib only)."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat, header = 8, b"", b""
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind = data[pos + 4 : pos + 8]
        body = data[pos + 8 : pos + 8 + length]
        if kind == b"IHDR":
            header = body
        elif kind == b"IDAT":
            idat += body
        pos += 12 + length
    width, height, depth, color, _, _, interlace = struct.unpack(">IIBBBBB", header)
    assert depth == 8 and interlace == 0, (depth, interlace)
    bpp = {0: 1, 2: 3, 4: 2, 6: 4}[color]
    raw = zlib.decompress(idat)
    stride = width * bpp
    rows: list[bytes] = []
    prev = bytearray(stride)
    for y in range(height):
        kind = raw[y * (stride + 1)]
        line = bytearray(raw[y * (stride + 1) + 1 : (y + 1) * (stride + 1)])
        for i in range(stride):
            a = line[i - bpp] if i >= bpp else 0
            b = prev[i]
            c = prev[i - bpp] if i >= bpp else 0
            if kind == 1:
                line[i] = (line[i] + a) & 255
            elif kind == 2:
                line[i] = (line[i] + b) & 255
            elif kind == 3:
                line[i] = (line[i] + (a + b) // 2) & 255
            elif kind == 4:
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                pred = a if pa <= pb and pa <= pc else b if pb <= pc else c
                line[i] = (line[i] + pred) & 255
        rows.append(bytes(line))
        prev = line
    return width, height, rows


def test_report_renders_in_headless_chromium(
    compared: tuple[Path, dict[str, Any]], tmp_path: Path
) -> None:
    browser = chromium()
    if browser is None:
        pytest.skip(
            "Chromium is not installed: `make chromium` (or `sudo apt-get install -y chromium`) "
            "installs it; `make setup` does so where it can"
        )
    page = Path(compared[1]["rows"][0]["run_dir"]).parent.parent / REPORT_HTML
    shot = tmp_path / "report.png"
    subprocess.run(
        [
            browser,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--hide-scrollbars",
            f"--user-data-dir={tmp_path / 'profile'}",
            f"--screenshot={shot}",
            "--window-size=1280,2000",
            page.resolve().as_uri(),
        ],
        check=True,
        capture_output=True,
        timeout=120,
    )
    width, height, rows = read_png(shot.read_bytes())
    assert (width, height) == (1280, 2000)
    # Not blank: many distinct grey levels, and a real spread of brightness.
    sample = [row[i] for row in rows[::8] for i in range(0, len(row), 24)]
    mean = sum(sample) / len(sample)
    variance = sum((v - mean) ** 2 for v in sample) / len(sample)
    assert variance > 100 and len(set(sample)) > 20, (variance, len(set(sample)))
    # The table is in the first screen: dark text pixels in the top 600 rows.
    assert sum(v < 80 for row in rows[:600:4] for v in row[::12]) > 200


# --------------------------------------------------------------------------- config and CLI


def test_default_config_file_equals_the_code_defaults() -> None:
    assert load_compare_config(CONFIGS / "default.yaml").to_dict() == CompareConfig().to_dict()
    default = CompareConfig()
    assert set(default.methods) >= {"features", "last2", "full", "lora", "ia3", "bitfit"}
    assert default.run_config("lora").output_dir == "runs/compare/runs/lora"


def test_method_flags_and_full_data() -> None:
    cfg = load_compare_config(None, [], only=["lora", "houlsby"], full_data=True)
    assert list(cfg.methods) == ["lora", "houlsby"]
    assert cfg.methods["houlsby"] == {"name": "houlsby"}  # a registered method by its name
    assert cfg.data.max_train_examples is None and cfg.data.max_eval_examples is None


def test_bad_input_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(dt.ConfigError, match=r"--methods: 'lroa'.*did you mean 'lora'"):
        load_compare_config(None, [], only=["lroa"])
    with pytest.raises(dt.ConfigError, match=r"methods\.x: must be a method section with a 'name'"):
        load_compare_config(write_yaml(tmp_path / "c.yaml", {"methods": {"x": {"r": 4}}}))
    with pytest.raises(dt.ConfigError, match=r"reference\.batch_size: value 1 must be >= 2"):
        load_compare_config(None, ["reference.batch_size=1"])
    with pytest.raises(dt.ConfigError, match=r"unknown config key 'epoch'"):
        load_compare_config(None, ["methods.lora.train.epoch=2"])
    with pytest.raises(dt.ConfigError, match=r"is a CNN; deltatune compare measures text runs"):
        load_compare_config(None, ["model.name_or_path=embedded-vgg16bn", "data.source=digits"])


def test_cli_prints_the_table_and_resumes(
    compared: tuple[Path, dict[str, Any]], capsys: pytest.CaptureFixture[str]
) -> None:
    config, summary = compared
    out = Path(summary["rows"][0]["run_dir"]).parent.parent
    assert (
        main(["compare", str(config), "--methods", "features,full", "--output-dir", str(out)]) == 0
    )
    text = capsys.readouterr().out
    assert "skipped" in text and "training" not in text
    assert "| features |" in text and "| full |" in text and "| lora |" not in text
    assert str(out / REPORT_HTML) in text
    assert main(["compare", "--methods", "nope"]) == 2
    assert "is neither an entry" in capsys.readouterr().err
    assert main(["compare", "--print-config", "train.epochs=2"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["train"]["epochs"] == 2


# --------------------------------------------------------------------------- causal LM


def test_causal_lm_comparison_reports_perplexity(tmp_path: Path) -> None:
    from conftest import make_llama
    from test_lm_sft import WORDS as LM_WORDS
    from test_lm_sft import make_pair

    decoder = tmp_path / "tiny-llama"
    model, tokenizer = make_pair(make_llama)
    model.save_pretrained(decoder)
    tokenizer.save_pretrained(decoder)

    pairs = tmp_path / "pairs.jsonl"
    rows = [
        {"q": f"what is {a} {b}", "a": "yes thank you ."}
        for a in LM_WORDS[8:18]
        for b in LM_WORDS[18:22]
    ]
    pairs.write_text("".join(json.dumps(r) + "\n" for r in rows))
    text = tmp_path / "reference.txt"
    text.write_text("\n".join(" ".join(LM_WORDS[i : i + 12]) for i in range(0, 40, 3)) + "\n")
    cfg = load_compare_config(
        write_yaml(
            tmp_path / "c.yaml",
            {
                "model": {"name_or_path": str(decoder), "task": "causal-lm"},
                "data": {
                    "source": str(pairs),
                    "max_length": 24,
                    "val_fraction": 0.2,
                    "test_fraction": 0.2,
                },
                "sft": {"prompt_column": "q", "response_column": "a"},
                "train": {"epochs": 3, "batch_size": 4, "learning_rate": 0.02, "device": "cpu"},
                "methods": {"lora": {"name": "lora", "r": 4, "target_modules": "all-linear"}},
                "reference": {
                    "source": str(text),
                    "max_examples": 8,
                    "batch_size": 4,
                    "max_length": 8,
                },
                "latency": {"batch_size": 2, "repeats": 1},
                "output_dir": str(tmp_path / "out"),
            },
        )
    )
    summary = compare(cfg, echo=lambda *_: None)
    (row,) = summary["rows"]
    metrics = json.loads((Path(row["run_dir"]) / "metrics.json").read_text())
    assert row["metric"] == "perplexity"
    assert row["score"] == pytest.approx(math.exp(metrics["test"]["loss"]))
    assert row["score"] < row["base_test_perplexity"]  # the fixed answer is learnt
    f = row["forgetting"]
    assert f["loss_increase"] == pytest.approx(f["loss_after"] - f["loss_before"])
    assert "perplexity" in (tmp_path / "out" / COMPARE_MD).read_text()

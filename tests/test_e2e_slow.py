"""End to end on the real embedded assets (MiniLM + BBC News), on small subsets.

Marked ``slow``: they load the 22.7M-parameter encoder. They still run in CI (`make test`),
sized to take well under a minute each on 2 CPU cores.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from deltatune.cli import main

pytestmark = pytest.mark.slow

SMALL = [
    "data.max_train_examples=120",
    "data.max_eval_examples=60",
    "data.max_length=64",
    "train.progress=false",
    "train.device=cpu",
]


def test_cli_lora_on_minilm_bbc_news(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "lora"
    code = main(
        ["train", *SMALL, "train.epochs=3", "train.learning_rate=2e-3", f"output_dir={out}"]
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert "test accuracy" in printed and "trainable params" in printed and str(out) in printed
    metrics = json.loads((out / "metrics.json").read_text())
    # 5 topics: chance is 0.2. A pretrained encoder + LoRA on 120 articles is far above it.
    assert metrics["test"]["accuracy"] >= 0.7, metrics
    assert metrics["trainable_percent"] < 5
    assert (out / "training.png").stat().st_size > 10_000
    code = main(
        [
            "predict",
            str(out),
            "--json",
            "--text",
            "The striker scored twice as the club won the cup final.",
        ]
    )
    assert code == 0
    row = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert row["label"] in {"business", "entertainment", "politics", "sports", "tech"}


def test_feature_based_logistic_regression_on_minilm(tmp_path: Path) -> None:
    out = tmp_path / "features"
    assert main(["train", *SMALL, "method.name=features", f"output_dir={out}"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["trainable_params"] == 0
    assert metrics["test"]["accuracy"] >= 0.7, metrics

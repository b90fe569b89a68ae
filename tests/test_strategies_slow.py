"""The strategies on the real embedded assets (MiniLM, BBC News, chatterbot, SmolLM2), on small
subsets: each checks the mechanics end to end and one direction of change, not the numbers of
the benchmark (``bench/beyond_labels_report.py``)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from deltatune.cli import main

pytestmark = pytest.mark.slow
QUIET = ["train.progress=false", "train.device=cpu"]


def test_mlm_on_bbc_news_lowers_the_held_out_mlm_loss(tmp_path: Path) -> None:
    torch.set_num_threads(1)
    out = tmp_path / "mlm"
    argv = [
        "adapt",
        "corpus.max_texts=80",
        "corpus.val_fraction=0.2",
        "train.max_steps=4",
        "train.batch_size=8",
        f"output_dir={out}",
        *QUIET,
    ]
    assert main(argv) == 0
    m = json.loads((out / "metrics.json").read_text())
    # The new head starts at chance (ln 30522 = 10.3); a few steps already cut the loss.
    assert m["val_before"]["loss"] > 9.5 and m["val_after"]["loss"] < m["val_before"]["loss"] - 1
    assert (out / "model" / "model.safetensors").is_file()


def test_self_training_on_bbc_news(tmp_path: Path) -> None:
    out = tmp_path / "semisup"
    argv = [
        "semisup",
        "semisup.labels_per_class=4",
        "semisup.rounds=1",
        "semisup.max_unlabelled=20",
        "semisup.threshold=0.3",
        "data.max_eval_examples=40",
        "train.max_steps=10",
        f"output_dir={out}",
        *QUIET,
    ]
    assert main(argv) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["labelled"] == 20 and m["unlabelled"] == 20 and len(m["rounds"]) == 2
    assert m["labelled_only_accuracy"] > 0.3  # 5 topics: chance is 0.2
    assert m["rounds"][1]["train_examples"] == 20 + m["rounds"][1]["pseudo_labels"]


def test_dpo_on_smollm2_moves_the_margin(tmp_path: Path) -> None:
    out = tmp_path / "dpo"
    argv = [
        "dpo",
        "data.max_train_pairs=4",
        "data.max_eval_pairs=4",
        "data.max_length=32",
        "train.max_steps=1",
        "train.learning_rate=1e-3",
        f"output_dir={out}",
        *QUIET,
    ]
    assert main(argv) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["before"]["margin"] == 0.0 and m["before"]["accuracy"] == 0.0  # policy == reference
    assert m["after"]["margin"] != 0.0
    assert (out / "adapter_model.safetensors").is_file()


def test_causal_lm_on_raw_text_with_smollm2(tmp_path: Path) -> None:
    docs = tmp_path / "docs"
    docs.mkdir()
    for i, text in enumerate(["The match ended in a draw.", "Shares fell after the results."]):
        (docs / f"{i}.txt").write_text(text * 4, encoding="utf-8")
    out = tmp_path / "causal"
    argv = [
        "adapt",
        "model.name_or_path=embedded-smollm2",
        f"corpus.source={docs}",
        "corpus.val_fraction=0",
        "objective.name=causal-lm",
        "objective.block_size=16",
        "train.max_steps=1",
        "train.batch_size=4",
        f"output_dir={out}",
        *QUIET,
    ]
    assert main(argv) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["steps"] == 1 and m["train_items"] >= 4 and m["final_train_loss"] > 0
    assert (out / "model" / "config.json").is_file()

"""Cross-validation: folds are disjoint and stratified; the summary is their mean and std."""

from __future__ import annotations

import csv
import json
import random
import statistics
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml

from deltatune.cli import main
from deltatune.errors import ConfigError
from deltatune.train.cv import CVConfig, fold_indices


def test_folds_are_disjoint_cover_everything_and_are_stratified() -> None:
    labels = [0] * 50 + [1] * 30 + [2] * 20
    folds = fold_indices(labels, 5, seed=0)
    assert len(folds) == 5
    held = [set(ho.tolist()) for _, ho in folds]
    assert set().union(*held) == set(range(100))
    assert sum(len(h) for h in held) == 100  # disjoint
    for tr, ho in folds:
        assert set(tr.tolist()).isdisjoint(ho.tolist())
        assert len(tr) + len(ho) == 100
        counts = Counter(labels[i] for i in ho)
        assert counts == {0: 10, 1: 6, 2: 4}  # each fold keeps the 50/30/20 proportions
    again = fold_indices(labels, 5, seed=0)
    assert all(np.array_equal(a[1], b[1]) for a, b in zip(folds, again))
    other = fold_indices(labels, 5, seed=1)
    assert any(not np.array_equal(a[1], b[1]) for a, b in zip(folds, other))


def test_too_few_examples_of_a_label_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match=r"cv.folds: value 5 .* label id 1 has 3"):
        fold_indices([0] * 10 + [1] * 3, 5, seed=0)
    with pytest.raises(ConfigError, match=r"cv.folds: value 1 must be >= 2"):
        CVConfig(folds=1)


# --------------------------------------------------------------------------- whole run, CLI

WORDS = ["alpha", "bravo", "charlie"]
FILLER = [f"w{i}" for i in range(40)]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A tiny 2-layer BERT folder and a keyword-labelled CSV (150 rows, 3 labels)."""
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
    rng = random.Random(0)
    data = tmp_path_factory.mktemp("data") / "topics.csv"
    with data.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["text", "label"])
        for i in range(150):
            words = [rng.choice(FILLER) for _ in range(8)]
            for _ in range(3):
                words.insert(rng.randrange(len(words) + 1), WORDS[i % 3])
            writer.writerow([" ".join(words), f"topic_{WORDS[i % 3]}"])
    return folder, data


def write_config(tmp: Path, tiny: tuple[Path, Path], **extra: Any) -> Path:
    cfg = {
        "model": {"name_or_path": str(tiny[0])},
        "data": {"source": str(tiny[1]), "max_length": 16},
        "method": {"name": "lora", "r": 4, "lora_alpha": 8, "target_modules": "all-linear"},
        "train": {
            "epochs": 12,
            "batch_size": 16,
            "learning_rate": 2e-2,
            "progress": False,
            "device": "cpu",
        },
        "output_dir": str(tmp / "cv"),
        **extra,
    }
    path = tmp / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_cli_cv_reports_mean_and_std_of_the_folds(
    tiny: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = write_config(tmp_path, tiny)
    assert main(["cv", str(config), "--folds", "3"]) == 0
    out = capsys.readouterr().out
    assert out.count("fold ") >= 3 and "±" in out
    result = json.loads((tmp_path / "cv" / "cv.json").read_text())
    rows = result["per_fold"]
    assert [r["fold"] for r in rows] == [0, 1, 2]
    for key in ("accuracy", "macro_f1", "loss"):
        values = [r[key] for r in rows]
        assert result["mean"][key] == pytest.approx(statistics.fmean(values))
        assert result["std"][key] == pytest.approx(statistics.pstdev(values))
    # The held-out folds partition the training split (120 of 150 after val/test).
    held = [i for r in rows for i in r["held_out_indices"]]
    assert sorted(held) == list(range(120)) and result["train_examples"] == 120
    assert all(r["held_out_examples"] == 40 and r["train_examples"] == 80 for r in rows)
    assert result["mean"]["accuracy"] > 0.5, rows  # above chance (1/3): the folds learn
    log = (tmp_path / "cv" / "cv.jsonl").read_text().splitlines()
    assert [json.loads(line)["fold"] for line in log] == [0, 1, 2]
    for k in range(3):
        assert (tmp_path / "cv" / f"fold_{k}" / "log.jsonl").read_text().strip()


def test_cv_with_a_closed_form_method(tiny: tuple[Path, Path], tmp_path: Path) -> None:
    from deltatune.run import load_run_config
    from deltatune.train.cv import cross_validate

    cfg = load_run_config(
        write_config(tmp_path, tiny),
        ["method.name=features", "cv.folds=2", "train.learning_rate=null"],
    )
    result = cross_validate(cfg, echo=lambda *_: None)
    assert len(result.folds) == 2
    accs = [r["accuracy"] for r in result.folds]
    assert result.mean["accuracy"] == pytest.approx(sum(accs) / 2)
    assert result.std["accuracy"] == pytest.approx(abs(accs[0] - accs[1]) / 2)


def test_train_run_augments_the_training_set_only(
    tiny: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import deltatune.run as run
    from deltatune.data.augment import AugmentedTextDataset

    seen: dict[str, Any] = {}

    class Stop(Exception):
        pass

    def fake_fit(model: Any, task: Any, train_ds: Any, val_ds: Any, *args: Any, **kw: Any) -> Any:
        seen["train"], seen["val"] = train_ds, val_ds
        raise Stop

    monkeypatch.setattr(run, "fit", fake_fit)
    cfg = run.load_run_config(
        write_config(tmp_path, tiny), ["augment.text=[token_dropout]", "augment.token_dropout=0.5"]
    )
    with pytest.raises(Stop):
        run.train_run(cfg, echo=lambda *_: None)
    assert isinstance(seen["train"], AugmentedTextDataset)
    assert not isinstance(seen["val"], AugmentedTextDataset)
    torch.manual_seed(0)
    base = seen["train"].base[0]["input_ids"]
    shorter = [len(seen["train"][0]["input_ids"]) for _ in range(20)]
    assert min(shorter) < len(base) and max(shorter) <= len(base)

    cfg = run.load_run_config(write_config(tmp_path, tiny), [])
    with pytest.raises(Stop):
        run.train_run(cfg, echo=lambda *_: None)
    assert not isinstance(seen["train"], AugmentedTextDataset)  # off by default

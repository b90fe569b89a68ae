"""Knowledge distillation: the loss equals the formula written out; a student learns a teacher."""

from __future__ import annotations

import csv
import json
import math
import random
from pathlib import Path

import pytest
import torch
import yaml

from conftest import make_bert, text_inputs
from deltatune.cli import main
from deltatune.errors import ConfigError, DeltatuneError
from deltatune.train.distill import DistillationTask, DistillConfig, distillation_loss


def reference_loss(s: torch.Tensor, t: torch.Tensor, y: torch.Tensor, T: float, a: float) -> float:
    """alpha T^2 KL(softmax(t/T) || softmax(s/T)) + (1 - alpha) CE, element by element."""
    total_kl = 0.0
    total_ce = 0.0
    for row_s, row_t, label in zip(s.tolist(), t.tolist(), y.tolist()):
        zs = [math.exp(v / T) for v in row_s]
        zt = [math.exp(v / T) for v in row_t]
        ps = [v / sum(zs) for v in zs]
        pt = [v / sum(zt) for v in zt]
        total_kl += sum(p * (math.log(p) - math.log(q)) for p, q in zip(pt, ps))
        e = [math.exp(v) for v in row_s]
        total_ce += -math.log(e[label] / sum(e))
    n = len(y)
    return a * T * T * total_kl / n + (1 - a) * total_ce / n


@pytest.mark.parametrize(("T", "alpha"), [(1.0, 0.5), (2.0, 0.7), (4.0, 1.0), (3.0, 0.0)])
def test_loss_equals_the_formula(T: float, alpha: float) -> None:
    g = torch.Generator().manual_seed(0)
    s = torch.randn(6, 5, generator=g, dtype=torch.float64) * 3
    t = torch.randn(6, 5, generator=g, dtype=torch.float64) * 3
    y = torch.randint(0, 5, (6,), generator=g)
    got = float(distillation_loss(s, t, y, T, alpha))
    assert got == pytest.approx(reference_loss(s, t, y, T, alpha), rel=1e-5, abs=1e-6)


def test_identical_logits_leave_only_the_label_term() -> None:
    s = torch.randn(4, 3)
    y = torch.tensor([0, 1, 2, 0])
    assert float(distillation_loss(s, s.clone(), y, 2.0, 1.0)) == pytest.approx(0.0, abs=1e-6)
    ce = float(torch.nn.functional.cross_entropy(s, y))
    assert float(distillation_loss(s, s.clone(), y, 2.0, 0.4)) == pytest.approx(0.6 * ce, rel=1e-5)


def test_student_learns_the_teacher_and_the_teacher_stays_frozen() -> None:
    teacher = make_bert()
    student = make_bert()
    with torch.no_grad():  # a different student: re-initialise its weights
        torch.manual_seed(5)
        for p in student.parameters():
            p.normal_(0, 0.05)
    before_teacher = {k: v.clone() for k, v in teacher.state_dict().items()}
    task = DistillationTask(teacher, temperature=2.0, alpha=1.0, num_labels=3)
    student.train()
    opt = torch.optim.Adam(student.parameters(), lr=3e-3)
    batch = {**text_inputs(batch=8, seed=3), "labels": torch.zeros(8, dtype=torch.long)}
    losses = []
    for _ in range(40):
        loss = task.loss(student, batch)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.2 * losses[0], losses[::10]
    assert all(p.grad is None for p in teacher.parameters())
    assert all(torch.equal(v, before_teacher[k]) for k, v in teacher.state_dict().items())


def test_config_errors_name_the_field() -> None:
    with pytest.raises(ConfigError, match=r"distill.temperature: value 0"):
        DistillConfig(temperature=0)
    with pytest.raises(ConfigError, match=r"distill.alpha: value 1.5"):
        DistillConfig(alpha=1.5)
    with pytest.raises(ConfigError, match=r"distill.student_layers"):
        DistillConfig(student_layers=0)
    with pytest.raises(DeltatuneError, match="differ"):
        distillation_loss(
            torch.zeros(2, 3), torch.zeros(2, 4), torch.zeros(2, dtype=torch.long), 1, 1
        )


# --------------------------------------------------------------------------- whole run, CLI

WORDS = ["alpha", "bravo", "charlie"]
FILLER = [f"w{i}" for i in range(40)]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A tiny 3-layer BERT folder and a keyword-labelled CSV."""
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizer

    folder = tmp_path_factory.mktemp("tiny-bert")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS, *FILLER]
    BertTokenizer(vocab={t: i for i, t in enumerate(vocab)}).save_pretrained(folder)
    cfg = BertConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        num_hidden_layers=3,
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


def write_config(tmp: Path, tiny: tuple[Path, Path], **extra: object) -> Path:
    cfg = {
        "model": {"name_or_path": str(tiny[0])},
        "data": {"source": str(tiny[1]), "max_length": 16},
        "method": {"name": "full"},
        "train": {
            "epochs": 10,
            "batch_size": 16,
            "learning_rate": 3e-3,
            "progress": False,
            "device": "cpu",
        },
        "output_dir": str(tmp / "teacher"),
        **extra,
    }
    path = tmp / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_cli_distills_a_smaller_student(
    tiny: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = write_config(tmp_path, tiny)
    assert main(["train", str(config)]) == 0
    teacher = tmp_path / "teacher"
    student = tmp_path / "student"
    code = main(
        [
            "distill",
            str(config),
            "distill.student_layers=2",
            "distill.latency_repeats=2",
            "--teacher",
            str(teacher),
            "--output-dir",
            str(student),
        ]
    )
    out = capsys.readouterr().out
    assert code == 0, out
    assert "teacher" in out and "student" in out
    d = json.loads((student / "metrics.json").read_text())["distill"]
    assert d["student"]["layers"] == 2 and d["student"]["method"] == "full"
    assert d["student"]["params"] < d["teacher"]["params"]
    assert d["teacher"]["test_accuracy"] >= 0.9
    assert d["student"]["test_accuracy"] >= 0.8, d
    # The student folder is an ordinary run: it evaluates to the accuracy it reported.
    from deltatune.run import evaluate_run, load_run

    assert evaluate_run(student, [])["accuracy"] == pytest.approx(d["student"]["test_accuracy"])
    cfg, model, _, _ = load_run(student)
    assert len(model.bert.encoder.layer) == 2
    assert Path(cfg.model.name_or_path) == student / "student_base"


def test_distill_errors(tiny: tuple[Path, Path], tmp_path: Path) -> None:
    from deltatune.run import load_run_config
    from deltatune.train.distill import distill_run

    config = write_config(tmp_path, tiny)
    with pytest.raises(ConfigError, match=r"distill.teacher: is null"):
        distill_run(load_run_config(config, []))
    with pytest.raises(ConfigError, match="not a folder"):
        distill_run(load_run_config(config, [f"distill.teacher={tmp_path / 'nope'}"]))
    with pytest.raises(ConfigError, match="closed form"):
        distill_run(
            load_run_config(config, ["method.name=features", f"distill.teacher={tmp_path}"])
        )

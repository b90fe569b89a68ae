"""``deltatune adapt | semisup | reward | dpo`` and ``generate --compare-base``, end to end on
tiny random-init models saved to folders; the shipped strategy configs; one-line errors."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from conftest import make_llama
from deltatune.cli import main
from deltatune.strategies.adapt import load_adapt_config
from deltatune.strategies.dpo import load_dpo_config
from deltatune.strategies.reward import load_reward_config
from deltatune.strategies.semisup import load_semisup_config
from test_strategies_unlabelled import soups, tiny_bert, word_tokenizer

CONFIGS = Path(__file__).resolve().parent.parent / "configs" / "strategies"
QUIET = ["train.progress=false", "train.device=cpu"]


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    tok = word_tokenizer()
    bert = root / "bert"
    tiny_bert(dropout=0.1).save_pretrained(bert)
    tok.save_pretrained(bert)
    llama = root / "llama"
    make_llama().save_pretrained(llama)
    tok.save_pretrained(llama)
    texts = root / "texts.txt"
    texts.write_text("\n".join(soups(40)) + "\n", encoding="utf-8")
    prefs = root / "prefs.jsonl"
    rows = [
        {"prompt": f"the cat {i}", "chosen": "sat on the mat", "rejected": "dog ran fast"}
        for i in range(12)
    ]
    prefs.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return {"bert": bert, "llama": llama, "texts": texts, "prefs": prefs}


@pytest.mark.parametrize(
    ("name", "loader"),
    [
        ("adapt-mlm.yaml", load_adapt_config),
        ("adapt-simcse.yaml", load_adapt_config),
        ("adapt-causal.yaml", load_adapt_config),
        ("semisup.yaml", load_semisup_config),
        ("reward.yaml", load_reward_config),
        ("dpo.yaml", load_dpo_config),
    ],
)
def test_shipped_strategy_configs_parse(name: str, loader: Any) -> None:
    cfg = loader(CONFIGS / name, [])
    assert cfg.output_dir.startswith("runs/")


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["adapt", "objective.name=mlmm"], "objective.name: value 'mlmm' is not one of"),
        (["adapt", "objective.mlm_probability=1.5"], "objective.mlm_probability: value 1.5"),
        (["adapt", "method.name=features"], "fitted in closed form"),
        (
            ["adapt", "corpus.sorce=x"],
            "unknown config key 'sorce' in config.corpus; did you mean 'source'",
        ),
        (["semisup", "semisup.threshold=2"], "semisup.threshold: value 2.0 must be in [0, 1]"),
        (["reward", "data.eval_fraction=0"], "data.eval_fraction"),
        (["dpo", "dpo.beta=0"], "dpo.beta: value 0.0 must be > 0"),
        (
            ["dpo", "data.source=/nope.jsonl", "train.device=cpu"],
            "data.source: '/nope.jsonl' does not exist",
        ),
    ],
)
def test_bad_input_is_one_line_error(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and "\n" not in err


def test_semisup_label_budget_larger_than_the_data(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = tmp_path / "d.csv"
    data.write_text(
        "text,label\n" + "".join(f"doc {i},{i % 2}\n" for i in range(20)), encoding="utf-8"
    )
    code = main(["semisup", f"data.source={data}", "semisup.labels_per_class=50", *QUIET])
    assert code == 2
    assert "semisup.labels_per_class: value 50 is larger than the" in capsys.readouterr().err


def test_adapt_mlm_then_the_adapted_encoder_is_a_classifier_base(
    folders: dict[str, Path], tmp_path: Path
) -> None:
    out = tmp_path / "mlm"
    argv = [
        "adapt",
        f"model.name_or_path={folders['bert']}",
        f"corpus.source={folders['texts']}",
        "corpus.val_fraction=0.2",
        "objective.max_length=16",
        "train.max_steps=3",
        "train.batch_size=8",
        f"output_dir={out}",
        *QUIET,
    ]
    assert main(argv) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == 3 and metrics["val_before"]["loss"] > 0 and metrics["val_after"]
    assert (out / "adapter_model.safetensors").is_file() and (out / "adapt_config.yaml").is_file()
    from safetensors.torch import load_file
    from transformers import AutoModelForSequenceClassification

    saved = load_file(str(out / "model" / "model.safetensors"))
    original = load_file(str(folders["bert"] / "model.safetensors"))
    assert not any(k.startswith("cls.") for k in saved)  # the MLM head is dropped
    changed = [k for k in original if "encoder" in k and not (saved[k] == original[k]).all()]
    assert changed  # the merged adapter moved the encoder
    clf = AutoModelForSequenceClassification.from_pretrained(out / "model", num_labels=3)
    assert clf.config.num_labels == 3


@pytest.mark.parametrize("objective", ["simcse", "causal-lm"])
def test_adapt_simcse_and_causal_lm(
    objective: str, folders: dict[str, Path], tmp_path: Path
) -> None:
    model = folders["llama"] if objective == "causal-lm" else folders["bert"]
    out = tmp_path / objective
    argv = [
        "adapt",
        f"model.name_or_path={model}",
        f"corpus.source={folders['texts']}",
        f"objective.name={objective}",
        "objective.max_length=16",
        "objective.block_size=16",
        "train.max_steps=2",
        "train.batch_size=4",
        "method.name=full",
        f"output_dir={out}",
        *QUIET,
    ]
    assert main(argv) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert (
        metrics["method"] == "full"
        and metrics["val_after"]["loss"] != metrics["val_before"]["loss"]
    )
    assert (out / "model" / "config.json").is_file()


def test_reward_and_dpo_then_generate_compare(
    folders: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    common = [
        f"data.source={folders['prefs']}",
        "data.eval_fraction=0.25",
        "data.max_length=24",
        "train.batch_size=4",
        *QUIET,
    ]
    out = tmp_path / "reward"
    assert (
        main(
            [
                "reward",
                f"model.name_or_path={folders['bert']}",
                "train.max_steps=2",
                f"output_dir={out}",
                *common,
            ]
        )
        == 0
    )
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["eval_pairs"] == 3 and 0.0 <= metrics["after"]["accuracy"] <= 1.0
    out = tmp_path / "dpo"
    assert (
        main(
            [
                "dpo",
                f"model.name_or_path={folders['llama']}",
                "train.max_steps=3",
                "train.learning_rate=1e-2",
                "dpo.beta=0.5",
                f"output_dir={out}",
                *common,
            ]
        )
        == 0
    )
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["before"]["margin"] == 0.0  # policy == reference before training
    assert metrics["after"]["margin"] > 0 and metrics["after"]["accuracy"] == 1.0
    capsys.readouterr()
    code = main(
        [
            "generate",
            "--model",
            str(folders["llama"]),
            "--adapter",
            str(out),
            "--compare-base",
            "--prompt",
            "the cat",
            "--max-new-tokens",
            "4",
            "--json",
            "--no-chat-template",
        ]
    )
    assert code == 0
    row = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(row) == {"prompt", "base", "adapter"} and row["prompt"] == "the cat"

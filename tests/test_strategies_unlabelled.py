"""Domain-adaptive training on unlabelled text: corpus input, MLM, SimCSE, causal-LM packing.

Tiny random-init models from conftest and a word-level tokenizer; every loss is checked
against the formula written out here.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

import deltatune as dt
from deltatune.errors import ConfigError, DeltatuneError
from deltatune.strategies.causal_text import PackedCollator, causal_lm_task, pack_texts
from deltatune.strategies.corpus import CorpusConfig, load_corpus, split_corpus
from deltatune.strategies.mlm import (
    MLMDataset,
    MLMTask,
    head_parameters,
    mlm_collator,
    with_mlm_head,
)
from deltatune.strategies.simcse import SimCSETask, pool, simcse_loss

WORDS = ["the", "cat", "sat", "on", "mat", "dog", "ran", "fast", "slow", "red", "blue", "big"]


def word_tokenizer() -> Any:
    from transformers import BertTokenizer

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
    tok = BertTokenizer(vocab={w: i for i, w in enumerate(vocab)})
    tok.eos_token = "[SEP]"
    return tok


def tiny_bert(dropout: float = 0.0) -> Any:
    from transformers import BertConfig, BertModel

    cfg = BertConfig(
        vocab_size=20,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
        hidden_dropout_prob=dropout,
        attention_probs_dropout_prob=dropout,
    )
    torch.manual_seed(0)
    return BertModel(cfg)


def soups(n: int, seed: int = 0) -> list[str]:
    g = torch.Generator().manual_seed(seed)
    return [
        " ".join(
            WORDS[int(i)]
            for i in torch.randint(
                len(WORDS), (int(torch.randint(4, 12, (1,), generator=g)),), generator=g
            )
        )
        for _ in range(n)
    ]


# --------------------------------------------------------------------------- corpus


def test_corpus_text_file_folder_csv_jsonl(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("first line\n\nsecond line\n", encoding="utf-8")
    assert load_corpus(CorpusConfig(source=str(tmp_path / "a.txt"))) == [
        "first line",
        "second line",
    ]
    assert load_corpus(CorpusConfig(source=str(tmp_path / "a.txt"), unit="file")) == [
        "first line\n\nsecond line"
    ]
    folder = tmp_path / "docs"
    (folder / "sub").mkdir(parents=True)
    (folder / "b.txt").write_text("doc b", encoding="utf-8")
    (folder / "sub" / "c.txt").write_text("doc c\nmore", encoding="utf-8")
    assert load_corpus(CorpusConfig(source=str(folder))) == ["doc b", "doc c\nmore"]
    (tmp_path / "t.csv").write_text("body,x\nhello,1\nworld,2\n", encoding="utf-8")
    assert load_corpus(CorpusConfig(source=str(tmp_path / "t.csv"), text_column="body")) == [
        "hello",
        "world",
    ]
    rows = [{"body": "one"}, {"body": "two"}, {"body": "three"}]
    (tmp_path / "t.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    cfg = CorpusConfig(source=str(tmp_path / "t.jsonl"), text_column="body", max_texts=2)
    texts = load_corpus(cfg)
    assert len(texts) == 2 and set(texts) <= {"one", "two", "three"}
    train, held = split_corpus(["a", "b", "c", "d"], 0.25, seed=0)
    assert len(train) == 3 and len(held) == 1 and set(train) | set(held) == {"a", "b", "c", "d"}


def test_corpus_errors_name_the_row_and_field(tmp_path: Path) -> None:
    (tmp_path / "t.jsonl").write_text('{"body": "ok"}\n{"body": "  "}\n', encoding="utf-8")
    with pytest.raises(DeltatuneError, match=r"line 2: column 'body' is empty"):
        load_corpus(CorpusConfig(source=str(tmp_path / "t.jsonl"), text_column="body"))
    (tmp_path / "t.csv").write_text('text\nfine\n""\n', encoding="utf-8")
    with pytest.raises(DeltatuneError, match=r"line 3: column 'text' is empty"):
        load_corpus(CorpusConfig(source=str(tmp_path / "t.csv")))
    with pytest.raises(
        ConfigError, match=r"corpus.text_column: column 'txt' .*did you mean 'text'"
    ):
        load_corpus(CorpusConfig(source=str(tmp_path / "t.csv"), text_column="txt"))
    folder = tmp_path / "f"
    folder.mkdir()
    (folder / "empty.txt").write_text("  \n", encoding="utf-8")
    with pytest.raises(DeltatuneError, match=r"empty\.txt' is empty"):
        load_corpus(CorpusConfig(source=str(folder)))
    with pytest.raises(ConfigError, match=r"corpus\.source: .* does not exist"):
        load_corpus(CorpusConfig(source=str(tmp_path / "missing.txt")))
    with pytest.raises(ConfigError, match=r"corpus\.max_texts"):
        CorpusConfig(max_texts=0)


# --------------------------------------------------------------------------- MLM


def test_mlm_head_is_tied_and_shares_the_encoder() -> None:
    enc = tiny_bert()
    mlm = with_mlm_head(enc)
    assert mlm.get_output_embeddings().weight is enc.get_input_embeddings().weight
    assert mlm.bert is enc  # the same module, not a copy
    head = head_parameters(mlm)
    assert head and all(id(p) not in {id(q) for q in enc.parameters()} for p in head)


def test_mlm_masking_rate_and_special_tokens() -> None:
    tok = word_tokenizer()
    texts = soups(200)
    ds = MLMDataset(texts, tok, max_length=16)
    torch.manual_seed(0)
    batch = mlm_collator(tok, 0.3)([ds[i] for i in range(len(ds))])
    labels, ids, mask = batch["labels"], batch["input_ids"], batch["attention_mask"]
    special = torch.isin(
        torch.tensor(tok(texts[:1], truncation=True, max_length=16)["input_ids"][0][:1]),
        torch.tensor(tok.all_special_ids),
    )
    assert bool(special.all())  # [CLS] is special
    picked = labels != -100
    original = torch.where(picked, labels, ids)
    is_special = torch.isin(original, torch.tensor(tok.all_special_ids)) | (mask == 0)
    assert not bool((picked & is_special).any())  # never [CLS]/[SEP]/padding
    rate = float(picked.sum()) / float((~is_special).sum())
    assert abs(rate - 0.3) < 0.05, rate
    # 80% of the picked become [MASK], 10% random, 10% unchanged.
    share_mask = float((ids[picked] == tok.mask_token_id).float().mean())
    assert abs(share_mask - 0.8) < 0.08, share_mask
    with pytest.raises(ConfigError, match="mlm_probability"):
        mlm_collator(tok, 1.5)


def test_mlm_loss_matches_cross_entropy_on_masked_positions_and_lora_trains() -> None:
    tok = word_tokenizer()
    enc = tiny_bert()
    dt.inject(enc, dt.LoraConfig(r=4, target_modules=["query", "value"]))
    mlm = with_mlm_head(enc).eval()
    ds = MLMDataset(soups(8), tok, max_length=16)
    torch.manual_seed(1)
    batch = mlm_collator(tok, 0.25)([ds[i] for i in range(8)])
    loss = MLMTask().loss(mlm, batch)
    logits = mlm(**{k: v for k, v in batch.items() if k != "labels"}).logits
    picked = batch["labels"] != -100
    manual = -logits.log_softmax(-1)[picked].gather(1, batch["labels"][picked][:, None]).mean()
    assert torch.allclose(loss, manual, atol=1e-5)
    loss.backward()
    grads = {n for n, p in mlm.named_parameters() if p.grad is not None}
    assert any("lora_A" in n for n in grads) and any(n.startswith("cls.") for n in grads)
    assert not any(n.startswith("bert.") and "lora" not in n for n in grads)  # base frozen
    metrics = MLMTask().evaluate(mlm, [batch])
    assert math.isclose(metrics["perplexity"], math.exp(metrics["loss"]), rel_tol=1e-6)


# --------------------------------------------------------------------------- SimCSE


def test_simcse_loss_matches_the_formula() -> None:
    torch.manual_seed(0)
    z1, z2, tau = torch.randn(5, 8), torch.randn(5, 8), 0.05
    total = 0.0
    for i in range(5):
        sims = [float(z1[i] @ z2[j] / (z1[i].norm() * z2[j].norm())) / tau for j in range(5)]
        total += -math.log(math.exp(sims[i]) / sum(math.exp(s) for s in sims))
    assert math.isclose(float(simcse_loss(z1, z2, tau)), total / 5, rel_tol=1e-4)
    hidden = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [100.0, 100.0]]])
    assert torch.allclose(
        pool(hidden, torch.tensor([[1, 1, 0]]), "mean"), torch.tensor([[2.0, 3.0]])
    )
    assert torch.allclose(
        pool(hidden, torch.tensor([[1, 1, 0]]), "cls"), torch.tensor([[1.0, 2.0]])
    )


def test_simcse_views_differ_by_dropout_and_training_lowers_the_loss() -> None:
    from transformers import DataCollatorWithPadding

    tok = word_tokenizer()
    enc = tiny_bert(dropout=0.1).train()
    dt.inject(enc, dt.LoraConfig(r=4, target_modules="all-linear"))
    ds = MLMDataset(soups(16, seed=3), tok, max_length=16)
    batch = DataCollatorWithPadding(tok)([ds[i] for i in range(16)])
    task = SimCSETask(temperature=0.1)
    before = task.evaluate(enc, [batch])
    opt = torch.optim.AdamW(dt.trainable_parameters(enc), lr=1e-2)
    for _ in range(15):
        opt.zero_grad()
        task.loss(enc, batch).backward()
        opt.step()
    after = task.evaluate(enc, [batch])
    assert after["loss"] < before["loss"]
    with torch.no_grad():  # eval mode: dropout off, the two views are equal
        enc.eval()
        from deltatune.strategies.simcse import embed

        assert torch.equal(embed(enc, batch, "mean"), embed(enc, batch, "mean"))


# --------------------------------------------------------------------------- causal LM


def test_pack_texts_puts_eos_between_documents() -> None:
    tok = word_tokenizer()
    eos = tok.eos_token_id
    docs = ["the cat", "dog ran fast", "red big"]
    blocks = pack_texts(docs, tok, block_size=4)
    ids = tok.convert_tokens_to_ids
    expected = [
        *ids(["the", "cat"]),
        eos,
        *ids(["dog", "ran", "fast"]),
        eos,
        *ids(["red", "big"]),
        eos,
    ]
    assert blocks == [expected[0:4], expected[4:8], expected[8:10]]
    assert pack_texts(docs, tok, 4, drop_last=True) == [expected[0:4], expected[4:8]]
    # A last block of one token has no next token to predict: dropped.
    assert pack_texts(["the cat", "dog ran fast", "red"], tok, 4) == [expected[0:4], expected[4:8]]
    with pytest.raises(DeltatuneError, match="corpus text 1 is empty"):
        pack_texts(["the", " "], tok, 4)


def test_causal_lm_text_loss_matches_shifted_cross_entropy(llama: Any) -> None:
    tok = word_tokenizer()
    blocks = pack_texts(soups(10), tok, block_size=8)
    batch = PackedCollator(tok.pad_token_id)([{"input_ids": b} for b in blocks[:3]])
    loss = causal_lm_task().loss(llama, batch)
    logits = llama(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    manual = F.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]),
        batch["labels"][:, 1:].reshape(-1),
        ignore_index=-100,
    )
    assert torch.allclose(loss, manual, atol=1e-5)

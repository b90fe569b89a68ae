"""Preference fine-tuning: data, the Bradley-Terry reward model, DPO (loss, gradients, reference)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch

import deltatune as dt
from conftest import ALL_CASES
from deltatune.errors import DeltatuneError
from deltatune.strategies.dpo import (
    DPOCollator,
    DPODataset,
    DPOTask,
    dpo_loss,
    prepare_dpo,
    sequence_logprobs,
)
from deltatune.strategies.preference import (
    PreferencePair,
    load_preference_file,
    split_preference_pairs,
    toy_preference_pairs,
)
from deltatune.strategies.reward import PairCollator, PairDataset, RewardTask, pairwise_loss
from test_strategies_unlabelled import word_tokenizer


def write_jsonl(path: Path, rows: list[Any]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


PAIRS = [
    PreferencePair("the cat", "sat on the mat", "dog ran fast"),
    PreferencePair("the dog", "ran fast", "red blue big"),
    PreferencePair("red cat", "sat on mat", "slow slow"),
    PreferencePair("big dog", "ran on the mat", "blue"),
]


# --------------------------------------------------------------------------- data


def test_preference_file_and_its_errors(tmp_path: Path) -> None:
    good = {"prompt": "p", "chosen": "c", "rejected": "r"}
    assert (
        load_preference_file(write_jsonl(tmp_path / "ok.jsonl", [good, good]))
        == [PreferencePair("p", "c", "r")] * 2
    )
    bad = write_jsonl(tmp_path / "bad.jsonl", [good, {"prompt": "p", "chosen": "c"}])
    with pytest.raises(DeltatuneError, match=r"bad.jsonl' line 2: missing field 'rejected'"):
        load_preference_file(bad)
    empty = write_jsonl(tmp_path / "empty.jsonl", [{**good, "chosen": "  "}])
    with pytest.raises(DeltatuneError, match=r"line 1: field 'chosen' is empty"):
        load_preference_file(empty)
    wrong = write_jsonl(tmp_path / "wrong.jsonl", [{**good, "prompt": 3}])
    with pytest.raises(DeltatuneError, match=r"line 1: field 'prompt' must be a string"):
        load_preference_file(wrong)
    (tmp_path / "broken.jsonl").write_text('{"prompt": \n', encoding="utf-8")
    with pytest.raises(DeltatuneError, match="line 1 is not valid JSON"):
        load_preference_file(tmp_path / "broken.jsonl")


def test_toy_pairs_from_the_instruction_corpus() -> None:
    pairs = toy_preference_pairs(seed=0)
    assert len(pairs) > 1000
    assert all(p.chosen != p.rejected for p in pairs)
    assert pairs == toy_preference_pairs(seed=0)
    train, held = split_preference_pairs(pairs, 0.1, seed=0, max_eval=20)
    assert len(held) == 20 and not {p.prompt for p in train} & {p.prompt for p in held}


# --------------------------------------------------------------------------- reward model


def test_pairwise_loss_is_bradley_terry() -> None:
    rc, rr = torch.tensor([1.0, -0.5, 2.0]), torch.tensor([0.0, 0.5, 2.5])
    manual = (
        sum(-math.log(1 / (1 + math.exp(-(a - b)))) for a, b in zip(rc.tolist(), rr.tolist())) / 3
    )
    assert math.isclose(float(pairwise_loss(rc, rr)), manual, rel_tol=1e-6)


def test_reward_model_learns_the_preference() -> None:
    from transformers import BertConfig, BertForSequenceClassification

    tok = word_tokenizer()
    torch.manual_seed(0)
    model = BertForSequenceClassification(
        BertConfig(
            vocab_size=20,
            hidden_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=32,
            num_labels=1,
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
        )
    )
    dt.inject(model, dt.FullConfig())
    ds = PairDataset(PAIRS, tok, max_length=16)
    batch = PairCollator(tok)([ds[i] for i in range(len(ds))])
    assert batch["input_ids"].shape[0] == 8  # chosen rows, then rejected rows
    task = RewardTask()
    before = task.evaluate(model.eval(), [batch])
    model.train()
    opt = torch.optim.AdamW(dt.trainable_parameters(model), lr=1e-3)
    for _ in range(25):
        opt.zero_grad()
        task.loss(model, batch).backward()
        opt.step()
    metrics = task.evaluate(model.eval(), [batch])
    assert metrics["accuracy"] == 1.0 and metrics["margin"] > 0
    assert metrics["loss"] < before["loss"]


# --------------------------------------------------------------------------- DPO


def test_dpo_loss_matches_the_formula_on_hand_made_logprobs() -> None:
    beta = 0.1
    pc = torch.tensor([-5.0, -3.0, -7.5], requires_grad=True)
    pr = torch.tensor([-6.0, -2.0, -7.0], requires_grad=True)
    rc = torch.tensor([-5.5, -3.2, -7.0])
    rr = torch.tensor([-5.8, -2.5, -7.1])
    loss, chosen_r, rejected_r = dpo_loss(pc, pr, rc, rr, beta)
    # L = -1/N sum log sigma(beta * ((pc - rc) - (pr - rr)))
    hs = [
        beta * ((a - c) - (b - d))
        for a, b, c, d in zip(pc.tolist(), pr.tolist(), rc.tolist(), rr.tolist())
    ]
    manual = sum(math.log(1 + math.exp(-h)) for h in hs) / 3
    assert math.isclose(float(loss.detach()), manual, rel_tol=1e-6)
    assert torch.allclose(chosen_r - rejected_r, torch.tensor(hs))
    loss.backward()
    # dL/d pc_i = -beta * sigma(-h_i) / N, dL/d pr_i = +beta * sigma(-h_i) / N
    expected = torch.tensor([-beta / (1 + math.exp(h)) / 3 for h in hs])
    assert torch.allclose(pc.grad, expected, atol=1e-7)
    assert torch.allclose(pr.grad, -expected, atol=1e-7)


def test_sequence_logprobs_sums_the_answer_tokens_only(llama: Any) -> None:
    tok = word_tokenizer()
    batch = DPOCollator(tok.pad_token_id)([DPODataset(PAIRS[:2], tok, 24)[i] for i in range(2)])
    got = sequence_logprobs(llama, batch)
    logits = llama(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    logp = logits.log_softmax(-1)
    for row in range(batch["input_ids"].shape[0]):
        total = 0.0
        for t in range(1, batch["input_ids"].shape[1]):
            label = int(batch["labels"][row, t])
            if label != -100:
                total += float(logp[row, t - 1, label].detach())
        assert math.isclose(float(got[row].detach()), total, rel_tol=1e-5)


def test_dpo_reference_is_the_disabled_adapter_and_only_the_adapter_learns(llama: Any) -> None:
    tok = word_tokenizer()
    dt.inject(llama, dt.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    base = {n: p.detach().clone() for n, p in llama.named_parameters() if not p.requires_grad}
    task = prepare_dpo(llama, beta=0.5)
    assert task.reference is None  # no second copy in memory
    ds = DPODataset(PAIRS, tok, 24)
    batch = DPOCollator(tok.pad_token_id)([ds[i] for i in range(4)])
    llama.train()
    loss = task.loss(llama, batch)
    assert math.isclose(
        float(loss.detach()), math.log(2), rel_tol=1e-6
    )  # LoRA B = 0: policy == reference
    loss.backward()
    grads = {n for n, p in llama.named_parameters() if p.grad is not None}
    assert grads and all("lora_" in n for n in grads)
    assert any(
        "lora_B" in n and float(p.grad.abs().sum()) > 0
        for n, p in llama.named_parameters()
        if p.grad is not None
    )
    opt = torch.optim.AdamW(dt.trainable_parameters(llama), lr=1e-2)
    for _ in range(5):
        opt.step()
        opt.zero_grad()
        task.loss(llama, batch).backward()
    after = task.evaluate(llama.eval(), [batch])
    assert after["loss"] < math.log(2) and after["margin"] > 0 and after["accuracy"] > 0.5
    for n, p in llama.named_parameters():
        if n in base:
            assert torch.equal(p, base[n]), n  # the base (the reference) never moved
    with dt.disabled(llama):  # and the disabled model is still exactly the reference
        ref_again = sequence_logprobs(llama, batch)
    with torch.no_grad():
        _, _, ref_chosen, ref_rejected = task._logps(llama, batch)
    assert torch.allclose(ref_again, torch.cat([ref_chosen, ref_rejected]))


def test_dpo_with_full_fine_tuning_uses_a_frozen_copy(llama: Any) -> None:
    tok = word_tokenizer()
    dt.inject(llama, dt.FullConfig())
    messages: list[str] = []
    task = prepare_dpo(llama, beta=0.1, echo=messages.append)
    assert task.reference is not None and "frozen copy" in messages[0]
    assert not any(p.requires_grad for p in task.reference.parameters())
    ds = DPODataset(PAIRS[:2], tok, 24)
    batch = DPOCollator(tok.pad_token_id)([ds[i] for i in range(2)])
    task.loss(llama, batch).backward()
    assert all(p.grad is None for p in task.reference.parameters())
    assert any(p.grad is not None for p in llama.parameters())
    with pytest.raises(Exception, match=r"dpo\.beta"):
        DPOTask(beta=0)


DECODER_CASES = [
    c for c in ALL_CASES if c.model in ("llama", "gpt2") and dt.get_method(c.method).fit is None
]


@pytest.mark.parametrize("case", DECODER_CASES, ids=lambda c: c.id)
def test_dpo_works_with_every_method(case: Any) -> None:
    """Every registered decoder method: the reference equals a fresh base model, the loss
    starts at log 2 when the method starts as the identity, gradients reach only the
    method's trainable parameters."""
    tok = word_tokenizer()
    model = case.make_model()
    dt.inject(model, case.config())
    model.eval()  # no dropout: policy and reference compare exactly
    task = prepare_dpo(model, beta=0.5, echo=lambda *_: None)
    ds = DPODataset(PAIRS[:2], tok, 20)
    batch = DPOCollator(tok.pad_token_id)([ds[i] for i in range(2)])
    with torch.no_grad():
        _, _, ref_chosen, ref_rejected = task._logps(model, batch)
        base_logps = sequence_logprobs(case.make_base().eval(), batch)
    assert torch.allclose(torch.cat([ref_chosen, ref_rejected]), base_logps, atol=1e-5)
    loss = task.loss(model, batch)
    identity_start = case.starts_like == () and case.options.get("init_lora_weights") is not False
    if identity_start:
        assert math.isclose(float(loss.detach()), math.log(2), rel_tol=1e-5), float(loss)
    loss.backward()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert with_grad and with_grad <= trainable
    assert any(float(p.grad.abs().sum()) > 0 for p in model.parameters() if p.grad is not None)
    if task.reference is not None:
        assert all(p.grad is None for p in task.reference.parameters())

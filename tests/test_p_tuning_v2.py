"""P-Tuning v2: deep prompts without reparameterisation, saved in PEFT's prefix-tuning format,
and sequence labelling on an encoder with :class:`TokenClassificationTask`."""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import deltatune as dt
from conftest import SEED, make_gpt2, make_llama, text_inputs
from deltatune.kv_prefix import find_prefix_layer
from deltatune.train import TrainerConfig, fit
from deltatune.train.token_classification import (
    IGNORE_INDEX,
    TokenClassificationTask,
    align_word_labels,
)

NUM_TAGS = 4


def make_bert_tagger() -> nn.Module:
    from transformers import BertConfig, BertForTokenClassification

    config = BertConfig(
        vocab_size=100,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
        num_labels=NUM_TAGS,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    torch.manual_seed(SEED)
    return BertForTokenClassification(config).eval()


def ptv2(**kw: Any) -> dt.MethodConfig:
    return dt.config_from_dict({"name": "p_tuning_v2", "num_virtual_tokens": 4, **kw})


def tagging_data(n: int, seed: int) -> list[dict[str, torch.Tensor]]:
    """Sequences whose tag is the token id mod 4; pads (id 0, mask 0) and the first token
    ([CLS]-like) carry -100."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        length = int(torch.randint(4, 9, (1,), generator=gen))
        ids = torch.zeros(8, dtype=torch.long)
        ids[:length] = torch.randint(1, 100, (length,), generator=gen)
        mask = (torch.arange(8) < length).long()
        labels = (ids % NUM_TAGS).masked_fill(mask == 0, IGNORE_INDEX)
        labels[0] = IGNORE_INDEX
        out.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    return out


def collate(rows: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {k: torch.stack([r[k] for r in rows]) for k in rows[0]}


# --- the task ---------------------------------------------------------------------------------


def test_task_loss_and_accuracy_equal_a_hand_count() -> None:
    model = make_bert_tagger()
    batch = collate(tagging_data(3, seed=1))
    task = TokenClassificationTask(num_labels=NUM_TAGS)
    with torch.no_grad():
        z = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    nll, right, count = 0.0, 0, 0
    for b in range(z.shape[0]):
        for t in range(z.shape[1]):
            y = int(batch["labels"][b, t])
            if y == IGNORE_INDEX:
                continue
            row = z[b, t].double()
            nll += float(-(row[y] - torch.logsumexp(row, 0)))
            right += int(int(row.argmax()) == y)
            count += 1
    assert math.isclose(float(task.loss(model, batch).detach()), nll / count, rel_tol=1e-5)
    metrics = task.evaluate(model, [batch])
    assert math.isclose(metrics["loss"], nll / count, rel_tol=1e-5)
    assert metrics["accuracy"] == right / count


def test_task_edge_cases() -> None:
    model = make_bert_tagger()
    task = TokenClassificationTask()
    batch = collate(tagging_data(2, seed=2))
    batch["labels"].fill_(IGNORE_INDEX)
    loss = task.loss(model, batch)
    assert float(loss.detach()) == 0.0 and loss.requires_grad
    with pytest.raises(dt.DeltatuneError, match="no labelled token"):
        task.evaluate(model, [batch])
    with pytest.raises(dt.DeltatuneError, match="no 'labels'"):
        task.loss(model, {"input_ids": batch["input_ids"]})
    with pytest.raises(dt.DeltatuneError, match="num_labels=7"):
        TokenClassificationTask(num_labels=7).loss(model, collate(tagging_data(2, seed=3)))


def test_align_word_labels() -> None:
    # [CLS] play ##ing football [SEP]
    word_ids = [None, 0, 0, 1, None]
    assert align_word_labels(word_ids, [2, 3]) == [-100, 2, -100, 3, -100]
    assert align_word_labels(word_ids, [2, 3], label_all_pieces=True) == [-100, 2, 2, 3, -100]
    with pytest.raises(dt.DeltatuneError, match="word id 1 has no label"):
        align_word_labels(word_ids, [2])


# --- P-Tuning v2 on sequence labelling --------------------------------------------------------


def test_ptuning_v2_trains_a_tagger_and_saves_it(tmp_path: Path) -> None:
    train, val = tagging_data(48, seed=10), tagging_data(16, seed=11)
    model = make_bert_tagger()
    torch.manual_seed(0)
    dt.inject(model, ptv2(modules_to_save=["classifier"], task_type="TOKEN_CLS"))
    # P: 4 tokens x 2 layers x 2 (k, v) x 32 = 512; classifier copy 32 * 4 + 4 = 132
    assert dt.trainable_report(model).trainable == 512 + 132
    task = TokenClassificationTask(num_labels=NUM_TAGS)
    before = task.evaluate(model, [collate(val)])
    prefix_before = find_prefix_layer(model).prefix("default").detach().clone()  # type: ignore[union-attr]
    cfg = TrainerConfig(
        epochs=6, batch_size=8, learning_rate=3e-2, metric_for_best="accuracy", warmup_ratio=0.0
    )
    result = fit(model, task, train, val, cfg, collate_fn=collate)
    after = task.evaluate(model, [collate(val)])
    assert after["loss"] < before["loss"]
    assert after["accuracy"] > before["accuracy"] + 0.2
    assert result.steps == 36 and result.best_metrics["accuracy"] >= after["accuracy"]
    assert not torch.equal(find_prefix_layer(model).prefix("default"), prefix_before)  # type: ignore[union-attr]
    # Save / load onto a fresh tagger: identical outputs (prefix + trained head).
    dt.save_adapter(model, tmp_path)
    fresh = make_bert_tagger()
    dt.load_adapter(fresh, tmp_path)
    batch = collate(val)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        assert torch.equal(fresh(**inputs).logits, model(**inputs).logits)


def test_peft_reads_our_tagger_as_prefix_tuning(tmp_path: Path) -> None:
    from peft import PeftModel

    batch = collate(tagging_data(3, seed=4))
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    model = make_bert_tagger()
    torch.manual_seed(0)
    dt.inject(model, ptv2(modules_to_save=["classifier"], task_type="TOKEN_CLS"))
    with torch.no_grad():
        model.classifier.modules_to_save["default"].weight.add_(0.3)
        ours = model(**inputs).logits
    dt.save_adapter(model, tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["peft_type"] == "PREFIX_TUNING"
    assert saved["deltatune_method"] == "p_tuning_v2"
    assert dt.read_adapter_config(tmp_path).method_name == "p_tuning_v2"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = PeftModel.from_pretrained(make_bert_tagger(), tmp_path).eval()
    with torch.no_grad():
        assert (theirs(**inputs).logits - ours).abs().max().item() <= 1e-5


@pytest.mark.parametrize("make", [make_gpt2, make_llama], ids=["gpt2", "llama"])
def test_peft_loads_decoder_prompts_with_the_same_outputs(make: Any, tmp_path: Path) -> None:
    from peft import PeftModel

    x = text_inputs()
    model = make()
    torch.manual_seed(0)
    dt.inject(model, ptv2(task_type="CAUSAL_LM"))
    with torch.no_grad():
        ours = model(**x).logits
    dt.save_adapter(model, tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = PeftModel.from_pretrained(make(), tmp_path).eval()
    with torch.no_grad():
        assert (theirs(**x).logits - ours).abs().max().item() <= 1e-5


def test_no_reparameterisation_and_bad_values() -> None:
    model = make_llama()
    dt.inject(model, ptv2(init_weights="zero"))
    layer = find_prefix_layer(model)
    assert layer is not None and not layer.prefix_encoder
    assert torch.count_nonzero(layer.prefix("default")) == 0
    with pytest.raises(dt.ConfigError, match="num_virtual_tokens=-2"):
        ptv2(num_virtual_tokens=-2)
    with pytest.raises(dt.ConfigError, match="unknown config key 'prefix_projection'"):
        ptv2(prefix_projection=True)

"""Pruning: structurally pruned models equal hand-built references; magnitude masks hold."""

from __future__ import annotations

import copy
import csv
import json
import random
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

from conftest import make_bert, make_llama, text_inputs
from deltatune.cli import main
from deltatune.errors import ConfigError
from deltatune.prune import (
    PruneConfig,
    apply_masks,
    apply_structure,
    blocks_of,
    count_params,
    drop_top_layers,
    load_pruned,
    magnitude_masks,
    mask_gradients,
    prune,
    prune_heads,
    prune_neurons,
    select_heads,
    select_neurons,
    structure_of,
)


def logits(model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits


def make_llama_mha() -> nn.Module:
    from transformers import LlamaConfig, LlamaForSequenceClassification

    cfg = LlamaConfig(
        vocab_size=100,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
        num_labels=3,
        pad_token_id=0,
    )
    torch.manual_seed(0)
    return LlamaForSequenceClassification(cfg).eval()


def test_pruned_neurons_equal_zeroed_neurons_bert() -> None:
    inputs = text_inputs()
    model = make_bert()
    removed = {0: [1, 5, 7, 30], 1: list(range(0, 64, 2))}
    reference = copy.deepcopy(model)
    with torch.no_grad():
        for i, gone in removed.items():
            block = reference.bert.encoder.layer[i]
            block.intermediate.dense.weight[gone] = 0
            block.intermediate.dense.bias[gone] = 0  # GELU(0) = 0: the neuron outputs nothing
            block.output.dense.weight[:, gone] = 0
    prune_neurons(model, {i: [k for k in range(64) if k not in g] for i, g in removed.items()})
    assert model.bert.encoder.layer[0].intermediate.dense.out_features == 60
    assert model.bert.encoder.layer[1].output.dense.in_features == 32
    torch.testing.assert_close(logits(model, inputs), logits(reference, inputs), atol=1e-6, rtol=0)


def test_pruned_heads_equal_silenced_heads_bert() -> None:
    inputs = text_inputs()
    model = make_bert()  # 2 heads of size 16 per block
    reference = copy.deepcopy(model)
    with torch.no_grad():
        # Zeroing a head's columns of W_o removes its whole contribution to the block.
        reference.bert.encoder.layer[1].attention.output.dense.weight[:, 0:16] = 0
    prune_heads(model, {1: [0]})
    attn = model.bert.encoder.layer[1].attention.self
    assert attn.query.out_features == 16 and attn.num_attention_heads == 1
    torch.testing.assert_close(logits(model, inputs), logits(reference, inputs), atol=1e-6, rtol=0)


def test_pruned_heads_and_neurons_equal_reference_llama() -> None:
    inputs = text_inputs()
    model = make_llama_mha()  # 4 heads of size 8
    reference = copy.deepcopy(model)
    with torch.no_grad():
        layer = reference.model.layers[0]
        layer.self_attn.o_proj.weight[:, 8:16] = 0  # head 1
        layer.self_attn.o_proj.weight[:, 24:32] = 0  # head 3
        layer.mlp.up_proj.weight[[2, 3]] = 0  # SiLU(gate) * 0 = 0
        layer.mlp.down_proj.weight[:, [2, 3]] = 0
    prune_heads(model, {0: [1, 3]})
    prune_neurons(model, {0: [k for k in range(64) if k not in (2, 3)]})
    torch.testing.assert_close(logits(model, inputs), logits(reference, inputs), atol=1e-5, rtol=0)


def test_head_pruning_refuses_grouped_query_attention() -> None:
    with pytest.raises(ConfigError, match="grouped-query"):
        prune_heads(make_llama(), {0: [0]})  # conftest's LLaMA: 2 query heads, 1 kv head


def test_drop_top_layers_equals_the_lower_blocks_output() -> None:
    inputs = text_inputs()
    model = make_bert()
    with torch.no_grad():
        hidden = model(**inputs, output_hidden_states=True).hidden_states[1]  # after block 0
        reference = model.classifier(model.bert.pooler(hidden))
    drop_top_layers(model, 1)
    assert len(model.bert.encoder.layer) == 1 and model.config.num_hidden_layers == 1
    torch.testing.assert_close(logits(model, inputs), reference, atol=1e-6, rtol=0)
    with pytest.raises(ConfigError, match=r"prune.layers: value 1 would remove all 1 blocks"):
        drop_top_layers(model, 1)


def test_head_selection_uses_importance_and_keeps_one_per_block() -> None:
    model = make_bert()
    with torch.no_grad():
        model.bert.encoder.layer[0].attention.output.dense.weight[:, 16:] *= 0.01  # head 1 weak
    assert select_heads(model, 0.25) == {0: [1]}
    chosen = select_heads(model, 0.99)
    assert all(len(h) == 1 for h in chosen.values())  # 2 heads per block: one always stays


def test_neuron_selection_keeps_the_most_important() -> None:
    model = make_bert()
    with torch.no_grad():
        model.bert.encoder.layer[0].output.dense.weight[:, :16] *= 1e-3
    keep = select_neurons(model, 0.25)
    assert keep[0] == list(range(16, 64)) and len(keep[1]) == 48


def test_magnitude_masks_zero_the_smallest_weights_globally() -> None:
    model = make_bert()
    masks = magnitude_masks(model, 0.4)
    params = dict(model.named_parameters())
    kept = torch.cat([params[n].detach().abs()[m] for n, m in masks.items()])
    gone = torch.cat([params[n].detach().abs()[~m] for n, m in masks.items()])
    total = sum(m.numel() for m in masks.values())
    assert abs(gone.numel() / total - 0.4) < 1e-3
    assert gone.max() <= kept.min()
    assert all(n.startswith("bert.encoder.layer.") for n in masks)  # blocks only, no head
    apply_masks(model, masks)
    assert int(sum((params[n] == 0).sum() for n in masks)) >= gone.numel()


def test_masked_weights_stay_zero_through_adamw_training() -> None:
    model = make_bert().train()
    masks = prune(model, magnitude=0.5)
    handles = mask_gradients(model, masks)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    inputs = text_inputs()
    for _ in range(3):
        loss = model(**inputs, labels=torch.tensor([0, 1, 2])).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    params = dict(model.named_parameters())
    for name, mask in masks.items():
        assert torch.all(params[name][~mask] == 0), name
        assert torch.any(params[name][mask] != 0)
    for h in handles:
        h.remove()


def test_structure_round_trip_rebuilds_the_pruned_model() -> None:
    inputs = text_inputs()
    model = make_bert()
    prune(model, layers=1, heads=0.5, neurons=0.5)
    structure = structure_of(model)
    assert structure == {"num_layers": 1, "heads": [1], "neurons": [32]}
    fresh = make_bert()
    apply_structure(fresh, structure)
    fresh.load_state_dict(model.state_dict())
    torch.testing.assert_close(logits(fresh, inputs), logits(model, inputs), atol=0, rtol=0)
    total, nonzero = count_params(model)
    assert total < count_params(make_bert())[0] and nonzero <= total


def test_prune_config_errors() -> None:
    with pytest.raises(ConfigError, match=r"prune.heads: value 1.0 must be a fraction"):
        PruneConfig(heads=1.0)
    with pytest.raises(ConfigError, match=r"prune.layers"):
        PruneConfig(layers=-1)
    with pytest.raises(ConfigError, match="not supported"):
        blocks_of(nn.Linear(2, 2))


# --------------------------------------------------------------------------- whole run, CLI

WORDS = ["alpha", "bravo", "charlie"]
FILLER = [f"w{i}" for i in range(40)]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A tiny BERT folder (4 heads, 2 layers) and a keyword-labelled CSV."""
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizer

    folder = tmp_path_factory.mktemp("tiny-bert")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS, *FILLER]
    BertTokenizer(vocab={t: i for i, t in enumerate(vocab)}).save_pretrained(folder)
    cfg = BertConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
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
        for i in range(120):
            words = [rng.choice(FILLER) for _ in range(8)]
            for _ in range(3):
                words.insert(rng.randrange(len(words) + 1), WORDS[i % 3])
            writer.writerow([" ".join(words), f"topic_{WORDS[i % 3]}"])
    return folder, data


def write_config(tmp: Path, tiny: tuple[Path, Path], **extra: object) -> Path:
    cfg = {
        "model": {"name_or_path": str(tiny[0])},
        "data": {"source": str(tiny[1]), "max_length": 16},
        "method": {"name": "lora", "r": 4, "lora_alpha": 8, "target_modules": "all-linear"},
        "train": {
            "epochs": 12,
            "batch_size": 16,
            "learning_rate": 5e-3,
            "progress": False,
            "device": "cpu",
        },
        "output_dir": str(tmp / "run"),
        **extra,
    }
    path = tmp / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_cli_prunes_a_run_and_recovers(
    tiny: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = write_config(tmp_path, tiny)
    assert main(["train", str(config)]) == 0
    run = tmp_path / "run"
    code = main(
        [
            "prune",
            str(run),
            "train.learning_rate=5e-3",
            "--heads",
            "0.5",
            "--neurons",
            "0.5",
            "--layers",
            "1",
            "--recovery-steps",
            "10",
        ]
    )
    out = capsys.readouterr().out
    assert code == 0, out
    assert "recovered" in out
    pruned_dir = Path(f"{run}-pruned")
    metrics = json.loads((pruned_dir / "metrics.json").read_text())
    assert metrics["structure"] == {
        "num_layers": 1,
        "heads": [2],
        "neurons": [32],
        "magnitude_masked": 0,
    }
    assert metrics["pruned"]["params"] < metrics["before"]["params"]
    assert metrics["before"]["test_accuracy"] >= 0.9  # the keyword task is learnt
    assert metrics["recovered"]["test_accuracy"] >= metrics["pruned"]["test_accuracy"]
    # The saved model reloads to the same predictions as the recovered one.
    model, tok, labels = load_pruned(pruned_dir)
    assert labels == json.loads((run / "labels.json").read_text())
    assert len(model.bert.encoder.layer) == 1
    from deltatune.data import PadCollator, TokenizedDataset, load_text_splits
    from deltatune.run import RunConfig
    from deltatune.train import ClassificationTask, evaluate_dataset

    cfg = RunConfig.from_file(pruned_dir / "config.yaml")
    test = TokenizedDataset(load_text_splits(cfg.data).test, tok, cfg.data.max_length)
    acc = evaluate_dataset(model, ClassificationTask(), test, collate_fn=PadCollator(tok))
    assert acc["accuracy"] == pytest.approx(metrics["recovered"]["test_accuracy"])


def test_prune_config_with_magnitude_and_lora_recovery(
    tiny: tuple[Path, Path], tmp_path: Path
) -> None:
    from deltatune.prune import prune_run
    from deltatune.run import load_run_config

    config = write_config(
        tmp_path,
        tiny,
        prune={"magnitude": 0.5, "recovery_steps": 8, "latency_repeats": 1},
    )
    cfg = load_run_config(config, [])
    m = prune_run(cfg, tmp_path / "pruned", echo=lambda *_: None)
    assert m["recovery_method"] == "lora"
    masked = m["structure"]["magnitude_masked"]
    assert m["pruned"]["nonzero_params"] <= m["before"]["nonzero_params"] - 0.99 * masked
    # LoRA's merged dense delta is masked again: the sparsity survives recovery.
    from deltatune.prune import block_linears

    model, _, _ = load_pruned(tmp_path / "pruned")
    weights = torch.cat([lin.weight.detach().flatten() for _, lin in block_linears(model)])
    assert int((weights == 0).sum()) == masked
    assert m["structure"]["magnitude_masked"] > 0
    with pytest.raises(ConfigError, match="nothing to prune"):
        prune_run(load_run_config(config, ["prune.magnitude=0"]), tmp_path / "x")


@pytest.mark.slow
def test_real_minilm_prunes_by_the_expected_parameter_count() -> None:
    """The embedded MiniLM (6 x 12 heads of 32, FFN 1536): the counts follow from the shapes."""
    from deltatune.models import ModelConfig, load_classifier, load_tokenizer

    model = load_classifier(ModelConfig(), ["a", "b", "c"]).eval()
    tok = load_tokenizer(ModelConfig())
    inputs = dict(
        tok(
            ["Shares fell sharply.", "The striker scored twice."], return_tensors="pt", padding=True
        )
    )
    total = count_params(model)[0]
    per_layer = sum(p.numel() for p in model.bert.encoder.layer[5].parameters())
    prune(model, layers=1, heads=0.25, neurons=0.25)
    per_head = 3 * (32 * 384 + 32) + 384 * 32  # q, k, v rows (+ bias) and W_o columns
    per_neuron = 384 + 1 + 384  # W_1 row, its bias, W_2 column
    expected = total - per_layer - 15 * per_head - 5 * 384 * per_neuron  # 15 = 25% of 60 heads
    assert count_params(model)[0] == expected
    assert structure_of(model) == {
        "num_layers": 5,
        "heads": structure_of(model)["heads"],
        "neurons": [1152] * 5,
    }
    assert sum(structure_of(model)["heads"]) == 45
    fresh = load_classifier(ModelConfig(), ["a", "b", "c"]).eval()
    apply_structure(fresh, structure_of(model))
    fresh.load_state_dict(model.state_dict())
    out = logits(model, inputs)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(logits(fresh, inputs), out, atol=0, rtol=0)

"""The byte counters the benchmarks (and the estimator) rely on."""

from __future__ import annotations

import torch
from torch import nn

from deltatune.memory import count_saved, model_storages, unique_bytes


def test_unique_bytes_counts_shared_storage_once() -> None:
    a = torch.zeros(10, 4)
    assert unique_bytes([a, a[:5], a.view(40)]) == 10 * 4 * 4
    assert unique_bytes([a, torch.zeros(3, dtype=torch.float64)]) == 160 + 24


def test_count_saved_sees_activations_not_weights() -> None:
    torch.manual_seed(0)
    layer = nn.Linear(8, 16)
    x = torch.randn(5, 8, requires_grad=True)
    with count_saved(model_storages(layer)) as seen:
        h = layer(x)  # saves x (the weight is excluded)
        y = torch.tanh(h)  # saves its output y
    assert sorted(seen.values()) == [5 * 8 * 4, 5 * 16 * 4]
    y.sum().backward()
    # Nothing is recorded outside the block.
    assert len(seen) == 2


def test_count_saved_reads_through_nf4_wrapper_tensors() -> None:
    # QLoRA's backward saves torchao NF4 views of the packed buffers: tensor subclasses with no
    # storage of their own. They are weights (the buffers), so the activations counted must be
    # exactly those of LoRA on the float model with the same targets.
    import deltatune as dt
    from conftest import make_llama, run, text_inputs

    x = text_inputs()
    saved = {}
    for name, cfg in [
        ("qlora", dt.QLoraConfig(r=2, compute_dtype="float32", lora_dropout=0.0)),
        ("lora", dt.LoraConfig(r=2, target_modules="all-linear", lora_dropout=0.0)),
    ]:
        torch.manual_seed(0)
        model = make_llama()
        dt.inject(model, cfg)
        with count_saved(model_storages(model)) as seen:
            run(model, x)
        saved[name] = sum(seen.values())
    assert saved["qlora"] == saved["lora"] > 0

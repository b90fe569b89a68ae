"""AdapterDrop: dropped layers compute exactly their base module and run no adapter code, the
other layers are unchanged; random drop only in training mode, reproducible with a seed."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

import deltatune as dt
from conftest import make_bert, make_llama, run, text_inputs


def maxdiff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


def perturb(model: nn.Module, name: str = "default", seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in dt.adapter_state_dict(model, name).values():
            t.add_(0.3 * torch.randn(t.shape, generator=gen))


def houlsby_bert(**options: Any) -> nn.Module:
    model = make_bert()
    dt.inject(model, dt.HoulsbyConfig(bottleneck_size=4, **options))
    perturb(model)
    return model


def capture(model: nn.Module) -> dict[str, tuple[tuple[Any, ...], Any]]:
    """Record every adapter layer's inputs and output in the next forward pass."""
    seen: dict[str, tuple[tuple[Any, ...], Any]] = {}
    for name, layer in dt.adapter_layers(model):
        layer.register_forward_hook(
            lambda _m, args, out, name=name: seen.__setitem__(name, (args, out))
        )
    return seen


def test_dropped_layers_compute_the_base_and_the_others_their_adapters() -> None:
    model = houlsby_bert()
    x = text_inputs()
    with torch.no_grad():
        full = run(model, x)
    dropped = dt.adapter_drop(model, 1)
    assert dropped == [
        "bert.encoder.layer.0.attention.output.dense",
        "bert.encoder.layer.0.output.dense",
    ]
    assert dt.dropped_layers(model) == dropped
    seen = capture(model)
    with torch.no_grad():
        out = run(model, x)
        for name, (args, result) in seen.items():
            layer = model.get_submodule(name)
            if name in dropped:
                assert torch.equal(result, layer.base_layer(*args)), name
            else:
                h = layer.base_layer(*args)
                assert torch.equal(result, layer.adapter["default"].serial(h)), name
                assert maxdiff(result, h) > 1e-3, name
    assert maxdiff(out, full) > 1e-4
    # the same as a model that never had adapters in block 0 (same weights in block 1)
    reference = make_bert()
    dt.inject(reference, dt.HoulsbyConfig(bottleneck_size=4, layers_to_transform=[1]))
    with torch.no_grad():
        for key, t in dt.adapter_state_dict(reference).items():
            t.copy_(dt.adapter_state_dict(model)[key])
        assert torch.equal(run(reference, x), out)
    # 0 restores every adapter; all blocks give the base model
    dt.adapter_drop(model, 0)
    assert dt.dropped_layers(model) == []
    with torch.no_grad():
        assert torch.equal(run(model, x), full)
        dt.adapter_drop(model, 2)
        assert torch.equal(run(model, x), run(make_bert(), x))


def test_dropped_layers_run_no_adapter_code(monkeypatch: pytest.MonkeyPatch) -> None:
    from deltatune.methods._bottleneck import Bottleneck

    model = houlsby_bert()
    calls: list[int] = []
    original = Bottleneck.delta

    def counting(self: Bottleneck, h: torch.Tensor) -> torch.Tensor:
        calls.append(id(self))
        return original(self, h)

    monkeypatch.setattr(Bottleneck, "delta", counting)
    owners = {id(layer.adapter["default"]): name for name, layer in dt.adapter_layers(model)}
    dt.adapter_drop(model, [0])
    with torch.no_grad():
        run(model, text_inputs())
    assert sorted(owners[c] for c in calls) == [
        "bert.encoder.layer.1.attention.output.dense",
        "bert.encoder.layer.1.output.dense",
    ]
    # LoRA: a dropped layer has nothing to run and gives exactly its base Linear
    lora = make_llama()
    torch.manual_seed(0)
    dt.inject(
        lora, dt.LoraConfig(r=2, target_modules=["q_proj", "down_proj"], init_lora_weights=False)
    )
    with torch.no_grad():
        full = run(lora, text_inputs())
    assert dt.adapter_drop(lora, [1]) == [
        "model.layers.1.self_attn.q_proj",
        "model.layers.1.mlp.down_proj",
    ]
    for name, layer in dt.adapter_layers(lora):
        assert (layer.adapters_to_run() == []) == (".layers.1." in name), name
    layer = lora.model.layers[1].self_attn.q_proj
    x = torch.randn(2, 3, 32)
    with torch.no_grad():
        assert torch.equal(layer(x), layer.base_layer(x))
        assert maxdiff(run(lora, text_inputs()), full) > 1e-4


def test_random_drop_only_in_training_and_reproducible() -> None:
    def draws(model: nn.Module, n: int = 12) -> list[int]:
        hook = next(h for h in model._forward_pre_hooks.values() if hasattr(h, "last_k"))
        ks = []
        for _ in range(n):
            with torch.no_grad():
                run(model, text_inputs(batch=1, seq=3))
            ks.append(hook.last_k)
            ks.append(len(dt.dropped_layers(model)))
        return ks

    model = houlsby_bert()
    dt.adapter_drop(model, 1, random_max=2, seed=7)
    model.eval()
    x = text_inputs()
    with torch.no_grad():
        fixed = run(model, x)
    for _ in range(3):  # eval mode: always the fixed setting
        with torch.no_grad():
            assert torch.equal(run(model, x), fixed)
        assert len(dt.dropped_layers(model)) == 2
    model.train()
    first = draws(model)
    ks = first[0::2]
    assert set(ks) == {0, 1, 2}  # k ~ U{0, 1, 2}
    assert first[1::2] == [2 * k for k in ks]  # 2 Houlsby layers per dropped block
    again = houlsby_bert()
    dt.adapter_drop(again, 1, random_max=2, seed=7)
    assert draws(again.train()) == first
    model.eval()
    with torch.no_grad():
        assert torch.equal(run(model, x), fixed)  # back to the fixed drop
    # without a seed the global generator decides (reproducible with torch.manual_seed)
    a, b = houlsby_bert(), houlsby_bert()
    dt.adapter_drop(a, 0, random_max=2)
    dt.adapter_drop(b, 0, random_max=2)
    torch.manual_seed(3)
    ka = draws(a.train())
    torch.manual_seed(3)
    assert draws(b.train()) == ka
    # unload and adapter_drop(model, 0) take the hook away
    dt.adapter_drop(a, 0)
    assert not a._forward_pre_hooks
    dt.unload(b)
    assert not b._forward_pre_hooks


def test_bad_arguments_are_named() -> None:
    model = houlsby_bert()
    with pytest.raises(dt.ConfigError, match="layers=3 must be between 0 and the 2 blocks"):
        dt.adapter_drop(model, 3)
    with pytest.raises(
        dt.ConfigError, match=r"block indices \[5\] are out of range; the model has 2 blocks"
    ):
        dt.adapter_drop(model, [0, 5])
    with pytest.raises(dt.ConfigError, match="random_max=4 must be between 0 and 2"):
        dt.adapter_drop(model, 0, random_max=4)
    lora = make_llama()
    dt.inject(lora, dt.LoraConfig(r=2, target_modules=["q_proj"]))
    dt.merge(lora)
    with pytest.raises(dt.DeltatuneError, match=r"has merged adapters .*unmerge first"):
        dt.adapter_drop(lora, 1)
    dt.unmerge(lora)
    assert dt.adapter_drop(lora, 1) == ["model.layers.0.self_attn.q_proj"]


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.proj(x)


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.blocks = nn.ModuleList([Block(), Block()])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return x


def test_a_model_without_an_architecture_entry() -> None:
    model = Net()
    dt.inject(model, dt.LoraConfig(r=2, target_modules=["proj"], init_lora_weights=False))
    with pytest.raises(dt.ConfigError, match=r"adapter_drop: .*arch: \{layers: \.\.\.\}"):
        dt.adapter_drop(model, 1)
    assert dt.adapter_drop(model, 1, arch={"layers": "blocks"}) == ["blocks.0.proj"]

"""Bottleneck adapters (Houlsby, Pfeiffer, parallel): the formulas written out by hand,
near-identity start, scaling, sizes, block selection, architecture errors and a custom model.

The generic matrix (test_matrix.py) already covers train / save / load / disable / switch /
unload on the tiny BERT, LLaMA and GPT-2 models; this file checks what is special to adapters.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import deltatune as dt
from conftest import make_bert, make_gpt2, make_llama, run, text_inputs
from deltatune.checkpoint import CONFIG_NAME
from deltatune.methods._bottleneck import Bottleneck, ParallelAdapterLayer, SerialAdapterLayer

torch.manual_seed(0)


def cfg(method: str, **options: Any) -> dt.MethodConfig:
    return dt.config_from_dict({"name": method, **options})


def perturb(model: nn.Module, seed: int = 0, scale: float = 0.2) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in dt.trainable_parameters(model):
            p.add_(scale * torch.randn(p.shape, generator=gen))


def maxdiff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


ACTS = {"relu": F.relu, "gelu": F.gelu, "silu": F.silu, "tanh": torch.tanh}


def by_hand(h: torch.Tensor, a: Bottleneck, act: str) -> torch.Tensor:
    """``h + up(act(down(LN_before(h))))`` (then LN_after), from the raw tensors."""
    z = h
    if a.ln_before is not None:
        z = F.layer_norm(z, (z.shape[-1],), a.ln_before.weight, a.ln_before.bias, 1e-5)
    z = F.linear(z, a.down.weight, a.down.bias)
    z = ACTS[act](z)
    z = F.linear(z, a.up.weight, a.up.bias)
    out = h + z
    if a.ln_after is not None:
        out = F.layer_norm(out, (out.shape[-1],), a.ln_after.weight, a.ln_after.bias, 1e-5)
    return out


# --- the serial formula ------------------------------------------------------------------------


@pytest.mark.parametrize("act", ["relu", "gelu", "silu", "tanh"])
@pytest.mark.parametrize("norms", [(False, False), (True, False), (True, True)])
def test_serial_layer_is_h_plus_up_act_down(act: str, norms: tuple[bool, bool]) -> None:
    model = make_bert()
    ln_before, ln_after = norms
    dt.inject(
        model,
        cfg(
            "houlsby", bottleneck_size=8, non_linearity=act, ln_before=ln_before, ln_after=ln_after
        ),
    )
    perturb(model)
    layer = model.bert.encoder.layer[0].output.dense
    assert isinstance(layer, SerialAdapterLayer)
    x = torch.randn(2, 5, 64)
    base = layer.base_layer
    h = F.linear(x, base.weight, base.bias)  # BERT's output.dense: 64 -> 32
    with torch.no_grad():
        expected = by_hand(h, layer.adapter["default"], act)
        assert maxdiff(layer(x), expected) <= 1e-6
        assert maxdiff(layer(x), h) > 1e-3


def test_houlsby_places_on_bert_llama_gpt2() -> None:
    placed = {
        "bert": (make_bert, ["attention.output.dense", "output.dense"]),
        "llama": (make_llama, ["self_attn.o_proj", "mlp.down_proj"]),
        "gpt2": (make_gpt2, ["attn.c_proj", "mlp.c_proj"]),
    }
    for kind, (make, suffixes) in placed.items():
        model = make()
        dt.inject(model, cfg("houlsby", bottleneck_size=4))
        wrapped = sorted(n for n, m in model.named_modules() if isinstance(m, SerialAdapterLayer))
        assert len(wrapped) == 4, kind
        assert all(any(n.endswith("." + s) for s in suffixes) for n in wrapped), wrapped
        pf = make()
        dt.inject(pf, cfg("pfeiffer", bottleneck_size=4))
        wrapped = [n for n, m in pf.named_modules() if isinstance(m, SerialAdapterLayer)]
        assert len(wrapped) == 2 and all(n.endswith("." + suffixes[1]) for n in wrapped), wrapped


def test_gpt2_conv1d_serial_formula() -> None:
    model = make_gpt2()
    dt.inject(model, cfg("pfeiffer", bottleneck_size=4, non_linearity="gelu"))
    perturb(model)
    layer = model.transformer.h[1].mlp.c_proj
    x = torch.randn(2, 3, 128)
    base = layer.base_layer  # Conv1D: weight (in, out)
    h = x @ base.weight + base.bias
    with torch.no_grad():
        assert maxdiff(layer(x), by_hand(h, layer.adapter["default"], "gelu")) <= 1e-5


def test_two_active_serial_adapters_stack_in_order() -> None:
    model = make_llama()
    dt.inject(model, cfg("houlsby", bottleneck_size=4), "a")
    dt.inject(model, cfg("houlsby", bottleneck_size=4, non_linearity="relu"), "b")
    dt.set_active(model, ["a", "b"])
    perturb(model)
    layer = model.model.layers[0].self_attn.o_proj
    x = torch.randn(2, 3, 32)
    with torch.no_grad():
        h = layer.base_layer(x)
        expected = by_hand(by_hand(h, layer.adapter["a"], "silu"), layer.adapter["b"], "relu")
        assert maxdiff(layer(x), expected) <= 1e-6
        dt.set_active(model, ["b", "a"])
        flipped = by_hand(by_hand(h, layer.adapter["b"], "relu"), layer.adapter["a"], "silu")
        assert maxdiff(layer(x), flipped) <= 1e-6


# --- initialisation ----------------------------------------------------------------------------


@pytest.mark.parametrize("make", [make_bert, make_llama, make_gpt2])
def test_houlsby_bert_init_is_near_identity(make: Any) -> None:
    x = text_inputs()
    model = make()
    with torch.no_grad():
        base = run(model, x)
    torch.manual_seed(0)
    dt.inject(model, cfg("houlsby", init_weights="bert", bottleneck_size=8))
    with torch.no_grad():
        out = run(model, x)
    assert 0 < maxdiff(out, base) < 1e-3
    # the default init is an exact identity (up = 0)
    exact = make()
    dt.inject(exact, cfg("houlsby", bottleneck_size=8))
    with torch.no_grad():
        assert torch.equal(run(exact, x), base)
    layer = exact.model.layers[0].mlp.down_proj if make is make_llama else None
    if layer is not None:
        assert torch.count_nonzero(layer.adapter["default"].up.weight) == 0
        assert torch.count_nonzero(layer.adapter["default"].down.weight) > 0


def test_ln_after_changes_the_start_and_ln_before_does_not() -> None:
    x = text_inputs()
    with torch.no_grad():
        base = run(make_llama(), x)
    before = make_llama()
    dt.inject(before, cfg("pfeiffer", ln_before=True, bottleneck_size=4))
    after = make_llama()
    dt.inject(after, cfg("pfeiffer", ln_after=True, bottleneck_size=4))
    with torch.no_grad():
        assert torch.equal(run(before, x), base)
        assert maxdiff(run(after, x), base) > 1e-3


# --- the parallel adapter ---------------------------------------------------------------------


def test_parallel_adapter_formula_and_scaling_on_llama() -> None:
    x = torch.randn(2, 3, 32)
    outs = {}
    for s in (1.0, 2.0, 4.0):
        model = make_llama()
        torch.manual_seed(0)
        dt.inject(model, cfg("parallel_adapter", bottleneck_size=8, scaling=s))
        perturb(model, seed=5)
        mlp = model.model.layers[1].mlp
        assert isinstance(mlp, ParallelAdapterLayer)
        a = mlp.adapter["default"]
        with torch.no_grad():
            ffn = mlp.base_layer(x)
            branch = F.linear(
                F.relu(F.linear(x, a.down.weight, a.down.bias)), a.up.weight, a.up.bias
            )
            outs[s] = mlp(x)
            assert maxdiff(outs[s], ffn + s * branch) <= 1e-6
            assert maxdiff(outs[s], ffn) > 1e-3
    d1 = outs[1.0] - mlp.base_layer(x)
    assert maxdiff(outs[2.0] - mlp.base_layer(x), 2 * d1) <= 1e-5
    assert maxdiff(outs[4.0] - mlp.base_layer(x), 4 * d1) <= 1e-5


def test_parallel_adapter_on_bert_joins_the_residual() -> None:
    """BERT: ``LayerNorm(W2 hidden + x + s·A(x))`` where x is the FFN input."""
    model = make_bert()
    dt.inject(model, cfg("parallel_adapter", bottleneck_size=8, scaling=3.0, non_linearity="gelu"))
    perturb(model)
    out_mod = model.bert.encoder.layer[0].output
    assert isinstance(out_mod, ParallelAdapterLayer) and out_mod.residual
    a = out_mod.adapter["default"]
    base = out_mod.base_layer
    hidden, x = torch.randn(2, 4, 64), torch.randn(2, 4, 32)
    with torch.no_grad():
        branch = F.linear(F.gelu(F.linear(x, a.down.weight, a.down.bias)), a.up.weight, a.up.bias)
        pre = F.linear(hidden, base.dense.weight, base.dense.bias) + x + 3.0 * branch
        expected = F.layer_norm(pre, (32,), base.LayerNorm.weight, base.LayerNorm.bias, 1e-12)
        assert maxdiff(out_mod(hidden, x), expected) <= 1e-5
        assert maxdiff(out_mod(hidden, input_tensor=x), expected) <= 1e-5
        assert maxdiff(out_mod(hidden, x), base(hidden, x)) > 1e-3


def test_two_active_parallel_adapters_add() -> None:
    model = make_gpt2()
    dt.inject(model, cfg("parallel_adapter", bottleneck_size=4), "a")
    dt.inject(model, cfg("parallel_adapter", bottleneck_size=4, scaling=1.0), "b")
    perturb(model)  # only "b" is trainable (active)
    dt.set_active(model, "a")
    perturb(model, seed=1)
    mlp = model.transformer.h[0].mlp
    x = torch.randn(1, 3, 32)
    with torch.no_grad():
        ffn = mlp.base_layer(x)
        dt.set_active(model, "a")
        da = mlp(x) - ffn
        dt.set_active(model, "b")
        db = mlp(x) - ffn
        dt.set_active(model, ["a", "b"])
        assert maxdiff(mlp(x), ffn + da + db) <= 1e-5


# --- sizes and blocks ---------------------------------------------------------------------------


def n_trainable(model: nn.Module) -> int:
    return dt.trainable_report(model).trainable


@pytest.mark.parametrize("method", ["houlsby", "pfeiffer", "parallel_adapter"])
def test_reduction_factor_or_bottleneck_size(method: str) -> None:
    by_factor, by_size = make_llama(), make_llama()
    dt.inject(by_factor, cfg(method, reduction_factor=4))  # hidden 32 / 4 = 8
    dt.inject(by_size, cfg(method, bottleneck_size=8))
    per_adapter = (32 * 8 + 8) + (8 * 32 + 32)
    places = {"houlsby": 2, "pfeiffer": 1, "parallel_adapter": 1}[method]
    assert n_trainable(by_factor) == n_trainable(by_size) == 2 * places * per_adapter
    shapes = {tuple(p.shape) for n, p in by_factor.named_parameters() if n.endswith("down.weight")}
    assert shapes == {(8, 32)}
    tiny = make_llama()
    dt.inject(tiny, cfg(method, reduction_factor=64))  # 32 // 64 = 0 -> at least 1
    assert {tuple(p.shape) for n, p in tiny.named_parameters() if n.endswith("down.weight")} == {
        (1, 32)
    }
    with pytest.raises(
        dt.ConfigError, match=r"reduction_factor \(4.0\) or bottleneck_size \(8\), not both"
    ):
        cfg(method, reduction_factor=4, bottleneck_size=8)
    with pytest.raises(dt.ConfigError, match="bottleneck_size=0"):
        cfg(method, bottleneck_size=0)
    with pytest.raises(dt.ConfigError, match="reduction_factor=-2"):
        cfg(method, reduction_factor=-2)
    with pytest.raises(dt.ConfigError, match="non_linearity"):
        cfg(method, non_linearity="sigmoid")
    with pytest.raises(dt.ConfigError, match="dropout"):
        cfg(method, dropout=1.5)


def test_default_sizes() -> None:
    for method, m in (("houlsby", 2), ("pfeiffer", 2), ("parallel_adapter", 16)):
        model = make_gpt2()
        dt.inject(model, cfg(method))
        downs = [p for n, p in model.named_parameters() if n.endswith("down.weight")]
        assert downs and all(p.shape == (m, 32) for p in downs), method


def test_layers_to_transform() -> None:
    model = make_bert()
    dt.inject(model, cfg("houlsby", bottleneck_size=4, layers_to_transform=1))
    wrapped = [n for n, m in model.named_modules() if isinstance(m, SerialAdapterLayer)]
    assert wrapped == [
        "bert.encoder.layer.1.attention.output.dense",
        "bert.encoder.layer.1.output.dense",
    ]
    llama = make_llama()
    dt.inject(llama, cfg("parallel_adapter", bottleneck_size=4, layers_to_transform=[0]))
    assert isinstance(llama.model.layers[0].mlp, ParallelAdapterLayer)
    assert not isinstance(llama.model.layers[1].mlp, dt.AdapterLayer)
    with pytest.raises(dt.ConfigError, match=r"has 2 blocks, give indices from 0 to 1"):
        dt.inject(make_llama(), cfg("pfeiffer", layers_to_transform=[0, 5]))


# --- architecture errors and a custom model -------------------------------------------------------


class Block(nn.Module):
    def __init__(self, d: int = 8) -> None:
        super().__init__()
        self.mix = nn.Linear(d, d)
        self.proj = nn.Linear(d, d)
        self.mlp = nn.Sequential(nn.Linear(d, 2 * d), nn.ReLU(), nn.Linear(2 * d, d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.proj(torch.tanh(self.mix(x)))
        return x + self.mlp(x)


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.blocks = nn.ModuleList([Block() for _ in range(3)])
        self.head = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return self.head(x)


NET_ARCH = {"layers": "blocks", "attn_out": "proj", "ffn": "mlp", "ffn_out": "mlp.2"}


@pytest.mark.parametrize(
    ("method", "fields"),
    [
        ("houlsby", ["layers", "attn_out", "ffn_out"]),
        ("pfeiffer", ["layers", "ffn_out"]),
        ("parallel_adapter", ["layers", "ffn", "ffn_out"]),
    ],
)
def test_unknown_model_type_names_the_fields_to_give(method: str, fields: list[str]) -> None:
    model = Net()
    with pytest.raises(dt.ConfigError) as err:
        dt.inject(model, cfg(method))
    msg = str(err.value)
    assert "Net (model type None) has no entry" in msg
    assert "arch: {" + ", ".join(f"{f}: ..." for f in fields) + "}" in msg
    for f in {"layers", "attn_out", "ffn", "ffn_out"} - set(fields):
        assert f"{f}: ..." not in msg
    assert "'blocks' (3 x Block)" in msg  # the candidates for `layers`
    assert "\n" not in msg
    assert not any(isinstance(m, dt.AdapterLayer) for m in model.modules())
    assert dt.adapter_names(model) == []


def test_unknown_transformers_model_type_is_named() -> None:
    model = Net()
    model.config = type("Cfg", (), {"model_type": "mamba"})()  # type: ignore[assignment]
    with pytest.raises(dt.ConfigError, match="model type 'mamba'"):
        dt.inject(model, cfg("pfeiffer"))


def test_partial_user_arch_names_what_is_missing() -> None:
    with pytest.raises(dt.ConfigError, match=r"arch: \{ffn_out: \.\.\.\}") as err:
        dt.inject(Net(), cfg("houlsby", arch={"layers": "blocks", "attn_out": "proj"}))
    assert "attn_out: ..." not in str(err.value)


def test_bad_arch_paths_are_named() -> None:
    with pytest.raises(
        dt.ConfigError, match=r"arch.ffn_out='mlp.9' names no submodule of block 'blocks.0'"
    ):
        dt.inject(Net(), cfg("pfeiffer", arch={**NET_ARCH, "ffn_out": "mlp.9"}))
    with pytest.raises(dt.ConfigError, match=r"arch.layers='layers' matches no module .*'blocks'"):
        dt.inject(Net(), cfg("pfeiffer", arch={**NET_ARCH, "layers": "layers"}))
    with pytest.raises(dt.ConfigError, match=r"arch.layers='head' is a Linear, not a ModuleList"):
        dt.inject(Net(), cfg("pfeiffer", arch={**NET_ARCH, "layers": "head"}))
    with pytest.raises(dt.ConfigError, match=r"arch.ffn_out='mlp.1' .*ReLU"):
        dt.inject(Net(), cfg("pfeiffer", arch={**NET_ARCH, "ffn_out": "mlp.1"}))
    with pytest.raises(
        dt.ConfigError,
        match=r"unknown config key 'ffn_output' in method\.arch; did you mean 'ffn_out'",
    ):
        cfg("pfeiffer", arch={"ffn_output": "mlp.2"})


@pytest.mark.parametrize("method", ["houlsby", "pfeiffer", "parallel_adapter"])
def test_user_arch_on_a_custom_module(method: str, tmp_path: Path) -> None:
    x = torch.randn(4, 5, 8)
    model = Net().eval()
    with torch.no_grad():
        base = model(x)
    config = cfg(method, bottleneck_size=3, arch=NET_ARCH)
    dt.inject(model, config)
    expected_places = {
        "houlsby": {"blocks.0.proj", "blocks.0.mlp.2"},
        "pfeiffer": {"blocks.0.mlp.2"},
        "parallel_adapter": {"blocks.0.mlp"},
    }[method]
    wrapped = {n for n, m in model.named_modules() if isinstance(m, dt.AdapterLayer)}
    assert {n for n in wrapped if n.startswith("blocks.0.")} == expected_places
    assert len(wrapped) == 3 * len(expected_places)
    perturb(model)
    with torch.no_grad():
        out = model(x)
    assert maxdiff(out, base) > 1e-3
    # the block computes what the formula says
    act = {"houlsby": "silu", "pfeiffer": "relu", "parallel_adapter": "relu"}[method]

    def sub(mod: nn.Module, inp: torch.Tensor) -> torch.Tensor:
        if isinstance(mod, SerialAdapterLayer):
            return by_hand(mod.base_layer(inp), mod.adapter["default"], act)
        return mod(inp)

    block = model.blocks[0]
    with torch.no_grad():
        h = x + sub(block.proj, torch.tanh(block.mix(x)))
        if method == "parallel_adapter":
            a = block.mlp.adapter["default"]
            z = F.linear(F.relu(F.linear(h, a.down.weight, a.down.bias)), a.up.weight, a.up.bias)
            expected = h + block.mlp.base_layer(h) + 4.0 * z
        else:
            expected = h + sub(block.mlp[2], block.mlp[1](block.mlp[0](h)))
        assert maxdiff(block(x), expected) <= 1e-6
    # save / load onto a fresh copy (the arch travels in adapter_config.json)
    dt.save_adapter(model, tmp_path)
    saved = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert saved["peft_type"] == f"DELTATUNE_{method.upper()}"
    assert saved["arch"]["layers"] == "blocks"
    assert dt.read_adapter_config(tmp_path) == config
    fresh = Net().eval()
    dt.load_adapter(fresh, tmp_path)
    with torch.no_grad():
        assert torch.equal(fresh(x), out)
        with dt.disabled(fresh):
            assert torch.equal(fresh(x), base)
    with pytest.raises(dt.DeltatuneError, match="cannot be merged"):
        dt.merge(fresh)


def test_user_arch_overrides_one_field_of_an_entry() -> None:
    model = make_llama()
    dt.inject(model, cfg("pfeiffer", bottleneck_size=4, arch={"ffn_out": "mlp.up_proj"}))
    wrapped = [n for n, m in model.named_modules() if isinstance(m, SerialAdapterLayer)]
    assert wrapped == ["model.layers.0.mlp.up_proj", "model.layers.1.mlp.up_proj"]
    # up_proj's output is the intermediate size
    assert model.model.layers[0].mlp.up_proj.adapter["default"].down.in_features == 64


# --- living together ---------------------------------------------------------------------------


def test_pfeiffer_inside_a_parallel_adapter_and_delete(tmp_path: Path) -> None:
    """Parallel wraps BERT's `output`; Pfeiffer then finds `output.dense` inside the wrapper."""
    x = text_inputs()
    model = make_bert()
    with torch.no_grad():
        base = run(model, x)
    dt.inject(model, cfg("parallel_adapter", bottleneck_size=4), "par")
    dt.inject(model, cfg("pfeiffer", bottleneck_size=4), "pf")
    assert isinstance(model.bert.encoder.layer[0].output.base_layer.dense, SerialAdapterLayer)
    dt.set_active(model, ["par", "pf"])
    perturb(model)
    with torch.no_grad():
        both = run(model, x)
    dt.save_adapters(model, tmp_path)
    fresh = make_bert()
    assert dt.load_adapters(fresh, tmp_path) == ["par", "pf"]
    dt.set_active(fresh, ["par", "pf"])
    with torch.no_grad():
        assert torch.equal(run(fresh, x), both)
    dt.delete(model, "par")
    assert isinstance(model.bert.encoder.layer[0].output.dense, SerialAdapterLayer)
    dt.delete(model, "pf")
    assert not any(isinstance(m, dt.AdapterLayer) for m in model.modules())
    with torch.no_grad():
        assert torch.equal(run(model, x), base)
    # unload with both present takes every wrapper away, innermost first
    dt.unload(fresh)
    assert not any(isinstance(m, dt.AdapterLayer) for m in fresh.modules())
    with torch.no_grad():
        assert torch.equal(run(fresh, x), base)


def test_houlsby_beside_lora_and_merge_refused_names_the_method() -> None:
    model = make_llama()
    dt.inject(model, dt.LoraConfig(r=2, target_modules=["q_proj"]), "lora")
    dt.inject(model, cfg("houlsby", bottleneck_size=4), "ad")
    with pytest.raises(dt.DeltatuneError, match=r"'ad' \(houlsby\) cannot be merged"):
        dt.merge(model, ["ad"])
    dt.merge(model, ["lora"])  # the LoRA half still merges
    with pytest.raises(dt.ConfigError, match="already carries a SerialAdapterLayer"):
        dt.inject(model, dt.LoraConfig(r=2, target_modules=["o_proj"]), "lora2")


def test_dropout_is_active_in_training_only() -> None:
    model = make_llama()
    dt.inject(model, cfg("pfeiffer", bottleneck_size=4, dropout=0.5))
    perturb(model)
    layer = model.model.layers[0].mlp.down_proj
    x = torch.randn(2, 6, 64)
    with torch.no_grad():
        eval_out = layer(x)
        assert torch.equal(layer(x), eval_out)
        model.train()
        torch.manual_seed(1)
        assert maxdiff(layer(x), eval_out) > 1e-4

"""(IA)³: the formulas by hand, merge/unmerge exactness, defaults, and Hugging Face PEFT interop
both ways (same outputs within 1e-5, same tensor keys and shapes).

The generic matrix (test_matrix.py) covers train / save / load / disable / switch / merge /
unload on the tiny BERT, LLaMA, GPT-2 and CNN models.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

import deltatune as dt
from conftest import MODELS, make_bert, make_cnn, make_gpt2, make_llama, run, text_inputs
from deltatune.checkpoint import CONFIG_NAME, WEIGHTS_NAME
from deltatune.methods.ia3 import IA3Config, IA3Layer

TOL = 1e-5


def perturb(model: nn.Module, seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.3 * torch.randn(p.shape, generator=gen, dtype=p.dtype))


def maxdiff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


def ia3_layers(model: nn.Module) -> dict[str, IA3Layer]:
    return {n: m for n, m in model.named_modules() if isinstance(m, IA3Layer)}


# --- formulas -----------------------------------------------------------------------------------


def test_output_and_input_scaling_on_linear() -> None:
    model = make_llama()
    dt.inject(model, IA3Config())  # PEFT default: k_proj, v_proj, down_proj (feed-forward)
    perturb(model)
    attn = model.model.layers[0].self_attn
    v, down = attn.v_proj, model.model.layers[0].mlp.down_proj
    assert isinstance(v, IA3Layer) and isinstance(down, IA3Layer)
    assert v.ia3_l["default"].shape == (16, 1) and down.ia3_l["default"].shape == (1, 64)
    x, h = torch.randn(2, 3, 32), torch.randn(2, 3, 64)
    with torch.no_grad():
        lv, ld = v.ia3_l["default"].flatten(), down.ia3_l["default"].flatten()
        assert maxdiff(v(x), lv * F.linear(x, v.base_layer.weight)) <= 1e-6
        assert maxdiff(down(h), F.linear(ld * h, down.base_layer.weight)) <= 1e-6


def test_bias_is_scaled_for_output_targets_only() -> None:
    model = make_bert()
    dt.inject(
        model,
        IA3Config(
            target_modules=["value", "intermediate.dense", "output.dense"],
            feedforward_modules=["output.dense"],
        ),
    )
    perturb(model)
    layer = model.bert.encoder.layer[1]
    value, inter = layer.attention.self.value, layer.intermediate.dense
    out, attn_out = layer.output.dense, layer.attention.output.dense
    assert not value.is_feedforward["default"] and not inter.is_feedforward["default"]
    # PEFT's plain `endswith`: attention.output.dense is a feed-forward target too
    assert out.is_feedforward["default"] and attn_out.is_feedforward["default"]
    x, h = torch.randn(2, 3, 32), torch.randn(2, 3, 64)
    with torch.no_grad():
        l_v = value.ia3_l["default"].flatten()
        b = value.base_layer
        assert maxdiff(value(x), l_v * (F.linear(x, b.weight) + b.bias)) <= 1e-6
        l_i = inter.ia3_l["default"].flatten()
        assert (
            maxdiff(inter(x), l_i * F.linear(x, inter.base_layer.weight, inter.base_layer.bias))
            <= 1e-6
        )
        l_o = out.ia3_l["default"].flatten()
        b = out.base_layer
        assert maxdiff(out(h), F.linear(l_o * h, b.weight) + b.bias) <= 1e-6


def test_conv1d_scaling() -> None:
    model = make_gpt2()
    dt.inject(model, IA3Config())  # c_attn (output), mlp.c_proj (input)
    perturb(model)
    block = model.transformer.h[0]
    c_attn, c_proj = block.attn.c_attn, block.mlp.c_proj
    assert c_attn.ia3_l["default"].shape == (96, 1) and c_proj.ia3_l["default"].shape == (1, 128)
    x, h = torch.randn(2, 3, 32), torch.randn(2, 3, 128)
    with torch.no_grad():
        b = c_attn.base_layer
        expected = c_attn.ia3_l["default"].flatten() * (x @ b.weight + b.bias)
        assert maxdiff(c_attn(x), expected) <= 1e-5
        b = c_proj.base_layer
        assert (
            maxdiff(c_proj(h), (c_proj.ia3_l["default"].flatten() * h) @ b.weight + b.bias) <= 1e-5
        )


def test_conv2d_scaling() -> None:
    model = make_cnn()
    dt.inject(model, IA3Config(target_modules=["conv1", "conv2"], feedforward_modules=["conv2"]))
    perturb(model)
    c1, c2 = model.conv1, model.conv2
    assert c1.ia3_l["default"].shape == (1, 8, 1, 1) and c2.ia3_l["default"].shape == (1, 8, 1, 1)
    x, h = torch.randn(2, 3, 8, 8), torch.randn(2, 8, 6, 6)
    with torch.no_grad():
        assert maxdiff(c1(x), c1.ia3_l["default"] * c1.base_layer(x)) <= 1e-6
        assert maxdiff(c2(h), c2.base_layer(c2.ia3_l["default"] * h)) <= 1e-6


def test_two_active_adapters_multiply() -> None:
    model = make_llama()
    dt.inject(model, IA3Config(), "a")
    dt.inject(model, IA3Config(), "b")
    dt.set_active(model, "a")
    perturb(model, 1)
    dt.set_active(model, "b")
    perturb(model, 2)
    dt.set_active(model, ["a", "b"])
    k = model.model.layers[0].self_attn.k_proj
    x = torch.randn(1, 2, 32)
    with torch.no_grad():
        la, lb = k.ia3_l["a"].flatten(), k.ia3_l["b"].flatten()
        assert maxdiff(k(x), la * lb * k.base_layer(x)) <= 1e-6


# --- merge / unmerge ------------------------------------------------------------------------------


@pytest.mark.parametrize("make", [make_bert, make_llama, make_gpt2])
def test_merge_folds_rows_or_columns_and_unmerge_restores(make: Any) -> None:
    model = make()
    dt.inject(
        model,
        IA3Config(
            target_modules="all-linear" if make is make_llama else None,
            feedforward_modules=["down_proj"] if make is make_llama else None,
        ),
    )
    perturb(model)
    x = text_inputs()
    with torch.no_grad():
        out = run(model, x)
    before = {
        n: (
            layer.base_layer.weight.detach().clone(),
            None if layer.base_layer.bias is None else layer.base_layer.bias.detach().clone(),
        )
        for n, layer in ia3_layers(model).items()
    }
    dt.merge(model)
    for name, layer in ia3_layers(model).items():
        w0, b0 = before[name]
        vec = layer.ia3_l["default"].detach()
        ff = layer.is_feedforward["default"]
        if layer.kind == "conv1d":  # weight (in, out)
            expected = w0 * (vec.t())
        else:
            expected = w0 * vec  # (1, in): columns; (out, 1): rows
        assert torch.allclose(layer.base_layer.weight, expected, atol=0, rtol=1e-6), name
        if b0 is not None:
            b_expected = b0 if ff else b0 * vec.flatten()
            assert torch.allclose(layer.base_layer.bias, b_expected, atol=0, rtol=1e-6), name
    with torch.no_grad():
        assert maxdiff(run(model, x), out) <= TOL
    dt.unmerge(model)
    for name, layer in ia3_layers(model).items():
        w0, b0 = before[name]
        assert maxdiff(layer.base_layer.weight, w0) <= 1e-6, name
        if b0 is not None:
            assert maxdiff(layer.base_layer.bias, b0) <= 1e-6, name
    with torch.no_grad():
        assert maxdiff(run(model, x), out) <= TOL


def test_unmerge_is_exact_where_a_vector_has_zeros() -> None:
    model = make_bert()
    dt.inject(model, IA3Config())
    perturb(model)
    layer = model.bert.encoder.layer[0].attention.self.value
    with torch.no_grad():
        layer.ia3_l["default"][:5] = 0.0
    w0 = layer.base_layer.weight.detach().clone()
    b0 = layer.base_layer.bias.detach().clone()
    x = text_inputs()
    with torch.no_grad():
        out = run(model, x)
    dt.merge(model)
    assert torch.count_nonzero(layer.base_layer.weight[:5]) == 0
    with torch.no_grad():
        assert maxdiff(run(model, x), out) <= TOL
    dt.unmerge(model)
    assert torch.equal(layer.base_layer.weight, w0) and torch.equal(layer.base_layer.bias, b0)


def test_export_merged_has_no_ia3_left(tmp_path: Path) -> None:
    model = make_llama()
    dt.inject(model, IA3Config())
    perturb(model)
    x = text_inputs()
    with torch.no_grad():
        out = run(model, x)
    dt.unload(model, merge=True)
    assert not ia3_layers(model)
    with torch.no_grad():
        assert maxdiff(run(model, x), out) <= TOL


# --- config and defaults --------------------------------------------------------------------------


def test_defaults_are_peft_s() -> None:
    for make, prefix, targets in (
        (
            make_bert,
            "bert.encoder.layer.0.",
            [
                "attention.output.dense",
                "attention.self.key",
                "attention.self.value",
                "output.dense",
            ],
        ),
        (make_llama, "model.layers.0.", ["mlp.down_proj", "self_attn.k_proj", "self_attn.v_proj"]),
        (make_gpt2, "transformer.h.0.", ["attn.c_attn", "mlp.c_proj"]),
    ):
        model = make()
        dt.inject(model, IA3Config())
        layers = ia3_layers(model)
        assert sorted(n for n in layers if n.startswith(prefix)) == [prefix + t for t in targets]
        assert len(layers) == 2 * len(targets)


def test_unknown_model_needs_targets_and_feedforward() -> None:
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(4, 8), nn.Linear(8, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc2(torch.relu(self.fc1(x)))

    with pytest.raises(dt.ConfigError, match="set target_modules and feedforward_modules"):
        dt.inject(Net(), IA3Config())
    with pytest.raises(dt.ConfigError, match=r"feedforward_modules is not set .*\[\] for none"):
        dt.inject(Net(), IA3Config(target_modules=["fc1"]))
    with pytest.raises(dt.ConfigError, match=r"entries \['fc3'\] match none of the target modules"):
        dt.inject(Net(), IA3Config(target_modules=["fc1", "fc2"], feedforward_modules=["fc3"]))
    model = Net()
    dt.inject(model, IA3Config(target_modules=["fc1", "fc2"], feedforward_modules=["fc2"]))
    assert model.fc2.ia3_l["default"].shape == (1, 8) and model.fc1.ia3_l["default"].shape == (8, 1)
    plain = Net()
    dt.inject(plain, IA3Config(target_modules=["fc1"], feedforward_modules=[]))
    with pytest.raises(dt.ConfigError, match="not Embedding"):
        dt.inject(make_llama(), IA3Config(target_modules=["embed_tokens"], feedforward_modules=[]))
    assert dt.get_method("ia3").default_lr == 3e-3
    assert dt.get_method("ia3").family == "adapter"


# --- PEFT interop ---------------------------------------------------------------------------------

peft = pytest.importorskip("peft")


@dataclasses.dataclass(frozen=True)
class Variant:
    id: str
    model: str
    options: dict[str, Any]
    adapter_name: str = "default"


VARIANTS = [
    Variant("bert-defaults-seqcls", "bert", {"task_type": "SEQ_CLS"}),
    Variant(
        "bert-regex",
        "bert",
        {
            "task_type": "SEQ_CLS",
            "target_modules": r".*\.(query|value|intermediate\.dense)",
            "feedforward_modules": r".*intermediate\.dense",
        },
    ),
    Variant("llama-defaults", "llama", {}),
    Variant(
        "llama-explicit",
        "llama",
        {
            "target_modules": ["q_proj", "up_proj", "down_proj"],
            "feedforward_modules": ["down_proj"],
        },
    ),
    Variant("llama-named", "llama", {}, adapter_name="extra"),
    Variant("gpt2-defaults", "gpt2", {}),
]


@pytest.fixture(params=VARIANTS, ids=[v.id for v in VARIANTS])
def variant(request: pytest.FixtureRequest) -> Variant:
    return request.param


def adapter_dir(root: Path, name: str) -> Path:
    return root if name == "default" else root / name


def base_output(variant: Variant) -> torch.Tensor:
    with torch.no_grad():
        return run(MODELS[variant.model](), text_inputs())


def deltatune_adapter(variant: Variant, out_dir: Path) -> torch.Tensor:
    model = MODELS[variant.model]()
    dt.inject(model, IA3Config(**variant.options), variant.adapter_name)
    perturb(model, seed=3)
    dt.save_adapters(model, out_dir)
    with torch.no_grad():
        return run(model, text_inputs())


def peft_adapter(variant: Variant, out_dir: Path) -> torch.Tensor:
    base = MODELS[variant.model]()
    pm = peft.get_peft_model(
        base, peft.IA3Config(**variant.options), adapter_name=variant.adapter_name
    )
    perturb(pm, seed=4)
    pm.eval()
    pm.save_pretrained(str(out_dir))
    with torch.no_grad():
        return run(pm, text_inputs())


pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")


def test_deltatune_to_peft(variant: Variant, tmp_path: Path) -> None:
    out = deltatune_adapter(variant, tmp_path)
    assert maxdiff(out, base_output(variant)) > 1e-3
    folder = adapter_dir(tmp_path, variant.adapter_name)
    saved = json.loads((folder / CONFIG_NAME).read_text())
    assert saved["peft_type"] == "IA3"
    pm = peft.PeftModel.from_pretrained(
        MODELS[variant.model](), str(folder), adapter_name=variant.adapter_name
    )
    pm.eval()
    with torch.no_grad():
        assert maxdiff(run(pm, text_inputs()), out) <= TOL


def test_peft_to_deltatune(variant: Variant, tmp_path: Path) -> None:
    out = peft_adapter(variant, tmp_path)
    assert maxdiff(out, base_output(variant)) > 1e-3
    model = MODELS[variant.model]()
    assert dt.load_adapters(model, tmp_path) == [variant.adapter_name]
    with torch.no_grad():
        assert maxdiff(run(model, text_inputs()), out) <= TOL
    # ... and a PEFT adapter merges in deltatune like ours
    dt.merge(model)
    with torch.no_grad():
        assert maxdiff(run(model, text_inputs()), out) <= TOL


def test_same_tensor_keys_and_shapes(variant: Variant, tmp_path: Path) -> None:
    deltatune_adapter(variant, tmp_path / "dt")
    peft_adapter(variant, tmp_path / "peft")
    ours = load_file(adapter_dir(tmp_path / "dt", variant.adapter_name) / WEIGHTS_NAME)
    theirs = load_file(adapter_dir(tmp_path / "peft", variant.adapter_name) / WEIGHTS_NAME)
    assert sorted(ours) == sorted(theirs)
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in theirs.items()}
    assert any(k.endswith(".ia3_l") for k in ours)


def test_peft_reads_our_config(tmp_path: Path) -> None:
    deltatune_adapter(VARIANTS[3], tmp_path)
    cfg = peft.PeftConfig.from_pretrained(str(tmp_path))
    assert cfg.peft_type == peft.PeftType.IA3
    assert set(cfg.target_modules) == {"q_proj", "up_proj", "down_proj"}
    assert set(cfg.feedforward_modules) == {"down_proj"}

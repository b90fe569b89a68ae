"""QLoRA: LoRA over a frozen NF4 / int8 base, against the formula written out here.

    y = Ŵ x + b + s · B A x,    s = alpha / r,   Ŵ the dequantised base weight (frozen)

plus: qlora quantises every linear layer but the head at inject; the saved adapter is PEFT
LoRA (PEFT loads it onto a float base); merging into a quantised base is refused by
``deltatune.merge`` and done by ``merge_quantized`` with the error it introduces reported;
``model.quantize`` on the base; the CLI's ``merge --dequantize/--requantize``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import deltatune as dt
from conftest import make_bert, make_llama, run, text_inputs
from deltatune.checkpoint import CONFIG_NAME
from deltatune.methods.lora import LoraLinear
from deltatune.methods.qlora import QLoraConfig
from deltatune.quant import QuantLinear, merge_quantized, quantize_model, quantized_memory
from test_cli import csv_data, run_cli, tiny_model_dir, write_config  # noqa: F401 (fixtures)


def qlora(**options: object) -> QLoraConfig:
    return QLoraConfig(**{"r": 4, "compute_dtype": "float32", **options})  # type: ignore[arg-type]


def n_quant(model: nn.Module) -> int:
    return sum(isinstance(m, QuantLinear) for m in model.modules())


def perturb(model: nn.Module, seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in dt.trainable_parameters(model):
            p.add_(0.2 * torch.randn(p.shape, generator=gen))


# --- injection -----------------------------------------------------------------------------


def test_inject_quantises_every_linear_but_the_head() -> None:
    x = text_inputs()
    float_model = make_llama()
    with torch.no_grad():
        float_out = run(float_model, x)
    reference = make_llama()
    quantize_model(reference, "nf4", compute_dtype="float32")
    with torch.no_grad():
        quant_out = run(reference, x)

    model = make_llama()
    dt.inject(model, qlora())
    assert n_quant(model) == 2 * 7  # q k v o gate up down per layer
    assert isinstance(model.lm_head, nn.Linear)
    lora_layers = [m for m in model.modules() if isinstance(m, LoraLinear)]
    assert len(lora_layers) == 14
    assert all(isinstance(m.base_layer, QuantLinear) for m in lora_layers)
    assert all(m.lora_A["default"].weight.dtype == torch.float32 for m in lora_layers)
    with torch.no_grad():
        start = run(model, x)
    assert torch.equal(start, quant_out)  # B = 0: the quantised base exactly
    # 4-bit rounding moves the logits a little, not a lot
    assert 0 < (start - float_out).abs().max() < 0.2 * float_out.abs().max()
    assert dt.trainable_report(model).trainable == 4096
    # the packed 4-bit weights count as the weights they stand for: same total as the float model
    float_total = sum(p.numel() for p in float_model.parameters())
    assert dt.trainable_report(model).total == float_total + 4096
    # nothing of the base trains
    assert all("lora_" in n for n, p in model.named_parameters() if p.requires_grad)


def test_lora_over_nf4_matches_the_formula() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(128, 64))
    dt.inject(model, qlora(target_modules=["0"], init_lora_weights=False, lora_alpha=8))
    layer = model[0]
    assert isinstance(layer, LoraLinear) and isinstance(layer.base_layer, QuantLinear)
    w_hat = layer.base_layer.dequantize()
    bias = layer.base_layer.bias
    a = layer.lora_A["default"].weight
    b = layer.lora_B["default"].weight
    x = torch.randn(5, 128, requires_grad=True)
    y = model(x)
    a_ref = a.detach().clone().requires_grad_(True)
    b_ref = b.detach().clone().requires_grad_(True)
    x_ref = x.detach().clone().requires_grad_(True)
    y_ref = F.linear(x_ref, w_hat, bias) + (8 / 4) * x_ref @ a_ref.t() @ b_ref.t()
    assert torch.allclose(y, y_ref, atol=1e-5)
    g = torch.randn_like(y)
    y.backward(g)
    y_ref.backward(g)
    assert torch.allclose(a.grad, a_ref.grad, atol=1e-5)
    assert torch.allclose(b.grad, b_ref.grad, atol=1e-5)
    assert torch.allclose(x.grad, x_ref.grad, atol=1e-5)  # flows through the frozen Ŵ


def test_training_lowers_the_loss_with_dropout_and_bf16_compute() -> None:
    model = make_llama().train()
    dt.inject(model, QLoraConfig(r=4, lora_dropout=0.1, compute_dtype="bfloat16"))
    x = text_inputs(batch=4, seq=8)
    opt = torch.optim.AdamW(dt.trainable_parameters(model), lr=1e-2)
    losses = []
    for _ in range(8):
        loss = model(**x, labels=x["input_ids"]).loss
        losses.append(loss.item())
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert losses[-1] < losses[0] - 0.1


# --- save / load ----------------------------------------------------------------------------


def test_saved_adapter_is_peft_lora_and_reloads_requantised(tmp_path: Path) -> None:
    x = text_inputs()
    model = make_llama()
    dt.inject(model, qlora(quantize="int8"))
    perturb(model)
    with torch.no_grad():
        out = run(model, x)
    dt.save_adapter(model, tmp_path)
    raw = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert raw["peft_type"] == "LORA"
    assert raw["deltatune_method"] == "qlora"
    assert raw["quantize"] == "int8"
    fresh = make_llama()  # float
    dt.load_adapter(fresh, tmp_path)
    assert n_quant(fresh) == 14
    with torch.no_grad():
        assert torch.equal(run(fresh, x), out)


def test_peft_loads_it_onto_a_float_base(tmp_path: Path) -> None:
    from peft import PeftModel

    x = text_inputs()
    model = make_llama()
    dt.inject(model, qlora())
    perturb(model)
    dt.save_adapter(model, tmp_path)
    tensors = {k: v.detach().clone() for k, v in dt.adapter_state_dict(model).items()}

    peft_model = PeftModel.from_pretrained(make_llama(), str(tmp_path)).eval()
    # The same LoRA tensors as plain LoRA on the float base, computed by deltatune.
    plain = make_llama()
    targets = [n for n, m in model.named_modules() if isinstance(m, LoraLinear)]
    dt.inject(plain, dt.LoraConfig(r=4, target_modules=targets))
    with torch.no_grad():
        for key, t in dt.adapter_state_dict(plain).items():
            t.copy_(tensors[key])
        diff = (peft_model(**x).logits - run(plain, x)).abs().max().item()
    assert diff <= 1e-5


# --- merging --------------------------------------------------------------------------------


def test_deltatune_merge_refuses_a_quantised_base() -> None:
    model = make_llama()
    dt.inject(model, qlora())
    with pytest.raises(dt.DeltatuneError, match="cannot be merged"):
        dt.merge(model)
    # plain LoRA over a base quantised at load time: refused with the way out named
    base = make_llama()
    quantize_model(base, "nf4", compute_dtype="float32")
    dt.inject(base, dt.LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    x = text_inputs()
    with torch.no_grad():
        before = run(base, x)
    with pytest.raises(dt.DeltatuneError, match="merge_quantized"):
        dt.merge(base)
    with torch.no_grad():
        assert torch.equal(run(base, x), before)
    assert not any(m.merged_adapters for _, m in dt.adapter_layers(base))


@pytest.mark.parametrize("dora", [False, True])
def test_merge_quantized_reports_each_modes_error(dora: bool) -> None:
    x = text_inputs()
    reports = {}
    for mode in ("dequantize", "requantize"):
        model = make_llama()
        dt.inject(model, qlora(use_dora=dora, init_lora_weights=False))
        mem = quantized_memory(model)
        with torch.no_grad():
            out = run(model, x)
        report = merge_quantized(model, x, mode=mode)
        reports[mode] = report
        assert report.layers == 14
        assert not list(dt.adapter_layers(model))
        with torch.no_grad():
            merged = run(model, x)
        diff = (merged - out).abs()
        assert report.max_abs_diff == pytest.approx(diff.max().item(), abs=1e-7)
        assert report.mean_abs_diff == pytest.approx(diff.mean().item(), abs=1e-7)
        if mode == "dequantize":
            assert n_quant(model) == 0  # a plain float model
            assert report.max_abs_diff <= 1e-4
        else:
            assert n_quant(model) == 14
            assert quantized_memory(model).bytes == mem.bytes
            assert "re-quantised" in str(report)
    assert reports["requantize"].mean_abs_diff > 10 * reports["dequantize"].mean_abs_diff


def test_dequantized_merge_matches_the_written_out_weight() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(128, 64))
    dt.inject(
        model,
        qlora(
            target_modules=["0"], init_lora_weights=False, lora_alpha=8, compute_dtype="bfloat16"
        ),
    )
    layer = model[0]
    expected = layer.base_layer.dequantize() + 2.0 * (
        layer.lora_B["default"].weight @ layer.lora_A["default"].weight
    )
    x = torch.randn(6, 128)
    report = merge_quantized(model, x, dtype=torch.bfloat16)
    assert isinstance(model[0], nn.Linear) and model[0].weight.dtype == torch.bfloat16
    assert torch.allclose(model[0].weight.float(), expected, atol=1e-2, rtol=1e-2)
    assert report.max_abs_diff > 0  # bf16 rounding, reported rather than hidden


# --- config / model loading / CLI -------------------------------------------------------------


def test_bad_config() -> None:
    with pytest.raises(dt.ConfigError, match="quantize"):
        dt.config_from_dict({"name": "qlora", "quantize": "nf2"})
    with pytest.raises(dt.ConfigError, match="compute_dtype"):
        dt.config_from_dict({"name": "qlora", "compute_dtype": "fp8"})
    model = make_llama()
    quantize_model(model, "int8")
    with pytest.raises(dt.ConfigError, match="set the two equal"):
        dt.inject(model, qlora(quantize="nf4"))
    float_model = make_bert()
    with pytest.raises(dt.ConfigError, match="matches no module"):
        dt.inject(float_model, qlora(target_modules=["nope"]))
    assert n_quant(float_model) == 0  # a bad config leaves the base float


def test_model_quantize_at_load(tiny_model_dir: Path) -> None:  # noqa: F811
    from deltatune.models import ModelConfig, load_classifier

    cfg = ModelConfig.from_dict({"name_or_path": str(tiny_model_dir), "quantize": "nf4"})
    model = load_classifier(cfg, ["a", "b", "c"])
    assert n_quant(model) == 2 * 6 + 1
    assert isinstance(model.classifier, nn.Linear)
    with pytest.raises(dt.ConfigError, match="quantize"):
        ModelConfig.from_dict({"quantize": "nf3"})


def test_methods_lists_qlora(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_cli(capsys, "methods", "--json")
    assert code == 0
    row = next(r for r in json.loads(out) if r["method"] == "qlora")
    assert row["peft_compatible"] and not row["merge"]


def test_cli_train_and_quantised_merges(
    tiny_model_dir: Path,  # noqa: F811
    csv_data: Path,  # noqa: F811
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from transformers import AutoModelForSequenceClassification

    cfg = write_config(
        tmp_path, tiny_model_dir, csv_data, name="qlora", r=4, lora_alpha=8, compute_dtype="float32"
    )
    assert run_cli(capsys, "train", str(cfg), "train.epochs=2")[0] == 0
    run_dir = tmp_path / "run"
    code, _, err = run_cli(capsys, "merge", str(run_dir), str(tmp_path / "m"))
    assert code != 0 and "--dequantize" in err
    code, out, _ = run_cli(capsys, "merge", str(run_dir), str(tmp_path / "deq"), "--dequantize")
    assert code == 0 and "max |Δ|" in out
    report = json.loads((tmp_path / "deq" / "merge_report.json").read_text())
    assert report["mode"] == "dequantize" and report["max_abs_diff"] <= 1e-4
    merged = AutoModelForSequenceClassification.from_pretrained(tmp_path / "deq")
    assert not any("lora" in k for k in merged.state_dict())
    code, out, _ = run_cli(capsys, "merge", str(run_dir), str(tmp_path / "req"), "--requantize")
    assert code == 0
    report = json.loads((tmp_path / "req" / "merge_report.json").read_text())
    assert report["mode"] == "requantize" and report["max_abs_diff"] > 0
    assert (tmp_path / "req" / "model.safetensors").is_file()


# --- paged optimiser / gradient checkpointing ---------------------------------------------------


def test_gradient_checkpointing_gives_the_same_gradients() -> None:
    from deltatune.quant.paged import enable_gradient_checkpointing

    x = text_inputs(batch=2, seq=6)
    grads = []
    for checkpointing in (False, True):
        model = make_llama().train()
        dt.inject(model, qlora(init_lora_weights=False))
        if checkpointing:
            enable_gradient_checkpointing(model)
            assert any(getattr(m, "gradient_checkpointing", False) for m in model.modules())
        model(**x, labels=x["input_ids"]).loss.backward()
        grads.append(torch.cat([p.grad.flatten() for p in dt.trainable_parameters(model)]))
    assert torch.allclose(grads[0], grads[1], atol=1e-6)
    with pytest.raises(dt.ConfigError, match="gradient_checkpointing"):
        enable_gradient_checkpointing(nn.Linear(2, 2))


def test_paged_optimizer_needs_cuda() -> None:
    from deltatune.quant.paged import build_named_optimizer
    from deltatune.train import TrainerConfig

    cfg = TrainerConfig.from_dict({"optimizer": "paged_adamw_8bit", "gradient_checkpointing": True})
    assert cfg.optimizer == "paged_adamw_8bit"
    p = nn.Parameter(torch.zeros(3))
    assert isinstance(build_named_optimizer("adamw", [{"params": [p]}], 1e-3), torch.optim.AdamW)
    if not torch.cuda.is_available():
        with pytest.raises(dt.DeltatuneError, match="needs the trainable parameters on CUDA"):
            build_named_optimizer("paged_adamw", [{"params": [p]}], 1e-3)
    with pytest.raises(dt.ConfigError, match="optimizer"):
        TrainerConfig.from_dict({"optimizer": "sgd"})


def test_quantised_base_refuses_in_place_methods() -> None:
    from deltatune.run import load_run_config

    with pytest.raises(dt.ConfigError, match=r"model\.quantize: nf4 freezes"):
        load_run_config(None, ["model.quantize=nf4", "method.name=full"])
    cfg = load_run_config(None, ["model.quantize=int8"])
    assert cfg.model.quantize == "int8" and cfg.method["name"] == "lora"

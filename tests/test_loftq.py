"""LoftQ initialisation of QLoRA (Li et al., 2023, Algorithm 1), written out here:

    L_0 = 0;   for t = 1..T:   Q_t = NF4(W − L_{t−1}),   L_t = best rank-r fit of W − Q_t (SVD)
    base = Q_T,   s·B A = L_T,   B = U_r Σ_r^½ / √s,   A = Σ_r^½ V_rᵀ / √s

checked against that loop (with the NF4 round trip of the paper written out in test_quant),
plus: the error ‖W − Q − s·B A‖ is below plain NF4's and does not grow with T; the model at
initialisation is closer to the float model than plain QLoRA; training; save/load (LoftQ is
re-run on the float base at load: T = 1 rebuilds NF4(W), T > 1 rebuilds Q_T); bad configs.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest
import torch
from torch import nn

import deltatune as dt
from conftest import make_gpt2, make_llama, run, text_inputs
from deltatune.checkpoint import CONFIG_NAME
from deltatune.methods.lora import LoraLinear
from deltatune.methods.qlora import QLoraConfig
from deltatune.quant import QuantLinear, quantize_model
from deltatune.quant.loftq import loftq_init
from test_cli import csv_data, run_cli, tiny_model_dir, write_config  # noqa: F401 (fixtures)
from test_quant import paper_nf4_roundtrip


def qlora(**options: object) -> QLoraConfig:
    return QLoraConfig(**{"r": 4, "compute_dtype": "float32", **options})  # type: ignore[arg-type]


def loftq(iters: int = 1, **options: object) -> QLoraConfig:
    return qlora(init_lora_weights="loftq", loftq_config={"loftq_iter": iters}, **options)


def weight(out_f: int = 128, in_f: int = 256, seed: int = 0) -> torch.Tensor:
    """Gaussian weights with a few strong directions, as pretrained matrices have."""
    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn(out_f, in_f, generator=gen) * 0.02
    u, v = torch.randn(out_f, 3, generator=gen), torch.randn(3, in_f, generator=gen)
    return noise + 0.01 * u @ v


def reference_loftq(w: torch.Tensor, r: int, s: float, iters: int):
    """The algorithm above with the paper's NF4 (block 64, double-quantised constants) and an
    explicit SVD; returns (Q_T dequantised, L_T, the error after each iteration)."""
    code = QuantLinear.from_weight(w, None, "nf4", "float32").nf4_code
    low_rank = torch.zeros_like(w, dtype=torch.float64)
    errors = []
    for _ in range(iters):
        _, q = paper_nf4_roundtrip((w.double() - low_rank).float(), code=code)
        residual = w.double() - q
        u, sigma, vh = torch.linalg.svd(residual, full_matrices=False)
        low_rank = u[:, :r] @ torch.diag(sigma[:r]) @ vh[:r]
        errors.append((residual - low_rank).norm().item())
    return q, low_rank, errors


def error_of(
    w: torch.Tensor, base: QuantLinear, a: torch.Tensor, b: torch.Tensor, s: float
) -> float:
    return (w - base.dequantize() - s * b @ a).norm().item()


# --- one layer --------------------------------------------------------------------------------


def test_one_iteration_is_the_truncated_svd_of_the_nf4_error() -> None:
    w, r, s = weight(), 8, 16 / 8
    result = loftq_init(
        w, None, scheme="nf4", rank=r, scaling=s, num_iter=1, compute_dtype="float32"
    )
    # T = 1: the base is plain NF4(W), code for code.
    plain = QuantLinear.from_weight(w, None, "nf4", "float32")
    assert torch.equal(result.base.quantized_data, plain.quantized_data)
    q, low_rank, errors = reference_loftq(w, r, s, 1)
    assert torch.allclose(result.base.dequantize().double(), q, atol=1e-6)
    a, b = result.lora_A, result.lora_B
    assert a.shape == (r, 256) and b.shape == (128, r)
    # s·B A is the rank-r truncated SVD of W − NF4(W) ...
    assert torch.allclose((s * b @ a).double(), low_rank, atol=1e-6)
    # ... split evenly: B's columns and A's rows are orthogonal, with norms √(σ_i / s) each.
    sigma = torch.linalg.svdvals(w.double() - q)[:r]
    assert torch.allclose(b.norm(dim=0).double(), (sigma / s).sqrt(), rtol=1e-4)
    assert torch.allclose(a.norm(dim=1).double(), (sigma / s).sqrt(), rtol=1e-4)
    gram_b = b.t() @ b
    assert torch.allclose(gram_b, torch.diag(gram_b.diagonal()), atol=1e-6)
    assert result.errors[0] == pytest.approx(errors[0], rel=1e-4)
    assert result.quantization_error == pytest.approx((w - plain.dequantize()).norm().item())


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_error_is_below_plain_nf4_and_does_not_grow_with_iterations(seed: int) -> None:
    w, r, s = weight(seed=seed), 8, 2.0
    plain = (w - QuantLinear.from_weight(w, None, "nf4", "float32").dequantize()).norm().item()
    measured = []
    for iters in (1, 2, 3, 5):
        res = loftq_init(
            w, None, scheme="nf4", rank=r, scaling=s, num_iter=iters, compute_dtype="float32"
        )
        err = error_of(w, res.base, res.lora_A, res.lora_B, s)  # recomputed, not reported
        assert err == pytest.approx(res.errors[-1], rel=1e-4)
        measured.append(err)
    assert measured[0] < 0.97 * plain
    assert all(later <= earlier * (1 + 1e-6) for earlier, later in itertools.pairwise(measured))
    assert measured[-1] < measured[0]  # T > 1 moves the base too, and it helps


def test_several_iterations_match_the_written_out_loop() -> None:
    w, r, s = weight(seed=3), 4, 0.5
    result = loftq_init(
        w, None, scheme="nf4", rank=r, scaling=s, num_iter=4, compute_dtype="float32"
    )
    q, low_rank, errors = reference_loftq(w, r, s, 4)
    ours = result.base.dequantize().double()
    # The two loops round W − L_{t−1} from float sums done in another order: a weight sitting on
    # an NF4 decision boundary may go the other way, nothing more.
    assert (ours - q).abs().gt(1e-5).float().mean() < 1e-3
    assert torch.allclose((s * result.lora_B @ result.lora_A).double(), low_rank, atol=1e-3)
    assert result.errors == pytest.approx(errors, rel=1e-3)
    # The base really moved off NF4(W).
    plain = QuantLinear.from_weight(w, None, "nf4", "float32")
    assert not torch.equal(result.base.quantized_data, plain.quantized_data)


def test_int8_base() -> None:
    w, s = weight(seed=4), 2.0
    res = loftq_init(w, None, scheme="int8", rank=8, scaling=s, num_iter=2, compute_dtype="float32")
    plain = (w - QuantLinear.from_weight(w, None, "int8", "float32").dequantize()).norm().item()
    assert res.base.scheme == "int8"
    assert error_of(w, res.base, res.lora_A, res.lora_B, s) < 0.97 * plain


# --- the model --------------------------------------------------------------------------------


def test_model_starts_closer_to_the_float_model_than_plain_qlora() -> None:
    x = text_inputs()
    float_model = make_llama()
    with torch.no_grad():
        reference = run(float_model, x)
    gaps = {}
    for name, config in (("plain", qlora()), ("loftq1", loftq(1)), ("loftq3", loftq(3))):
        model = make_llama()
        dt.inject(model, config)
        assert sum(isinstance(m, QuantLinear) for m in model.modules()) == 14
        with torch.no_grad():
            gaps[name] = (run(model, x) - reference).abs().mean().item()
    assert gaps["loftq1"] < 0.9 * gaps["plain"]
    assert gaps["loftq3"] < gaps["loftq1"]


def test_model_layers_hold_the_layer_algorithm() -> None:
    float_model = make_llama()
    model = make_llama()
    dt.inject(model, loftq(2, lora_alpha=8, rank_pattern={"q_proj": 2}))
    for name, layer in model.named_modules():
        if not isinstance(layer, LoraLinear):
            continue
        w = float_model.get_submodule(name).weight.detach()
        r = 2 if name.endswith("q_proj") else 4
        expected = loftq_init(
            w, None, scheme="nf4", rank=r, scaling=8 / r, num_iter=2, compute_dtype="float32"
        )
        assert torch.equal(layer.base_layer.quantized_data, expected.base.quantized_data)
        assert torch.equal(layer.lora_A["default"].weight, expected.lora_A)
        assert torch.equal(layer.lora_B["default"].weight, expected.lora_B)
        assert layer.scaling["default"] == 8 / r


def test_gpt2_conv1d_weights_are_read_transposed() -> None:
    x = text_inputs()
    with torch.no_grad():
        reference = run(make_gpt2(), x)
    gaps = []
    for config in (qlora(), loftq(1)):
        model = make_gpt2()
        dt.inject(model, config)
        with torch.no_grad():
            gaps.append((run(model, x) - reference).abs().mean().item())
    assert gaps[1] < 0.9 * gaps[0]


def test_training_lowers_the_loss() -> None:
    model = make_llama().train()
    dt.inject(model, loftq(2, lora_dropout=0.1, compute_dtype="bfloat16"))
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
    assert all("lora_" in n for n, p in model.named_parameters() if p.requires_grad)


# --- save / load ------------------------------------------------------------------------------


@pytest.mark.parametrize("iters", [1, 3])
def test_save_and_load_rebuilds_the_base(tmp_path: Path, iters: int) -> None:
    x = text_inputs()
    model = make_llama()
    dt.inject(model, loftq(iters))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # stands for training: the factors move away from their init
        for p in dt.trainable_parameters(model):
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
        out = run(model, x)
    dt.save_adapter(model, tmp_path)
    raw = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert raw["peft_type"] == "LORA" and raw["deltatune_method"] == "qlora"
    assert raw["init_lora_weights"] == "loftq"
    assert raw["loftq_config"] == {"loftq_bits": 4, "loftq_iter": iters}  # PEFT's keys

    fresh = make_llama()  # the float base: LoftQ runs again, deterministically
    dt.load_adapter(fresh, tmp_path)
    with torch.no_grad():
        assert torch.equal(run(fresh, x), out)
    bases = {n: m.base_layer for n, m in model.named_modules() if isinstance(m, LoraLinear)}
    for name, layer in fresh.named_modules():
        if isinstance(layer, LoraLinear):
            assert torch.equal(layer.base_layer.quantized_data, bases[name].quantized_data)
    if iters == 1:  # T = 1: the base is NF4(W), plain QLoRA's
        plain = make_llama()
        dt.inject(plain, qlora())
        plain_bases = {
            n: m.base_layer for n, m in plain.named_modules() if isinstance(m, LoraLinear)
        }
        assert all(
            torch.equal(b.quantized_data, plain_bases[n].quantized_data) for n, b in bases.items()
        )


def test_loading_onto_an_already_quantised_base_is_refused(tmp_path: Path) -> None:
    model = make_llama()
    dt.inject(model, loftq(1))
    dt.save_adapter(model, tmp_path)
    quantised = make_llama()
    quantize_model(quantised, "nf4", compute_dtype="float32")
    with pytest.raises(dt.CheckpointError, match="needs the float weights"):
        dt.load_adapter(quantised, tmp_path)
    assert not list(dt.adapter_layers(quantised))


# --- bad input --------------------------------------------------------------------------------


def test_bad_config() -> None:
    with pytest.raises(dt.ConfigError, match=r"loftq_config.*init_lora_weights"):
        dt.config_from_dict({"name": "qlora", "loftq_config": {"loftq_iter": 2}})
    with pytest.raises(dt.ConfigError, match="loftq_bits=8 does not match quantize='nf4'"):
        dt.config_from_dict(
            {"name": "qlora", "init_lora_weights": "loftq", "loftq_config": {"loftq_bits": 8}}
        )
    with pytest.raises(dt.ConfigError, match="loftq_iter=0"):
        dt.config_from_dict(
            {"name": "qlora", "init_lora_weights": "loftq", "loftq_config": {"loftq_iter": 0}}
        )
    with pytest.raises(dt.ConfigError, match="unknown keys"):
        dt.config_from_dict(
            {"name": "qlora", "init_lora_weights": "loftq", "loftq_config": {"iters": 2}}
        )
    with pytest.raises(dt.ConfigError, match="use_dora"):
        dt.config_from_dict({"name": "qlora", "init_lora_weights": "loftq", "use_dora": True})
    with pytest.raises(dt.ConfigError, match="init_lora_weights"):
        dt.config_from_dict({"name": "lora", "init_lora_weights": "loftq"})  # qlora only
    cfg = dt.config_from_dict({"name": "qlora", "quantize": "int8", "init_lora_weights": "loftq"})
    assert cfg.loftq_config == {"loftq_bits": 8, "loftq_iter": 1}
    with pytest.raises(dt.ConfigError, match="rank"):
        loftq_init(torch.zeros(4, 64), None, scheme="nf4", rank=5, scaling=1.0)


def test_a_quantised_base_is_refused_and_left_as_it_was() -> None:
    model = make_llama()
    quantize_model(model, "nf4", compute_dtype="float32")
    x = text_inputs()
    with torch.no_grad():
        before = run(model, x)
    with pytest.raises(dt.ConfigError, match=r"needs the float weights.*model\.quantize: null"):
        dt.inject(model, loftq(1))
    assert not list(dt.adapter_layers(model))
    with torch.no_grad():
        assert torch.equal(run(model, x), before)
    assert isinstance(model.lm_head, nn.Linear)


def test_cli_run_reloads_to_the_same_test_metrics(
    tiny_model_dir: Path,  # noqa: F811
    csv_data: Path,  # noqa: F811
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    cfg = write_config(
        tmp_path,
        tiny_model_dir,
        csv_data,
        name="qlora",
        r=4,
        lora_alpha=8,
        compute_dtype="float32",
        init_lora_weights="loftq",
        loftq_config={"loftq_iter": 2},
    )
    assert run_cli(capsys, "train", str(cfg), "train.epochs=2")[0] == 0
    trained = json.loads((tmp_path / "run" / "metrics.json").read_text())["test"]
    # `eval` rebuilds the run: float base, LoftQ re-run (T = 2), the saved factors loaded.
    code, out, _ = run_cli(capsys, "eval", str(tmp_path / "run"))
    assert code == 0
    reloaded = json.loads(out)
    assert reloaded["loss"] == pytest.approx(trained["loss"], abs=1e-6)
    assert reloaded["accuracy"] == trained["accuracy"]

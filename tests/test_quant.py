"""NF4 / int8 quantised Linear layers against the QLoRA paper's definitions, written out here.

NF4 (Dettmers et al., 2023, §3 and Appendix E): the 16 levels are quantiles of N(0, 1),
with an asymmetric split so that 0 is exact: with δ = ½(1/30 + 1/32),

    positive: Φ⁻¹(linspace(1 − δ, ½, 9)[:-1])   (8 values)
    negative: −Φ⁻¹(linspace(1 − δ, ½, 8)[:-1])  (7 values)
    zero, then all 16 sorted and divided by the largest.

Blockwise absmax (block 64): c_b = max|W_b|, index k = argmin |W/c_b − q_k|. Double quantisation
(block 256 of constants): μ = mean c, a_j = max|c − μ| over the block, int8 codes
round((c − μ)·128/a_j) clamped to [−128, 127], ĉ = code·a_j/128 + μ. Dequantised Ŵ = q_k · ĉ_b.
(The paper quantises the second level to 8 bits; torchao's int8 absmax after subtracting the
mean is what this writes out.)

Int8: s_o = max|W_o·|/127, Q = round(W/s), Ŵ = Q·s.
"""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import deltatune as dt
from conftest import make_bert, make_llama, run, text_inputs
from deltatune.quant import (
    QuantLinear,
    dequantize_model,
    nf4_scaler_block,
    quantize_model,
    quantized_memory,
)


def paper_nf4_code() -> torch.Tensor:
    delta = 0.5 * (1 / 30 + 1 / 32)
    pos = torch.special.ndtri(torch.linspace(1 - delta, 0.5, 9, dtype=torch.float64)[:-1])
    neg = -torch.special.ndtri(torch.linspace(1 - delta, 0.5, 8, dtype=torch.float64)[:-1])
    code = torch.cat([pos, neg, torch.zeros(1, dtype=torch.float64)]).sort().values
    return code / code.max()


def paper_nf4_roundtrip(
    w: torch.Tensor, block: int = 64, scaler_block: int = 256, code: torch.Tensor | None = None
):
    """(indices, dequantised weight) by the definition in the module docstring."""
    flat = w.double().flatten()
    blocks = flat.view(-1, block)
    c = blocks.abs().amax(dim=1)
    code = paper_nf4_code() if code is None else code.double()
    idx = (blocks / c.unsqueeze(1)).unsqueeze(-1).sub(code).abs().argmin(dim=-1)
    mu = c.mean()
    centred = (c - mu).view(-1, scaler_block)
    a = centred.abs().amax(dim=1, keepdim=True)
    codes = torch.round(centred * 128 / a).clamp(-128, 127)
    c_hat = (codes * a / 128).flatten() + mu
    deq = code[idx] * c_hat.unsqueeze(1)
    return idx.flatten(), deq.view(w.shape)


def weight(out_f: int, in_f: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(out_f, in_f, generator=torch.Generator().manual_seed(seed)) * 0.05


def test_nf4_code_book_is_the_papers() -> None:
    layer = QuantLinear.from_weight(weight(64, 256), None, "nf4", "float32")
    ours = layer.nf4_code.double()
    assert ours.shape == (16,)
    assert ours[0] == -1 and ours[-1] == 1 and (ours == 0).sum() == 1
    # torchao stores the levels to 4 decimals (e.g. -0.6962 for -0.69619...).
    assert torch.allclose(ours, paper_nf4_code(), atol=6e-5, rtol=0)


def test_nf4_roundtrip_matches_the_definition() -> None:
    w = weight(128, 256)  # 512 blocks of 64 -> 2 scaler blocks of 256
    layer = QuantLinear.from_weight(w, None, "nf4", "float32")
    assert layer.scaler_block_size == 256
    idx, expected = paper_nf4_roundtrip(w)
    data = layer.quantized_data
    ours_idx = torch.stack([data >> 4, data & 0xF], dim=1).flatten().long()
    # The 4-decimal code book may flip a few elements that sit on a decision boundary.
    assert (ours_idx == idx).float().mean() > 0.999
    deq = layer.dequantize()
    same = ours_idx == idx
    assert torch.allclose(deq.double().flatten()[same], expected.flatten()[same], atol=3e-5)
    # With the stored (4-decimal) levels in the same written-out formula: exact agreement.
    idx4, expected4 = paper_nf4_roundtrip(w, code=layer.nf4_code)
    assert torch.equal(ours_idx, idx4)
    assert torch.allclose(deq.double(), expected4, atol=1e-6)
    err = (deq - w).abs()
    # |W − Ŵ| is at most half the widest gap of the code book times the block's scale (+ ĉ error).
    gap = paper_nf4_code().diff().max().item() / 2
    c = w.flatten().view(-1, 64).abs().amax(dim=1, keepdim=True).expand(-1, 64).reshape(w.shape)
    assert (err <= gap * c * 1.02 + 1e-4).all()
    assert err.mean() / w.abs().mean() < 0.15


def test_int8_roundtrip_matches_the_definition() -> None:
    w = weight(48, 40)
    layer = QuantLinear.from_weight(w, None, "int8", "float32")
    s = w.abs().amax(dim=1) / 127
    q = torch.round(w / s.unsqueeze(1)).clamp(-127, 127)
    assert torch.equal(layer.qweight.float(), q)
    assert torch.allclose(layer.dequantize(), q * s.unsqueeze(1), atol=1e-7)
    assert ((layer.dequantize() - w).abs() <= s.unsqueeze(1) / 2 + 1e-7).all()


@pytest.mark.parametrize(("scheme", "limit"), [("nf4", 0.53), ("int8", 1.02)])
def test_resident_bytes_per_parameter(scheme: str, limit: float) -> None:
    model = nn.Sequential(nn.Linear(384, 1536), nn.Linear(1536, 384), nn.Linear(384, 7))
    quantize_model(model, scheme, compute_dtype="float32", skip=["2"])  # type: ignore[arg-type]
    mem = quantized_memory(model)
    assert mem.params == 2 * 384 * 1536
    assert mem.bytes_per_param <= limit
    if scheme == "nf4":
        # 4 bits + one int8 constant per 64 + one fp32 factor per 64*256 + one fp32 mean
        expected = 0.5 + 1 / 64 + 4 / (64 * 256) + 4 / (384 * 1536)
        assert mem.bytes_per_param == pytest.approx(expected, rel=1e-6)
    # nothing float of the weights' size is kept by the quantised layers
    for layer in model[:2]:
        for t in [*layer.buffers(), *layer.parameters()]:
            assert not (t.is_floating_point() and t.numel() >= 384 * 1536 // 64 + 1)


def test_scaler_block_falls_back_to_a_divisor() -> None:
    assert nf4_scaler_block(2304) == 256
    assert nf4_scaler_block(576 * 576 // 64) == 216  # SmolLM2's 576x576 projections: 5184 = 24·216
    assert nf4_scaler_block(16) == 16
    layer = QuantLinear.from_weight(weight(576, 576), None, "nf4", "float32")
    assert layer.scaler_block_size == 216
    _, expected = paper_nf4_roundtrip(weight(576, 576), scaler_block=216, code=layer.nf4_code)
    assert torch.allclose(layer.dequantize().double(), expected, atol=1e-6)


@pytest.mark.parametrize("scheme", ["nf4", "int8"])
def test_forward_and_input_gradient_use_the_dequantised_weight(scheme: str) -> None:
    w = weight(64, 128)
    b = torch.randn(64) * 0.1
    layer = QuantLinear.from_weight(w, b, scheme, "float32")  # type: ignore[arg-type]
    w_hat = layer.dequantize()
    x = torch.randn(3, 5, 128, requires_grad=True)
    y = layer(x)
    assert torch.allclose(y, F.linear(x, w_hat, b), atol=1e-5)
    g = torch.randn_like(y)
    y.backward(g)
    assert x.grad is not None
    assert torch.allclose(x.grad, g @ w_hat, atol=1e-5)
    assert not any(p.requires_grad for p in layer.parameters())


@pytest.mark.parametrize("scheme", ["nf4", "int8"])
def test_bf16_compute_keeps_the_input_dtype(scheme: str) -> None:
    w = weight(64, 128)
    layer = QuantLinear.from_weight(w, None, scheme, "bfloat16")  # type: ignore[arg-type]
    assert layer.compute_dtype == torch.bfloat16
    x = torch.randn(4, 128)
    y = layer(x)
    assert y.dtype == torch.float32
    ref = F.linear(x, layer.dequantize())
    assert (y - ref).abs().max() < 0.02 * ref.abs().max()


def test_backward_keeps_no_float_copy_of_the_weight() -> None:
    layer = QuantLinear.from_weight(weight(256, 256), None, "nf4", "float32")
    kept: list[torch.Tensor] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        kept.append(t)
        return t

    x = torch.randn(2, 256, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        layer(x).sum().backward()
    assert kept
    assert not any(type(t) is torch.Tensor and t.numel() == 256 * 256 for t in kept)


def test_to_dtype_moves_but_does_not_round_the_constants() -> None:
    model = make_llama()
    quantize_model(model, "nf4", compute_dtype="float32")
    layer = model.model.layers[0].self_attn.q_proj
    before = layer.dequantize()
    model.to(torch.bfloat16)
    assert layer.quantization_factor.dtype == torch.float32
    assert torch.equal(layer.dequantize(), before)
    assert layer.bias is None and layer.quantized_data.dtype == torch.uint8


def test_quantize_model_skips_heads_and_reports_odd_shapes(caplog) -> None:
    model = make_bert()
    model.odd = nn.Linear(3, 7)  # 21 elements: not a multiple of the NF4 block
    with caplog.at_level(logging.WARNING):
        report = quantize_model(model, "nf4", compute_dtype="float32")
    assert "classifier" in report.skipped
    assert "odd" in report.skipped and "not a multiple" in report.skipped["odd"]
    assert "odd" in caplog.text
    assert isinstance(model.classifier, nn.Linear)
    assert isinstance(model.bert.encoder.layer[0].attention.self.query, QuantLinear)
    assert len(report.quantized) == 2 * 6 + 1  # q k v o intermediate output per layer + pooler
    # quantising again keeps what is quantised
    assert quantize_model(model, "nf4").quantized == []


def test_quantised_model_state_dict_round_trip() -> None:
    a, b = make_llama(), make_llama()
    quantize_model(a, "nf4", compute_dtype="float32")
    quantize_model(b, "nf4", compute_dtype="float32")
    with torch.no_grad():
        for buf in b.buffers():
            if buf.dtype == torch.uint8:
                buf.zero_()
    b.load_state_dict(a.state_dict())
    x = text_inputs()
    with torch.no_grad():
        assert torch.equal(run(a, x), run(b, x))


def test_dequantize_model_gives_float_linears() -> None:
    model = make_llama()
    x = text_inputs()
    quantize_model(model, "int8", compute_dtype="float32")
    with torch.no_grad():
        q_out = run(model, x)
    names = dequantize_model(model)
    assert names and not any(isinstance(m, QuantLinear) for m in model.modules())
    with torch.no_grad():
        assert (run(model, x) - q_out).abs().max() < 1e-5


def test_bad_input() -> None:
    with pytest.raises(dt.ConfigError, match="quantize='nf3'"):
        quantize_model(make_llama(), "nf3")  # type: ignore[arg-type]
    with pytest.raises(dt.ConfigError, match="compute_dtype='fp8'"):
        QuantLinear.from_weight(weight(64, 64), None, "nf4", "fp8")
    with pytest.raises(dt.ConfigError, match="multiple of the NF4 block"):
        QuantLinear.from_weight(weight(3, 7), None, "nf4", "float32")
    model = make_llama()
    dt.inject(model, dt.LoraConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(dt.ConfigError, match="before adding adapters"):
        quantize_model(model, "nf4")


@pytest.mark.slow
def test_real_minilm_nf4_bytes_and_outputs() -> None:
    """The embedded MiniLM: ≤ 0.53 bytes per quantised weight, and the 4-bit encoder's sentence
    embeddings stay close to the float ones on real BBC text."""
    from deltatune.data import DataConfig, load_text_splits
    from deltatune.models import ModelConfig, load_classifier, load_tokenizer

    cfg = ModelConfig()
    tok = load_tokenizer(cfg)
    texts = load_text_splits(DataConfig(max_length=64)).val.texts[:8]
    enc = tok(texts, truncation=True, max_length=64, padding=True, return_tensors="pt")
    float_model = load_classifier(cfg, ["a", "b"]).eval()
    quant_model = load_classifier(ModelConfig(quantize="nf4"), ["a", "b"]).eval()
    mem = quantized_memory(quant_model)
    assert mem.params == 6 * (4 * 384 * 384 + 2 * 384 * 1536) + 384 * 384
    assert mem.bytes_per_param <= 0.53
    with torch.no_grad():
        h_float = float_model.bert(**enc).last_hidden_state[:, 0]
        h_quant = quant_model.bert(**enc).last_hidden_state[:, 0]
    cos = F.cosine_similarity(h_float, h_quant, dim=-1)
    assert cos.min() > 0.95


@pytest.mark.slow
def test_real_smollm2_nf4_is_as_accurate_as_bitsandbytes() -> None:
    """Issue #6 regression: SmolLM2's NF4 perplexity jump is NF4's, not a bug of ours. On real
    SmolLM2 weights (incl. the 576x576 projections whose scaler block falls back to 216) our
    per-layer mean |W − Ŵ| stays within 1% of bitsandbytes' NF4 and of the paper's block-64
    absmax round trip (no double quantisation) written out here; the tied embedding / lm_head
    stays float and shared."""
    bnbf = pytest.importorskip("bitsandbytes.functional")
    from deltatune.lm.load import load_causal_lm

    model, _ = load_causal_lm("embedded-smollm2")
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    layer0 = {
        n: m.weight.detach().float().clone()
        for n, m in model.model.layers[0].named_modules()
        if isinstance(m, nn.Linear)
    }
    report = quantize_model(model, "nf4", compute_dtype="float32")
    assert len(report.quantized) == 30 * 7 and report.skipped == {"lm_head": "output layer"}
    assert type(model.lm_head) is nn.Linear and type(model.model.embed_tokens) is nn.Embedding
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    code = paper_nf4_code().float()
    for name, w in layer0.items():
        ours = QuantLinear.from_weight(w, None, "nf4", "float32")
        if w.shape == (576, 576):
            assert ours.scaler_block_size == 216
        err_ours = (ours.dequantize() - w).abs().mean()
        q, state = bnbf.quantize_4bit(w, quant_type="nf4", blocksize=64, compress_statistics=True)
        err_bnb = (bnbf.dequantize_4bit(q, state).float() - w).abs().mean()
        blocks = w.reshape(-1, 64)
        c = blocks.abs().amax(1, keepdim=True)
        idx = (blocks / c).unsqueeze(-1).sub(code).abs().argmin(-1)
        err_ref = ((code[idx] * c).reshape(w.shape) - w).abs().mean()
        assert err_ours <= 1.01 * err_bnb, name
        assert err_ours <= 1.01 * err_ref, name

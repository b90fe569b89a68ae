"""LoRA / rsLoRA / DoRA outputs and gradients against the formulas written out independently.

Each test wraps one plain layer in a tiny module, injects LoRA with random A and B
(``init_lora_weights=False``), and recomputes the output from the raw tensors:

- Linear:    y = W x + b + s · B A x,          s = alpha / r   (rsLoRA: alpha / sqrt(r))
- Conv1D:    y = x W + b + s · B A x           (GPT-2 keeps W as (in, out))
- Embedding: y = E[x] + s · (B A)ᵀ[x]
- Conv2d:    y = conv(x, W + s · B ∘ A) + b    (A a k×k conv to r channels, B a 1×1 conv)
- DoRA:      y = m ⊙ (W + s B A) / ‖W + s B A‖_row · x + b
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

import deltatune as dt
from conftest import make_bert, run, text_inputs
from deltatune.methods.lora import LoraEmbedding


class One(nn.Module):
    """A model made of a single layer called ``layer``."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


def lora_one(layer: nn.Module, dtype: torch.dtype = torch.float32, **options) -> One:
    torch.manual_seed(0)
    model = One(layer).to(dtype).eval()
    cfg = dt.LoraConfig(target_modules=["layer"], init_lora_weights=False, **options)
    dt.inject(model, cfg)
    return model


def ab(model: One) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) as plain tensors in the (r, in) / (out, r) layout."""
    layer = model.layer
    if isinstance(layer, LoraEmbedding):
        return layer.lora_embedding_A["default"], layer.lora_embedding_B["default"]
    return layer.lora_A["default"].weight, layer.lora_B["default"].weight


def linear(in_f: int = 6, out_f: int = 5, bias: bool = True) -> nn.Linear:
    torch.manual_seed(1)
    return nn.Linear(in_f, out_f, bias=bias)


def conv1d(in_f: int = 6, out_f: int = 5) -> Conv1D:
    torch.manual_seed(1)
    layer = Conv1D(out_f, in_f)
    nn.init.normal_(layer.weight, std=0.3)
    nn.init.normal_(layer.bias, std=0.3)
    return layer


def inputs(*shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(2), dtype=dtype)


TOL = 1e-5


# --- plain LoRA ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("r", "alpha", "rslora", "scale"),
    [
        (4, 8, False, 8 / 4),
        (4, 8, True, 8 / math.sqrt(4)),
        (3, 5, False, 5 / 3),
        (2, 1, True, 1 / math.sqrt(2)),
    ],
)
def test_linear_formula(r: int, alpha: float, rslora: bool, scale: float) -> None:
    base = linear()
    w, b0 = base.weight.detach().clone(), base.bias.detach().clone()
    model = lora_one(base, r=r, lora_alpha=alpha, use_rslora=rslora)
    a, b = ab(model)
    assert a.shape == (r, 6) and b.shape == (5, r)
    assert model.layer.scaling["default"] == pytest.approx(scale)
    x = inputs(3, 4, 6)
    expected = x @ w.T + b0 + scale * (x @ a.T) @ b.T
    with torch.no_grad():
        got = model(x)
    assert (got - expected).abs().max() <= TOL
    # The LoRA part is really there (not a zero update).
    assert (got - (x @ w.T + b0)).abs().max() > 1e-2


def test_linear_without_bias() -> None:
    base = linear(bias=False)
    w = base.weight.detach().clone()
    model = lora_one(base, r=2, lora_alpha=4)
    a, b = ab(model)
    x = inputs(4, 6)
    with torch.no_grad():
        assert (model(x) - (x @ w.T + 2.0 * x @ a.T @ b.T)).abs().max() <= TOL


def test_conv1d_formula_and_layout() -> None:
    base = conv1d()
    w, b0 = base.weight.detach().clone(), base.bias.detach().clone()
    assert w.shape == (6, 5)  # GPT-2 Conv1D: (in, out)
    model = lora_one(base, r=4, lora_alpha=8)
    a, b = ab(model)
    assert a.shape == (4, 6) and b.shape == (5, 4)  # LoRA stays in the Linear layout
    x = inputs(2, 3, 6)
    expected = x @ w + b0 + 2.0 * (x @ a.T) @ b.T
    with torch.no_grad():
        assert (model(x) - expected).abs().max() <= TOL
    dt.merge(model)
    assert (model.layer.base_layer.weight - (w + 2.0 * (b @ a).T)).abs().max() <= TOL
    with torch.no_grad():
        assert (model(x) - expected).abs().max() <= TOL


def test_embedding_formula() -> None:
    torch.manual_seed(1)
    base = nn.Embedding(11, 6)
    e = base.weight.detach().clone()
    model = lora_one(base, r=3, lora_alpha=6)
    a, b = ab(model)
    assert a.shape == (3, 11) and b.shape == (6, 3)
    ids = torch.tensor([[0, 4, 10, 4], [7, 1, 2, 3]])
    expected = e[ids] + 2.0 * (b @ a).T[ids]
    with torch.no_grad():
        assert (model(ids) - expected).abs().max() <= TOL
    dt.merge(model)
    assert (model.layer.base_layer.weight - (e + 2.0 * (b @ a).T)).abs().max() <= TOL


@pytest.mark.parametrize(
    ("kernel", "stride", "padding", "dilation"),
    [(3, 1, 1, 1), (3, 2, 0, 1), (1, 1, 0, 1), (3, 1, 2, 2)],
)
def test_conv2d_formula(kernel: int, stride: int, padding: int, dilation: int) -> None:
    torch.manual_seed(1)
    base = nn.Conv2d(3, 5, kernel, stride=stride, padding=padding, dilation=dilation)
    w, b0 = base.weight.detach().clone(), base.bias.detach().clone()
    model = lora_one(base, r=2, lora_alpha=4)
    a, b = ab(model)
    assert a.shape == (2, 3, kernel, kernel) and b.shape == (5, 2, 1, 1)
    # delta[o, i, h, w] = s · Σ_r B[o, r] A[r, i, h, w]
    delta = 2.0 * torch.einsum("or,rihw->oihw", b[:, :, 0, 0], a)
    x = inputs(2, 3, 9, 9)
    expected = F.conv2d(x, w + delta, b0, stride=stride, padding=padding, dilation=dilation)
    with torch.no_grad():
        got = model(x)
    assert got.shape == expected.shape
    assert (got - expected).abs().max() <= TOL
    dt.merge(model)
    assert (model.layer.base_layer.weight - (w + delta)).abs().max() <= TOL


def test_dropout_acts_on_the_adapter_input_only() -> None:
    """Train mode: y = W x + b + s · B A x̃ with x̃ = mask ⊙ x / (1 - p) (inverted dropout).

    A is square (r = in = 4) and B has full column rank, so x̃ can be recovered from the output
    exactly, whatever random numbers the implementation draws for its mask.
    """
    p = 0.5
    base = linear(in_f=4, out_f=5).double()
    w, b0 = base.weight.detach().clone(), base.bias.detach().clone()
    model = lora_one(base, dtype=torch.float64, r=4, lora_alpha=8, lora_dropout=p)
    a, b = (t.detach() for t in ab(model))
    x = inputs(64, 4, dtype=torch.float64)
    with torch.no_grad():
        assert (model(x) - (x @ w.T + b0 + 2.0 * x @ a.T @ b.T)).abs().max() <= 1e-10  # eval: off
        model.train()
        y = model(x)
    x_tilde = torch.linalg.lstsq(b @ a, ((y - x @ w.T - b0) / 2.0).T).solution.T
    dropped = x_tilde.abs() <= 1e-8
    kept = (x_tilde - x / (1 - p)).abs() <= 1e-8
    assert bool((dropped | kept).all())
    assert 0.3 < dropped.double().mean().item() < 0.7
    # With B = 0 the adapter adds nothing, so the base path sees the undropped input.
    with torch.no_grad():
        model.layer.lora_B["default"].weight.zero_()
        assert (model(x) - (x @ w.T + b0)).abs().max() <= 1e-12


# --- DoRA -----------------------------------------------------------------------------------


def dora_weight(
    w_oi: torch.Tensor, a: torch.Tensor, b: torch.Tensor, m: torch.Tensor, s: float
) -> torch.Tensor:
    """The paper's merged DoRA weight, (out, in): m ⊙ V / ‖V‖_row with V = W + s B A."""
    v = w_oi + s * b @ a
    return m[:, None] * v / v.norm(dim=1, keepdim=True)


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_dora_forward_and_merge(kind: str) -> None:
    base = linear() if kind == "linear" else conv1d()
    w_oi = base.weight.detach().clone() if kind == "linear" else base.weight.detach().clone().T
    b0 = base.bias.detach().clone()
    model = lora_one(base, r=3, lora_alpha=6, use_dora=True)
    a, b = ab(model)
    mag = model.layer.lora_magnitude_vector["default"]
    assert mag.shape == (5,)
    # Initialised to the row norms of W + sBA, so the layer starts as the plain LoRA layer.
    assert torch.allclose(mag, (w_oi + 2.0 * b @ a).norm(dim=1), atol=TOL)
    with torch.no_grad():
        mag.mul_(torch.linspace(0.5, 1.5, 5))  # make the magnitude matter
    x = inputs(4, 6)
    expected = x @ dora_weight(w_oi, a, b, mag, 2.0).T + b0
    with torch.no_grad():
        got = model(x)
    assert (got - expected).abs().max() <= TOL
    assert (got - (x @ w_oi.T + b0 + 2.0 * x @ a.T @ b.T)).abs().max() > 1e-2

    dt.merge(model)
    merged = model.layer.base_layer.weight
    merged_oi = merged if kind == "linear" else merged.T
    assert (merged_oi - dora_weight(w_oi, a, b, mag, 2.0)).abs().max() <= TOL
    with torch.no_grad():
        assert (model(x) - expected).abs().max() <= TOL
    dt.unmerge(model)
    assert (model.layer.base_layer.weight - base_weight_of(kind, w_oi)).abs().max() <= TOL


def base_weight_of(kind: str, w_oi: torch.Tensor) -> torch.Tensor:
    return w_oi if kind == "linear" else w_oi.T


# --- gradients (fp64) -----------------------------------------------------------------------


def _grads(model: One, x: torch.Tensor, upstream: torch.Tensor) -> list[torch.Tensor]:
    params = [p for p in model.parameters() if p.requires_grad]
    out = model(x)
    return list(torch.autograd.grad((out * upstream).sum(), params))


def _check(
    reference: torch.Tensor, leaves: list[torch.Tensor], got: list[torch.Tensor], upstream
) -> None:
    want = torch.autograd.grad((reference * upstream).sum(), leaves)
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g.shape == w.shape
        assert (g - w).abs().max().item() <= 1e-10
        assert w.abs().max().item() > 1e-3  # a real gradient, not zeros on both sides


def test_linear_gradients_fp64() -> None:
    base = linear().double()
    w, b0 = base.weight.detach().clone(), base.bias.detach().clone()
    model = lora_one(base, dtype=torch.float64, r=3, lora_alpha=5, use_rslora=True)
    a, b = (t.detach().clone().requires_grad_() for t in ab(model))
    x, up = inputs(4, 6, dtype=torch.float64), inputs(4, 5, dtype=torch.float64) + 1
    s = 5 / math.sqrt(3)
    got = _grads(model, x, up)  # order: lora_A, lora_B
    _check(x @ w.T + b0 + s * x @ a.T @ b.T, [a, b], got, up)


def test_conv1d_gradients_fp64() -> None:
    base = conv1d().double()
    w, b0 = base.weight.detach().clone(), base.bias.detach().clone()
    model = lora_one(base, dtype=torch.float64, r=2, lora_alpha=4)
    a, b = (t.detach().clone().requires_grad_() for t in ab(model))
    x, up = inputs(3, 6, dtype=torch.float64), inputs(3, 5, dtype=torch.float64) + 1
    got = _grads(model, x, up)
    _check(x @ w + b0 + 2.0 * x @ a.T @ b.T, [a, b], got, up)


def test_embedding_gradients_fp64() -> None:
    torch.manual_seed(1)
    base = nn.Embedding(11, 6).double()
    e = base.weight.detach().clone()
    model = lora_one(base, dtype=torch.float64, r=3, lora_alpha=6)
    a, b = (t.detach().clone().requires_grad_() for t in ab(model))
    ids = torch.tensor([[0, 4, 10, 4], [7, 1, 2, 3]])
    up = inputs(2, 4, 6, dtype=torch.float64) + 1
    got = _grads(model, ids, up)  # order: lora_embedding_A, lora_embedding_B
    _check(e[ids] + 2.0 * (b @ a).T[ids], [a, b], got, up)


def test_conv2d_gradients_fp64() -> None:
    torch.manual_seed(1)
    base = nn.Conv2d(3, 4, 3, padding=1).double()
    w, b0 = base.weight.detach().clone(), base.bias.detach().clone()
    model = lora_one(base, dtype=torch.float64, r=2, lora_alpha=4)
    a, b = (t.detach().clone().requires_grad_() for t in ab(model))
    x, up = inputs(2, 3, 5, 5, dtype=torch.float64), inputs(2, 4, 5, 5, dtype=torch.float64) + 1
    got = _grads(model, x, up)
    delta = 2.0 * torch.einsum("or,rihw->oihw", b[:, :, 0, 0], a)
    _check(F.conv2d(x, w + delta, b0, padding=1), [a, b], got, up)


def test_dora_gradients_fp64() -> None:
    """DoRA treats the row norm as a constant in the backward pass (paper §4.3)."""
    base = linear().double()
    w, b0 = base.weight.detach().clone(), base.bias.detach().clone()
    model = lora_one(base, dtype=torch.float64, r=3, lora_alpha=6, use_dora=True)
    with torch.no_grad():
        model.layer.lora_magnitude_vector["default"].mul_(
            torch.linspace(0.5, 1.5, 5, dtype=torch.float64)
        )
    a, b = (t.detach().clone().requires_grad_() for t in ab(model))
    m = model.layer.lora_magnitude_vector["default"].detach().clone().requires_grad_()
    x, up = inputs(4, 6, dtype=torch.float64), inputs(4, 5, dtype=torch.float64) + 1
    got = _grads(model, x, up)  # order: lora_A, lora_B, lora_magnitude_vector
    v = w + 2.0 * b @ a
    reference = x @ (m[:, None] * v / v.norm(dim=1, keepdim=True).detach()).T + b0
    _check(reference, [a, b, m], got, up)


# --- per-module rank and alpha --------------------------------------------------------------


def test_rank_and_alpha_patterns(tmp_path: Path) -> None:
    model = make_bert()
    cfg = dt.LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=["query", "value"],
        rank_pattern={"query": 2, "bert.encoder.layer.1.attention.self.value": 6},
        alpha_pattern={"value": 3},
        init_lora_weights=False,
    )
    dt.inject(model, cfg)
    layers = dict(dt.adapter_layers(model))
    expect = {  # module -> (r, alpha)
        "bert.encoder.layer.0.attention.self.query": (2, 8),
        "bert.encoder.layer.1.attention.self.query": (2, 8),
        "bert.encoder.layer.0.attention.self.value": (4, 3),
        "bert.encoder.layer.1.attention.self.value": (6, 3),
    }
    assert set(layers) == set(expect)
    for name, (r, alpha) in expect.items():
        layer = layers[name]
        assert layer.lora_A["default"].weight.shape == (r, 32), name
        assert layer.lora_B["default"].weight.shape == (32, r), name
        assert layer.scaling["default"] == pytest.approx(alpha / r), name
    assert dt.trainable_report(model).trainable == (2 + 2 + 4 + 6) * 64
    # The per-module ranks survive save / load.
    x = text_inputs()
    with torch.no_grad():
        out = run(model, x)
    dt.save_adapter(model, tmp_path)
    fresh = make_bert()
    dt.load_adapter(fresh, tmp_path)
    with torch.no_grad():
        assert torch.equal(run(fresh, x), out)


# --- safe merge -----------------------------------------------------------------------------


@pytest.mark.parametrize("use_dora", [False, True])
def test_safe_merge_refuses_nan(use_dora: bool) -> None:
    model = lora_one(linear(), r=2, lora_alpha=4, use_dora=use_dora)
    w = model.layer.base_layer.weight.detach().clone()
    with torch.no_grad():
        model.layer.lora_B["default"].weight[1, 0] = float("nan")
    with pytest.raises(dt.DeltatuneError, match="NaN"):
        dt.merge(model, safe=True)
    assert torch.equal(model.layer.base_layer.weight, w)
    assert model.layer.merged_adapters == []


def test_safe_merge_leaves_no_half_merged_model() -> None:
    """A NaN in one module's adapter: no other module is left merged either."""
    model = make_bert()
    dt.inject(model, dt.LoraConfig(r=2, target_modules=["query", "value"], init_lora_weights=False))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    broken = "bert.encoder.layer.1.attention.self.query"
    with torch.no_grad():
        model.get_submodule(broken).lora_B["default"].weight[0, 0] = float("inf")
    with pytest.raises(dt.DeltatuneError) as err:
        dt.merge(model)
    assert broken in str(err.value) and "\n" not in str(err.value)
    assert not any(layer.merged_adapters for _, layer in dt.adapter_layers(model))
    for n, p in model.named_parameters():
        if "lora_B" not in n:
            assert (p - before[n]).abs().max() <= 1e-6, n
    # The broken module's base weight is bit-for-bit untouched.
    assert torch.equal(
        model.get_submodule(broken).base_layer.weight, before[f"{broken}.base_layer.weight"]
    )

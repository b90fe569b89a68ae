"""The fast LoRA kernel (deltatune.kernels.lora_linear) changes no result.

Outputs and gradients of the fused path equal the plain formula ``dropout(x) Aᵀ Bᵀ · s`` for the
same dropout mask (rebuilt from the kernel's seed), within 1e-6 (fp64) / 1e-5 (fp32) relative to
the values' size; with dropout 0 (or in eval mode) a layer's output and gradients are bitwise
those of the plain path.
"""

from __future__ import annotations

from functools import partial

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import deltatune as dt
from deltatune.kernels import (
    draw_seed,
    dropout_keep_mask,
    fast_lora,
    lora_dropout_linear,
    lora_linear_reference,
)
from deltatune.methods.lora import LoraLinear

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _close(got: torch.Tensor, want: torch.Tensor, tol: float) -> None:
    scale = max(1.0, float(want.detach().abs().max()))
    err = float((got.detach().double() - want.detach().double()).abs().max())
    assert err <= tol * scale, f"max abs diff {err:.3g} > {tol:g} * {scale:.3g}"


def _inputs(
    dtype: torch.dtype, device: str, shape: tuple[int, ...] = (3, 7, 24), out: int = 20, r: int = 4
):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(*shape, generator=g, dtype=dtype).to(device).requires_grad_()
    base = torch.randn(*shape[:-1], out, generator=g, dtype=dtype).to(device).requires_grad_()
    a = (torch.randn(r, shape[-1], generator=g, dtype=dtype) / 5).to(device).requires_grad_()
    b = (torch.randn(out, r, generator=g, dtype=dtype) / 5).to(device).requires_grad_()
    return x, base, a, b


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(("dtype", "tol"), [(torch.float64, 1e-6), (torch.float32, 1e-5)])
@pytest.mark.parametrize("p", [0.05, 0.5])
def test_kernel_matches_plain_formula_for_the_same_mask(
    device: str, dtype: torch.dtype, tol: float, p: float
) -> None:
    x, base, a, b = _inputs(dtype, device)
    y = lora_dropout_linear(x, base, a, b, 1.7, p, seed=1234)
    want = lora_linear_reference(x, base, a, b, 1.7, p, seed=1234)
    _close(y, want, tol)
    gy = torch.randn_like(y)
    got_grads = torch.autograd.grad(y, (x, base, a, b), gy)
    want_grads = torch.autograd.grad(want, (x, base, a, b), gy)
    for got, ref in zip(got_grads, want_grads):
        _close(got, ref, tol)


def test_reference_is_the_literal_dropout_formula() -> None:
    x, base, a, b = _inputs(torch.float64, "cpu")
    keep = dropout_keep_mask(x.shape, 0.3, 99, x.device).double()
    literal = (
        base + torch.nn.functional.linear(torch.nn.functional.linear(x * keep / 0.7, a), b) * 2.0
    )
    assert torch.equal(lora_linear_reference(x, base, a, b, 2.0, 0.3, seed=99), literal)


def test_kernel_gradcheck() -> None:
    x, base, a, b = _inputs(torch.float64, "cpu", shape=(2, 3, 6), out=5, r=2)
    assert torch.autograd.gradcheck(
        lambda *t: lora_dropout_linear(*t, 0.9, 0.25, seed=5), (x, base, a, b)
    )


def test_mask_is_reproducible_and_has_the_right_rate() -> None:
    m1 = dropout_keep_mask((64, 1000), 0.05, 11, torch.device("cpu"))
    m2 = dropout_keep_mask((64, 1000), 0.05, 11, torch.device("cpu"))
    m3 = dropout_keep_mask((64, 1000), 0.05, 12, torch.device("cpu"))
    assert torch.equal(m1, m2) and not torch.equal(m1, m3)
    dropped = 1 - m1.double().mean().item()
    assert abs(dropped - 0.05) < 0.004  # 64k draws: sd 0.0009
    odd = dropout_keep_mask((3, 5, 7), 0.5, 3, torch.device("cpu"))  # numel not a multiple of 4
    assert odd.shape == (3, 5, 7) and 0 < odd.sum() < odd.numel()


def test_only_needed_gradients_are_computed() -> None:
    x, base, a, b = _inputs(torch.float32, "cpu")
    x = x.detach()  # first adapted layer: its input needs no gradient
    y = lora_dropout_linear(x, base, a, b, 1.0, 0.1, seed=3)
    want = lora_linear_reference(x, base, a, b, 1.0, 0.1, seed=3)
    ga, gb = torch.autograd.grad(y.sum(), (a, b))
    wa, wb = torch.autograd.grad(want.sum(), (a, b))
    _close(ga, wa, 1e-5)
    _close(gb, wb, 1e-5)


# --- through LoraLinear ------------------------------------------------------------------------
class _Block(nn.Module):
    """q, k, v read the same input (the sibling case), like an attention block."""

    def __init__(self, d: int = 32) -> None:
        super().__init__()
        self.q, self.k, self.v = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.q(x) * torch.tanh(self.k(x)) + self.v(x)


def _adapted(dropout: float, dtype: torch.dtype = torch.float32, **kw: object) -> nn.Module:
    torch.manual_seed(0)
    model = _Block().to(dtype)
    cfg = dt.LoraConfig(
        r=4,
        lora_alpha=8,
        lora_dropout=dropout,
        target_modules=["q", "k", "v"],
        init_lora_weights=False,
        **kw,
    )  # type: ignore[arg-type]
    return dt.inject(model, cfg).train()


def _run(model: nn.Module, x: torch.Tensor, fast: bool) -> tuple[torch.Tensor, list[torch.Tensor]]:
    x = x.clone().requires_grad_()
    with fast_lora(fast):
        y = model(x)
    params = [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad(y.square().sum(), [x, *params])
    return y.detach(), list(grads)


@pytest.mark.parametrize("train", [True, False])
def test_dropout_zero_or_eval_is_bitwise_the_plain_path(train: bool) -> None:
    model = _adapted(0.0 if train else 0.1)
    model.train(train)
    x = torch.randn(2, 9, 32)
    y_fast, g_fast = _run(model, x, True)
    y_plain, g_plain = _run(model, x, False)
    assert torch.equal(y_fast, y_plain)
    assert all(torch.equal(a, b) for a, b in zip(g_fast, g_plain))
    # ... and both are the textbook formula, op for op.
    xr = x.clone().requires_grad_()

    def literal(layer: LoraLinear) -> torch.Tensor:
        a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        base = layer.base_layer(xr)  # base first, as the layer does (same dx summation order)
        lora = torch.nn.functional.linear(torch.nn.functional.linear(xr, a), b)
        return base + lora * layer.scaling["default"]

    y_lit = literal(model.q) * torch.tanh(literal(model.k)) + literal(model.v)
    params = [p for p in model.parameters() if p.requires_grad]
    g_lit = torch.autograd.grad(y_lit.square().sum(), [xr, *params])
    assert torch.equal(y_fast, y_lit.detach())
    assert all(torch.equal(a, b) for a, b in zip(g_fast, g_lit))


@pytest.mark.parametrize(("dtype", "tol"), [(torch.float64, 1e-6), (torch.float32, 1e-5)])
def test_layer_matches_plain_formula_with_the_kernels_masks(dtype: torch.dtype, tol: float) -> None:
    model = _adapted(0.2, dtype)
    x = torch.randn(2, 9, 32, dtype=dtype)
    torch.manual_seed(42)
    y_fast, g_fast = _run(model, x, True)
    # The kernel draws one seed per adapted layer from the global generator, in call order q, k, v.
    torch.manual_seed(42)
    seeds = {name: draw_seed() for name in ("q", "k", "v")}

    def reference(layer: LoraLinear, name: str, inp: torch.Tensor) -> torch.Tensor:
        a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        return lora_linear_reference(
            inp, layer.base_layer(inp), a, b, layer.scaling["default"], 0.2, seeds[name]
        )

    xr = x.clone().requires_grad_()
    y_ref = reference(model.q, "q", xr) * torch.tanh(reference(model.k, "k", xr)) + reference(
        model.v, "v", xr
    )
    params = [p for p in model.parameters() if p.requires_grad]
    g_ref = torch.autograd.grad(y_ref.square().sum(), [xr, *params])
    _close(y_fast, y_ref.detach(), tol)
    for got, want in zip(g_fast, g_ref):
        _close(got, want, tol)


def test_same_global_seed_same_result_and_masks_differ_between_siblings() -> None:
    model = _adapted(0.3)
    x = torch.randn(2, 9, 32)
    torch.manual_seed(7)
    y1, g1 = _run(model, x, True)
    torch.manual_seed(7)
    y2, g2 = _run(model, x, True)
    assert torch.equal(y1, y2) and all(torch.equal(a, b) for a, b in zip(g1, g2))
    torch.manual_seed(7)
    s_q, s_k = draw_seed(), draw_seed()
    assert s_q != s_k


def test_fast_path_saves_less_for_backward() -> None:
    model = _adapted(0.1)
    x = torch.randn(4, 64, 32, requires_grad=True)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}

    def saved_bytes(fast: bool) -> int:
        seen: dict[int, int] = {}

        def pack(t: torch.Tensor) -> torch.Tensor:
            ptr = t.untyped_storage().data_ptr()
            if ptr not in params:
                seen[ptr] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), fast_lora(fast):
            model(x)
        return sum(seen.values())

    fast, plain = saved_bytes(True), saved_bytes(False)
    assert fast < plain / 2, (fast, plain)


def test_autocast_bf16_matches_reference() -> None:
    model = _adapted(0.1)
    x = torch.randn(2, 9, 32)
    torch.manual_seed(3)
    xf = x.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y_fast = model(xf)
    params = [p for p in model.parameters() if p.requires_grad]
    g_fast = torch.autograd.grad(y_fast.float().square().sum(), [xf, *params])  # outside autocast
    torch.manual_seed(3)
    seeds = {name: draw_seed() for name in ("q", "k", "v")}
    xr = x.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):

        def ref(layer: LoraLinear, name: str) -> torch.Tensor:
            a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
            return lora_linear_reference(
                xr, layer.base_layer(xr), a, b, layer.scaling["default"], 0.1, seeds[name]
            )

        y_ref = ref(model.q, "q") * torch.tanh(ref(model.k, "k")) + ref(model.v, "v")
    g_ref = torch.autograd.grad(y_ref.float().square().sum(), [xr, *params])
    assert y_fast.dtype == y_ref.dtype == torch.bfloat16
    _close(y_fast.detach(), y_ref.detach(), 2e-2)
    for got, want, p in zip(g_fast, g_ref, [xr, *params]):
        assert got.dtype == p.dtype
        _close(got, want, 5e-2)


def test_conv1d_and_two_active_adapters() -> None:
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    model = nn.Sequential(Conv1D(24, 16))
    dt.inject(
        model,
        dt.LoraConfig(r=2, lora_dropout=0.2, target_modules=["0"], init_lora_weights=False),
        "one",
    )
    dt.inject(
        model,
        dt.LoraConfig(r=3, lora_dropout=0.4, target_modules=["0"], init_lora_weights=False),
        "two",
    )
    dt.set_active(model, ["one", "two"])
    model.train()
    x = torch.randn(2, 5, 16)
    torch.manual_seed(1)
    y_fast, g_fast = _run(model, x, True)
    torch.manual_seed(1)
    seeds = [draw_seed(), draw_seed()]
    layer = model[0]
    xr = x.clone().requires_grad_()
    y = layer.base_layer(xr)
    for seed, (name, p) in zip(seeds, [("one", 0.2), ("two", 0.4)]):
        a, b = layer.lora_A[name].weight, layer.lora_B[name].weight
        y = lora_linear_reference(xr, y, a, b, layer.scaling[name], p, seed)
    params = [p for p in model.parameters() if p.requires_grad]
    g_ref = torch.autograd.grad(y.square().sum(), [xr, *params])
    _close(y_fast, y.detach(), 1e-5)
    for got, want in zip(g_fast, g_ref):
        _close(got, want, 1e-5)


def test_fused_base_equals_base_layer_plus_adapter_and_respects_hooks() -> None:
    from deltatune.kernels import linear_lora_dropout

    x, _, a, b = _inputs(torch.float64, "cpu")
    lin = nn.Linear(24, 20).double().requires_grad_(False)
    y = linear_lora_dropout(x, lin.weight, lin.bias, a, b, 1.3, 0.2, seed=8)
    want = lora_linear_reference(x, lin(x), a, b, 1.3, 0.2, seed=8)
    _close(y, want, 1e-6)
    gy = torch.randn_like(y)
    for got, ref in zip(
        torch.autograd.grad(y, (x, a, b), gy), torch.autograd.grad(want, (x, a, b), gy)
    ):
        _close(got, ref, 1e-6)
    # A forward hook on the base layer must still run: the layer then does not fuse.
    model = _adapted(0.2)
    calls: list[int] = []
    model.q.base_layer.register_forward_hook(lambda *_: calls.append(1))
    model(torch.randn(2, 3, 32))
    assert calls == [1]


def _dora_model(dropout: float, dtype: torch.dtype = torch.float32) -> nn.Module:
    torch.manual_seed(0)
    model = _Block().to(dtype)
    cfg = dt.LoraConfig(
        r=4, lora_alpha=8, lora_dropout=dropout, target_modules=["q", "v"], use_dora=True,
        init_lora_weights=False,
    )  # fmt: skip
    dt.inject(model, cfg).train()
    with torch.no_grad():  # magnitudes away from the norms, so that m/‖W'‖ ≠ 1 matters
        for layer in (model.q, model.v):
            layer.lora_magnitude_vector["default"].mul_(
                torch.rand_like(layer.lora_magnitude_vector["default"]) + 0.5
            )
    return model


def test_dora_kernel_gradcheck() -> None:
    from deltatune.kernels import dora_dropout_delta

    x, _, a, b = _inputs(torch.float64, "cpu", shape=(2, 3, 6), out=5, r=2)
    w = torch.randn(5, 6, dtype=torch.float64)
    m = (torch.rand(5, dtype=torch.float64) + 0.5).requires_grad_()
    norm = (w + 0.7 * (b @ a)).norm(dim=1).detach()
    assert torch.autograd.gradcheck(
        lambda x, a, b, m: dora_dropout_delta(x, w, a, b, m, norm, 0.7, 0.3, seed=2), (x, a, b, m)
    )


@pytest.mark.parametrize(("dtype", "tol"), [(torch.float64, 1e-6), (torch.float32, 1e-5)])
def test_dora_layer_matches_peft_formula_with_the_kernels_masks(
    dtype: torch.dtype, tol: float
) -> None:
    from deltatune.kernels import dora_delta_reference

    model = _dora_model(0.2, dtype)
    x = torch.randn(2, 9, 32, dtype=dtype)
    torch.manual_seed(5)
    y_fast, g_fast = _run(model, x, True)
    torch.manual_seed(5)
    seeds = {"q": draw_seed(), "v": draw_seed()}
    xr = x.clone().requires_grad_()

    def ref(layer: LoraLinear, name: str) -> torch.Tensor:
        a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        s = layer.scaling["default"]
        w = layer.base_layer.weight
        norm = (w + s * (b @ a)).norm(dim=1).detach()
        m = layer.lora_magnitude_vector["default"]
        return layer.base_layer(xr) + dora_delta_reference(
            xr, w, a, b, m, norm, s, 0.2, seeds[name]
        )

    y_ref = ref(model.q, "q") * torch.tanh(model.k(xr)) + ref(model.v, "v")
    params = [p for p in model.parameters() if p.requires_grad]
    g_ref = torch.autograd.grad(y_ref.square().sum(), [xr, *params])
    _close(y_fast, y_ref.detach(), tol)
    for got, want in zip(g_fast, g_ref):
        _close(got, want, tol)


@pytest.mark.parametrize("train", [True, False])
def test_dora_without_dropout_is_bitwise_the_plain_path(train: bool) -> None:
    model = _dora_model(0.0 if train else 0.1)
    model.train(train)
    x = torch.randn(2, 9, 32)
    y_fast, g_fast = _run(model, x, True)
    y_plain, g_plain = _run(model, x, False)
    assert torch.equal(y_fast, y_plain)
    assert all(torch.equal(a, b) for a, b in zip(g_fast, g_plain))


def test_dora_fast_path_saves_less_for_backward() -> None:
    model = _dora_model(0.1)
    x = torch.randn(4, 64, 32, requires_grad=True)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}

    def saved_bytes(fast: bool) -> int:
        seen: dict[int, int] = {}

        def pack(t: torch.Tensor) -> torch.Tensor:
            if t.untyped_storage().data_ptr() not in params:
                seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), fast_lora(fast):
            model(x)
        return sum(seen.values())

    assert saved_bytes(True) < saved_bytes(False)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_layer_with_autocast_runs_and_matches_cpu_formula() -> None:
    model = _adapted(0.1).cuda()
    x = torch.randn(2, 9, 32, device="cuda")
    torch.manual_seed(3)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y = model(x)
    y.float().sum().backward()
    assert y.dtype == torch.bfloat16
    assert all(
        p.grad is not None and p.grad.dtype == torch.float32
        for p in model.parameters()
        if p.requires_grad
    )


def test_training_with_dropout_takes_the_fused_kernels() -> None:
    model = _adapted(0.1)
    y = model.q(torch.randn(2, 3, 32))
    assert "LoraDropoutLinear" in type(y.grad_fn).__name__
    dora = _dora_model(0.1)
    y = dora.q(torch.randn(2, 3, 32))
    names = []
    fn = y.grad_fn
    while fn is not None and len(names) < 5:
        names.append(type(fn).__name__)
        fn = fn.next_functions[0][0] if fn.next_functions else None
    assert any("DoraDropoutLinear" in n for n in names) or any(
        "DoraDropoutLinear" in type(f).__name__
        for f, _ in y.grad_fn.next_functions
        if f is not None
    )


def test_inference_in_place_add_is_bitwise_the_plain_formula() -> None:
    model = _adapted(0.1).eval()
    x = torch.randn(2, 9, 32)
    with torch.no_grad():
        got = model.q(x)
    layer = model.q
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    want = (
        layer.base_layer(x)
        + torch.nn.functional.linear(torch.nn.functional.linear(x, a), b) * layer.scaling["default"]
    )
    assert torch.equal(got, want.detach())


@pytest.mark.parametrize("reentrant", [False, True])
def test_activation_checkpointing_replays_the_same_masks(reentrant: bool) -> None:
    from torch.utils.checkpoint import checkpoint

    model = _adapted(0.3)
    x = torch.randn(2, 9, 32)
    torch.manual_seed(11)
    y_ref, g_ref = _run(model, x, True)
    xr = x.clone().requires_grad_()
    torch.manual_seed(11)
    y = checkpoint(model, xr, use_reentrant=reentrant)
    params = [p for p in model.parameters() if p.requires_grad]
    y.square().sum().backward()  # reentrant checkpointing needs .backward(), not .grad()
    grads = [xr.grad, *(p.grad for p in params)]
    assert torch.equal(y.detach(), y_ref)
    for got, want in zip(grads, g_ref):
        _close(got, want, 1e-6)


# --- rebuilding the input from its producer's saved tensors ------------------------------------
def _rms_norm(h: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """LLaMA's RMSNorm: ``w ⊙ (h ⊙ rsqrt(mean(h²) + eps))`` (w frozen: the outer Mul keeps w only)."""
    return w * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6))


_FROZEN_W = torch.linspace(0.5, 1.5, 24, dtype=torch.float64)
_LAYER_NORMS: dict[tuple[torch.dtype, str], nn.LayerNorm] = {}


def _layer_norm(t: torch.Tensor) -> torch.Tensor:
    """A registered LayerNorm (as LoRA's injection registers the model's), BERT's eps."""
    from deltatune.kernels import register_layer_norms

    key = (t.dtype, t.device.type)
    if key not in _LAYER_NORMS:
        ln = nn.LayerNorm(24, eps=1e-12).to(t.device, t.dtype)
        with torch.no_grad():
            ln.weight.copy_(torch.linspace(0.5, 1.5, 24))
            ln.bias.copy_(torch.linspace(-0.2, 0.3, 24))
        ln.requires_grad_(False)
        register_layer_norms(ln)
        _LAYER_NORMS[key] = ln
    return _LAYER_NORMS[key](t * 1.5)  # type: ignore[no-any-return]


PRODUCERS = {
    "layer_norm": _layer_norm,
    "gelu": lambda t: torch.nn.functional.gelu(t),
    "gelu_tanh": lambda t: torch.nn.functional.gelu(t, approximate="tanh"),
    "silu": torch.nn.functional.silu,
    "swiglu": lambda t: torch.nn.functional.silu(t) * t.cos(),  # LLaMA's act(gate) ⊙ up
    "rms_norm": lambda t: _rms_norm(t, _FROZEN_W.to(t.device, t.dtype)),
}


def _saved_ids(fn) -> tuple[object, set[int]]:  # type: ignore[no-untyped-def]
    """Run ``fn()`` recording the storages autograd saves; returns its result and their pointers."""
    ptrs: set[int] = set()

    def pack(t: torch.Tensor) -> torch.Tensor:
        ptrs.add(t.untyped_storage().data_ptr())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, ptrs


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("producer", sorted(PRODUCERS))
@pytest.mark.parametrize(("dtype", "tol"), [(torch.float64, 1e-6), (torch.float32, 1e-5)])
def test_input_is_rebuilt_bitwise_not_kept_and_changes_no_result(
    device: str, producer: str, dtype: torch.dtype, tol: float
) -> None:
    from deltatune.kernels.lora_linear import _recipe, _run_recipe, rebuild_inputs

    make = PRODUCERS[producer]
    x_in, base, a, b = _inputs(dtype, device)

    def step(rebuild: bool) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor, set[int]]:
        x = make(x_in)
        with rebuild_inputs(rebuild):
            y, ptrs = _saved_ids(lambda: lora_dropout_linear(x, base, a, b, 1.7, 0.3, seed=21))
        grads = torch.autograd.grad(y.square().sum(), (x_in, base, a, b))  # type: ignore[union-attr]
        return y.detach(), list(grads), x, ptrs  # type: ignore[union-attr]

    y_on, g_on, x_on, saved_on = step(True)
    y_off, g_off, x_off, saved_off = step(False)
    assert x_off.untyped_storage().data_ptr() in saved_off
    assert x_on.untyped_storage().data_ptr() not in saved_on  # x itself is not kept ...
    x_again = make(x_in)
    leaves: list[torch.Tensor] = []
    recipe = _recipe(x_again.grad_fn, x_again.device, leaves, 0)
    assert torch.equal(_run_recipe(recipe, tuple(leaves)), x_again)  # ... it is rebuilt
    assert torch.equal(y_on, y_off)
    assert all(torch.equal(u, v) for u, v in zip(g_on, g_off))
    # and both are the plain formula for the same mask, differentiated by autograd
    x = make(x_in)
    want = lora_linear_reference(x, base, a, b, 1.7, 0.3, seed=21)
    g_want = torch.autograd.grad(want.square().sum(), (x_in, base, a, b))
    _close(y_on, want, tol)
    for got, ref in zip(g_on, g_want):
        _close(got, ref, tol)


def test_input_is_kept_when_it_cannot_be_rebuilt() -> None:
    from deltatune.kernels.lora_linear import _recipe

    pre, base, a, b = _inputs(torch.float64, "cpu")
    w = _FROZEN_W
    cases = {
        "leaf": lambda: pre,
        "add (keeps nothing)": lambda: pre + 1.0,
        "mul by a factor nobody keeps": lambda: w * (pre + 1.0),
        "view of a gelu output": lambda: torch.nn.functional.gelu(pre).view(-1, 24),
    }
    for name, make in cases.items():
        x = make()
        base_x = base.view(-1, 20) if x.dim() == 2 else base
        _, ptrs = _saved_ids(partial(lora_dropout_linear, x, base_x, a, b, 1.0, 0.2, seed=3))
        assert x.untyped_storage().data_ptr() in ptrs, name
    # modified in place without autograd after it was made: its producer no longer describes it
    x = torch.nn.functional.gelu(pre)
    assert _recipe(x.grad_fn, x.device, [], 0) is not None
    with torch.no_grad():
        x.mul_(2.0)
    y, ptrs = _saved_ids(lambda: lora_dropout_linear(x, base, a, b, 1.0, 0.2, seed=3))
    assert x.untyped_storage().data_ptr() in ptrs
    ga = torch.autograd.grad(y.sum(), a)[0]  # type: ignore[union-attr]
    want = lora_linear_reference(x, base, a, b, 1.0, 0.2, seed=3)
    _close(ga, torch.autograd.grad(want.sum(), a)[0], 1e-6)


def test_layer_norm_output_is_kept_unless_registered_and_verified() -> None:
    from deltatune.kernels import register_layer_norms
    from deltatune.kernels.lora_linear import _LAYER_NORMS as registry

    pre, base, a, b = _inputs(torch.float64, "cpu")
    ln = nn.LayerNorm(24).double()

    def step() -> tuple[bool, torch.Tensor]:
        x = ln(pre)
        y, ptrs = _saved_ids(lambda: lora_dropout_linear(x, base, a, b, 1.0, 0.2, seed=3))
        ga = torch.autograd.grad(y.sum(), a)[0]  # type: ignore[union-attr]
        want = lora_linear_reference(ln(pre), base, a, b, 1.0, 0.2, seed=3)
        _close(ga, torch.autograd.grad(want.sum(), a)[0], 1e-6)
        return x.untyped_storage().data_ptr() in ptrs, ga

    kept, g_kept = step()  # nobody told the kernel this LayerNorm's eps
    assert kept
    assert register_layer_norms(nn.Sequential(ln)) == 1
    kept, g_rebuilt = step()
    assert not kept and torch.equal(g_rebuilt, g_kept)
    assert registry[id(ln.weight)][3] is True  # checked against the real output once
    assert register_layer_norms(ln) == 0  # the same module again: nothing new
    ln.eps = 1e-3  # a changed eps is read from the module and checked again
    kept, _ = step()
    assert not kept and registry[id(ln.weight)][2:] == [1e-3, True]

    class OtherEps(nn.LayerNorm):  # a forward that does not use self.eps: the check fails
        def forward(self, t: torch.Tensor) -> torch.Tensor:
            return F.layer_norm(t, self.normalized_shape, self.weight, self.bias, 1e-2)

    ln = OtherEps(24).double()
    register_layer_norms(ln)
    kept, _ = step()
    assert kept and registry[id(ln.weight)][3] is False
    ln = nn.LayerNorm(24, bias=False).double()  # no bias: rebuilt all the same
    register_layer_norms(ln)
    kept, _ = step()
    assert not kept
    ln = nn.LayerNorm(24, elementwise_affine=False).double()  # no weight to find eps by: kept
    assert register_layer_norms(ln) == 0
    kept, _ = step()
    assert kept


def test_rebuilt_source_modified_in_place_is_an_error_not_a_wrong_gradient() -> None:
    pre, base, a, b = _inputs(torch.float64, "cpu")
    h = pre * 1.0
    y = lora_dropout_linear(torch.nn.functional.gelu(h), base, a, b, 1.0, 0.2, seed=3)
    with torch.no_grad():
        h.add_(1.0)  # the tensor GELU saved (and the kernel would rebuild x from)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        torch.autograd.grad(y.sum(), a)


class _Mlp(nn.Module):
    """The FFN shapes of the benchmark models: GELU (BERT) or RMSNorm + SwiGLU (LLaMA)."""

    def __init__(self, kind: str, d: int = 32, hidden: int = 88) -> None:
        super().__init__()
        self.kind = kind
        self.norm_w = nn.Parameter(torch.rand(d) + 0.5, requires_grad=False)
        self.norm = nn.LayerNorm(d, eps=1e-12)  # BERT's: its output (up's input) is rebuilt
        self.gate, self.up = nn.Linear(d, hidden, bias=False), nn.Linear(d, hidden)
        self.down = nn.Linear(hidden, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "gelu":
            return x + self.down(torch.nn.functional.gelu(self.up(self.norm(x))))
        h = _rms_norm(x, self.norm_w)
        return x + self.down(torch.nn.functional.silu(self.gate(h)) * self.up(h))


def _mlp(kind: str, dora: bool = False) -> nn.Module:
    torch.manual_seed(0)
    targets = ["up", "down"] if dora or kind == "gelu" else ["gate", "up", "down"]
    cfg = dt.LoraConfig(
        r=4, lora_alpha=8, lora_dropout=0.2, target_modules=targets, use_dora=dora,
        init_lora_weights=False,
    )  # fmt: skip
    return dt.inject(_Mlp(kind), cfg).train()


def _mlp_step(
    model: nn.Module, x: torch.Tensor, rebuild: bool, autocast: bool = False
) -> tuple[torch.Tensor, list[torch.Tensor], int]:
    from deltatune.kernels.lora_linear import rebuild_inputs

    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    x = x.clone().requires_grad_()
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.untyped_storage().data_ptr() not in params:
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    torch.manual_seed(5)
    with (
        rebuild_inputs(rebuild),
        torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t),
        torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast),
    ):
        y = model(x)
    trainable = [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad(y.float().square().sum(), [x, *trainable])
    return y.detach(), list(grads), sum(seen.values())


@pytest.mark.parametrize("kind", ["gelu", "swiglu"])
@pytest.mark.parametrize("dora", [False, True])
@pytest.mark.parametrize("autocast", [False, True])
def test_layers_rebuild_ffn_inputs_same_results_less_memory(
    kind: str, dora: bool, autocast: bool
) -> None:
    model = _mlp(kind, dora)
    x = torch.randn(2, 16, 32)
    y_on, g_on, saved_on = _mlp_step(model, x, True, autocast)
    y_off, g_off, saved_off = _mlp_step(model, x, False, autocast)
    assert torch.equal(y_on, y_off)
    assert all(torch.equal(u, v) for u, v in zip(g_on, g_off))
    # the down projection's input (2·16 × 88) is no longer kept; for SwiGLU (no DoRA, all three
    # adapted) also the RMSNorm output that gate and up share (2·16 × 32), for GELU the
    # LayerNorm output up reads (2·16 × 32, fp32 under autocast too)
    elem = 2 if autocast else 4
    freed = 2 * 16 * 88 * elem + (2 * 16 * 32 * 4 if kind == "gelu" or not dora else 0)
    assert saved_off - saved_on >= freed, (saved_off, saved_on, freed)


@pytest.mark.parametrize("reentrant", [False, True])
def test_rebuild_under_activation_checkpointing(reentrant: bool) -> None:
    from torch.utils.checkpoint import checkpoint

    model = _mlp("swiglu")
    x = torch.randn(2, 16, 32)
    y_ref, g_ref, _ = _mlp_step(model, x, True)
    xr = x.clone().requires_grad_()
    torch.manual_seed(5)
    y = checkpoint(model, xr, use_reentrant=reentrant)
    y.square().sum().backward()
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert torch.equal(y.detach(), y_ref)
    for got, want in zip([xr.grad, *(p.grad for p in trainable)], g_ref):
        assert torch.equal(got, want)

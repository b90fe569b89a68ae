r"""Fast LoRA (and DoRA) with dropout for Linear layers: one autograd Function per adapted layer.

Why: the plain LoRA branch ``s · dropout(x) Aᵀ Bᵀ`` built from ``nn.Dropout`` and two
``F.linear`` keeps, per adapted layer, a dropped copy of the input for backward (and on CPU also
the float noise tensor ``nn.Dropout`` multiplies by), although the input ``x`` itself is often
kept anyway and is the very same tensor for sibling projections (q, k, v; gate, up). These
Functions keep ``x`` and a seed instead and regenerate the dropout mask in backward. They are
used by :class:`deltatune.methods.lora.LoraLinear` only where dropout is active (``p > 0`` in
training); with ``p = 0`` or in eval mode the layer runs the plain formula, op for op, so results
are bitwise those of the straightforward path there.

Notation: ``x`` (N × in, leading dims flattened), ``A`` (r × in), ``B`` (out × r), scale ``s``,
dropout probability ``p``, keep mask ``M`` (N × in, entries 0/1, drawn from a seed),
``c = 1 / (1 − p)``, ``k = s · c``; ``dropout(x) = c · (M ⊙ x)``.

LoRA forward (:func:`lora_dropout_linear`; :func:`linear_lora_dropout` also computes the frozen
base ``x Wᵀ + bias`` in the same Function)::

    xd = M ⊙ x                                  (transient)
    v  = k · xd Aᵀ                              (N × r, kept, stored as vᵀ)
    y  = base + v Bᵀ                            (= base + s · dropout(x) Aᵀ Bᵀ)
       [fused: y = x Wᵀ + bias + v Bᵀ]

LoRA backward, given ``g = ∂L/∂y`` (N × out)::

    ∂L/∂base = g
    ∂L/∂B    = gᵀ v                             (out × r)
    du       = k · g B                          (N × r)
    ∂L/∂A    = duᵀ (M ⊙ x)                      (r × in; M regenerated from the seed)
    ∂L/∂x    = M ⊙ (du A)                       (N × in)
       [fused: ∂L/∂x = M ⊙ (du A) + g W;  W and bias get no gradient]

Kept for backward: ``x`` (shared with the siblings, so one copy per distinct input; or nothing,
when ``x`` can be rebuilt from what its producer keeps, see below), ``vᵀ``,
``A``, ``B`` (and ``W``: parameters, no new memory) and the seed, a Python int. Nothing N × in
is created per layer beyond the transient ``xd`` and the mask.

DoRA (PEFT's formula with dropout; :func:`dora_dropout_delta` returns the addition to the base
output). ``W`` frozen (out × in), magnitude ``m`` (out), ``n = ‖W + s B A‖_row`` detached,
``μ = m / n``::

    P = dropout(x) Wᵀ,   u = dropout(x) Aᵀ,   Q = P + s · u Bᵀ           (Q kept, N × out)
    Δ = μ ⊙ Q − P       (= (μ − 1) ⊙ dropout(x) Wᵀ + μ ⊙ s · dropout(x) Aᵀ Bᵀ)

    ∂L/∂m = Σ_rows (g ⊙ Q) / n
    du    = (g ⊙ s μ) B                         ∂L/∂B = (g ⊙ s μ)ᵀ u
    ∂L/∂A = c · duᵀ (M ⊙ x)                     ∂L/∂x = c · M ⊙ (du A + (g ⊙ (μ − 1)) W)

Kept: ``x``, ``uᵀ``, ``Q`` and the seed (the plain path keeps the dropped input, the noise, and
two N × out tensors).

The mask: ``⌈N·in/4⌉`` 64-bit random words from a ``torch.Generator`` on the input's device,
seeded with the per-call seed, read as N·in 16-bit integers ``w``; an element is dropped where
``w + 32768 < round(p · 65536)``. So ``p`` is applied in steps of 2⁻¹⁶ (0.05 → 0.0500031); the
scale stays ``1 / (1 − p)`` as in ``torch.nn.Dropout``. Each call draws its seed from the global
CPU generator (``torch.manual_seed`` makes a run reproducible, and activation checkpointing,
which restores that generator, replays the same masks) unless one is passed;
:func:`dropout_keep_mask` rebuilds the mask of a seed, and :func:`lora_linear_reference` /
:func:`dora_delta_reference` are the plain formulas with that mask (the tests compare them).

Rebuilding the input instead of keeping it (:func:`rebuild_inputs`, on by default). A frozen
Linear keeps nothing for backward, so every ``x`` an adapted layer keeps is new memory unless
another op keeps the very same storage. The largest inputs are the FFN down projection's
(N × 4h), and the ops producing them keep their *inputs*, not ``x``: ``x = gelu(pre)`` keeps
``pre``; ``x = act(gate) ⊙ up`` (the Mul) keeps both factors. Where ``x`` is the fresh output
(``x._version == 0``) of such an op, the Function keeps the tensors the producing autograd node
saved anyway (the same storages: no new memory) instead of ``x`` and recomputes ``x`` from them
in backward::

    GeluBackward0:  x = gelu(pre, approximate)     (pre = node._saved_self)
    SiluBackward0:  x = silu(pre)
    MulBackward0:   x = a ⊙ b                      (a, b = node._saved_self, node._saved_other)
    NativeLayerNormBackward0:
                    x = layer_norm(h, w, b, eps)   (h, w, b = the node's input, weight, bias)

LayerNorm's node does not keep ``eps``, and only the very eps gives the same bits, so its outputs
are rebuilt only for ``nn.LayerNorm`` modules registered by :func:`register_layer_norms` (LoRA's
injection registers the model's), whose weight is the one the node saved, with the module's
current eps, and only once a rebuild with that eps was seen to equal the layer's real output
bitwise (checked on first use and again after the eps changes; a mismatch keeps ``x``).
This is BERT's q/k/v input (the previous block's output LayerNorm) and FFN up-projection input.

A factor the Mul did not save (autograd saves ``a`` only if ``b`` needs a gradient) is itself
rebuilt when its own producer is one of these ops, e.g. RMSNorm's ``w ⊙ (h ⊙ rsqrt(…))`` (``w``
frozen: ``h ⊙ rsqrt(…)`` is not kept by the outer Mul, but both its factors are kept by the inner
one); anything else keeps ``x``. The recomputation is the same op on the same tensors, so ``x`` is
rebuilt bitwise (outputs and gradients do not change at all). The Function saves those tensors
itself, so modifying one in place before backward is autograd's usual error, and the unsaved
factor of a Mul must not be modified in place outside autograd (as with any tensor autograd does
not keep). Only these dropout kernels rebuild (``p = 0`` runs the plain path). Caveat: on
CPU an elementwise op's vectorised and scalar code paths may round differently, so running
backward with a different ``torch.set_num_threads`` than forward may change the rebuilt ``x``
(of GELU/SiLU; a product is exact either way) in its last bit. Cost: one elementwise op per
rebuilt input in backward. The node's tensors are read in forward without running unpack hooks:
where they were packed by saved-tensor hooks into something that is not the tensor itself
(activation checkpointing's handles and detached recomputed tensors, ``save_on_cpu``'s tuples)
``x`` is kept; the tensors the Function saves go through the active hooks like any other.

Under autocast the matmuls run in the autocast dtype (as ``F.linear`` would), the output keeps
the base output's dtype, and gradients come back in each input's own dtype. On CUDA the mask
comes from a CUDA generator (Philox), so the same seed gives a different mask than on CPU.
"""

from __future__ import annotations

import math
import threading
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from deltatune.targeting import is_conv1d

_STATE = threading.local()
_ENABLED = [True]


def fast_lora_enabled() -> bool:
    """Whether LoRA layers use the fused kernels (default True)."""
    return _ENABLED[0]


def set_fast_lora(enabled: bool) -> None:
    """Switch the fused LoRA kernels on or off for the whole process."""
    _ENABLED[0] = bool(enabled)


@contextmanager
def fast_lora(enabled: bool = True) -> Iterator[None]:
    """``with fast_lora(False): ...`` runs LoRA layers on the plain autograd path."""
    old = _ENABLED[0]
    _ENABLED[0] = bool(enabled)
    try:
        yield
    finally:
        _ENABLED[0] = old


_REBUILD = [True]


def rebuild_inputs_enabled() -> bool:
    """Whether the kernels rebuild an input from its producer's saved tensors (default True)."""
    return _REBUILD[0]


def set_rebuild_inputs(enabled: bool) -> None:
    """Switch input rebuilding (module docstring) on or off for the whole process."""
    _REBUILD[0] = bool(enabled)


@contextmanager
def rebuild_inputs(enabled: bool = True) -> Iterator[None]:
    """``with rebuild_inputs(False): ...`` makes the kernels keep every input ``x`` itself."""
    old = _REBUILD[0]
    _REBUILD[0] = bool(enabled)
    try:
        yield
    finally:
        _REBUILD[0] = old


_MAX_DEPTH = 3

# A rebuild recipe: ("leaf", i) is the i-th tensor kept for it; ("gelu", approximate, r),
# ("silu", r) and ("mul", r1, r2) apply that op to the sub-recipes' results.
Recipe = tuple[Any, ...]


def _saved_tensor(raw: Any, device: torch.device, needs_grad: bool) -> torch.Tensor | None:
    """The tensor an autograd node saved, read without running unpack hooks, or None.

    Without hooks ``raw.data`` is the tensor itself. Under saved-tensor hooks it is whatever the
    pack hook returned: a handle (activation checkpointing's forward), a tuple
    (``save_on_cpu``), a detached tensor (checkpointing's recomputation, whose pack detaches
    what needs a gradient) are not taken, so that forward and recomputation save the same
    tensors; a floating tensor on the same device that needs a gradient exactly when the
    node's input did is taken to be the tensor itself (as with a hook that only counts).
    """
    data = raw.data
    if raw.unpack_hook is None:
        return data  # type: ignore[no-any-return]
    if (
        isinstance(data, torch.Tensor)
        and data.is_floating_point()
        and data.device == device
        and data.requires_grad == needs_grad
    ):
        return data
    return None


def _recipe(node: Any, device: torch.device, leaves: list[torch.Tensor], depth: int) -> Any:
    """How to recompute ``node``'s output from tensors autograd keeps anyway, or None.

    Appends the tensors it needs to ``leaves``. A Mul's factor ``i`` is saved exactly when the
    other factor needs a gradient (edge ``1 − i`` set); an unsaved factor needs a gradient
    itself, so its producer is reached through edge ``i`` and rebuilt in turn.
    """
    if node is None or depth > _MAX_DEPTH:
        return None
    name = type(node).__name__
    if name in ("GeluBackward0", "SiluBackward0"):
        pre = _saved_tensor(node._raw_saved_self, device, True)
        if pre is None:
            return None
        leaves.append(pre)
        leaf = ("leaf", len(leaves) - 1)
        if name == "GeluBackward0":
            return ("gelu", node._saved_approximate, leaf)
        return ("silu", leaf)
    if name == "NativeLayerNormBackward0":
        return _layer_norm_recipe(node, device, leaves, depth)
    if name == "MulBackward0":
        edges = node.next_functions
        raws = (node._raw_saved_self, node._raw_saved_other)
        factors = []
        for i in (0, 1):
            if edges[1 - i][0] is not None:
                t = _saved_tensor(raws[i], device, edges[i][0] is not None)
                if t is None:
                    return None
                leaves.append(t)
                factors.append(("leaf", len(leaves) - 1))
            else:
                sub = _recipe(edges[i][0], device, leaves, depth + 1)
                if sub is None:
                    return None
                factors.append(sub)
        return ("mul", *factors)
    return None


# LayerNorm's autograd node keeps its input, weight and bias but not eps, and a rebuild is only
# bitwise with the very eps (and kernel) forward used, so eps is read from the module that owns
# the weight: id(weight) -> [weakref to weight, weakref to module, eps, verified]. ``verified``
# is None until a rebuild with that eps has been compared with the layer's real output, and is
# reset when the module's eps changes.
_LAYER_NORMS: dict[int, list[Any]] = {}


def register_layer_norms(model: nn.Module) -> int:
    """Remember ``model``'s LayerNorms by their weights, so that their outputs can be rebuilt.

    Called by LoRA's injection; returns how many were newly registered. A LayerNorm whose
    output an adapted layer reads is then not kept twice: backward reruns the LayerNorm on its
    own saved input (bitwise the same output, checked against the real output the first time).
    """
    count = 0
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if not isinstance(module, nn.LayerNorm) or not isinstance(weight, torch.Tensor):
            continue
        entry = _LAYER_NORMS.get(id(weight))
        if entry is None or entry[0]() is not weight or entry[1]() is not module:
            _LAYER_NORMS[id(weight)] = [weakref.ref(weight), weakref.ref(module), None, None]
            count += 1
    for key in [k for k, e in _LAYER_NORMS.items() if e[0]() is None]:
        del _LAYER_NORMS[key]
    return count


def _layer_norm_recipe(
    node: Any, device: torch.device, leaves: list[torch.Tensor], depth: int
) -> Any:
    """``native_layer_norm(input, shape, weight, bias, eps)`` for a registered LayerNorm.

    Below the top (``depth > 0``, e.g. a LayerNorm output times something) only once verified:
    the check needs the LayerNorm's own output, which only the top level has.
    """
    edges = node.next_functions
    weight = _saved_tensor(node._raw_saved_weight, device, edges[1][0] is not None)
    entry = _LAYER_NORMS.get(id(weight)) if weight is not None else None
    module = entry[1]() if entry is not None and entry[0]() is weight else None
    if entry is None or module is None or module.weight is not weight:
        return None
    eps = float(module.eps)
    if entry[2] != eps:  # new, or eps changed since the last check: check again
        entry[2], entry[3] = eps, None
    if entry[3] is False or (depth > 0 and entry[3] is not True):
        return None
    shape = tuple(node._saved_normalized_shape)
    if shape != tuple(module.normalized_shape):
        return None
    inp = _saved_tensor(node._raw_saved_input, device, edges[0][0] is not None)
    bias = None
    if node._raw_saved_bias.data is not None:
        bias = _saved_tensor(node._raw_saved_bias, device, edges[2][0] is not None)
        if bias is None:
            return None
    if inp is None:
        return None
    first = len(leaves)
    leaves += [inp, weight] + ([bias] if bias is not None else [])
    bias_leaf = ("leaf", first + 2) if bias is not None else None
    return ("layer_norm", shape, eps, ("leaf", first), ("leaf", first + 1), bias_leaf, entry)


def _run_recipe(recipe: Recipe, leaves: tuple[torch.Tensor, ...]) -> torch.Tensor:
    kind = recipe[0]
    if kind == "leaf":
        return leaves[recipe[1]]
    if kind == "layer_norm":
        _, shape, eps, inp, weight, bias, _entry = recipe
        b = None if bias is None else _run_recipe(bias, leaves)
        return torch.native_layer_norm(
            _run_recipe(inp, leaves), shape, _run_recipe(weight, leaves), b, eps
        )[0]
    if kind == "gelu":
        return F.gelu(_run_recipe(recipe[2], leaves), approximate=recipe[1])
    if kind == "silu":
        return F.silu(_run_recipe(recipe[1], leaves))
    return torch.mul(_run_recipe(recipe[1], leaves), _run_recipe(recipe[2], leaves))


def _has_data(t: torch.Tensor) -> bool:
    from torch._subclasses.fake_tensor import FakeTensor

    return not (t.is_meta or isinstance(t, FakeTensor))


def _keep_input(ctx: Any, x: torch.Tensor) -> list[torch.Tensor]:
    """The tensors to save for ``x``: ``[x]``, or the leaves of a recipe that rebuilds it."""
    ctx.x_shape, ctx.x_dtype, ctx.x_device = x.shape, x.dtype, x.device
    ctx.x_recipe = None
    if _REBUILD[0] and x.grad_fn is not None and x._version == 0 and x.output_nr == 0:
        leaves: list[torch.Tensor] = []
        recipe = _recipe(x.grad_fn, x.device, leaves, 0)
        # First rebuild of this LayerNorm: trust eps (and the kernel) only once it is seen to
        # reproduce forward's output bitwise. Tensors without data (meta, or the fake tensors
        # of deltatune.estimate) cannot be compared: they take the rebuild as a real run would.
        if recipe and recipe[0] == "layer_norm" and recipe[-1][3] is None and _has_data(x):
            with torch.no_grad(), torch.autocast(x.device.type, enabled=False):
                recipe[-1][3] = bool(torch.equal(_run_recipe(recipe, tuple(leaves)), x))
            if not recipe[-1][3]:
                recipe = None
        if recipe is not None:
            ctx.x_recipe = recipe
            return leaves
    return [x]


def _restore_input(ctx: Any, kept: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """``x`` in backward: the saved tensor, or rebuilt bitwise by its recipe."""
    if ctx.x_recipe is None:
        return kept[0]
    with torch.no_grad(), torch.autocast(ctx.x_device.type, enabled=False):
        x = _run_recipe(ctx.x_recipe, kept)
    if x.shape != ctx.x_shape or x.dtype != ctx.x_dtype:
        raise RuntimeError(
            f"deltatune.kernels: the rebuilt input has shape {tuple(x.shape)} / {x.dtype}, "
            f"forward saw {tuple(ctx.x_shape)} / {ctx.x_dtype}; run with "
            "deltatune.kernels.lora_linear.set_rebuild_inputs(False) and report this"
        )
    return x


def draw_seed() -> int:
    """A 63-bit seed drawn from the global CPU generator (no device synchronisation)."""
    return int(torch.empty((), dtype=torch.int64).random_().item())


def _generator(device: torch.device) -> torch.Generator:
    cache: dict[torch.device, torch.Generator] | None = getattr(_STATE, "generators", None)
    if cache is None:
        cache = {}
        _STATE.generators = cache
    gen = cache.get(device)
    if gen is None:
        gen = torch.Generator(device=device)
        cache[device] = gen
    return gen


def _threshold(p: float) -> int:
    return round(p * 65536) - 32768


def _random_int16(
    shape: torch.Size | tuple[int, ...], seed: int, device: torch.device
) -> torch.Tensor:
    """``prod(shape)`` uniform 16-bit integers from 64-bit words of a generator seeded with ``seed``."""
    n = math.prod(shape)
    gen = _generator(torch.device(device))
    gen.manual_seed(seed)
    words = torch.empty((n + 3) // 4, dtype=torch.int64, device=device)
    words.random_(-(2**63), None, generator=gen)
    return words.view(torch.int16)[:n].view(shape)


def _keep(
    shape: torch.Size | tuple[int, ...],
    p: float,
    seed: int,
    device: torch.device,
    dtype: torch.dtype,
) -> torch.Tensor:
    """The keep mask ``M`` as 0/1 values of ``dtype`` (one pass from the random integers)."""
    bits = _random_int16(shape, seed, device)
    return torch.ge(bits, _threshold(p), out=torch.empty(shape, dtype=dtype, device=device))


def dropout_keep_mask(
    shape: torch.Size | tuple[int, ...], p: float, seed: int, device: torch.device
) -> torch.Tensor:
    """The boolean keep mask ``M`` the kernel uses for this seed (``True`` = kept)."""
    return torch.ge(_random_int16(shape, seed, device), _threshold(p))


def _compute_dtype(x: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return weight.dtype


def dropout_p(dropout: nn.Module) -> float:
    """The probability a LoRA dropout module drops with now (0 for Identity or in eval mode)."""
    return float(dropout.p) if isinstance(dropout, nn.Dropout) and dropout.training else 0.0


def _global_module_hooks() -> bool:
    from torch.nn.modules import module as _module

    return bool(
        getattr(_module, "_global_forward_hooks", None)
        or getattr(_module, "_global_forward_pre_hooks", None)
    )


def fusable_base(base: nn.Module, x: torch.Tensor, lora_dtype: torch.dtype) -> bool | None:
    """Whether ``base``'s matmul may run inside :func:`linear_lora_dropout` instead of ``base(x)``.

    Returns None when it may not, else ``weight_in_out`` (True for GPT-2 ``Conv1D``). Fusable:
    exactly ``nn.Linear`` or ``Conv1D`` (no subclass, e.g. a quantized layer), a frozen plain
    ``nn.Parameter`` weight and bias, no forward hooks (module or global), and dtypes that
    ``F.linear`` accepts as they are (or autocast on).
    """
    if type(base) is nn.Linear:
        in_out = False
    elif is_conv1d(base):
        in_out = True
    else:
        return None
    w, bias = base.weight, getattr(base, "bias", None)
    if type(w) is not nn.Parameter or w.requires_grad:
        return None
    if bias is not None and (type(bias) is not nn.Parameter or bias.requires_grad):
        return None
    if base._forward_hooks or base._forward_pre_hooks or _global_module_hooks():
        return None
    if not torch.is_autocast_enabled(x.device.type) and not x.dtype == w.dtype == lora_dtype:
        return None
    return in_out


class _LoraDropoutLinear(torch.autograd.Function):
    """``y = base + k · (M ⊙ x) Aᵀ Bᵀ``, or with ``base=None``: ``y = x Wᵀ + bias + ...`` (frozen W)."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x: torch.Tensor,
        base: torch.Tensor | None,
        w: torch.Tensor | None,
        bias: torch.Tensor | None,
        a: torch.Tensor,
        b: torch.Tensor,
        k: float,
        p: float,
        seed: int,
        dtype: torch.dtype,
        w_in_out: bool,
    ) -> torch.Tensor:
        in_f, out_f = a.shape[1], b.shape[0]
        with torch.autocast(x.device.type, enabled=False):
            x2 = x.reshape(-1, in_f)
            xd = _keep(x2.shape, p, seed, x.device, dtype).mul_(x2)  # M ⊙ x, transient
            v_t = torch.mm(a.to(dtype), xd.t()).mul_(k)  # (r, N): this layout keeps every mm fast
            del xd
            b_t = b.to(dtype).t()
            if base is None:  # fused frozen base layer: out = x Wᵀ + bias, then += v Bᵀ in place
                assert w is not None
                w_t = w.to(dtype) if w_in_out else w.to(dtype).t()
                xc = x2.to(dtype)
                out = torch.mm(xc, w_t) if bias is None else torch.addmm(bias.to(dtype), xc, w_t)
                out.addmm_(v_t.t(), b_t)
                shape = (*x.shape[:-1], out_f)
            else:
                shape = base.shape
                base2d = base.reshape(-1, out_f)
                if base.dtype == dtype:
                    out = torch.addmm(base2d, v_t.t(), b_t)
                else:
                    out = base2d + torch.mm(v_t.t(), b_t).to(base.dtype)
        kept = _keep_input(ctx, x)
        ctx.save_for_backward(v_t, a, b, w, *kept)
        ctx.k, ctx.p, ctx.seed, ctx.dtype, ctx.w_in_out = k, p, seed, dtype, w_in_out
        return out.view(shape)

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        v_t, a, b, w, *kept = ctx.saved_tensors
        dtype: torch.dtype = ctx.dtype
        x_shape, x_device = ctx.x_shape, ctx.x_device
        need_x, need_base, _, _, need_a, need_b = ctx.needs_input_grad[:6]
        in_f, out_f = a.shape[1], b.shape[0]
        grad_x = grad_a = grad_b = None
        with torch.autocast(g.device.type, enabled=False):
            g2 = g.reshape(-1, out_f).to(dtype)
            if need_b:
                grad_b = torch.mm(v_t, g2).t().to(b.dtype)
            if need_a or need_x:
                du_t = torch.mm(b.to(dtype).t(), g2.t()).mul_(ctx.k)  # (r, N)
                keep = _keep((x_shape.numel() // in_f, in_f), ctx.p, ctx.seed, x_device, dtype)
                if need_x:
                    dx = torch.mm(du_t.t(), a.to(dtype)).mul_(keep)
                    if w is not None:  # the fused base layer's input gradient: g W
                        dx.addmm_(g2, w.to(dtype).t() if ctx.w_in_out else w.to(dtype))
                    grad_x = dx.view(x_shape).to(ctx.x_dtype)
                if need_a:
                    x = _restore_input(ctx, tuple(kept))
                    xd = keep.mul_(x.reshape(-1, in_f))  # the mask's buffer becomes M ⊙ x
                    grad_a = torch.mm(du_t, xd).to(a.dtype)
        grad_base = g if need_base else None
        return grad_x, grad_base, None, None, grad_a, grad_b, None, None, None, None, None


def _check_p(p: float) -> None:
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout p={p} must be in [0, 1)")


def lora_dropout_linear(
    x: torch.Tensor,
    base: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    scale: float,
    p: float,
    seed: int | None = None,
) -> torch.Tensor:
    """``base + scale · dropout_p(x) Aᵀ Bᵀ`` with the mask drawn from ``seed`` (see module doc).

    ``x``: ``(..., in)``; ``base``: ``(..., out)`` (the base layer's output, returned plus the
    LoRA term, in its own dtype); ``a``: ``(r, in)``; ``b``: ``(out, r)``; ``0 <= p < 1``.
    """
    _check_p(p)
    seed = draw_seed() if seed is None else seed
    dtype = _compute_dtype(x, a)
    k = scale / (1.0 - p)
    return _LoraDropoutLinear.apply(x, base, None, None, a, b, k, p, seed, dtype, False)  # type: ignore[no-any-return]


def linear_lora_dropout(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    a: torch.Tensor,
    b: torch.Tensor,
    scale: float,
    p: float,
    seed: int | None = None,
    weight_in_out: bool = False,
) -> torch.Tensor:
    """``x Wᵀ + bias + scale · dropout_p(x) Aᵀ Bᵀ`` for a frozen ``W`` (no gradient for W, bias).

    The base layer's matmul runs inside the same Function, so that backward reads the output
    gradient once and adds ``g W`` straight into the input gradient. ``weight_in_out``: ``W`` is
    stored ``(in, out)`` (GPT-2 ``Conv1D``). Under autocast, W and bias are cast like
    ``F.linear`` would cast them.
    """
    _check_p(p)
    if weight.requires_grad or (bias is not None and bias.requires_grad):
        raise ValueError(
            "linear_lora_dropout needs a frozen weight and bias; use lora_dropout_linear"
        )
    seed = draw_seed() if seed is None else seed
    dtype = _compute_dtype(x, a)
    k = scale / (1.0 - p)
    return _LoraDropoutLinear.apply(  # type: ignore[no-any-return]
        x, None, weight, bias, a, b, k, p, seed, dtype, weight_in_out
    )


class _DoraDropoutLinear(torch.autograd.Function):
    """DoRA with dropout (PEFT's formula), see the module docstring."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x: torch.Tensor,
        w: torch.Tensor,
        a: torch.Tensor,
        b: torch.Tensor,
        m: torch.Tensor,
        norm: torch.Tensor,
        s: float,
        p: float,
        seed: int,
        dtype: torch.dtype,
    ) -> torch.Tensor:
        in_f, out_f = a.shape[1], b.shape[0]
        c = 1.0 / (1.0 - p)
        with torch.autocast(x.device.type, enabled=False):
            x2 = x.reshape(-1, in_f)
            xd = _keep(x2.shape, p, seed, x.device, dtype).mul_(x2)  # M ⊙ x, transient
            big_p = torch.mm(xd, w.to(dtype).t()).mul_(c)  # P = dropout(x) Wᵀ
            u_t = torch.mm(a.to(dtype), xd.t()).mul_(c)  # uᵀ = (dropout(x) Aᵀ)ᵀ
            del xd
            q = torch.addmm(big_p, u_t.t(), b.to(dtype).t(), alpha=s)  # Q = P + s u Bᵀ
            ms = (m / norm).to(dtype)
            delta = big_p.neg_().addcmul_(q, ms)  # ms ⊙ Q − P, in P's buffer
        kept = _keep_input(ctx, x)
        ctx.save_for_backward(u_t, q, w, a, b, ms, norm, *kept)
        ctx.s, ctx.c, ctx.p, ctx.seed, ctx.dtype = s, c, p, seed, dtype
        return delta.view(*x.shape[:-1], out_f)

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        u_t, q, w, a, b, ms, norm, *kept = ctx.saved_tensors
        dtype: torch.dtype = ctx.dtype
        x_shape, x_device = ctx.x_shape, ctx.x_device
        need_x, _, need_a, need_b, need_m = ctx.needs_input_grad[:5]
        in_f, out_f = a.shape[1], b.shape[0]
        grad_x = grad_a = grad_b = grad_m = None
        with torch.autocast(g.device.type, enabled=False):
            g2 = g.reshape(-1, out_f).to(dtype)
            sms = ms * ctx.s  # (out,)
            if need_m:
                grad_m = (torch.linalg.vecdot(g2.t(), q.t()) / norm).to(norm.dtype)
            if need_b:
                grad_b = torch.mm(u_t, g2).t().mul(sms.unsqueeze(1)).to(b.dtype)
            if need_a or need_x:
                # du = (g ⊙ s·ms) B, with the dropout scale c folded in
                du_t = torch.mm((b.to(dtype) * (sms * ctx.c).unsqueeze(1)).t(), g2.t())
                keep = _keep((x_shape.numel() // in_f, in_f), ctx.p, ctx.seed, x_device, dtype)
                if need_x:
                    w_s = w.to(dtype) * ((ms - 1) * ctx.c).unsqueeze(1)
                    dx = torch.mm(du_t.t(), a.to(dtype)).addmm_(g2, w_s).mul_(keep)
                    grad_x = dx.view(x_shape).to(ctx.x_dtype)
                if need_a:
                    x = _restore_input(ctx, tuple(kept))
                    xd = keep.mul_(x.reshape(-1, in_f))
                    grad_a = torch.mm(du_t, xd).to(a.dtype)
        return grad_x, None, grad_a, grad_b, grad_m, None, None, None, None, None


def dora_dropout_delta(
    x: torch.Tensor,
    weight: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    magnitude: torch.Tensor,
    weight_norm: torch.Tensor,
    scale: float,
    p: float,
    seed: int | None = None,
) -> torch.Tensor:
    """DoRA's addition to the base output with dropout, as PEFT computes it (module docstring).

    ``(m/n − 1) ⊙ dropout(x) Wᵀ + (m/n) ⊙ s · dropout(x) Aᵀ Bᵀ`` with ``W`` the frozen
    base weight in ``(out, in)`` layout, ``m`` the magnitude and ``n`` the detached row norm of
    ``W + s B A`` (no gradient flows into ``n`` or ``W``).
    """
    _check_p(p)
    seed = draw_seed() if seed is None else seed
    dtype = _compute_dtype(x, a)
    return _DoraDropoutLinear.apply(  # type: ignore[no-any-return]
        x, weight.detach(), a, b, magnitude, weight_norm.detach(), scale, p, seed, dtype
    )


def dora_delta_reference(
    x: torch.Tensor,
    weight: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    magnitude: torch.Tensor,
    weight_norm: torch.Tensor,
    scale: float,
    p: float,
    seed: int,
) -> torch.Tensor:
    """PEFT's DoRA formula with dropout, written plainly, with the kernel's mask for ``seed``."""
    keep = dropout_keep_mask(x.shape, p, seed, x.device).to(x.dtype)
    xd = x * keep / (1.0 - p)
    ms = (magnitude / weight_norm.detach()).view(1, -1)
    lora = F.linear(F.linear(xd, a), b)
    return (ms - 1) * F.linear(xd, weight.detach()) + ms * lora * scale


def lora_linear_reference(
    x: torch.Tensor,
    base: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    scale: float,
    p: float,
    seed: int,
) -> torch.Tensor:
    """The plain formula ``base + scale · dropout(x) Aᵀ Bᵀ`` with the kernel's mask for ``seed``."""
    keep = dropout_keep_mask(x.shape, p, seed, x.device).to(x.dtype)
    return base + F.linear(F.linear(x * keep / (1.0 - p), a), b) * scale


__all__ = [
    "dora_delta_reference",
    "dora_dropout_delta",
    "draw_seed",
    "dropout_keep_mask",
    "dropout_p",
    "fast_lora",
    "fast_lora_enabled",
    "fusable_base",
    "linear_lora_dropout",
    "lora_dropout_linear",
    "lora_linear_reference",
    "rebuild_inputs",
    "rebuild_inputs_enabled",
    "set_fast_lora",
    "set_rebuild_inputs",
]

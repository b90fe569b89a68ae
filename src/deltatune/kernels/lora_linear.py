r"""Fast LoRA with dropout for Linear layers: one autograd Function per adapted layer.

The plain LoRA branch ``s · dropout(x) Aᵀ Bᵀ`` built from ``nn.Dropout`` and two ``F.linear``
keeps, per adapted layer, a dropped copy of the input (and, on CPU, a float noise tensor of the
same size) for backward, although the input ``x`` itself is usually kept anyway (it is the same
tensor for the sibling projections q, k, v and gate, up). This Function keeps ``x`` and a seed
instead and regenerates the dropout mask in backward.

Notation: ``x`` (N × in, leading dims flattened), ``A`` (r × in), ``B`` (out × r), scale ``s``,
dropout probability ``p``, keep mask ``M`` (N × in, entries 0/1, drawn from a seed),
``c = 1 / (1 − p)`` and ``k = s · c``. ``dropout(x) = c · (M ⊙ x)``.

Forward::

    xd  = M ⊙ x                       (transient, not kept)
    v   = k · xd Aᵀ                    (N × r, kept)
    y   = base + v Bᵀ                  (= base + s · dropout(x) Aᵀ Bᵀ)

Backward, given ``g = ∂L/∂y`` (N × out)::

    ∂L/∂base = g
    ∂L/∂B    = gᵀ v                                   (out × r)
    du       = k · g B                                (N × r)
    ∂L/∂A    = duᵀ (M ⊙ x)                            (r × in;  M regenerated from the seed)
    ∂L/∂x    = M ⊙ (du A)                             (N × in)

Saved for backward: ``x`` (shared with the base layer and the siblings, so usually free),
``v`` (r wide, stored as ``vᵀ``), ``A``, ``B`` and the seed (a Python int). Nothing N × in is created per layer
beyond the transient ``xd`` and the mask.

The mask: ``⌈N·in/4⌉`` 64-bit random words from a ``torch.Generator`` on the input's device,
seeded with the per-call seed, read as N·in 16-bit integers ``w``; an element is dropped where
``w + 32768 < round(p · 65536)``. So ``p`` is used in steps of 2⁻¹⁶ (0.05 -> 0.0500031); the
scale stays ``1 / (1 − p)`` as in ``torch.nn.Dropout``. The seed is drawn from the global CPU
generator (``torch.manual_seed`` makes a run reproducible) unless passed explicitly, and
:func:`dropout_keep_mask` rebuilds the same mask from it (tests compare against the plain
formula with that mask).

Under autocast the matmuls run in the autocast dtype (as the plain path's ``F.linear`` would),
the output keeps ``base``'s dtype, and the gradients come back in each input's own dtype.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F

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


def _random_int16(shape: torch.Size | tuple[int, ...], seed: int, device: torch.device) -> torch.Tensor:
    """``prod(shape)`` uniform 16-bit integers from 64-bit words of a generator seeded with ``seed``."""
    n = math.prod(shape)
    gen = _generator(torch.device(device))
    gen.manual_seed(seed)
    words = torch.empty((n + 3) // 4, dtype=torch.int64, device=device)
    words.random_(-(2**63), None, generator=gen)
    return words.view(torch.int16)[:n].view(shape)


def _keep(shape: torch.Size | tuple[int, ...], p: float, seed: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """The keep mask ``M`` as 0/1 values of ``dtype`` (one pass from the random integers)."""
    bits = _random_int16(shape, seed, device)
    return torch.ge(bits, _threshold(p), out=torch.empty(shape, dtype=dtype, device=device))


def dropout_keep_mask(shape: torch.Size | tuple[int, ...], p: float, seed: int, device: torch.device) -> torch.Tensor:
    """The boolean keep mask ``M`` the kernel uses for this seed (``True`` = kept)."""
    return torch.ge(_random_int16(shape, seed, device), _threshold(p))


def _compute_dtype(x: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return weight.dtype


class _LoraDropoutLinear(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x: torch.Tensor,
        base: torch.Tensor,
        a: torch.Tensor,
        b: torch.Tensor,
        k: float,
        p: float,
        seed: int,
        dtype: torch.dtype,
    ) -> torch.Tensor:
        in_f, out_f = a.shape[1], b.shape[0]
        with torch.autocast(x.device.type, enabled=False):
            x2 = x.reshape(-1, in_f)
            xd = _keep(x2.shape, p, seed, x.device, dtype).mul_(x2)  # M ⊙ x, transient
            v_t = torch.mm(a.to(dtype), xd.t()).mul_(k)  # (r, N): this layout keeps every mm fast
            del xd
            b_c = b.to(dtype)
            base2d = base.reshape(-1, out_f)
            if base.dtype == dtype:
                out = torch.addmm(base2d, v_t.t(), b_c.t())
            else:
                out = base2d + torch.mm(v_t.t(), b_c.t()).to(base.dtype)
        ctx.save_for_backward(x, v_t, a, b)
        ctx.k, ctx.p, ctx.seed, ctx.dtype = k, p, seed, dtype
        return out.view(base.shape)

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        x, v_t, a, b = ctx.saved_tensors
        dtype: torch.dtype = ctx.dtype
        need_x, need_base, need_a, need_b = ctx.needs_input_grad[:4]
        in_f, out_f = a.shape[1], b.shape[0]
        grad_x = grad_a = grad_b = None
        with torch.autocast(g.device.type, enabled=False):
            g2 = g.reshape(-1, out_f).to(dtype)
            if need_b:
                grad_b = torch.mm(v_t, g2).t().to(b.dtype)
            if need_a or need_x:
                du_t = torch.mm(b.to(dtype).t(), g2.t()).mul_(ctx.k)  # (r, N)
                keep = _keep((x.numel() // in_f, in_f), ctx.p, ctx.seed, x.device, dtype)
                if need_x:
                    grad_x = torch.mm(du_t.t(), a.to(dtype)).mul_(keep).view(x.shape).to(x.dtype)
                if need_a:
                    xd = keep.mul_(x.reshape(-1, in_f))  # the mask's buffer becomes M ⊙ x
                    grad_a = torch.mm(du_t, xd).to(a.dtype)
        return grad_x, (g if need_base else None), grad_a, grad_b, None, None, None, None


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
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout p={p} must be in [0, 1)")
    if seed is None:
        seed = draw_seed()
    dtype = _compute_dtype(x, a)
    return _LoraDropoutLinear.apply(x, base, a, b, scale / (1.0 - p), p, seed, dtype)  # type: ignore[no-any-return]


def lora_linear_reference(
    x: torch.Tensor, base: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: float, p: float, seed: int
) -> torch.Tensor:
    """The plain formula ``base + scale · dropout(x) Aᵀ Bᵀ`` with the kernel's mask for ``seed``."""
    keep = dropout_keep_mask(x.shape, p, seed, x.device).to(x.dtype)
    return base + F.linear(F.linear(x * keep / (1.0 - p), a), b) * scale


__all__ = [
    "dropout_keep_mask",
    "draw_seed",
    "fast_lora",
    "fast_lora_enabled",
    "lora_dropout_linear",
    "lora_linear_reference",
    "set_fast_lora",
]

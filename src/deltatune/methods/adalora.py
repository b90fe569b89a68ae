r"""AdaLoRA (Zhang et al., ICLR 2023): an SVD-form update whose rank budget moves between layers.

::

            ┌──────────────┐
    x ──┬──►│ W (frozen)   │───────────────────────────────────────────────┐
        │   └──────────────┘                                               ▼
        └──► dropout ──► Q = A (r × in) ──► ⊙ Λ = E (r) ──► P = B (out × r) ──► × α/r₀ ──► (+) ──► y

    y = W x + α / (r₀ + 1e-5) · P Λ Q dropout(x)        (paper Eq. 3, scaled as Hugging Face PEFT)

``P`` (``lora_B``), ``Λ`` (``lora_E``, a column of singular values) and ``Q`` (``lora_A``) start
at N(0, 0.02), 0 and N(0, 0.02), so an injected model starts equal to its base. ``r₀`` is the
initial rank ``init_r`` (PEFT's ``ranknum``); it stays fixed when triplets are pruned.

Training (:func:`update_and_allocate`, called by :func:`deltatune.train.fit` after every
optimizer step through a training hook, before the gradients are cleared):

- importance of every entry ``w`` of P, Λ, Q (Eq. 8-9, with ``I = |w · ∂L/∂w|``)::

      Ī(t) = β₁ Ī(t-1) + (1-β₁) I(t)              sensitivity, smoothed
      Ū(t) = β₂ Ū(t-1) + (1-β₂) |I(t) - Ī(t)|     its uncertainty
      s(w) = Ī(t) · Ū(t)

- importance of triplet ``i`` of a module (Eq. 10):
  ``S_i = s(λ_i) + mean_j s(P_ji) + mean_j s(Q_ij)``;
- budget (total rank over all modules, Eq. 11) with ``b₀ = init_r · n``, ``b_T = target_r · n``::

      b(t) = b₀                                                   t ≤ t_init
             b_T + (b₀ - b_T) (1 - (t - t_init)/(T - t_init - t_final))³    (rounded down)
             b_T                                                  t > T - t_final

  every ``deltaT`` steps of the middle phase, the triplets whose ``S_i`` is among the
  ``b₀ - b(t)`` smallest over *all* modules get ``λ_i = 0`` (they may grow back: the mask is
  soft, as in the paper). At ``t = T - t_final`` the allocation is final: the kept triplets of
  each module are written to ``rank_pattern`` (PEFT's format: ``{"<module>.lora_E": [bool] *
  init_r}``), dropped ones stay zero, and the saved adapter holds only the kept rows.

The loss gets the orthogonality regulariser (:func:`orthogonal_regularization`), in PEFT's
form: ``orth_reg_weight`` times the mean, over the adapter's matrices, of ``‖Q Qᵀ - I‖_F`` and
``‖Pᵀ P - I‖_F`` (the paper's Eq. 4 writes the sum of the squared norms).

Saved in PEFT's ``ADALORA`` format: ``<module>.lora_A`` ``(r, in)``, ``lora_E`` ``(r, 1)``,
``lora_B`` ``(out, r)`` (no ``.weight``; ``ranknum`` is not saved); a module whose final rank
is 0 saves empty tensors, as PEFT does. Supported base layers: ``nn.Linear``, GPT-2 ``Conv1D``
and ``nn.Conv2d`` (``lora_A`` is ``(r, in · kh · kw)``).
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Iterator
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import nn

from deltatune.errors import ConfigError, DeltatuneError
from deltatune.layers import AdapterLayer
from deltatune.registry import Capabilities, MethodConfig, MethodSpec, register
from deltatune.targeting import is_conv1d, select_modules, set_submodule

#: Default targets by ``config.model_type`` (PEFT's AdaLoRA mapping for these models).
DEFAULT_TARGETS: dict[str, list[str]] = {
    "bert": ["query", "value"],
    "roberta": ["query", "value"],
    "distilbert": ["q_lin", "v_lin"],
    "gpt2": ["c_attn"],
    "llama": ["q_proj", "v_proj"],
    "mistral": ["q_proj", "v_proj"],
    "qwen2": ["q_proj", "v_proj"],
}
#: PEFT adds this to ``ranknum`` before dividing; kept so outputs match PEFT's to ~1e-7.
RANKNUM_EPS = 1e-5
HOOK_PREFIX = "adalora:"


@dataclasses.dataclass
class AdaLoraConfig(MethodConfig):
    """AdaLoRA settings; field names, defaults and meanings are Hugging Face PEFT's.

    - ``init_r`` (12): rank every module starts with. ``target_r`` (8): the average rank the
      budget ends at (total budget ``target_r`` × number of modules).
    - ``tinit`` (0): steps before any pruning. ``tfinal`` (0): steps at the end with the final
      ranks fixed. ``deltaT`` (1): prune every ``deltaT`` steps in between.
    - ``beta1`` / ``beta2`` (0.85): EMA factors of the sensitivity and of its uncertainty.
    - ``orth_reg_weight`` (0.5): weight of the orthogonality regulariser on P and Q.
    - ``total_step`` (None): the schedule's length T; ``None`` takes the trainer's total number
      of optimizer steps (and is written into the saved config, which PEFT needs).
    - ``rank_pattern`` (None): the final allocation, ``{"<module>.lora_E": [kept?] * init_r}``;
      written by training, read when loading (modules are created with the kept rank).
    - ``lora_alpha`` (8): scale numerator (the update is scaled by ``lora_alpha / init_r``).
    - ``lora_dropout``, ``target_modules`` (None = the model type's default, e.g. query/value
      for BERT), ``exclude_modules``, ``layers_to_transform``, ``layers_pattern``,
      ``modules_to_save``, ``fan_in_fan_out``: as for LoRA.
    - ``init_lora_weights`` (True): Λ = 0 (start at the base); ``False``: all random (tests).
    - ``r`` (8): unused by AdaLoRA (PEFT keeps it from LoRA); use ``init_r``.
    """

    method_name: ClassVar[str] = "adalora"
    peft_type: ClassVar[str] = "ADALORA"

    init_r: int = 12
    target_r: int = 8
    tinit: int = 0
    tfinal: int = 0
    deltaT: int = 1  # PEFT's field name
    beta1: float = 0.85
    beta2: float = 0.85
    orth_reg_weight: float = 0.5
    total_step: int | None = None
    rank_pattern: dict[str, list[bool]] | None = None
    lora_alpha: float = 8
    lora_dropout: float = 0.0
    target_modules: str | list[str] | None = None
    exclude_modules: str | list[str] | None = None
    layers_to_transform: int | list[int] | None = None
    layers_pattern: str | list[str] | None = None
    modules_to_save: list[str] | None = None
    fan_in_fan_out: bool = False
    bias: Literal["none"] = "none"
    init_lora_weights: bool = True
    r: int = 8

    def validate(self) -> None:
        if self.init_r <= 0:
            raise ConfigError(f"init_r={self.init_r} must be a positive integer (try 12)")
        if not 0 < self.target_r <= self.init_r:
            raise ConfigError(
                f"target_r={self.target_r} must be in 1..init_r ({self.init_r}); AdaLoRA only "
                "prunes (try target_r=8 with init_r=12)"
            )
        for field in ("tinit", "tfinal"):
            if getattr(self, field) < 0:
                raise ConfigError(f"{field}={getattr(self, field)} must be >= 0 (try 0)")
        if self.deltaT < 1:
            raise ConfigError(f"deltaT={self.deltaT} must be >= 1 (try 1 or 10)")
        for field in ("beta1", "beta2"):
            value = getattr(self, field)
            if not 0.0 < value < 1.0:
                raise ConfigError(f"{field}={value} must be in (0, 1) (try 0.85)")
        if self.orth_reg_weight < 0:
            raise ConfigError(f"orth_reg_weight={self.orth_reg_weight} must be >= 0 (try 0.5)")
        if self.total_step is not None:
            self.check_schedule(self.total_step, "total_step")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ConfigError(f"lora_dropout={self.lora_dropout} must be in [0, 1) (try 0.05)")
        if self.r != 8:
            warnings.warn(
                f"r={self.r} is not used by AdaLoRA; the starting rank is init_r={self.init_r}",
                stacklevel=3,
            )

    def check_schedule(self, total: int, where: str) -> None:
        """The schedule needs a pruning phase: ``tinit < total - tfinal``."""
        if total <= 0 or self.tinit >= total - self.tfinal:
            raise ConfigError(
                f"{where}={total} leaves no pruning phase with tinit={self.tinit} and "
                f"tfinal={self.tfinal} (need tinit < total_step - tfinal); lower tinit/tfinal "
                "or train for more steps"
            )

    def kept_rank(self, module_name: str) -> tuple[int, list[bool] | None]:
        """(rank to create, the saved mask) for a module under ``rank_pattern``."""
        pattern = self.rank_pattern or {}
        key = f"{module_name}.lora_E"
        mask = pattern.get(key)
        if mask is None:
            mask = next((v for k, v in pattern.items() if k.startswith(key + ".")), None)
        if mask is None:
            return self.init_r, None
        if len(mask) != self.init_r:
            raise ConfigError(
                f"rank_pattern['{key}'] has {len(mask)} entries, init_r is {self.init_r}; "
                "the pattern must come from an adapter with the same init_r"
            )
        return sum(bool(m) for m in mask), [bool(m) for m in mask]

    @property
    def scale(self) -> float:
        """``lora_alpha / (init_r + 1e-5)`` (PEFT: ``scaling / ranknum``, scaling = alpha or r)."""
        scaling = self.lora_alpha if self.lora_alpha > 0 else float(self.init_r)
        return scaling / (self.init_r + RANKNUM_EPS)


class AllocatorState(nn.Module):
    """One adapter's importance statistics in one layer (buffers: checkpointed with the run).

    ``ipt_*`` hold Ī (smoothed sensitivity), ``unc_*`` hold Ū (its uncertainty) for A, E, B.
    ``mask`` marks the triplets kept by the final allocation; ``final`` says it is made.
    """

    def __init__(self, a: torch.Tensor, e: torch.Tensor, b: torch.Tensor) -> None:
        super().__init__()
        for part, t in (("A", a), ("E", e), ("B", b)):
            self.register_buffer(f"ipt_{part}", torch.zeros_like(t, requires_grad=False))
            self.register_buffer(f"unc_{part}", torch.zeros_like(t, requires_grad=False))
        self.register_buffer("mask", torch.ones(e.shape[0], dtype=torch.bool, device=e.device))
        self.register_buffer("final", torch.zeros((), dtype=torch.bool, device=e.device))

    def reset(self) -> None:
        for name, buf in self.named_buffers():
            if name.startswith(("ipt_", "unc_")):
                buf.zero_()

    def buffer(self, name: str) -> torch.Tensor:
        value = getattr(self, name)
        assert isinstance(value, torch.Tensor)
        return value


class AdaLoraLayer(AdapterLayer):
    """AdaLoRA's SVD-form update ``P Λ Q`` beside a Linear, Conv1D or Conv2d."""

    adapter_attributes = ("lora_A", "lora_E", "lora_B", "adalora_state")

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.fan_in_fan_out = is_conv1d(base_layer)
        self.is_conv2d = isinstance(base_layer, nn.Conv2d)
        weight = self.base_weight_param
        if self.is_conv2d:
            conv: nn.Conv2d = base_layer  # type: ignore[assignment]
            if conv.groups != 1:
                raise ConfigError(
                    f"AdaLoRA on grouped/depthwise Conv2d (groups={conv.groups}) is not supported; "
                    "exclude it with exclude_modules"
                )
            self.out_features = conv.out_channels
            self.in_features = conv.in_channels * math.prod(conv.kernel_size)
        else:
            rows, cols = (int(n) for n in weight.shape)
            self.out_features, self.in_features = (
                (cols, rows) if self.fan_in_fan_out else (rows, cols)
            )
        self.lora_A = nn.ParameterDict()
        self.lora_E = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        self.adalora_state = nn.ModuleDict()
        self.lora_dropout = nn.ModuleDict()
        self.scaling: dict[str, float] = {}
        self.init_r: dict[str, int] = {}
        self.fixed: dict[str, bool] = {}

    def add_adapter(
        self, adapter_name: str, config: AdaLoraConfig, r: int | None = None, fixed: bool = False
    ) -> None:
        """Add an adapter of rank ``r`` (default ``init_r``); ``fixed``: its ranks come from a
        saved ``rank_pattern`` and the allocator leaves it alone."""
        r = config.init_r if r is None else r
        w = self.base_weight_param
        dtype = w.dtype if w.is_floating_point() else torch.float32
        a = torch.empty(r, self.in_features, device=w.device, dtype=dtype)
        e = torch.empty(r, 1, device=w.device, dtype=dtype)
        b = torch.empty(self.out_features, r, device=w.device, dtype=dtype)
        with torch.no_grad():
            if config.init_lora_weights:
                nn.init.normal_(a, std=0.02)
                nn.init.zeros_(e)
                nn.init.normal_(b, std=0.02)
            else:
                for t in (a, e, b):
                    nn.init.normal_(t)
        self.lora_A[adapter_name] = nn.Parameter(a)
        self.lora_E[adapter_name] = nn.Parameter(e)
        self.lora_B[adapter_name] = nn.Parameter(b)
        self.adalora_state[adapter_name] = AllocatorState(a, e, b)
        self.lora_dropout[adapter_name] = (
            nn.Dropout(config.lora_dropout) if config.lora_dropout > 0 else nn.Identity()
        )
        self.scaling[adapter_name] = config.scale
        self.init_r[adapter_name] = config.init_r
        self.fixed[adapter_name] = fixed

    def delete_adapter(self, adapter_name: str) -> None:
        super().delete_adapter(adapter_name)
        if adapter_name in self.lora_dropout:
            del self.lora_dropout[adapter_name]
        self.scaling.pop(adapter_name, None)
        self.init_r.pop(adapter_name, None)
        self.fixed.pop(adapter_name, None)

    def state(self, adapter_name: str) -> AllocatorState:
        state = self.adalora_state[adapter_name]
        assert isinstance(state, AllocatorState)
        return state

    def pruned(self, adapter_name: str) -> torch.Tensor | None:
        """The kept-triplet mask once the final allocation dropped some, else ``None``."""
        state = self.state(adapter_name)
        mask = state.buffer("mask")
        return mask if bool(state.buffer("final")) and not bool(mask.all()) else None

    def _ae(self, name: str) -> torch.Tensor:
        """``Λ Q`` (A scaled row-wise by E); dropped triplets count as zero after the final
        allocation, so the in-memory model equals the saved (pruned) one."""
        e = self.lora_E[name]
        mask = self.pruned(name)
        if mask is not None:
            e = e * mask.view(-1, 1).to(e.dtype)
        return self.lora_A[name] * e

    def adapter_tensors(self, adapter_name: str) -> dict[str, torch.Tensor]:
        a, e, b = self.lora_A[adapter_name], self.lora_E[adapter_name], self.lora_B[adapter_name]
        mask = self.pruned(adapter_name)
        if mask is None:
            return {"lora_A": a, "lora_E": e, "lora_B": b}
        # After the final allocation only the kept triplets are saved (PEFT's resize on save).
        return {"lora_A": a[mask], "lora_E": e[mask], "lora_B": b[:, mask]}

    def load_adapter_tensors(self, adapter_name: str, tensors: dict[str, torch.Tensor]) -> None:
        if self.pruned(adapter_name) is not None:
            raise DeltatuneError(
                f"adapter '{adapter_name}' is pruned in memory; load into a freshly injected model"
            )
        super().load_adapter_tensors(adapter_name, tensors)

    def delta_weight(self, adapter_name: str) -> torch.Tensor:
        delta = (self.lora_B[adapter_name] @ self._ae(adapter_name)) * self.scaling[adapter_name]
        if self.is_conv2d:
            return delta.reshape(self.base_weight_param.shape)
        return delta.t() if self.fan_in_fan_out else delta

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        for name in self.adapters_to_run():
            a = self.lora_A[name]
            xa = x if torch.is_autocast_enabled(x.device.type) else x.to(a.dtype)
            dropped = self.lora_dropout[name](xa)
            if self.is_conv2d:
                conv: nn.Conv2d = self.base_layer  # type: ignore[assignment]
                delta = F.conv2d(
                    dropped,
                    self.delta_weight(name).to(dropped.dtype),
                    stride=conv.stride,
                    padding=conv.padding,
                    dilation=conv.dilation,
                )
            else:
                delta = (dropped @ self._ae(name).t() @ self.lora_B[name].t()) * self.scaling[name]
            result = result + delta.to(result.dtype)
        return result


# --------------------------------------------------------------------------- the allocator


def _layers(model: nn.Module, adapter_name: str) -> Iterator[tuple[str, AdaLoraLayer]]:
    for name, module in model.named_modules():
        if isinstance(module, AdaLoraLayer) and adapter_name in module.lora_A:
            yield name, module


def budget_schedule(
    step: int, init_budget: int, target_budget: int, config: AdaLoraConfig, total_step: int
) -> tuple[int, bool]:
    """(total rank budget at ``step``, whether to mask at this step): paper Eq. 11, cubic."""
    tinit, tfinal = config.tinit, config.tfinal
    if step <= tinit:
        return init_budget, False
    if step > total_step - tfinal:
        return target_budget, True
    remaining = 1 - (step - tinit) / (total_step - tfinal - tinit)
    budget = int((init_budget - target_budget) * remaining**3 + target_budget)
    return budget, step % config.deltaT == 0


def update_importance(layer: AdaLoraLayer, adapter_name: str, beta1: float, beta2: float) -> None:
    """Ī ← β₁ Ī + (1-β₁) I,  Ū ← β₂ Ū + (1-β₂) |I - Ī|  with ``I = |w ∇w|`` (Eq. 8-9).

    A parameter without a gradient (its module was not used this step) counts as ``I = 0``.
    """
    state = layer.state(adapter_name)
    with torch.no_grad():
        for part in ("A", "E", "B"):
            p = getattr(layer, f"lora_{part}")[adapter_name]
            sens = (p * p.grad).abs() if p.grad is not None else torch.zeros_like(p)
            ipt, unc = state.buffer(f"ipt_{part}"), state.buffer(f"unc_{part}")
            ipt.mul_(beta1).add_(sens.to(ipt.dtype), alpha=1 - beta1)
            unc.mul_(beta2).add_((sens.to(unc.dtype) - ipt).abs(), alpha=1 - beta2)


def triplet_scores(layer: AdaLoraLayer, adapter_name: str) -> torch.Tensor:
    """``S_i = s(λ_i) + mean_j s(Q_ij) + mean_j s(P_ji)`` with ``s = Ī · Ū`` (Eq. 10); shape (r,)."""
    st = layer.state(adapter_name)
    s_a = st.buffer("ipt_A") * st.buffer("unc_A")
    s_e = st.buffer("ipt_E") * st.buffer("unc_E")
    s_b = st.buffer("ipt_B") * st.buffer("unc_B")
    return s_e.view(-1) + s_a.mean(dim=1) + s_b.mean(dim=0)


def mask_to_budget(
    layers: list[tuple[str, AdaLoraLayer]], adapter_name: str, init_budget: int, budget: int
) -> dict[str, torch.Tensor]:
    """Zero ``λ_i`` of the ``init_budget - budget`` least important triplets over all modules
    (ties at the threshold are dropped too, as in PEFT). Returns each module's kept mask."""
    scores = {name: triplet_scores(layer, adapter_name) for name, layer in layers}
    kept = {name: torch.ones_like(s, dtype=torch.bool) for name, s in scores.items()}
    k = init_budget - budget
    if k <= 0:  # nothing to prune yet (int rounding keeps the first steps at the full budget)
        return kept
    threshold = torch.kthvalue(torch.cat([s.float().cpu() for s in scores.values()]), k)[0]
    with torch.no_grad():
        for name, layer in layers:
            keep = scores[name].float() > threshold.to(scores[name].device)
            layer.lora_E[adapter_name].masked_fill_(~keep.view(-1, 1), 0.0)
            kept[name] = keep
    return kept


def _config(model: nn.Module, adapter_name: str) -> AdaLoraConfig | None:
    from deltatune.model import state_of

    config = state_of(model).configs.get(adapter_name)
    return config if isinstance(config, AdaLoraConfig) else None


def update_and_allocate(
    model: nn.Module,
    global_step: int,
    total_steps: int | None = None,
    adapter_name: str = "default",
) -> int | None:
    """One step of AdaLoRA's rank allocation; call it after ``optimizer.step()`` and before
    ``optimizer.zero_grad()`` with the number of optimizer steps done (1, 2, ...).

    :func:`deltatune.train.fit` calls it for you. ``total_steps`` fills a ``total_step`` of
    ``None``. Returns the budget in force after this step (``None`` when nothing was done:
    the adapter is not active or was loaded with its final ranks).
    """
    from deltatune.model import active_adapters, state_of

    config = _config(model, adapter_name)
    if config is None or adapter_name not in active_adapters(model):
        return None
    if config.total_step is None:
        if total_steps is None:
            raise ConfigError(
                "total_step is null; set it in the AdaLoRA config or pass total_steps"
            )
        config.check_schedule(total_steps, "total_step (the trainer's total steps)")
        config = config.replace(total_step=total_steps)
        state_of(model).configs[adapter_name] = config
    total = config.total_step
    assert total is not None
    layers = list(_layers(model, adapter_name))
    if not layers or any(layer.fixed[adapter_name] for _, layer in layers):
        return None  # loaded with its final ranks (a saved rank_pattern): nothing to allocate
    init_budget = sum(layer.init_r[adapter_name] for _, layer in layers)
    target_budget = config.target_r * len(layers)
    final_step = total - config.tfinal
    if global_step < final_step:
        for _, layer in layers:
            update_importance(layer, adapter_name, config.beta1, config.beta2)
        budget, mask_now = budget_schedule(global_step, init_budget, target_budget, config, total)
        if mask_now:
            mask_to_budget(layers, adapter_name, init_budget, budget)
        return budget
    states = [layer.state(adapter_name) for _, layer in layers]
    if not all(bool(s.buffer("final")) for s in states):
        # The final allocation (PEFT: force_mask at total_step - tfinal), then fixed ranks.
        kept = mask_to_budget(layers, adapter_name, init_budget, target_budget)
        for (name, _), state in zip(layers, states, strict=True):
            state.buffer("mask").copy_(kept[name])
            state.buffer("final").fill_(True)
            state.reset()
    with torch.no_grad():
        for (_, layer), state in zip(layers, states, strict=True):
            layer.lora_E[adapter_name].masked_fill_(~state.buffer("mask").view(-1, 1), 0.0)
    pattern = {
        f"{name}.lora_E": [bool(v) for v in state.buffer("mask").tolist()]
        for (name, _), state in zip(layers, states, strict=True)
    }
    if config.rank_pattern != pattern:
        state_of(model).configs[adapter_name] = config.replace(rank_pattern=pattern)
    return target_budget


def final_ranks(model: nn.Module, adapter_name: str = "default") -> dict[str, int]:
    """Each module's rank: its kept triplets once the allocation is final (or loaded), else
    the number of nonzero singular values right now."""
    out: dict[str, int] = {}
    for name, layer in _layers(model, adapter_name):
        state = layer.state(adapter_name)
        if layer.fixed[adapter_name] or bool(state.buffer("final")):
            out[name] = int(state.buffer("mask").sum())
        else:
            out[name] = int((layer.lora_E[adapter_name] != 0).sum())
    return out


def orthogonal_regularization(model: nn.Module, adapter_name: str = "default") -> torch.Tensor:
    """``orth_reg_weight · mean over matrices of ‖Q Qᵀ - I‖_F and ‖Pᵀ P - I‖_F`` (PEFT's form of
    the paper's ``R(P, Q)``); zero when the adapter is inactive or the weight is 0."""
    from deltatune.model import active_adapters

    config = _config(model, adapter_name)
    terms: list[torch.Tensor] = []
    if config is not None and config.orth_reg_weight > 0 and adapter_name in active_adapters(model):
        for _, layer in _layers(model, adapter_name):
            a, b = layer.lora_A[adapter_name], layer.lora_B[adapter_name]
            for cov in (a @ a.t(), b.t() @ b):
                eye = torch.eye(cov.shape[0], device=cov.device, dtype=cov.dtype)
                terms.append(torch.linalg.matrix_norm(cov - eye))
    if not terms:
        return torch.zeros(())
    assert config is not None
    return config.orth_reg_weight * torch.stack(terms).mean()


@dataclasses.dataclass
class AdaLoraHook:
    """The training hook :func:`inject_adalora` attaches (see :mod:`deltatune.train.trainer`)."""

    adapter_name: str

    def extra_loss(self, model: nn.Module) -> torch.Tensor:
        return orthogonal_regularization(model, self.adapter_name)

    def after_optimizer_step(self, model: nn.Module, step: int, total_steps: int) -> None:
        config = _config(model, self.adapter_name)
        if step == 1 and config is not None and config.total_step is not None:
            final = config.total_step - config.tfinal
            if final > total_steps:
                warnings.warn(
                    f"AdaLoRA total_step={config.total_step} puts the final rank allocation at "
                    f"step {final}, after this run's {total_steps} steps: the ranks will not be "
                    "fixed; set method.total_step to null to use the run's length",
                    stacklevel=2,
                )
        update_and_allocate(model, step, total_steps, self.adapter_name)


# --------------------------------------------------------------------------- injection


def default_targets(model: nn.Module) -> list[str]:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type in DEFAULT_TARGETS:
        return DEFAULT_TARGETS[model_type]
    raise ConfigError(
        f"target_modules is not set and there is no default for model type {model_type!r}; "
        "set target_modules (e.g. [q_proj, v_proj] or all-linear)"
    )


def _new_layer(name: str, module: nn.Module) -> AdaLoraLayer:
    if isinstance(module, nn.Linear | nn.Conv2d) or is_conv1d(module):
        return AdaLoraLayer(module)
    raise ConfigError(
        f"target module '{name}' is a {type(module).__name__}; AdaLoRA wraps Linear, Conv1D and "
        "Conv2d (adjust target_modules or add it to exclude_modules)"
    )


def inject_adalora(model: nn.Module, config: AdaLoraConfig, adapter_name: str) -> None:
    from deltatune.model import modules_to_save_of
    from deltatune.train.trainer import add_training_hook

    targets = config.target_modules if config.target_modules is not None else default_targets(model)
    patterns = modules_to_save_of(config)
    skip = {
        n
        for n, _ in model.named_modules()
        if n and any(n == p or n.endswith("." + p) for p in patterns)
    }
    for name in select_modules(
        model,
        targets,
        exclude_modules=config.exclude_modules,
        layers_to_transform=config.layers_to_transform,
        layers_pattern=config.layers_pattern,
        skip=skip,
    ):
        module = model.get_submodule(name)
        if isinstance(module, AdapterLayer) and not isinstance(module, AdaLoraLayer):
            raise ConfigError(f"module '{name}' already carries a {type(module).__name__} adapter")
        parts = name.split(".")
        if any(
            isinstance(model.get_submodule(".".join(parts[:i])), AdapterLayer)
            for i in range(1, len(parts))
        ):
            continue  # part of another adapter (e.g. a LoRA's lora_A Linear)
        layer = module if isinstance(module, AdaLoraLayer) else _new_layer(name, module)
        rank, saved_mask = config.kept_rank(name)
        layer.add_adapter(adapter_name, config, rank, fixed=saved_mask is not None)
        if layer is not module:
            set_submodule(model, name, layer)
    add_training_hook(model, HOOK_PREFIX + adapter_name, AdaLoraHook(adapter_name))


register(
    MethodSpec(
        name="adalora",
        config_cls=AdaLoraConfig,
        inject=inject_adalora,
        capabilities=Capabilities(
            merge=True, peft_compatible=True, multi_adapter=True, disable=True
        ),
        # Λ starts at 0 and P, Q at N(0, 0.02): at LoRA's 1e-3 the update stays tiny for the
        # first hundred steps (MiniLM/BBC, 50 steps: test accuracy 0.37 at 1e-3, 0.80 at 5e-3,
        # 0.96 at 1e-2; docs/adalora.md).
        default_lr=1e-2,
        summary="SVD-form low-rank update P·Λ·Q whose rank budget moves to the important modules",
        family="low-rank",
    )
)

__all__ = [
    "AdaLoraConfig",
    "AdaLoraHook",
    "AdaLoraLayer",
    "AllocatorState",
    "budget_schedule",
    "final_ranks",
    "inject_adalora",
    "mask_to_budget",
    "orthogonal_regularization",
    "triplet_scores",
    "update_and_allocate",
    "update_importance",
]

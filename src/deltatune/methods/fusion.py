r"""AdapterFusion (Pfeiffer et al., 2021, "AdapterFusion: Non-Destructive Task Composition for
Transfer Learning"): attention over the outputs of N frozen task adapters, per layer.

Stage one trains N task adapters independently (``houlsby`` / ``pfeiffer``, one per task).
Stage two keeps them frozen and trains one fusion layer at every place where they sit::

    h = sublayer output (what the adapters see)
    Δ_n = A_n(h) − h                  the change adapter n makes (n = 1 … N)

    q   = Q h + b_Q                   query from the hidden state
    k_n = K Δ_n + b_K                 keys from each adapter's output
    s   = softmax_n(q · k_n)          attention over the adapters (one weight per token)
    h'  = h + V Σ_n s_n Δ_n           values: each adapter's output through V; residual h

::

    h ──┬──► A_1(h) − h ──► Δ_1 ──┐
        ├──► A_2(h) − h ──► Δ_2 ──┼──► K ──► k_n ─┐
        │                         │               ├─► softmax(q·k_n) ──► s ─┐
        ├──► Q ──────────────────────────► q ─────┘                         ▼
        │                         └──────────────────────────────► V Σ s_n Δ_n ──► (+) ──► h'
        └──────────────────────────────────────────────────────────────────────────┘

Keys from ``A_n(h)`` or from ``Δ_n`` give the same softmax (the shared ``K h`` term adds the
same score to every adapter), so this is the paper's "keys and values from the adapters'
outputs" as the authors' ``adapters`` library computes it (``up`` outputs as keys/values, the
residual ``h`` added after the value matrix; ``V`` applied after the weighted sum, which is the
same linear map). Initialisation as in the paper: ``Q`` and ``K`` random (N(0, 0.02²), zero
bias), ``V`` the identity (``value_offdiag_init`` puts a small constant off the diagonal: the
paper and the ``adapters`` library use 1e-6; the default 0 makes fusion over one adapter give
that adapter's output exactly). With ``V = I`` and uniform attention the output is the mean of
the adapters' outputs; over a single adapter it is that adapter's output.

The paper keeps ``V`` near the identity with ``λ‖I − V‖²`` added to the loss (λ = 0.01):
:func:`fusion_regularization` computes it; ``inject`` attaches a training hook
(:class:`FusionRegularizationHook`) so :func:`deltatune.train.fit` and ``deltatune train`` add it
to the loss while ``V`` trains. :func:`fusion_weights` reads the attention weights of the last forward
pass per layer, so you can see which task adapters were used.

A fusion adapter is injected like any method, naming the adapters it fuses (they must be on
the model, or ``adapter_paths`` says where to load them from, frozen)::

    dt.inject(model, dt.FusionConfig(adapter_names=["sst", "mnli"]), "fusion")  # active, trainable
    dt.set_active(model, dt.Fuse("sst", "mnli"))                                  # the same

Fusion layers live inside the serial adapter layers (``...output.dense.fusion.query.weight``)
and only fusion parameters are saved (``peft_type`` ``DELTATUNE_FUSION``); loading one needs
its fused adapters on the model first (``load_adapters`` orders a folder that holds them all).
Not mergeable. Parallel adapters are not fused (their output is not a serial hidden state).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Mapping
from typing import Any, ClassVar

import torch
from torch import nn

from deltatune.errors import ConfigError, DeltatuneError
from deltatune.methods._bottleneck import ParallelAdapterLayer, SerialAdapterLayer, _like
from deltatune.registry import Capabilities, MethodConfig, MethodSpec, register

HOOK_PREFIX = "fusion:"


@dataclasses.dataclass
class FusionConfig(MethodConfig):
    """AdapterFusion settings (every field, with its default).

    - ``adapter_names`` (required): the serial bottleneck adapters (houlsby / pfeiffer) to fuse;
      their order is the order of :func:`fusion_weights`.
    - ``adapter_paths`` ({}): ``{adapter name: saved adapter folder}`` for fused adapters that
      are not on the model yet; they are loaded, frozen, before the fusion is added (this is
      how ``deltatune train`` with ``method: {name: fusion, ...}`` gets its task adapters).
    - ``value`` (True): learn the value matrix ``V`` (False: ``V = I``, the "static" variant).
    - ``value_offdiag_init`` (0.0): ``V`` starts as the identity with this off the diagonal
      (the paper uses 1e-6).
    - ``dropout`` (0.0): dropout on the attention scores.
    - ``regularization`` (0.01): λ of ``λ‖I − V‖²`` in :func:`fusion_regularization`.
    - ``modules_to_save`` (None): modules trained whole and saved too (a new head).
    - ``task_type``, ``base_model_name_or_path`` (None): as in every method config.
    """

    method_name: ClassVar[str] = "fusion"
    peft_type: ClassVar[str] = "DELTATUNE_FUSION"

    adapter_names: list[str] = dataclasses.field(default_factory=list)
    adapter_paths: dict[str, str] = dataclasses.field(default_factory=dict)
    value: bool = True
    value_offdiag_init: float = 0.0
    dropout: float = 0.0
    regularization: float = 0.01
    modules_to_save: list[str] | None = None

    def validate(self) -> None:
        if not self.adapter_names:
            raise ConfigError(
                "adapter_names is empty: list the task adapters to fuse (e.g. [sst, mnli])"
            )
        if any(not n for n in self.adapter_names):
            raise ConfigError(f"adapter_names={self.adapter_names!r} has an empty name")
        repeated = sorted({n for n in self.adapter_names if self.adapter_names.count(n) > 1})
        if repeated:
            raise ConfigError(f"adapter_names names {repeated} more than once")
        extra = sorted(set(self.adapter_paths) - set(self.adapter_names))
        if extra:
            raise ConfigError(
                f"adapter_paths has {extra}, which are not in adapter_names={self.adapter_names}"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout={self.dropout} must be in [0, 1) (try 0.1)")
        if not (math.isfinite(self.regularization) and self.regularization >= 0):
            raise ConfigError(f"regularization={self.regularization} must be >= 0 (try 0.01)")
        if not math.isfinite(self.value_offdiag_init):
            raise ConfigError(f"value_offdiag_init={self.value_offdiag_init} must be finite")

    def depends_on(self) -> list[str]:
        """The adapters this fusion needs on the model (loaded before it; kept while it exists)."""
        return list(self.adapter_names)


class FusionLayer(nn.Module):
    """One fusion at one serial adapter place: ``h' = h + V Σ_n softmax_n(Q h · K Δ_n) Δ_n``."""

    def __init__(self, dim: int, adapters: list[str], positions: list[int], config: FusionConfig):
        super().__init__()
        self.adapters = list(adapters)
        #: Index of each fused adapter here in ``config.adapter_names`` (for the readout).
        self.positions = list(positions)
        self.n_total = len(config.adapter_names)
        self.query = nn.Linear(dim, dim)
        self.key = nn.Linear(dim, dim)
        self.value = nn.Linear(dim, dim, bias=False) if config.value else None
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        with torch.no_grad():
            for lin in (self.query, self.key):
                nn.init.normal_(lin.weight, std=0.02)
                nn.init.zeros_(lin.bias)
            if self.value is not None:
                self.value.weight.fill_(config.value_offdiag_init)
                self.value.weight.fill_diagonal_(1.0)
        #: Attention weights of the last forward pass, ``(..., adapters here)``, detached.
        self.last_weights: torch.Tensor | None = None

    def deltas(self, h: torch.Tensor, layer: SerialAdapterLayer) -> torch.Tensor:
        """``Δ_n = A_n(h) − h`` for every fused adapter, stacked: ``(..., N, d)``."""
        out = []
        for name in self.adapters:
            if name not in layer.adapter:
                raise DeltatuneError(
                    f"fusion over {self.adapters}: adapter '{name}' is no longer on this layer"
                )
            block = layer.bottleneck(name)
            delta = block.delta(h)
            if block.ln_after is not None:
                delta = block.serial(h) - h
            out.append(delta)
        return torch.stack(out, dim=-2)

    def forward(self, h: torch.Tensor, layer: SerialAdapterLayer) -> torch.Tensor:
        x = h.to(self.query.weight.dtype)
        d = self.deltas(x, layer)  # (..., N, d)
        q = self.query(x)  # (..., d)
        k = self.key(d)  # (..., N, d)
        scores = self.dropout((k @ q.unsqueeze(-1)).squeeze(-1))  # (..., N)
        probs = scores.softmax(dim=-1)
        self.last_weights = probs.detach()
        context = (probs.unsqueeze(-2) @ d).squeeze(-2)  # Σ_n s_n Δ_n: (..., d)
        if self.value is not None:
            context = self.value(context)
        return (x + context).to(h.dtype)


def _fusion_layers(model: nn.Module, adapter_name: str) -> Iterable[tuple[str, FusionLayer]]:
    from deltatune.model import adapter_layers

    for name, layer in adapter_layers(model):
        fusion = getattr(layer, "fusion", None)
        if isinstance(fusion, nn.ModuleDict) and adapter_name in fusion:
            module = fusion[adapter_name]
            assert isinstance(module, FusionLayer)
            yield name, module


def _fusion_names(model: nn.Module) -> list[str]:
    from deltatune.model import state_of

    return [n for n, c in state_of(model).configs.items() if isinstance(c, FusionConfig)]


def _pick_fusion(model: nn.Module, adapter_name: str | None, what: str) -> str:
    from deltatune.model import active_adapters

    names = _fusion_names(model)
    if adapter_name is not None:
        if adapter_name not in names:
            raise ConfigError(
                f"{what}: '{adapter_name}' is not a fusion adapter (fusion adapters: "
                f"{', '.join(names) or 'none'})"
            )
        return adapter_name
    if len(names) == 1:
        return names[0]
    active = [n for n in names if n in active_adapters(model)]
    if len(active) == 1:
        return active[0]
    raise ConfigError(
        f"{what}: the model has {len(names)} fusion adapters ({', '.join(names) or 'none'}); "
        "name one with adapter_name="
    )


def fusion_weights(
    model: nn.Module,
    adapter_name: str | None = None,
    attention_mask: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """Per layer, the fusion's attention weights of the last forward pass, averaged over tokens.

    Returns ``{module name: tensor (N,)}`` with ``N = len(adapter_names)`` in the config's order
    (an adapter missing at a layer gets 0); each sums to 1. ``attention_mask`` (``(batch,
    tokens)``, 1 for real tokens) leaves padding out of the average. ``adapter_name`` picks the
    fusion when the model has several.
    """
    name = _pick_fusion(model, adapter_name, "fusion_weights")
    out: dict[str, torch.Tensor] = {}
    for layer_name, fusion in _fusion_layers(model, name):
        w = fusion.last_weights
        if w is None:
            continue
        w = w.float()
        if (
            attention_mask is not None
            and w.dim() == 3
            and tuple(attention_mask.shape) == w.shape[:2]
        ):
            m = attention_mask.to(device=w.device, dtype=w.dtype).unsqueeze(-1)
            mean = (w * m).sum(dim=(0, 1)) / m.sum().clamp_min(1.0)
        else:
            mean = w.reshape(-1, w.shape[-1]).mean(dim=0)
        full = torch.zeros(fusion.n_total, dtype=mean.dtype, device=mean.device)
        full[fusion.positions] = mean
        out[layer_name] = full.cpu()
    return out


def fusion_regularization(model: nn.Module, adapter_name: str | None = None) -> torch.Tensor:
    """``Σ_layers λ‖I − V‖²`` over the fusion's value matrices (λ = ``config.regularization``).

    Without ``adapter_name``: every fusion adapter whose ``V`` is trainable (0 if none).
    """
    from deltatune.model import state_of

    configs = state_of(model).configs
    names = [adapter_name] if adapter_name is not None else _fusion_names(model)
    total: torch.Tensor | None = None
    for name in names:
        config = configs.get(name)
        if not isinstance(config, FusionConfig):
            raise ConfigError(f"fusion_regularization: '{name}' is not a fusion adapter")
        for _, fusion in _fusion_layers(model, name):
            v = fusion.value
            if v is None or (adapter_name is None and not v.weight.requires_grad):
                continue
            eye = torch.eye(v.weight.shape[0], dtype=v.weight.dtype, device=v.weight.device)
            term = config.regularization * (eye - v.weight).pow(2).sum()
            total = term if total is None else total + term
    if total is None:
        ref = next(model.parameters(), None)
        return torch.zeros((), device=ref.device if ref is not None else None)
    return total


class FusionRegularizationHook:
    """Training hook that adds one fusion adapter's ``λ‖I − V‖²`` to every training loss.

    ``inject`` attaches it, so :func:`deltatune.train.fit` (and with it ``deltatune train``)
    applies the paper's regulariser without a custom task. It adds nothing while the fusion's
    ``V`` is frozen (not the active, trained adapter) or after the adapter was deleted.
    """

    def __init__(self, adapter_name: str) -> None:
        self.adapter_name = adapter_name

    def extra_loss(self, model: nn.Module) -> torch.Tensor:
        from deltatune.model import state_of

        if isinstance(state_of(model).configs.get(self.adapter_name), FusionConfig) and any(
            f.value is not None and f.value.weight.requires_grad
            for _, f in _fusion_layers(model, self.adapter_name)
        ):
            return fusion_regularization(model, self.adapter_name)
        ref = next(model.parameters(), None)
        return torch.zeros((), device=ref.device if ref is not None else None)


class FusionRegularizedTask:
    """A task whose loss adds :func:`fusion_regularization`, for a hand-written training loop.

    :func:`deltatune.train.fit` needs no wrapper: it applies :class:`FusionRegularizationHook`,
    which ``inject`` attaches (wrapping the task as well would count the term twice).
    """

    def __init__(self, task: Any) -> None:
        self.task = task

    def loss(self, model: nn.Module, batch: Mapping[str, Any]) -> torch.Tensor:
        return self.task.loss(model, batch) + fusion_regularization(model)  # type: ignore[no-any-return]

    def evaluate(self, model: nn.Module, loader: Iterable[Any]) -> dict[str, float]:
        return self.task.evaluate(model, loader)  # type: ignore[no-any-return]

    def __getattr__(self, name: str) -> Any:
        return getattr(self.task, name)


def inject_fusion(model: nn.Module, config: FusionConfig, adapter_name: str) -> None:
    from deltatune.checkpoint import load_adapter
    from deltatune.model import adapter_layers, delete, state_of
    from deltatune.train.trainer import add_training_hook

    state = state_of(model)
    loaded: list[str] = []
    try:
        for name in config.adapter_names:
            if name in state.configs:
                continue
            path = config.adapter_paths.get(name)
            if path is None:
                raise ConfigError(
                    f"fusion: adapter '{name}' is not on this model (adapters: "
                    f"{', '.join(state.configs) or 'none'}); add it first (inject / load_adapter) "
                    f"or give adapter_paths: {{{name}: <saved adapter folder>}}"
                )
            load_adapter(model, path, name)
            loaded.append(name)
        placed = dict.fromkeys(config.adapter_names, 0)
        for layer_name, layer in adapter_layers(model):
            here = [n for n in config.adapter_names if n in layer.adapter_names]
            if not here:
                continue
            if isinstance(layer, ParallelAdapterLayer):
                raise ConfigError(
                    f"fusion: {here} are parallel adapters (at '{layer_name}'); AdapterFusion "
                    "fuses serial bottleneck adapters (houlsby, pfeiffer)"
                )
            if not isinstance(layer, SerialAdapterLayer):
                continue
            here = [n for n in here if n in layer.adapter]
            if not here:
                continue
            positions = [config.adapter_names.index(n) for n in here]
            layer.fusion[adapter_name] = _like(
                layer.base_layer, FusionLayer(layer.dim, here, positions, config)
            )
            for n in here:
                placed[n] += 1
        unplaced = [n for n, count in placed.items() if count == 0]
        if unplaced:
            kinds = ", ".join(f"'{n}' is {state.configs[n].method_name}" for n in unplaced)
            raise ConfigError(
                f"fusion: {kinds}; AdapterFusion fuses serial bottleneck adapters "
                "(houlsby, pfeiffer)"
            )
    except Exception:
        for _, layer in adapter_layers(model):
            fusion = getattr(layer, "fusion", None)
            if isinstance(fusion, nn.ModuleDict) and adapter_name in fusion:
                del fusion[adapter_name]
        for name in reversed(loaded):
            delete(model, name)
        raise
    add_training_hook(model, HOOK_PREFIX + adapter_name, FusionRegularizationHook(adapter_name))


register(
    MethodSpec(
        name="fusion",
        config_cls=FusionConfig,
        inject=inject_fusion,
        capabilities=Capabilities(multi_adapter=True, disable=True),
        default_lr=5e-5,
        summary="AdapterFusion: attention over frozen task adapters' outputs, per layer",
        family="adapter",
    )
)

__all__ = [
    "FusionConfig",
    "FusionLayer",
    "FusionRegularizedTask",
    "fusion_regularization",
    "fusion_weights",
    "inject_fusion",
]

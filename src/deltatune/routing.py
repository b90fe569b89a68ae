r"""Per-example adapter routing: one batch in which each example names its adapter.

::

    with dt.route(model, ["sports", "news", None, "sports"]):
        out = model(**batch)     # row i is computed with adapter names[i]; None = the base model

Row ``i`` of the result equals what the model gives for example ``i`` with ``names[i]`` as the
only active adapter (up to float rounding of different batch sizes in matrix products, ~1e-7),
for every kind of :class:`~deltatune.layers.AdapterLayer` (LoRA, bottleneck adapters, IA3,
fusion, a ``modules_to_save`` head, ...). An entry may also be a composition
(``Stack("lang", "task")``, ``Fuse("a", "b")``); ``None`` or ``"__base__"`` means no adapter.

How it works::

    batch (B examples) ──► AdapterLayer ──► group the B rows by the adapters they name
                                            (only adapters this layer holds count)
                           for each group g:  layer(rows of g)  with g's adapters active
                           ◄── outputs put back in row order (concatenate, then un-permute)

Everything between adapter layers (attention, norms, embeddings) still runs once on the whole
batch; only the wrapped modules run once per group. Inputs are split along dim 0: every tensor
argument (also inside a tuple/list argument) whose first dimension equals the batch size;
other arguments are passed to every group unchanged. Outputs may be tensors, tuples, lists,
dicts (``ModelOutput``) of them, or ``None``.

Notes:

- Train through routing like through any forward: each adapter gets gradients from its own
  examples. Only parameters with ``requires_grad`` train, so make the routed adapters active
  first (``set_active(model, ["a", "b"])``).
- Merged adapters live in the base weights and would apply to every row, so routing refuses a
  model with merged adapters (``unmerge`` first). A disabled model or a layer dropped by
  AdapterDrop runs its base for every row.
- ``generate`` works inside ``route`` (the batch keeps its size from step to step).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Union

import torch
from torch import nn

from deltatune.errors import ConfigError, DeltatuneError
from deltatune.layers import AdapterLayer

if TYPE_CHECKING:
    from deltatune.compose import AdapterSetup

#: The routing entry that means "no adapter" (``None`` means the same).
BASE = "__base__"

#: The adapters one example runs with, in the order they apply (empty: the base model).
Setup = tuple[str, ...]
#: What a :func:`route` entry may be.
RouteEntry = Union[str, None, "AdapterSetup"]


@dataclasses.dataclass
class _Plan:
    """How one layer splits one batch: the groups and how to put the outputs back."""

    groups: list[tuple[Setup, slice | torch.Tensor]]
    sizes: list[int]
    #: Row order of the concatenated group outputs -> batch order; ``None``: already in order.
    inverse: torch.Tensor | None


class Route:
    """The adapter setup of every example, as held by each routed layer.

    ``setups[i]`` is example ``i``'s setup. With ``blocks=True`` (an active ``Parallel``) the
    setups are per *block* instead: a batch of ``n · len(setups)`` rows is ``len(setups)``
    consecutive blocks of ``n`` rows, block ``j`` running ``setups[j]``.
    """

    def __init__(
        self,
        setups: Sequence[Setup],
        *,
        blocks: bool = False,
        layer_names: Mapping[int, str] | None = None,
        what: str = "route",
    ) -> None:
        self.setups = [tuple(s) for s in setups]
        self.blocks = blocks
        self.layer_names = dict(layer_names or {})
        self.what = what
        #: With ``blocks``: the replicated batch size of the model call in flight (set by the
        #: model's Parallel hooks; None outside a call of the model).
        self.batch: int | None = None
        self._plans: dict[tuple[int, frozenset[str], str], _Plan] = {}
        self._nested: dict[int, list[tuple[AdapterLayer, set[str]]]] = {}

    def where(self, layer: nn.Module) -> str:
        name = self.layer_names.get(id(layer))
        return f"module '{name}'" if name else f"a {type(layer).__name__}"

    def per_example(self, batch: int, layer: nn.Module) -> list[Setup]:
        n = len(self.setups)
        if self.blocks:
            if self.batch is None or batch != self.batch or batch % n:
                raise DeltatuneError(
                    f"{self.what}: {self.where(layer)} got a batch of {batch} rows outside a call "
                    f"of the model whose inputs Parallel replicates ({n} branches"
                    + (f", replicated batch {self.batch}" if self.batch is not None else "")
                    + "); call the model itself, not a submodule"
                )
            return [s for s in self.setups for _ in range(batch // n)]
        if batch != n:
            raise DeltatuneError(
                f"{self.what}: {n} adapter names were given but {self.where(layer)} got a batch "
                f"of {batch} examples (dim 0); give exactly one name per example"
            )
        return self.setups

    def nested(self, layer: AdapterLayer) -> list[tuple[AdapterLayer, set[str]]]:
        """The layer and the adapter layers inside it, each with the adapter names it holds."""
        found = self._nested.get(id(layer))
        if found is None:
            found = [
                (m, set(m.adapter_names)) for m in layer.modules() if isinstance(m, AdapterLayer)
            ]
            self._nested[id(layer)] = found
        return found

    def plan(self, batch: int, known: frozenset[str], layer: nn.Module, device: Any) -> _Plan:
        key = (batch, known, str(device))
        cached = self._plans.get(key)
        if cached is not None:
            return cached
        rows: dict[Setup, list[int]] = {}
        for i, setup in enumerate(self.per_example(batch, layer)):
            rows.setdefault(tuple(n for n in setup if n in known), []).append(i)
        groups: list[tuple[Setup, slice | torch.Tensor]] = []
        order: list[int] = []
        for setup, idx in rows.items():
            contiguous = idx == list(range(idx[0], idx[0] + len(idx)))
            index: slice | torch.Tensor = (
                slice(idx[0], idx[0] + len(idx))
                if contiguous
                else torch.tensor(idx, dtype=torch.long, device=device)
            )
            groups.append((setup, index))
            order += idx
        inverse = None
        if order != list(range(batch)):
            inverse = torch.argsort(torch.tensor(order, dtype=torch.long)).to(device)
        plan = _Plan(groups, [len(i) for i in rows.values()], inverse)
        self._plans[key] = plan
        return plan


def _first_batch_size(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[int, Any] | None:
    for value in (*args, *kwargs.values()):
        if isinstance(value, torch.Tensor) and value.dim() > 0:
            return value.shape[0], value.device
    return None


def _take(value: Any, index: slice | torch.Tensor, batch: int) -> Any:
    if isinstance(value, torch.Tensor):
        if value.dim() == 0 or value.shape[0] != batch:
            return value
        if isinstance(index, slice):
            return value[index]
        return value.index_select(0, index)
    if isinstance(value, tuple | list):
        return type(value)(_take(v, index, batch) for v in value)
    return value


def _merge(outs: list[Any], plan: _Plan, route: Route, layer: nn.Module) -> Any:
    first = outs[0]
    if first is None:
        return None
    if isinstance(first, torch.Tensor):
        for out, size in zip(outs, plan.sizes, strict=True):
            if not isinstance(out, torch.Tensor) or out.dim() == 0 or out.shape[0] != size:
                shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
                raise DeltatuneError(
                    f"{route.what}: {route.where(layer)} returned {shape} for a group of {size} "
                    "examples; routing needs outputs whose dim 0 is the batch"
                )
        merged = torch.cat(outs, dim=0)
        return merged if plan.inverse is None else merged.index_select(0, plan.inverse)
    if isinstance(first, tuple | list):
        parts = [_merge([o[i] for o in outs], plan, route, layer) for i in range(len(first))]
        if isinstance(first, tuple) and hasattr(first, "_fields"):  # a namedtuple
            return type(first)(*parts)
        return type(first)(parts)
    if isinstance(first, Mapping):
        merged_map = {k: _merge([o[k] for o in outs], plan, route, layer) for k in first}
        return type(first)(**merged_map) if type(first) is not dict else merged_map
    raise DeltatuneError(
        f"{route.what}: {route.where(layer)} returned a {type(first).__name__}; routing puts "
        "back tensors, tuples, lists and dicts of them"
    )


def routed_call(layer: AdapterLayer, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """Call ``layer`` once per group of examples that share adapters; outputs in batch order."""
    route = layer.routing
    assert route is not None
    found = _first_batch_size(args, kwargs)
    if found is None:
        raise DeltatuneError(
            f"{route.what}: {route.where(layer)} got no tensor argument with a batch dimension"
        )
    batch, device = found
    nested = route.nested(layer)
    for m, _ in nested:
        if m.merged_adapters:
            raise DeltatuneError(
                f"{route.what}: adapters {m.merged_adapters} are merged into the base weights of "
                f"{route.where(m)} and would apply to every example; unmerge them first"
            )
    known = frozenset(n for _, names in nested for n in names)
    plan = route.plan(batch, known, layer, device)
    saved = [(m, m.routing, m.active_adapters) for m, _ in nested]
    outs = []
    try:
        for setup, index in plan.groups:
            for m, names in nested:
                m.routing = None
                m.active_adapters = [n for n in setup if n in names]
            if len(plan.groups) == 1:
                group_args, group_kwargs = args, kwargs
            else:
                group_args = tuple(_take(a, index, batch) for a in args)
                group_kwargs = {k: _take(v, index, batch) for k, v in kwargs.items()}
            outs.append(layer(*group_args, **group_kwargs))
    finally:
        for m, routing, active in saved:
            m.routing = routing
            m.active_adapters = active
    if len(outs) == 1:
        return outs[0]
    return _merge(outs, plan, route, layer)


def _layers(model: nn.Module) -> list[tuple[str, AdapterLayer]]:
    from deltatune.model import adapter_layers

    return list(adapter_layers(model))


@contextmanager
def route(model: nn.Module, adapter_names: Sequence[RouteEntry]) -> Iterator[nn.Module]:
    """``with route(model, names): model(batch)``: example ``i`` runs with ``names[i]``.

    ``names[i]`` is an adapter name, ``None`` / ``"__base__"`` (the base model), or a
    composition (``Stack(...)``, ``Fuse(...)``). The model's active adapters are unchanged
    after the block. Raises :class:`ConfigError` for unknown names and
    :class:`DeltatuneError` when a batch does not have one example per name.
    """
    from deltatune.compose import resolve_setup
    from deltatune.model import state_of

    if isinstance(adapter_names, str) or not isinstance(adapter_names, Sequence):
        raise ConfigError(
            f"route needs a list with one adapter name per example, got {adapter_names!r}; "
            "to use one adapter for the whole batch, call set_active(model, name)"
        )
    if len(adapter_names) == 0:
        raise ConfigError("route needs one adapter name per example; the list is empty")
    if state_of(model).composition is not None and _parallel_active(model):
        raise DeltatuneError(
            "route: a Parallel composition is active (it routes the replicated batch itself); "
            "set_active(model, <adapter>) first"
        )
    setups = [
        resolve_setup(model, entry, where=f"route: example {i}")
        for i, entry in enumerate(adapter_names)
    ]
    layers = _layers(model)
    if not layers:
        raise ConfigError("route: the model has no adapters (inject or load some first)")
    merged = sorted({n for _, layer in layers for n in layer.merged_adapters})
    if merged:
        raise DeltatuneError(
            f"route: adapters {merged} are merged into the base weights and would apply to every "
            "example; call unmerge(model) first"
        )
    r = Route(setups, layer_names={id(layer): name for name, layer in layers})
    previous = [(layer, layer.routing) for _, layer in layers]
    for _, layer in layers:
        layer.routing = r
    try:
        yield model
    finally:
        for layer, routing in previous:
            layer.routing = routing


def _parallel_active(model: nn.Module) -> bool:
    return any(layer.routing is not None and layer.routing.blocks for _, layer in _layers(model))


__all__ = ["BASE", "Route", "RouteEntry", "Setup", "route", "routed_call"]

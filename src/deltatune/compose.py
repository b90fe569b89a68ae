r"""Composition as data: ``Stack``, ``Parallel`` and ``Fuse`` (as in AdapterHub's ``adapters``).

Give a composition to :func:`deltatune.set_active` (or as one entry of
:func:`deltatune.route`) where an adapter name would go::

    dt.set_active(model, dt.Stack("lang", "task"))        # task adapter on top of a language one
    dt.set_active(model, dt.Fuse("sst", "mnli", "qqp"))   # their AdapterFusion (see methods.fusion)
    dt.set_active(model, dt.Stack("lang", dt.Fuse("a", "b")))
    dt.set_active(model, dt.Parallel("sst", "mnli"))      # both tasks from one forward call
    out = model(**batch)                                  # logits: (2 · B, ...)
    per_task = dt.split_parallel(model, out)              # {"sst": ..., "mnli": ...}

Semantics, per adapter layer:

- ``Stack(a, b, ...)``: the adapters apply in this order. For serial bottleneck adapters
  (Houlsby, Pfeiffer) ``b`` reads ``a``'s output: ``h ← B(A(h))``. Additive methods (LoRA, the
  parallel adapter) add their changes and IA3 multiplies its vectors, for which the order does
  not matter. A plain list ``["a", "b"]`` means the same. Items: names, ``Fuse``, ``Stack``.
- ``Fuse(a, b, ...)``: the AdapterFusion layer trained over exactly these adapters (inject it
  first with ``FusionConfig(adapter_names=[a, b, ...])``); ``Fuse(..., name="f")`` picks one by
  adapter name when several fuse the same adapters. Items: adapter names.
- ``Parallel(x, y, ...)``: one call computes every branch. The model's inputs are replicated
  along dim 0 (every tensor argument whose dim 0 is the batch size, ``labels`` included),
  block ``j`` of the replicated batch runs branch ``j`` (per-example routing, see
  :mod:`deltatune.routing`), and the outputs come back concatenated in branch order: rows
  ``j·B … (j+1)·B − 1`` belong to branch ``j``. :func:`split_parallel` cuts an output into
  one piece per branch. Each branch may have its own head (``modules_to_save``, e.g.
  ``task_type: SEQ_CLS``), so several task heads answer at once. A loss the model computes
  from replicated ``labels`` is the mean over all branches. Items: names, ``Stack``,
  ``Fuse``; a ``Parallel`` is only valid at the top. Meant for single forward passes
  (classification, scoring, training on the same batch); for ``generate`` use
  :func:`deltatune.route` with an explicitly repeated batch.

All named adapters of a composition become trainable (``requires_grad``), as with a list.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

from deltatune.errors import ConfigError, DeltatuneError

if TYPE_CHECKING:
    from deltatune.routing import Route

#: Marks the forward pre-hooks deltatune puts on a model (found again by this attribute, so a
#: deep copy of the model keeps working hooks that can still be removed).
HOOK_MARK = "_deltatune_hook"


class AdapterSetup:
    """Base of :class:`Stack`, :class:`Parallel` and :class:`Fuse`: an ordered tuple of items."""

    kind: ClassVar[str] = ""
    allowed: ClassVar[tuple[str, ...]] = ()

    def __init__(self, *adapters: str | AdapterSetup) -> None:
        if len(adapters) == 1 and isinstance(adapters[0], list | tuple):
            adapters = tuple(adapters[0])
        if not adapters:
            raise ConfigError(f"{self.kind}() needs at least one adapter name")
        for item in adapters:
            if isinstance(item, str):
                if not item:
                    raise ConfigError(f"{self.kind}(): an adapter name is empty")
                continue
            if not isinstance(item, AdapterSetup) or item.kind not in self.allowed:
                inner = ", ".join(self.allowed) or "nothing"
                raise ConfigError(
                    f"{self.kind}() takes adapter names{' and ' + inner if self.allowed else ''}, "
                    f"not {item!r}"
                )
        self.adapters: tuple[str | AdapterSetup, ...] = tuple(adapters)

    def __iter__(self) -> Iterator[str | AdapterSetup]:
        return iter(self.adapters)

    def __len__(self) -> int:
        return len(self.adapters)

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and self._key() == other._key()  # type: ignore[attr-defined]

    def __hash__(self) -> int:
        return hash((type(self).__name__, self._key()))

    def _key(self) -> tuple[Any, ...]:
        return self.adapters

    def __repr__(self) -> str:
        return f"{self.kind}({', '.join(map(repr, self.adapters))})"

    @property
    def label(self) -> str:
        """A short name for this setup (keys of :func:`split_parallel`)."""
        return "+".join(a if isinstance(a, str) else a.label for a in self.adapters)


class Stack(AdapterSetup):
    """Adapters applied one after another at every layer (``Stack("lang", "task")``)."""

    kind = "Stack"
    allowed = ("Stack", "Fuse")


class Fuse(AdapterSetup):
    """The AdapterFusion over these adapters (``Fuse("a", "b", name=None)``)."""

    kind = "Fuse"
    allowed = ()

    def __init__(self, *adapters: str | AdapterSetup, name: str | None = None) -> None:
        self.name = name
        super().__init__(*adapters)
        if len(set(self.adapters)) != len(self.adapters):
            raise ConfigError(f"{self!r} names an adapter twice")

    def _key(self) -> tuple[Any, ...]:
        return (*self.adapters, self.name)

    def __repr__(self) -> str:
        extra = f", name={self.name!r}" if self.name is not None else ""
        return f"Fuse({', '.join(map(repr, self.adapters))}{extra})"

    @property
    def label(self) -> str:
        return self.name or "fuse(" + ",".join(str(a) for a in self.adapters) + ")"


class Parallel(AdapterSetup):
    """Several branches computed in one forward call on a replicated batch (see module doc)."""

    kind = "Parallel"
    allowed = ("Stack", "Fuse")

    def __init__(self, *adapters: str | AdapterSetup) -> None:
        super().__init__(*adapters)
        if len(set(self.adapters)) != len(self.adapters):
            raise ConfigError(f"{self!r} has the same branch twice")


# --- resolving ----------------------------------------------------------------------------------


def _known(model: nn.Module) -> list[str]:
    from deltatune.model import adapter_names

    return adapter_names(model)


def _fusion_for(model: nn.Module, fuse: Fuse, where: str) -> str:
    from deltatune.model import state_of

    wanted = [str(a) for a in fuse.adapters]
    fusions = {
        name: list(getattr(cfg, "adapter_names", []))
        for name, cfg in state_of(model).configs.items()
        if cfg.method_name == "fusion"
    }
    if fuse.name is not None:
        if fuse.name not in fusions:
            raise ConfigError(
                f"{where}: {fuse!r}: there is no fusion adapter named '{fuse.name}' "
                f"(fusion adapters: {', '.join(fusions) or 'none'})"
            )
        if set(fusions[fuse.name]) != set(wanted):
            raise ConfigError(
                f"{where}: {fuse!r}: fusion '{fuse.name}' fuses {fusions[fuse.name]}, not {wanted}"
            )
        return fuse.name
    matches = [n for n, fused in fusions.items() if set(fused) == set(wanted)]
    if not matches:
        raise ConfigError(
            f"{where}: {fuse!r}: no fusion of {wanted} on this model; add one with "
            f"inject(model, FusionConfig(adapter_names={wanted}), '<name>') (fusion adapters: "
            f"{', '.join(f'{n} {f}' for n, f in fusions.items()) or 'none'})"
        )
    if len(matches) > 1:
        raise ConfigError(
            f"{where}: {fuse!r}: several fusions fuse these adapters ({', '.join(matches)}); "
            "pick one with Fuse(..., name=...)"
        )
    return matches[0]


def resolve_setup(model: nn.Module, entry: Any, *, where: str = "set_active") -> tuple[str, ...]:
    """The adapter names one setup runs, in order: a name, ``None``/``"__base__"``, a
    ``Stack`` or a ``Fuse`` (a ``Parallel`` has several setups: see :func:`resolve_active`)."""
    from deltatune.routing import BASE

    if entry is None or entry == BASE:
        return ()
    if isinstance(entry, str):
        known = _known(model)
        if entry not in known:
            raise ConfigError(
                f"{where}: no adapter named '{entry}' on this model (adapters: "
                f"{', '.join(known) or 'none'}; None or '{BASE}' for the base model)"
            )
        return (entry,)
    if isinstance(entry, Fuse):
        for a in entry.adapters:
            resolve_setup(model, a, where=where)
        return (_fusion_for(model, entry, where),)
    if isinstance(entry, Stack):
        names: list[str] = []
        for item in entry.adapters:
            names += resolve_setup(model, item, where=where)
        return tuple(names)
    if isinstance(entry, Parallel):
        raise ConfigError(f"{where}: {entry!r} cannot be nested here; Parallel goes at the top")
    raise ConfigError(
        f"{where}: expected an adapter name, None, Stack(...) or Fuse(...), got {entry!r}"
    )


def resolve_active(model: nn.Module, value: Any) -> tuple[list[str], list[tuple[str, ...]] | None]:
    """``set_active``'s argument as (the adapter names to activate, Parallel branches or None)."""
    if isinstance(value, Parallel):
        branches = [resolve_setup(model, b, where=repr(value)) for b in value.adapters]
        names = list(dict.fromkeys(n for b in branches for n in b))
        return names, branches
    if isinstance(value, AdapterSetup):
        return list(dict.fromkeys(resolve_setup(model, value, where=repr(value)))), None
    if isinstance(value, str):
        return [value], None
    if isinstance(value, Sequence) and all(isinstance(v, str) for v in value):
        return list(value), None
    raise ConfigError(
        f"set_active takes an adapter name, a list of names, or Stack/Parallel/Fuse, not {value!r}"
    )


# --- Parallel: replicate the inputs, route the blocks -------------------------------------------


class _ReplicateBatch:
    """Forward pre-hook: repeat every batch-sized tensor argument ``n`` times along dim 0, and
    tell the layers' route the replicated batch size (so that they refuse any other batch)."""

    def __init__(self, route: Route) -> None:
        self.route = route
        self.n = len(route.setups)
        setattr(self, HOOK_MARK, "parallel")

    def __call__(
        self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[tuple[Any, ...], dict[str, Any]]:
        batch = None
        for value in (*args, *kwargs.values()):
            if isinstance(value, torch.Tensor) and value.dim() > 0:
                batch = value.shape[0]
                break
        if batch is None:
            return args, kwargs
        self.route.batch = batch * self.n

        def rep(value: Any) -> Any:
            if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == batch:
                return value.repeat(self.n, *([1] * (value.dim() - 1)))
            return value

        return tuple(rep(a) for a in args), {k: rep(v) for k, v in kwargs.items()}


class _EndParallelCall:
    """Forward hook (also on error): the model call is over, no replicated batch in flight."""

    def __init__(self, route: Route) -> None:
        self.route = route
        setattr(self, HOOK_MARK, "parallel")

    def __call__(self, module: nn.Module, args: Any, output: Any) -> None:
        self.route.batch = None


def remove_hooks(model: nn.Module, kind: str | None = None) -> None:
    """Remove deltatune's forward (pre-)hooks (of one ``kind``, or all) from ``model``."""
    for hooks, extras in (
        (model._forward_pre_hooks, (model._forward_pre_hooks_with_kwargs,)),
        (
            model._forward_hooks,
            (model._forward_hooks_with_kwargs, model._forward_hooks_always_called),
        ),
    ):
        for hook_id, hook in list(hooks.items()):
            mark = getattr(hook, HOOK_MARK, None)
            if mark is not None and (kind is None or mark == kind):
                del hooks[hook_id]
                for extra in extras:
                    extra.pop(hook_id, None)


def set_parallel(model: nn.Module, branches: list[tuple[str, ...]] | None) -> None:
    """Install (``branches``) or remove (``None``) the Parallel replication and block routing."""
    from deltatune.model import adapter_layers
    from deltatune.routing import Route

    remove_hooks(model, "parallel")
    layers = list(adapter_layers(model))
    for _, layer in layers:
        if layer.routing is not None and layer.routing.blocks:
            layer.routing = None
    if branches is None:
        return
    route = Route(
        branches,
        blocks=True,
        layer_names={id(layer): name for name, layer in layers},
        what="Parallel",
    )
    for _, layer in layers:
        layer.routing = route
    model.register_forward_pre_hook(_ReplicateBatch(route), with_kwargs=True)
    model.register_forward_hook(_EndParallelCall(route), always_call=True)


def split_parallel(model: nn.Module | Parallel | int, output: Any) -> dict[str, Any]:
    """Cut the output of a ``Parallel`` forward into one piece per branch.

    ``model`` is the model (its active ``Parallel`` gives the branches), a ``Parallel`` or a
    branch count. Returns ``{branch label: output piece}`` in branch order (the label of an
    adapter name is the name; of ``Stack("a", "b")`` it is ``"a+b"``; of a ``Fuse`` its
    fusion's ``name`` or ``"fuse(a,b)"``; with a bare count, ``"0"``, ``"1"``, ...). Every
    tensor whose dim 0 is a multiple of the branch count is cut in equal blocks; scalars
    (a loss) and other values go to every piece whole.
    """
    if isinstance(model, int):
        labels = [str(i) for i in range(model)]
    else:
        setup = model if isinstance(model, Parallel) else _state_composition(model)
        if not isinstance(setup, Parallel):
            raise DeltatuneError(
                "split_parallel: the model has no active Parallel composition; "
                "set_active(model, Parallel(...)) first (or pass the branch count)"
            )
        labels = [a if isinstance(a, str) else a.label for a in setup.adapters]
    n = len(labels)

    def cut(value: Any, j: int) -> Any:
        if isinstance(value, torch.Tensor):
            if value.dim() == 0 or value.shape[0] % n:
                return value
            size = value.shape[0] // n
            return value[j * size : (j + 1) * size]
        if isinstance(value, tuple | list):
            parts = [cut(v, j) for v in value]
            if isinstance(value, tuple) and hasattr(value, "_fields"):
                return type(value)(*parts)
            return type(value)(parts)
        if isinstance(value, dict):
            cut_map = {k: cut(v, j) for k, v in value.items()}
            return type(value)(**cut_map) if type(value) is not dict else cut_map
        return value

    return {label: cut(output, j) for j, label in enumerate(labels)}


def _state_composition(model: nn.Module) -> Any:
    from deltatune.model import state_of

    return state_of(model).composition


__all__ = [
    "AdapterSetup",
    "Fuse",
    "Parallel",
    "Stack",
    "remove_hooks",
    "resolve_active",
    "resolve_setup",
    "set_parallel",
    "split_parallel",
]

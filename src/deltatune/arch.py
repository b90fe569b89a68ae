r"""Architecture map: where a transformer keeps its blocks, attention and feed-forward parts.

Methods that act on a *place* in a transformer block rather than on modules picked by name
(bottleneck adapters, and later prefix tuning, LLaMA-Adapter, MAM, UniPELT) look the places up
here, by ``model.config.model_type``. ``layers`` is the blocks container (a ``ModuleList``),
found as the module whose name equals it or ends with ``"." + layers`` (so it works on
``BertModel`` and on ``BertForSequenceClassification`` alike); every other path is relative to
one block.

=============  ========================  ================  =================  =====================
field          meaning                   bert / roberta    gpt2               llama / mistral / qwen2
=============  ========================  ================  =================  =====================
layers         blocks container          encoder.layer     h                  layers
attention      attention module          attention.self    attn               self_attn
q / k / v      q, k, v projections       attention.self.   (fused)            self_attn.q_proj,
                                         query/key/value                      k_proj, v_proj
qkv            fused q-k-v projection    (none)            attn.c_attn        (none)
attn_out       attention output proj.    attention.        attn.c_proj        self_attn.o_proj
                                         output.dense
ffn            feed-forward block        output (*)        mlp                mlp
ffn_out        feed-forward output proj. output.dense      mlp.c_proj         mlp.down_proj
ffn_residual   see (*)                   true              false              false
=============  ========================  ================  =================  =====================

``distilbert`` has an entry too (``transformer.layer``, ``attention.q_lin`` ..., ``ffn``,
``ffn.lin2``).

(*) BERT-like encoders split the feed-forward network in two modules: ``intermediate``
(``act(W1 x)``) and ``output``, which is called as ``output(hidden, x)`` and returns
``LayerNorm(W2 hidden + x)``: it also adds the residual ``x`` (the FFN input). For such an
``ffn``, set ``ffn_residual: true``; a method that adds something to the FFN output (the
parallel adapter) then adds it to the residual argument, which is the same sum before the
LayerNorm.

A model without an entry (or with unusual module names) takes the names from the method
config's ``arch`` mapping, e.g. for a hand-written model::

    arch: {layers: blocks, attn_out: attn.proj, ffn: mlp, ffn_out: mlp.fc2}

Fields given there override the model type's entry one by one; a field a method needs that
neither gives is a :class:`~deltatune.errors.ConfigError` naming exactly the fields to add.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from torch import nn

from deltatune.config import BaseConfig
from deltatune.errors import ConfigError
from deltatune.layers import AdapterLayer

#: What each field names, for error messages and ``deltatune methods``.
FIELD_HELP: dict[str, str] = {
    "layers": "the ModuleList of transformer blocks, e.g. 'encoder.layer' or 'model.layers'",
    "attention": "the attention module inside a block, e.g. 'attention.self' or 'self_attn'",
    "q": "the query projection inside a block, e.g. 'self_attn.q_proj'",
    "k": "the key projection inside a block, e.g. 'self_attn.k_proj'",
    "v": "the value projection inside a block, e.g. 'self_attn.v_proj'",
    "qkv": "a fused query-key-value projection inside a block, e.g. 'attn.c_attn'",
    "attn_out": "the attention output projection inside a block, e.g. 'self_attn.o_proj'",
    "ffn": "the feed-forward module inside a block, called as ffn(x), e.g. 'mlp'",
    "ffn_out": "the feed-forward output projection inside a block, e.g. 'mlp.down_proj'",
    "ffn_residual": "true if ffn is called as ffn(hidden, x) and adds the residual x itself (BERT)",
}


@dataclasses.dataclass
class ArchConfig(BaseConfig):
    """Module names of one architecture (see the module docstring's table).

    Every field defaults to ``None`` (not given): ``layers``, ``attention``, ``q``, ``k``,
    ``v``, ``qkv``, ``attn_out``, ``ffn``, ``ffn_out`` (module paths, all but ``layers``
    relative to a block) and ``ffn_residual`` (bool; ``None`` counts as false).
    """

    layers: str | None = None
    attention: str | None = None
    q: str | None = None
    k: str | None = None
    v: str | None = None
    qkv: str | None = None
    attn_out: str | None = None
    ffn: str | None = None
    ffn_out: str | None = None
    ffn_residual: bool | None = None

    def validate(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, str) and (
                not value or value.startswith(".") or value.endswith(".") or ".." in value
            ):
                raise ConfigError(
                    f"arch.{f.name}={value!r} is not a module path (dotted names, e.g. 'mlp.fc2')"
                )

    def merged_over(self, base: ArchConfig | None) -> ArchConfig:
        """This config's given fields on top of ``base``'s."""
        if base is None:
            return self
        changes = {k: v for k, v in self.to_dict().items() if v is not None}
        return dataclasses.replace(base, **changes)


_BERT = ArchConfig(
    layers="encoder.layer",
    attention="attention.self",
    q="attention.self.query",
    k="attention.self.key",
    v="attention.self.value",
    attn_out="attention.output.dense",
    ffn="output",
    ffn_out="output.dense",
    ffn_residual=True,
)
_LLAMA = ArchConfig(
    layers="layers",
    attention="self_attn",
    q="self_attn.q_proj",
    k="self_attn.k_proj",
    v="self_attn.v_proj",
    attn_out="self_attn.o_proj",
    ffn="mlp",
    ffn_out="mlp.down_proj",
    ffn_residual=False,
)

#: ``model.config.model_type`` -> module names.
ARCHITECTURES: dict[str, ArchConfig] = {
    "bert": _BERT,
    "roberta": _BERT,
    "distilbert": ArchConfig(
        layers="transformer.layer",
        attention="attention",
        q="attention.q_lin",
        k="attention.k_lin",
        v="attention.v_lin",
        attn_out="attention.out_lin",
        ffn="ffn",
        ffn_out="ffn.lin2",
        ffn_residual=False,
    ),
    "gpt2": ArchConfig(
        layers="h",
        attention="attn",
        qkv="attn.c_attn",
        attn_out="attn.c_proj",
        ffn="mlp",
        ffn_out="mlp.c_proj",
        ffn_residual=False,
    ),
    "llama": _LLAMA,
    "mistral": _LLAMA,
    "qwen2": _LLAMA,
}


def model_type_of(model: nn.Module) -> str | None:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    return model_type if isinstance(model_type, str) else None


def _arch_example(needed: Sequence[str]) -> str:
    return "{" + ", ".join(f"{f}: ..." for f in needed) + "}"


def _module_lists(model: nn.Module) -> list[str]:
    return [
        f"'{n}' ({len(m)} x {type(m[0]).__name__})"
        for n, m in model.named_modules()
        if isinstance(m, nn.ModuleList) and len(m) > 0
    ]


def resolve_arch(
    model: nn.Module, user: ArchConfig | None, needed: Sequence[str], method: str
) -> ArchConfig:
    """The architecture entry for ``model`` with the user's given ``arch`` fields on top.

    Raises a :class:`ConfigError` naming every field in ``needed`` that neither gives.
    """
    model_type = model_type_of(model)
    known = ARCHITECTURES.get(model_type) if model_type is not None else None
    given = user is not None and any(v is not None for v in user.to_dict().values())
    arch = user.merged_over(known) if user is not None and given else known
    missing = [f for f in needed if arch is None or getattr(arch, f) is None]
    if not missing:
        assert arch is not None
        return arch
    what = "; ".join(f"{f} = {FIELD_HELP[f]}" for f in missing)
    lists = _module_lists(model)
    hint = f" (ModuleLists in this model: {', '.join(lists[:5])})" if "layers" in missing else ""
    if known is None:
        where = (
            f"{type(model).__name__} (model type {model_type!r}) has no entry in deltatune's "
            f"architecture map (known: {', '.join(ARCHITECTURES)})"
        )
    else:
        where = f"the architecture entry for model type {model_type!r} has no {', '.join(missing)}"
    raise ConfigError(
        f"{method}: {where}; give the module names in the method config as "
        f"arch: {_arch_example(missing)} with {what}{hint}"
    )


def transformer_blocks(model: nn.Module, arch: ArchConfig) -> list[tuple[str, nn.Module]]:
    """``(name, block)`` for each block of the ``arch.layers`` container, in order."""
    path = arch.layers
    if not path:
        raise ConfigError(f"arch.layers is not set ({FIELD_HELP['layers']})")
    found = [
        (n, m)
        for n, m in model.named_modules()
        if (n == path or n.endswith("." + path)) and not _inside_adapter(n)
    ]
    if len(found) != 1 or not isinstance(found[0][1], nn.ModuleList | nn.Sequential):
        lists = _module_lists(model)
        problem = (
            "matches no module"
            if not found
            else f"matches {len(found)} modules ({', '.join(n for n, _ in found[:4])}); give a longer path"
            if len(found) > 1
            else f"is a {type(found[0][1]).__name__}, not a ModuleList"
        )
        raise ConfigError(
            f"arch.layers={path!r} {problem} in {type(model).__name__}; it must name the "
            f"ModuleList of transformer blocks (ModuleLists here: {', '.join(lists[:5]) or 'none'})"
        )
    name, container = found[0]
    return [(f"{name}.{i}", block) for i, block in enumerate(container)]


def _inside_adapter(name: str) -> bool:
    # An adapter's own modules (e.g. a ModulesToSave copy of a block) are not model parts.
    return any(part in {"adapter", "modules_to_save"} for part in name.split("."))


def select_blocks(
    blocks: list[tuple[str, nn.Module]], layers_to_transform: int | Sequence[int] | None
) -> list[tuple[str, nn.Module]]:
    """The blocks at these indices (all of them for ``None``); an index out of range is an error."""
    if layers_to_transform is None:
        return blocks
    wanted = [layers_to_transform] if isinstance(layers_to_transform, int) else layers_to_transform
    bad = [i for i in wanted if not 0 <= i < len(blocks)]
    if bad or not wanted:
        raise ConfigError(
            f"layers_to_transform={list(wanted)!r}: the model has {len(blocks)} blocks, "
            f"give indices from 0 to {len(blocks) - 1}"
        )
    return [blocks[i] for i in sorted(set(wanted))]


def block_submodule(
    block_name: str, block: nn.Module, path: str | None, field: str
) -> tuple[str, nn.Module]:
    """``(full name, module)`` of ``arch.<field>`` inside one block.

    Steps through adapter wrappers on the way (``mlp`` wrapped by a parallel adapter still has
    ``mlp.down_proj``, found at ``mlp.base_layer.down_proj``).
    """
    if not path:
        raise ConfigError(f"arch.{field} is not set ({FIELD_HELP[field]})")
    module = block
    parts_out: list[str] = []
    for part in path.split("."):
        while isinstance(module, AdapterLayer) and part not in module._modules:
            module = module.base_layer
            parts_out.append("base_layer")
        child = module._modules.get(part)
        if child is None:
            children = ", ".join(n for n, _ in block.named_children())
            raise ConfigError(
                f"arch.{field}={path!r} names no submodule of block '{block_name}' "
                f"({type(block).__name__}); its children are: {children}"
            )
        module = child
        parts_out.append(part)
    return f"{block_name}.{'.'.join(parts_out)}", module


__all__ = [
    "ARCHITECTURES",
    "FIELD_HELP",
    "ArchConfig",
    "block_submodule",
    "model_type_of",
    "resolve_arch",
    "select_blocks",
    "transformer_blocks",
]

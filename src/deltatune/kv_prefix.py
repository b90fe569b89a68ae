r"""Key/value prefixes: the machinery shared by prefix tuning and P-Tuning v2.

Every attention layer ``l`` gets ``n`` trained key and value vectors per key/value head that
every real token attends to, in front of the real keys and values (Li & Liang, 2021)::

    head_h(x) = softmax( q_h [P_k^(l,h) ; K_h]^T / sqrt(d) ) [P_v^(l,h) ; V_h]

            prefix (trained)          real tokens (frozen model)
    keys    P_k^(l): n x d    ──┐     K = x W_k
                                ├──►  [P_k ; K]  ──► softmax(q [P_k ; K]^T / sqrt d)
    values  P_v^(l): n x d    ──┘     V = x W_v      ──► · [P_v ; V] ──► attention output

All layers' prefixes live in one tensor ``P`` of shape ``(n, num_layers * 2 * token_dim)``
(``token_dim = key/value heads * head_dim``), Hugging Face PEFT's ``prompt_embeddings`` layout:
row ``t`` is virtual token ``t``; its columns are layer 0's key (heads x head_dim), layer 0's
value, layer 1's key, ... Prefix tuning may produce ``P`` through a reparameterising MLP during
training, ``P = W_2 tanh(W_1 E + b_1) + b_2`` with ``E`` an ``(n, token_dim)`` embedding; saving
stores only ``P`` (the MLP folded away), as PEFT does.

How the prefix reaches the attention: like PEFT, as the first ``n`` entries of the model's
key/value cache. A forward pre-hook on the backbone (``BertModel``, ``GPT2Model``,
``LlamaModel``: the module that holds the blocks) puts ``P`` into a fresh
``transformers.DynamicCache`` (each layer's keys and values, broadcast over the batch) and
prepends ``n`` ones to the 2-D ``attention_mask``. The transformers attention code then
concatenates the prefix with the real keys and values and builds its causal / padding masks
over ``n + length`` positions, so encoders, decoders, every attention implementation and
generation with the key/value cache work unchanged.

Positions (the same as PEFT): the prefix occupies positions ``0 .. n-1`` and real token ``i``
sits at position ``n + i`` (absolute position embeddings for BERT / GPT-2, the RoPE angle for
LLaMA; the prefix keys themselves carry no rotation). Given ``position_ids`` are shifted by
``n``. Without them, positions are counted from each row's first real token, so a left-padded
row computes exactly what the same example computes alone (plain Hugging Face forward counts
the pads). Right-padded and unpadded inputs get ``n + arange(length)``, PEFT's positions.

During generation the cache is filled with the prefix on the first call (an empty or absent
cache) and then grows with the real tokens; a non-empty cache handed to the model is taken to
hold the prefix already (it came from an earlier call of the same adapted model).

The parameters live in one :class:`PrefixLayer` that wraps the first block's attention module
(its forward is the wrapped module's, unchanged); its ``prompt_embeddings`` are saved under the
top-level key ``prompt_embeddings`` (PEFT's). Several active adapters concatenate their prefixes
in the order of the active list.
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any

import torch
from torch import nn

from deltatune.arch import (
    ArchConfig,
    block_submodule,
    resolve_arch,
    transformer_blocks,
)
from deltatune.compose import HOOK_MARK
from deltatune.errors import ConfigError, DeltatuneError
from deltatune.layers import AdapterLayer
from deltatune.targeting import set_submodule
from deltatune.virtual_tokens import prepare_modules_to_save

HOOK_KIND = "kv_prefix"


@dataclasses.dataclass(frozen=True)
class KVShape:
    """Key/value sizes of a model: layers, key/value heads, head size."""

    num_layers: int
    num_heads: int
    head_dim: int

    @property
    def token_dim(self) -> int:
        """One layer's key (or value) width: key/value heads x head size."""
        return self.num_heads * self.head_dim

    @property
    def width(self) -> int:
        """Columns of the prefix tensor ``P``: ``num_layers * 2 * token_dim``."""
        return self.num_layers * 2 * self.token_dim


def _config_int(cfg: Any, *names: str) -> int | None:
    for name in names:
        value = getattr(cfg, name, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def kv_shape(
    model: nn.Module,
    num_blocks: int,
    *,
    method: str,
    num_layers: int | None = None,
    token_dim: int | None = None,
    num_attention_heads: int | None = None,
) -> KVShape:
    """The prefix sizes for ``model``, from its config (PEFT's rules, GQA included).

    For grouped-query attention the prefix has the *key/value* heads (PEFT: ``token_dim =
    head_dim * num_key_value_heads``). Values the method config gives must agree with the
    model's; a model without a transformers config needs all three.
    """
    cfg = getattr(model, "config", None)
    heads = _config_int(cfg, "num_attention_heads", "n_head", "num_heads")
    hidden = _config_int(cfg, "hidden_size", "n_embd", "d_model")
    if heads is None or hidden is None:
        if num_attention_heads is None or token_dim is None:
            raise ConfigError(
                f"{method}: {type(model).__name__} has no transformers config with "
                "num_attention_heads and hidden_size; give token_dim and num_attention_heads "
                "(key/value heads) in the method config"
            )
        shape = KVShape(num_blocks, num_attention_heads, token_dim // num_attention_heads)
    else:
        kv_heads = _config_int(cfg, "num_key_value_heads") or heads
        head_dim = _config_int(cfg, "head_dim") or hidden // heads
        shape = KVShape(num_blocks, kv_heads, head_dim)
    checks = (
        ("num_layers", num_layers, shape.num_layers, "transformer blocks"),
        ("num_attention_heads", num_attention_heads, shape.num_heads, "key/value heads"),
        ("token_dim", token_dim, shape.token_dim, "key/value heads x head_dim"),
    )
    for field, given, actual, what in checks:
        if given is not None and given != actual:
            raise ConfigError(
                f"{method}: {field}={given} does not fit this {type(model).__name__}, which has "
                f"{actual} ({what}); leave {field} null to take it from the model"
            )
    if shape.token_dim % shape.num_heads:
        raise ConfigError(f"{method}: token_dim={shape.token_dim} is not a multiple of the heads")
    return shape


class PrefixMLP(nn.Module):
    """Prefix tuning's reparameterisation: ``P = W_2 tanh(W_1 E + b_1) + b_2``.

    ``E`` is an ``(n, token_dim)`` embedding; the MLP maps each row to the ``num_layers * 2 *
    token_dim`` prefix columns. Names follow PEFT's ``PrefixEncoder`` (``embedding``,
    ``transform.0``, ``transform.2``).
    """

    def __init__(self, n: int, shape: KVShape, hidden: int, zero: bool) -> None:
        super().__init__()
        self.embedding = nn.Embedding(n, shape.token_dim)
        last = nn.Linear(hidden, shape.width)
        self.transform = nn.Sequential(nn.Linear(shape.token_dim, hidden), nn.Tanh(), last)
        if zero:
            nn.init.zeros_(last.weight)
            nn.init.zeros_(last.bias)

    def forward(self) -> torch.Tensor:
        out: torch.Tensor = self.transform(self.embedding.weight)
        return out


class PrefixLayer(AdapterLayer):
    """Holds every adapter's prefix ``P``; wraps the first block's attention, unchanged.

    An adapter is either *direct* (``prompt_embeddings[name]``, an ``(n, width)`` parameter)
    or *reparameterised* (``prefix_encoder[name]``, a :class:`PrefixMLP`); :meth:`fold` turns
    the second into the first.
    """

    adapter_attributes = ("prompt_embeddings", "prefix_encoder")
    absolute_keys = True

    def __init__(self, base_layer: nn.Module, shape: KVShape) -> None:
        super().__init__(base_layer)
        self.shape = shape
        self.prompt_embeddings = nn.ParameterDict()
        self.prefix_encoder = nn.ModuleDict()

    def add_adapter(
        self, adapter_name: str, config: Any = None, *, n: int = 1, mlp_hidden: int | None = None
    ) -> None:
        ref = next(iter(self.base_layer.parameters()), torch.empty(0))
        # Prefixes train in float32 even on a half-precision base (cast to the model's dtype in
        # the forward), as PEFT does.
        dtype = torch.float32
        zero = getattr(config, "init_weights", None) == "zero"
        if mlp_hidden is None:
            value = torch.zeros(n, self.shape.width) if zero else torch.randn(n, self.shape.width)
            self.prompt_embeddings[adapter_name] = nn.Parameter(
                value.to(device=ref.device, dtype=dtype)
            )
        else:
            mlp = PrefixMLP(n, self.shape, mlp_hidden, zero)
            self.prefix_encoder[adapter_name] = mlp.to(device=ref.device, dtype=dtype)

    def num_virtual_tokens(self, adapter_name: str) -> int:
        if adapter_name in self.prompt_embeddings:
            return int(self.prompt_embeddings[adapter_name].shape[0])
        mlp: PrefixMLP = self.prefix_encoder[adapter_name]  # type: ignore[assignment]
        return int(mlp.embedding.num_embeddings)

    def prefix(self, adapter_name: str) -> torch.Tensor:
        """``P`` of one adapter, ``(n, num_layers * 2 * token_dim)``."""
        if adapter_name in self.prompt_embeddings:
            return self.prompt_embeddings[adapter_name]
        out: torch.Tensor = self.prefix_encoder[adapter_name]()
        return out

    def active_prefix(self) -> torch.Tensor | None:
        """The active adapters' prefixes, concatenated along the tokens; None for none."""
        names = self.adapters_to_run()
        if not names:
            return None
        parts = [self.prefix(a) for a in names]
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)

    def adapter_tensors(self, adapter_name: str) -> dict[str, torch.Tensor]:
        if adapter_name in self.prompt_embeddings:
            return {"prompt_embeddings": self.prompt_embeddings[adapter_name]}
        # Reparameterised: what is saved is the folded prefix (PEFT saves the same).
        with torch.no_grad():
            return {"prompt_embeddings": self.prefix(adapter_name).detach().clone()}

    def fold(self, adapter_name: str) -> bool:
        """Replace the adapter's MLP by its output ``P`` (a direct parameter). Returns whether
        there was an MLP to fold; outputs stay equal (the same tensor is used)."""
        if adapter_name not in self.prefix_encoder:
            return False
        mlp = self.prefix_encoder[adapter_name]
        trainable = any(p.requires_grad for p in mlp.parameters())
        with torch.no_grad():
            value = self.prefix(adapter_name).detach().clone()
        del self.prefix_encoder[adapter_name]
        self.prompt_embeddings[adapter_name] = nn.Parameter(value, requires_grad=trainable)
        return True

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.base_layer(*args, **kwargs)


# --- injection ------------------------------------------------------------------------------


def backbone_of(model: nn.Module, arch: ArchConfig) -> tuple[str, nn.Module]:
    """``(name, module)`` of the module that holds ``arch.layers`` (e.g. ``bert``, ``model``)."""
    blocks = transformer_blocks(model, arch)
    container = blocks[0][0].rsplit(".", 1)[0]
    assert arch.layers is not None
    name = container[: -len(arch.layers)].rstrip(".")
    return name, model.get_submodule(name) if name else model


def find_prefix_layer(root: nn.Module) -> PrefixLayer | None:
    for module in root.modules():
        if isinstance(module, PrefixLayer):
            return module
    return None


def add_prefix_adapter(
    model: nn.Module,
    config: Any,
    adapter_name: str,
    *,
    method: str,
    mlp_hidden: int | None,
) -> None:
    """Add one prefix adapter (``config.num_virtual_tokens`` tokens) to ``model``."""
    arch = resolve_arch(model, config.arch, ("layers", "attention"), method)
    blocks = transformer_blocks(model, arch)
    shape = kv_shape(
        model,
        len(blocks),
        method=method,
        num_layers=config.num_layers,
        token_dim=config.token_dim,
        num_attention_heads=config.num_attention_heads,
    )
    _, backbone = backbone_of(model, arch)
    _check_backbone(backbone, method)
    # A new head (task_type SEQ_CLS, modules_to_save) is saved under PEFT's prompt-learning key.
    prepare_modules_to_save(model, config, adapter_name)
    layer = find_prefix_layer(model)
    if layer is None:
        name, attention = block_submodule(blocks[0][0], blocks[0][1], arch.attention, "attention")
        layer = PrefixLayer(attention, shape)
        set_submodule(model, name, layer)
    elif layer.shape != shape:
        raise ConfigError(
            f"{method}: the model's other prefix adapters have {layer.shape}, not {shape}"
        )
    layer.add_adapter(adapter_name, config, n=config.num_virtual_tokens, mlp_hidden=mlp_hidden)
    layer.set_active([adapter_name])
    install_hook(backbone)


_BACKBONE_INPUTS = ("attention_mask", "position_ids", "past_key_values")


def _check_backbone(backbone: nn.Module, method: str) -> None:
    params = inspect.signature(backbone.forward).parameters
    missing = [p for p in _BACKBONE_INPUTS if p not in params]
    if missing:
        raise ConfigError(
            f"{method}: {type(backbone).__name__}.forward takes no {', '.join(missing)}; key/value "
            "prefixes need a transformers backbone that accepts them (BERT-, GPT-2-, LLaMA-like)"
        )


def install_hook(backbone: nn.Module) -> None:
    """Register the prefix pre-hook on ``backbone`` once (it is a no-op without a PrefixLayer)."""
    for hook in backbone._forward_pre_hooks.values():
        if getattr(hook, HOOK_MARK, None) == HOOK_KIND:
            return
    backbone.register_forward_pre_hook(PrefixHook(backbone), with_kwargs=True)
    backbone.register_forward_hook(_drop_unasked_cache, with_kwargs=True)


def _drop_unasked_cache(
    module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any
) -> Any:
    """With ``use_cache=False`` return no cache: some backbones (LLaMA) hand back the one the
    prefix hook supplied, and generation without a cache would then feed it back next step."""
    if kwargs.get("use_cache") is False and getattr(output, "past_key_values", None) is not None:
        output.past_key_values = None
    return output


setattr(_drop_unasked_cache, HOOK_MARK, HOOK_KIND)


def fold(model: nn.Module, adapter_name: str | None = None) -> list[str]:
    """Fold reparameterised prefixes into plain ones (all adapters, or one). Returns the folded.

    Afterwards the adapter trains its prefix ``P`` directly and its config says
    ``inference_mode: true`` (what :func:`~deltatune.save_adapter` writes anyway).
    """
    from deltatune.model import state_of

    layer = find_prefix_layer(model)
    if layer is None:
        return []
    names = [adapter_name] if adapter_name is not None else list(layer.prefix_encoder)
    done = [n for n in names if layer.fold(n)]
    state = state_of(model)
    for n in done:
        cfg = state.configs.get(n)
        if cfg is not None and hasattr(cfg, "inference_mode"):
            state.configs[n] = cfg.replace(**{"inference_mode": True})
    return done


# --- the forward pre-hook -------------------------------------------------------------------


def prefix_cache(prefix: torch.Tensor, shape: KVShape, batch: int, cache: Any, config: Any) -> Any:
    """A ``DynamicCache`` (or ``cache``, empty) holding ``prefix`` as every layer's first keys."""
    from transformers import DynamicCache

    n = prefix.shape[0]
    # (n, L, 2, H, d) -> (L, 2, 1, H, n, d): per layer, keys and values as (batch, H, n, d)
    kv = prefix.view(n, shape.num_layers, 2, shape.num_heads, shape.head_dim)
    kv = kv.permute(1, 2, 3, 0, 4).unsqueeze(2)
    if cache is None:
        cache = DynamicCache(config=config)
    for i in range(shape.num_layers):
        size = (batch, shape.num_heads, n, shape.head_dim)
        cache.update(kv[i, 0].expand(size), kv[i, 1].expand(size), i)
    return cache


def prefix_positions(
    attention_mask: torch.Tensor | None, q_len: int, past: int, n: int, device: torch.device
) -> torch.Tensor:
    """Position ids of the real tokens: ``n`` + the index counted from each row's first real
    token (``(batch or 1, q_len)``); pads before it get position ``n``."""
    if attention_mask is None:
        return (torch.arange(past, past + q_len, device=device) + n).unsqueeze(0)
    start = attention_mask.shape[1] - q_len
    idx = torch.arange(start, start + q_len, device=device)
    lead = (attention_mask.cumsum(-1) == 0).sum(-1, keepdim=True)  # leading pads per row
    return (idx.unsqueeze(0) - lead).clamp(min=0) + n


class PrefixHook:
    """Forward pre-hook on the backbone: prefix cache, extended mask, shifted positions."""

    def __init__(self, backbone: nn.Module) -> None:
        self.names = [
            name
            for name, p in inspect.signature(backbone.forward).parameters.items()
            if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
        ]
        setattr(self, HOOK_MARK, HOOK_KIND)

    def __call__(
        self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[tuple[Any, ...], dict[str, Any]] | None:
        layer, prefix, positional = _active_parts(module)
        if prefix is None and not positional:
            return None
        if len(args) > len(self.names):
            raise DeltatuneError(
                f"{type(module).__name__} was called with {len(args)} positional arguments; "
                "a model with key/value prefixes takes them by name"
            )
        kwargs = {**dict(zip(self.names, args, strict=False)), **kwargs}
        ref = kwargs.get("input_ids")
        if ref is None:
            ref = kwargs.get("inputs_embeds")
        if ref is None:
            raise DeltatuneError("a model with key/value prefixes needs input_ids or inputs_embeds")
        batch, q_len, device = ref.shape[0], ref.shape[1], ref.device
        mask = kwargs.get("attention_mask")
        if mask is not None and mask.dim() != 2:
            raise DeltatuneError(
                f"attention_mask has {mask.dim()} dimensions; a model with key/value prefixes "
                "or LLaMA-Adapter needs the 2-D (batch, length) padding mask"
            )
        past = kwargs.get("past_key_values")
        seen = past.get_seq_length() if past is not None else 0
        if prefix is None:
            # Position-sensitive adapters only (LLaMA-Adapter): count positions from each row's
            # first real token; inputs without left padding keep the model's own positions.
            if (
                kwargs.get("position_ids") is None
                and mask is not None
                and bool(mask[:, 0].eq(0).any())
            ):
                kwargs["position_ids"] = prefix_positions(mask, q_len, seen, 0, device)
            return (), kwargs
        assert layer is not None
        if layer.routing is not None:
            raise DeltatuneError(
                "key/value prefixes (prefix tuning, P-Tuning v2) do not support per-example "
                "routing or Parallel; activate one set of adapters for the whole batch"
            )
        n = prefix.shape[0]
        if seen == 0:
            emb = kwargs.get("inputs_embeds")
            dtype = emb.dtype if emb is not None else _float_dtype(module)
            cache = prefix_cache(prefix.to(dtype), layer.shape, batch, past, module.config)
            kwargs["past_key_values"] = cache
            real_past = 0
        else:
            real_past = seen - n
        position_ids = kwargs.get("position_ids")
        if position_ids is not None:
            kwargs["position_ids"] = position_ids + n
        else:
            kwargs["position_ids"] = prefix_positions(mask, q_len, real_past, n, device)
        _check_position_limit(module, kwargs["position_ids"], n)
        if mask is not None:
            ones = torch.ones(batch, n, dtype=mask.dtype, device=mask.device)
            kwargs["attention_mask"] = torch.cat([ones, mask], dim=1)
        return (), kwargs


def _check_position_limit(backbone: nn.Module, position_ids: torch.Tensor, n: int) -> None:
    """Absolute position tables (BERT, GPT-2) end; say so instead of an index error."""
    table = getattr(backbone, "wpe", None)
    if table is None:
        table = getattr(getattr(backbone, "embeddings", None), "position_embeddings", None)
    if not isinstance(table, nn.Embedding) or position_ids.numel() == 0:
        return
    last = int(position_ids.max())
    if last >= table.num_embeddings:
        raise DeltatuneError(
            f"the prefix ({n} virtual tokens) plus the input reach position {last}, but "
            f"{type(backbone).__name__} has {table.num_embeddings} positions; shorten the input "
            f"(max length {table.num_embeddings - n}) or use fewer num_virtual_tokens"
        )


def _active_parts(root: nn.Module) -> tuple[PrefixLayer | None, torch.Tensor | None, bool]:
    """The PrefixLayer, its active prefix, and whether an active layer needs real positions."""
    layer: PrefixLayer | None = None
    prefix: torch.Tensor | None = None
    positional = False
    checkpointing = False
    for module in root.modules():
        if isinstance(module, PrefixLayer) and layer is None:
            layer = module
            prefix = module.active_prefix()
        elif getattr(module, "needs_real_positions", False) and isinstance(module, AdapterLayer):
            positional = positional or bool(module.adapters_to_run())
        elif module.training and getattr(module, "gradient_checkpointing", False) is True:
            checkpointing = True
    if prefix is not None and checkpointing:
        raise DeltatuneError(
            "key/value prefixes (prefix tuning, P-Tuning v2) cannot train with gradient "
            "checkpointing: transformers drops the key/value cache inside checkpointed blocks; "
            "set train.gradient_checkpointing: false"
        )
    return layer, prefix, positional


def _float_dtype(module: nn.Module) -> torch.dtype:
    for p in module.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


__all__ = [
    "KVShape",
    "PrefixHook",
    "PrefixLayer",
    "PrefixMLP",
    "add_prefix_adapter",
    "backbone_of",
    "find_prefix_layer",
    "fold",
    "kv_shape",
    "prefix_cache",
    "prefix_positions",
]

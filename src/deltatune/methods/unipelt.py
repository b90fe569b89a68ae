r"""UniPELT (Mao et al., 2022, "UniPELT: A Unified Framework for Parameter-Efficient Language
Model Tuning"): LoRA, prefix tuning and a bottleneck adapter in every transformer block, each
behind its own learned gate computed from the block's own hidden states, so that training
learns how much of each to use (per layer and per token).

::

    block l   (x: the attention's input, one row per token; h: the FFN output projection's output)

              ┌── G_P = σ(W_GP x + b_GP) ──┐  scales the prefix's attention weights
              │   P_k, P_v (n vectors)     ▼
    x ──┬──► attention( q, [P_k ; K], [P_v ; V] ) ──► (+x, norm) ──► FFN ... ──► h
        │        ▲ q = W_q x + G_L · s B_q A_q x
        │        ▲ v = W_v x + G_L · s B_v A_v x
        └──► G_L = σ(W_GL x + b_GL)

    h ──┬───────────────────────────────────────────────────────────┐
        ├──► [LN] ──► down (d → m) ──► f ──► up (m → d) ──► × G_A ──(+)──► h' ──► (+, norm)
        └──► G_A = σ(W_GA h + b_GA)

The three gated parts, per token ``i`` of layer ``l`` (every gate is one ``Linear(d, 1)`` and
a sigmoid, so ``G ∈ (0, 1)``; ``s = lora_alpha / r``)::

    q_i  = W_q x_i + G_L,i · s · B_q A_q x_i        (LoRA on the query and value projections;
    v_i  = W_v x_i + G_L,i · s · B_v A_v x_i         GPT-2: on its fused q-k-v projection)

    head_i = ( G_P,i Σ_{j∈P} e^{s_ij} P_v,j  +  Σ_{j∈T} e^{s_ij} V_j )
             / ( G_P,i Σ_{j∈P} e^{s_ij}  +  Σ_{j∈T} e^{s_ij} ),     s_ij = q_i · k_j / sqrt(d_head)

    h'_i = h_i + G_A,i · ( f(LN(h_i) W_down + b_down) W_up + b_up )   (sequential adapter,
                                                                      Pfeiffer's placement)

(``P``: the ``n`` prefix positions, keys ``P_k``; ``T``: the real tokens, keys ``K``.)

The prefix gate, and how it differs from the paper: the paper multiplies the prefix vectors
``P_k`` and ``P_v`` by ``G_P``. Here ``G_P`` multiplies the prefix's *attention weights*
(``log G_P`` is added to the prefix columns of the attention scores). In He et al.'s unified
view, prefix attention is ``(1 − λ_i) Attn(x_i; K, V) + λ_i Attn(x_i; P_k, P_v)`` with
``λ_i`` the softmax mass on the prefix; the gate turns that into
``λ_i = G_P Z_P / (G_P Z_P + Z_T)`` (``Z`` the sums of ``e^{s_ij}`` above). Two reasons:
``G_P → 0`` then removes the prefix exactly (zeroed prefix keys, as in the paper's form, still
draw weight ``e^0`` each) and ``G_P → 1`` is plain prefix tuning, so every gate spans
"off" to "on"; and a per-token gate on the attention weights goes through the model's own
attention (an additive mask) and its key/value cache, so generation with the cache equals
generation without it. (The ``adapters`` library, and the paper's code, average the gate over
the sequence instead, which a cache cannot reproduce token by token.)

Defaults, from the paper's BERT-base setup (hidden 768): LoRA ``r = 8`` on query and value,
prefix length ``10`` in every layer, adapter bottleneck ``48``. deltatune keeps ``r = 8``
(``lora_alpha = 16``, deltatune's LoRA default, so ``s = 2``) and ``n = 10`` whatever the
model, and scales the bottleneck with the hidden size as ``m = hidden // 16`` (48 of 768; 24
on MiniLM's 384; ``bottleneck_size`` fixes ``m``). As in prefix tuning the prefix trains
through the MLP ``P = W_2 tanh(W_1 E + b_1) + b_2`` (``prefix_projection``), folded into
``P`` on saving. LoRA's ``B`` and the adapter's ``up`` start at zero; the gates start as
PyTorch's default ``Linear`` (so near 0.5); the prefix is random, so a fresh adapter does not
start exactly at the base model.

Reading the gates: :func:`gate_values` gives, per layer, the mean of each gate over the tokens
of the last forward (or of a forward on given inputs, pads left out)::

    gate_values(model, batch)  ->  {0: {"lora": 0.53, "prefix": 0.48, "adapter": 0.61}, 1: ...}

How it is built (reusing the single methods' machinery): the attention module of every block
is wrapped by a :class:`UniPELTAttention`, a :class:`~deltatune.kv_prefix.PrefixLayer` that
also holds that block's LoRA tensors and its two gates. The first block's one holds the prefix
``P`` for all layers (the shared key/value-prefix code, :mod:`deltatune.kv_prefix`: cache,
positions, padding, generation). Each call computes ``G_L`` and ``G_P`` from the attention's
input, adds the gated LoRA term to the query/value projections' outputs (forward hooks held
for the call only) and adds ``log G_P`` to the prefix columns of the attention mask. The FFN
output projection of every block is wrapped by a :class:`UniPELTAdapterLayer`, the
Pfeiffer/Houlsby :class:`~deltatune.methods._bottleneck.SerialAdapterLayer` plus ``G_A``.
One adapter name covers all of it (``set_active``, ``disabled``, ``delete``, saving). Saved in
deltatune's own format, ``peft_type: DELTATUNE_UNIPELT``; the prefix is saved at its layer's
key (``base_model.model.<block 0 attention>.prompt_embeddings``). Not mergeable: prefixes and
input-dependent gates cannot be folded into weights. Needs the ``eager`` or ``sdpa`` attention
(the gate is an additive attention mask). The model's key/value prefixes are UniPELT's: prefix
tuning, P-Tuning v2 or MAM cannot be added beside it (and UniPELT not beside them).
"""

from __future__ import annotations

import dataclasses
import inspect
import math
from typing import Any, ClassVar, Literal, cast

import torch
import torch.nn.functional as F
from torch import nn

from deltatune.arch import (
    ArchConfig,
    block_submodule,
    resolve_arch,
    transformer_blocks,
)
from deltatune.errors import ConfigError, DeltatuneError
from deltatune.kv_prefix import (
    KVShape,
    PrefixLayer,
    add_prefix_adapter,
    find_prefix_layer,
    kv_shape,
)
from deltatune.layers import AdapterLayer
from deltatune.methods._bottleneck import SerialAdapterLayer
from deltatune.methods.lora import LoraConfig, lora_delta
from deltatune.methods.pfeiffer import PfeifferConfig
from deltatune.methods.prefix_tuning import PrefixTuningConfig, check_prefix_fields
from deltatune.registry import Capabilities, MethodConfig, MethodSpec, register
from deltatune.targeting import is_conv1d, set_submodule

#: Attention implementations that take an additive float mask (the prefix gate is one).
MASKED_ATTENTION = ("eager", "sdpa")
GATES = ("lora", "prefix", "adapter")


@dataclasses.dataclass
class UniPELTConfig(MethodConfig):
    """UniPELT settings (every field, with its default).

    LoRA part (query and value projections; GPT-2's fused ``c_attn``):

    - ``r`` (8): LoRA rank (the paper's 8). ``lora_alpha`` (16): scale ``s = alpha / r``.
    - ``lora_dropout`` (0.0): dropout on LoRA's input.

    Prefix part (every attention layer):

    - ``num_virtual_tokens`` (10): prefix length ``n`` per layer (the paper's 10).
    - ``prefix_projection`` (True): train the prefix through the MLP
      ``P = W_2 tanh(W_1 E + b_1) + b_2`` (folded into ``P`` on saving); False trains ``P``.
    - ``encoder_hidden_size`` (None = token_dim): the MLP's hidden width.
    - ``prefix_init`` ("random"): ``random`` draws ``P`` (or ``E`` and the MLP) from N(0, 1);
      ``zero`` starts ``P`` (or the MLP's last layer) at zero.
    - ``num_layers``, ``token_dim``, ``num_attention_heads`` (None = from the model): as in
      prefix tuning; given values must match the model.
    - ``inference_mode`` (False): true builds a direct ``P`` (no MLP); saved adapters say true.

    Adapter part (after every feed-forward output projection, Pfeiffer's placement):

    - ``reduction_factor`` (None = 16, the paper's 48 of 768): ``m = hidden // reduction_factor``.
    - ``bottleneck_size`` (None): give ``m`` directly instead (not with ``reduction_factor``).
    - ``non_linearity`` ("relu"): ``relu``, ``gelu``, ``silu`` or ``tanh``.
    - ``ln_before`` (False): a trainable LayerNorm on the adapter's input.
    - ``dropout`` (0.0): dropout on the adapter's output.
    - ``init_weights`` ("zero"): ``zero`` = ``up`` starts at zero; ``bert`` = both projections
      ~ N(0, 0.01²).

    Gates: one ``Linear(hidden, 1)`` + sigmoid per part and layer (``G_L``, ``G_P`` from the
    attention's input, ``G_A`` from the adapter's input); no settings.

    Common: ``modules_to_save`` (None; a new head), ``arch`` (empty = the model type's entry;
    UniPELT needs ``layers``, ``attention``, ``ffn_out`` and ``q`` + ``v`` or ``qkv``, inside
    ``attention``), ``task_type``, ``base_model_name_or_path``.
    """

    method_name: ClassVar[str] = "unipelt"
    peft_type: ClassVar[str] = "DELTATUNE_UNIPELT"

    r: int = 8
    lora_alpha: float = 16
    lora_dropout: float = 0.0
    num_virtual_tokens: int = 10
    prefix_projection: bool = True
    encoder_hidden_size: int | None = None
    prefix_init: Literal["random", "zero"] = "random"
    num_layers: int | None = None
    token_dim: int | None = None
    num_attention_heads: int | None = None
    inference_mode: bool = False
    reduction_factor: float | None = None
    bottleneck_size: int | None = None
    non_linearity: Literal["relu", "gelu", "silu", "tanh"] = "relu"
    ln_before: bool = False
    dropout: float = 0.0
    init_weights: Literal["zero", "bert"] = "zero"
    modules_to_save: list[str] | None = None
    arch: ArchConfig = dataclasses.field(default_factory=ArchConfig)

    def validate(self) -> None:
        check_prefix_fields(self)
        if not math.isfinite(self.lora_alpha):
            raise ConfigError(f"lora_alpha={self.lora_alpha} must be a finite number (try 16)")
        self.lora_config()  # r, lora_dropout
        self.adapter_config()  # reduction_factor, bottleneck_size, dropout

    def lora_config(self) -> LoraConfig:
        """The LoRA part's settings (its scale and initialisation)."""
        return LoraConfig(r=self.r, lora_alpha=self.lora_alpha, lora_dropout=self.lora_dropout)

    def adapter_config(self) -> PfeifferConfig:
        """The adapter part as a Pfeiffer config (what the bottleneck code reads)."""
        return PfeifferConfig(
            reduction_factor=self.reduction_factor,
            bottleneck_size=self.bottleneck_size,
            non_linearity=self.non_linearity,
            ln_before=self.ln_before,
            dropout=self.dropout,
            init_weights=self.init_weights,
            arch=self.arch,
        )

    def prefix_config(self) -> PrefixTuningConfig:
        """The prefix part as a prefix tuning config (what the shared prefix code reads)."""
        return PrefixTuningConfig(
            num_virtual_tokens=self.num_virtual_tokens,
            prefix_projection=self.prefix_projection,
            encoder_hidden_size=self.encoder_hidden_size,
            init_weights="zero" if self.prefix_init == "zero" else None,
            num_layers=self.num_layers,
            token_dim=self.token_dim,
            num_attention_heads=self.num_attention_heads,
            inference_mode=self.inference_mode,
            modules_to_save=self.modules_to_save,
            arch=self.arch,
            task_type=self.task_type,
        )


# --- layers ---------------------------------------------------------------------------------


def _in_out(module: nn.Module, what: str) -> tuple[int, int]:
    """``(in_features, out_features)`` of a Linear / Conv1D (through adapter wrappers)."""
    while isinstance(module, AdapterLayer):
        module = module.base_layer
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if is_conv1d(module):
        rows, cols = (int(n) for n in cast(torch.Tensor, module.weight).shape)
        return rows, cols
    raise ConfigError(
        f"unipelt: {what} is a {type(module).__name__}; LoRA needs a Linear or Conv1D there"
    )


def _float_like(module: nn.Module) -> tuple[torch.dtype, torch.device]:
    ref = next(module.parameters(), None)
    if ref is None:
        return torch.float32, torch.device("cpu")
    return (ref.dtype if ref.is_floating_point() else torch.float32), ref.device


def _additive_mask(
    mask: torch.Tensor | None, q_len: int, kv_len: int, causal: bool, dtype: torch.dtype
) -> torch.Tensor:
    """The attention mask as additive floats (0 = attend, dtype min = masked), 4-D."""
    lowest = torch.finfo(dtype).min
    if mask is None:
        out = torch.zeros(1, 1, q_len, kv_len, dtype=dtype)
        if causal and q_len > 1:
            # No mask from the model: a causal attention means "query i sees the cache and
            # the real tokens up to i" (its rows end at the last key).
            rows = torch.arange(q_len).unsqueeze(1) + (kv_len - q_len)
            out = out.masked_fill(torch.arange(kv_len).unsqueeze(0) > rows, lowest)
        return out
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, lowest)
    return mask.to(dtype)


class _LoraHook:
    """Forward hook on a query/value projection: adds ``G_L · s · B A x`` for this call."""

    def __init__(self, owner: UniPELTAttention, key: str, gates: dict[str, torch.Tensor]) -> None:
        self.owner = owner
        self.key = key
        self.gates = gates

    def __call__(self, module: nn.Module, inputs: tuple[Any, ...], output: Any) -> Any:
        x = inputs[0]
        out = output
        for name, gate in self.gates.items():
            a = cast(torch.Tensor, self.owner.lora_A[name][self.key].weight)  # type: ignore[index]
            b = cast(torch.Tensor, self.owner.lora_B[name][self.key].weight)  # type: ignore[index]
            delta = lora_delta(
                x.to(a.dtype),
                a,
                b,
                self.owner.lora_scaling[name],
                self.owner.lora_dropout[name],
            )
            out = out + (gate.to(delta.dtype) * delta).to(out.dtype)
        return out


class UniPELTAttention(PrefixLayer):
    """Wraps one block's attention module: that block's LoRA tensors, ``G_L`` and ``G_P``.

    The first block's instance also holds the prefix ``P`` of every layer (it is the model's
    :class:`~deltatune.kv_prefix.PrefixLayer`, the first one in module order).
    ``last_gates[adapter]`` keeps the gates of the last call, ``{"lora": (batch, tokens),
    "prefix": (batch, tokens)}``, detached.
    """

    # (PrefixLayer's tuple type is inferred as exactly two names, hence the ignore.)
    adapter_attributes = (  # type: ignore[assignment]
        "prompt_embeddings",
        "prefix_encoder",
        "gate_lora",
        "gate_prefix",
        "lora_A",
        "lora_B",
    )
    # Saved at this module's own path (its gates and LoRA tensors are per layer).
    absolute_keys = False

    def __init__(
        self,
        base_layer: nn.Module,
        shape: KVShape,
        layer_index: int,
        projections: dict[str, str],
        hidden: int,
    ) -> None:
        super().__init__(base_layer, shape)
        self.layer_index = layer_index
        self.projections = dict(projections)
        self.hidden = hidden
        self.gate_lora = nn.ModuleDict()
        self.gate_prefix = nn.ModuleDict()
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.lora_dropout = nn.ModuleDict()
        self.lora_scaling: dict[str, float] = {}
        self.prefix_tokens: dict[str, int] = {}
        self.last_gates: dict[str, dict[str, torch.Tensor]] = {}
        try:
            params = inspect.signature(base_layer.forward).parameters.items()
            self.arg_names = [
                n for n, p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
            ]
        except (TypeError, ValueError):
            self.arg_names = ["hidden_states"]

    def add_unipelt(self, adapter_name: str, config: UniPELTConfig) -> None:
        """This block's LoRA tensors and gates for one adapter (the prefix comes separately)."""
        lora = config.lora_config()
        dtype, device = _float_like(self.base_layer)
        a_dict, b_dict = nn.ModuleDict(), nn.ModuleDict()
        for key, path in self.projections.items():
            n_in, n_out = _in_out(self.base_layer.get_submodule(path), f"'{path}'")
            a = nn.Linear(n_in, lora.r, bias=False)
            b = nn.Linear(lora.r, n_out, bias=False)
            nn.init.kaiming_uniform_(a.weight, a=math.sqrt(5))
            nn.init.zeros_(b.weight)
            a_dict[key], b_dict[key] = a, b
        self.lora_A[adapter_name] = a_dict.to(device=device, dtype=dtype)
        self.lora_B[adapter_name] = b_dict.to(device=device, dtype=dtype)
        self.gate_lora[adapter_name] = nn.Linear(self.hidden, 1).to(device=device, dtype=dtype)
        self.gate_prefix[adapter_name] = nn.Linear(self.hidden, 1).to(device=device, dtype=dtype)
        dropout = lora.lora_dropout
        self.lora_dropout[adapter_name] = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.lora_scaling[adapter_name] = lora.scale(lora.r, lora.lora_alpha)
        self.prefix_tokens[adapter_name] = config.num_virtual_tokens

    def add_adapter(
        self, adapter_name: str, config: Any = None, *, n: int = 1, mlp_hidden: int | None = None
    ) -> None:
        if adapter_name not in self.gate_prefix:
            raise ConfigError(
                f"adapter '{adapter_name}': this model's key/value prefixes belong to a UniPELT "
                "adapter, so prefix tuning, P-Tuning v2 or MAM cannot be added beside it; "
                "use a separate copy of the model"
            )
        super().add_adapter(adapter_name, config, n=n, mlp_hidden=mlp_hidden)

    def adapter_tensors(self, adapter_name: str) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        if adapter_name in self.prompt_embeddings or adapter_name in self.prefix_encoder:
            out.update(super().adapter_tensors(adapter_name))
        if adapter_name in self.gate_lora:
            for attr in ("gate_lora", "gate_prefix", "lora_A", "lora_B"):
                holder = getattr(self, attr)[adapter_name]
                out.update({f"{attr}.{k}": p for k, p in holder.named_parameters()})
        return out

    def delete_adapter(self, adapter_name: str) -> None:
        super().delete_adapter(adapter_name)
        if adapter_name in self.lora_dropout:
            del self.lora_dropout[adapter_name]
        for record in (self.lora_scaling, self.prefix_tokens, self.last_gates):
            record.pop(adapter_name, None)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        names = [n for n in self.adapters_to_run() if n in self.gate_lora]
        if not names:
            return self.base_layer(*args, **kwargs)
        kwargs = {**dict(zip(self.arg_names, args, strict=False)), **kwargs}
        hidden = kwargs.get(self.arg_names[0]) if self.arg_names else None
        if not isinstance(hidden, torch.Tensor) or hidden.dim() != 3:
            raise DeltatuneError(
                f"UniPELT: {type(self.base_layer).__name__} was not given its hidden states "
                "(batch, tokens, hidden) as its first argument"
            )
        lora_gates: dict[str, torch.Tensor] = {}
        log_prefix_gates: dict[str, torch.Tensor] = {}
        for name in names:
            x = hidden.to(cast(torch.Tensor, self.gate_lora[name].weight).dtype)
            lora_gates[name] = torch.sigmoid(self.gate_lora[name](x))  # (batch, tokens, 1)
            log_prefix_gates[name] = F.logsigmoid(self.gate_prefix[name](x))
            self.last_gates[name] = {
                "lora": lora_gates[name].detach().squeeze(-1),
                "prefix": log_prefix_gates[name].detach().exp().squeeze(-1),
            }
        kwargs["attention_mask"] = self._gated_mask(hidden, kwargs, names, log_prefix_gates)
        handles = [
            self.base_layer.get_submodule(path).register_forward_hook(
                _LoraHook(self, key, lora_gates)
            )
            for key, path in self.projections.items()
        ]
        try:
            return self.base_layer(**kwargs)
        finally:
            for handle in handles:
                handle.remove()

    def _gated_mask(
        self,
        hidden: torch.Tensor,
        kwargs: dict[str, Any],
        names: list[str],
        log_gates: dict[str, torch.Tensor],
    ) -> torch.Tensor:
        """The attention mask with ``log G_P`` added to each adapter's prefix columns."""
        impl = getattr(getattr(self.base_layer, "config", None), "_attn_implementation", None)
        if impl is not None and impl not in MASKED_ATTENTION:
            raise DeltatuneError(
                f"UniPELT's prefix gate is an additive attention mask, which the '{impl}' "
                f"attention does not take; load the model with attn_implementation='sdpa' "
                "(or 'eager')"
            )
        cache = kwargs.get("past_key_values")
        if cache is None:
            raise DeltatuneError(
                "UniPELT: the attention got no key/value cache, so its prefix is missing; call "
                "the whole model (its backbone's pre-hook puts the prefix into the cache)"
            )
        cache = getattr(cache, "self_attention_cache", cache)  # encoder-decoder caches
        layer_idx = getattr(self.base_layer, "layer_idx", None)
        layer_idx = self.layer_index if layer_idx is None else layer_idx
        batch, q_len = hidden.shape[0], hidden.shape[1]
        mask = kwargs.get("attention_mask")
        kv_len = (
            int(mask.shape[-1])
            if isinstance(mask, torch.Tensor)
            else cache.get_seq_length(layer_idx) + q_len
        )
        n_total = sum(self.prefix_tokens[n] for n in names)
        if kv_len - q_len < n_total:
            raise DeltatuneError(
                f"UniPELT: layer {self.layer_index} sees {kv_len - q_len} cached positions, "
                f"fewer than the {n_total} prefix tokens; call the whole model"
            )
        dtype = hidden.dtype
        causal = bool(getattr(self.base_layer, "is_causal", False))
        base = _additive_mask(mask, q_len, kv_len, causal, dtype).to(hidden.device)
        # The prefix columns come first in the cache, in the order of the active adapters.
        columns = [log_gates[n].expand(batch, q_len, self.prefix_tokens[n]) for n in names]
        bias = F.pad(torch.cat(columns, dim=-1), (0, kv_len - n_total)).unsqueeze(1)
        return (base + bias.to(dtype)).clamp(min=torch.finfo(dtype).min)


class UniPELTAdapterLayer(SerialAdapterLayer):
    """Wraps a block's FFN output projection: ``h ← h + G_A(h) · Δ(h)`` per UniPELT adapter.

    Other (plain Pfeiffer / Houlsby) adapters on the same module apply ungated, as in
    :class:`~deltatune.methods._bottleneck.SerialAdapterLayer`. ``last_gates[adapter]`` keeps
    ``{"adapter": (batch, tokens)}`` of the last call, detached.
    """

    adapter_attributes: tuple[str, ...] = ("adapter", "fusion", "gate_adapter")

    def __init__(self, base_layer: nn.Module, what: str, layer_index: int) -> None:
        super().__init__(base_layer, what)
        self.layer_index = layer_index
        self.gate_adapter = nn.ModuleDict()
        self.last_gates: dict[str, dict[str, torch.Tensor]] = {}

    def add_unipelt(self, adapter_name: str, config: PfeifferConfig) -> None:
        self.add_adapter(adapter_name, config)
        dtype, device = _float_like(self.adapter[adapter_name])
        self.gate_adapter[adapter_name] = nn.Linear(self.dim, 1).to(device=device, dtype=dtype)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        out = self.base_layer(*args, **kwargs)
        names = self.adapters_to_run()
        if not names:
            return out
        h = out[0] if isinstance(out, tuple) else out
        for name in names:
            if name in self.fusion:
                h = self.fusion[name](h, self)
            elif name in self.gate_adapter:
                gate_layer = self.gate_adapter[name]
                gate = torch.sigmoid(gate_layer(h.to(cast(torch.Tensor, gate_layer.weight).dtype)))
                self.last_gates[name] = {"adapter": gate.detach().squeeze(-1)}
                h = h + (gate * self.bottleneck(name).delta(h)).to(h.dtype)
            else:
                h = self.bottleneck(name).serial(h)
        return (h, *out[1:]) if isinstance(out, tuple) else h

    def adapter_tensors(self, adapter_name: str) -> dict[str, torch.Tensor]:
        out = super().adapter_tensors(adapter_name)
        if adapter_name in self.gate_adapter:
            gate = self.gate_adapter[adapter_name]
            out.update({f"gate_adapter.{k}": p for k, p in gate.named_parameters()})
        return out

    def delete_adapter(self, adapter_name: str) -> None:
        super().delete_adapter(adapter_name)
        self.last_gates.pop(adapter_name, None)


# --- injection ------------------------------------------------------------------------------


def lora_projections(arch: ArchConfig) -> dict[str, str]:
    """LoRA's targets as paths inside the attention module: ``{"q": ..., "v": ...}`` or, for a
    fused projection (GPT-2), ``{"qkv": ...}``."""
    assert arch.attention is not None
    wanted = {"q": arch.q, "v": arch.v} if arch.q and arch.v else {"qkv": arch.qkv}
    out: dict[str, str] = {}
    for key, path in wanted.items():
        if not path:
            raise ConfigError(
                "unipelt: the architecture entry names neither q and v nor qkv; give them in "
                "the method config, e.g. arch: {q: self_attn.q_proj, v: self_attn.v_proj}"
            )
        if not path.startswith(arch.attention + "."):
            raise ConfigError(
                f"unipelt: arch.{key}={path!r} is not inside arch.attention={arch.attention!r}; "
                "LoRA's projections must be submodules of the attention module"
            )
        out[key] = path[len(arch.attention) + 1 :]
    return out


def inject_unipelt(model: nn.Module, config: UniPELTConfig, adapter_name: str) -> None:
    arch = resolve_arch(model, config.arch, ("layers", "attention", "ffn_out"), "unipelt")
    projections = lora_projections(arch)
    blocks = transformer_blocks(model, arch)
    shape = kv_shape(
        model,
        len(blocks),
        method="unipelt",
        num_layers=config.num_layers,
        token_dim=config.token_dim,
        num_attention_heads=config.num_attention_heads,
    )
    host = find_prefix_layer(model)
    if host is not None and not isinstance(host, UniPELTAttention):
        raise ConfigError(
            "unipelt: this model already has key/value prefixes (prefix tuning, P-Tuning v2 or "
            "MAM); UniPELT gates its own prefix and cannot share them; delete that adapter "
            "first or use a separate copy of the model"
        )
    # Find every place first, so a model that does not fit fails with nothing changed.
    places: list[tuple[int, str, nn.Module, str, nn.Module]] = []
    for index, (block_name, block) in enumerate(blocks):
        attn_name, attention = block_submodule(block_name, block, arch.attention, "attention")
        out_name, ffn_out = block_submodule(block_name, block, arch.ffn_out, "ffn_out")
        for module, name, cls in (
            (attention, attn_name, UniPELTAttention),
            (ffn_out, out_name, UniPELTAdapterLayer),
        ):
            if isinstance(module, AdapterLayer) and not isinstance(module, cls):
                raise ConfigError(
                    f"unipelt: module '{name}' already carries a {type(module).__name__} "
                    "adapter; inject UniPELT first, or delete that adapter"
                )
        inner = attention.base_layer if isinstance(attention, AdapterLayer) else attention
        for key, path in projections.items():
            try:
                projection = inner.get_submodule(path)
            except AttributeError:
                raise ConfigError(
                    f"unipelt: arch.{key} names no module '{path}' inside '{attn_name}'"
                ) from None
            _in_out(projection, f"arch.{key} ('{attn_name}.{path}')")
        places.append((index, attn_name, attention, out_name, ffn_out))
    adapter_cfg = config.adapter_config()
    for index, attn_name, attention, out_name, ffn_out in places:
        if isinstance(attention, UniPELTAttention):
            attn_layer = attention
        else:
            hidden = _in_out(attention.get_submodule(next(iter(projections.values()))), "q")[0]
            attn_layer = UniPELTAttention(attention, shape, index, projections, hidden)
            set_submodule(model, attn_name, attn_layer)
        attn_layer.add_unipelt(adapter_name, config)
        if isinstance(ffn_out, UniPELTAdapterLayer):
            ffn_layer = ffn_out
        else:
            ffn_layer = UniPELTAdapterLayer(ffn_out, f"arch.ffn_out ('{out_name}')", index)
            set_submodule(model, out_name, ffn_layer)
        ffn_layer.add_unipelt(adapter_name, adapter_cfg)
    reparam = config.prefix_projection and not config.inference_mode
    mlp_hidden = (config.encoder_hidden_size or shape.token_dim) if reparam else None
    # The first block's UniPELTAttention is the model's first PrefixLayer: the prefix goes there.
    add_prefix_adapter(
        model, config.prefix_config(), adapter_name, method="unipelt", mlp_hidden=mlp_hidden
    )


# --- reading the gates ----------------------------------------------------------------------


def _mean(values: torch.Tensor, mask: torch.Tensor | None) -> float:
    if mask is not None and mask.shape == values.shape:
        weights = mask.to(values.dtype)
        return float((values * weights).sum() / weights.sum().clamp(min=1))
    return float(values.mean())


def gate_values(
    model: nn.Module,
    inputs: dict[str, Any] | None = None,
    adapter_name: str | None = None,
) -> dict[int, dict[str, float]]:
    """Per-layer mean gate values of a UniPELT adapter:
    ``{layer: {"lora": G_L, "prefix": G_P, "adapter": G_A}}``.

    With ``inputs`` (a batch of model inputs) the model is run on them first (no gradients,
    in its current train/eval mode) and the means leave out padding (``attention_mask`` 0).
    Without, the means are over every token of the model's last forward. ``adapter_name``:
    the adapter to read (default: the first active UniPELT adapter).
    """
    from deltatune.model import state_of

    if adapter_name is None:
        state = state_of(model)
        unipelt = [n for n in state.active if isinstance(state.configs.get(n), UniPELTConfig)]
        if not unipelt:
            raise DeltatuneError(
                "gate_values: no UniPELT adapter is active on this model; give adapter_name"
            )
        adapter_name = unipelt[0]
    mask = None
    if inputs is not None:
        with torch.no_grad():
            model(**inputs)
        mask = inputs.get("attention_mask")
    out: dict[int, dict[str, float]] = {}
    for module in model.modules():
        if isinstance(module, UniPELTAttention | UniPELTAdapterLayer):
            record = module.last_gates.get(adapter_name)
            if record is not None:
                row = out.setdefault(module.layer_index, {})
                row.update({k: _mean(v, mask) for k, v in record.items()})
    if not out:
        raise DeltatuneError(
            f"gate_values: adapter '{adapter_name}' has no gate values yet; run a forward "
            "first or pass inputs"
        )
    return {layer: {g: out[layer][g] for g in GATES if g in out[layer]} for layer in sorted(out)}


register(
    MethodSpec(
        name="unipelt",
        config_cls=UniPELTConfig,
        inject=inject_unipelt,
        capabilities=Capabilities(multi_adapter=True, disable=True),
        default_lr=1e-3,
        summary="UniPELT: gated LoRA (q, v) + gated prefix + gated adapter per layer (Mao et al.)",
        family="combined",
    )
)

__all__ = [
    "UniPELTAdapterLayer",
    "UniPELTAttention",
    "UniPELTConfig",
    "gate_values",
    "inject_unipelt",
    "lora_projections",
]

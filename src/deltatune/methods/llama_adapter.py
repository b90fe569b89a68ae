r"""LLaMA-Adapter v1 (Zhang et al., 2023, "LLaMA-Adapter: Efficient Fine-tuning of Language
Models with Zero-init Attention"): learnable adaption prompts in the top ``L`` layers, whose
keys and values the real tokens attend to through a zero-initialised gate.

In each adapted layer, with the layer's own projections ``W_q, W_k, W_v, W_o`` (frozen), a
trained prompt ``A`` (``K x hidden``) and a trained scalar gate ``g`` (starts at 0)::

    x ──► attention(x) (unchanged: real keys/values, causal mask, cache) ───────────────┐
    │                                                                                  + ──► y
    └──► q = RoPE(x W_q) ──► g · softmax(q (A W_k)^T / sqrt(d)) (A W_v) ──► W_o ───────┘

    y = attention(x) + W_o · concat_h[ g · softmax(q_h k_h^T / sqrt(d)) v_h ]
        with k = A W_k, v = A W_v (no rotation: the prompt has no position)

The prompt's attention has its own softmax over the ``K`` prompt tokens, separate from the
real tokens' (the paper's zero-init attention), and only keys and values come from the prompt.
Because ``g = 0`` at the start, the model's output is then exactly the base model's. For
grouped-query attention the prompt's key/value heads are shared as in the base attention.

Works on LLaMA-like decoders (LLaMA, Mistral, Qwen2: the architecture map's ``attention``,
``q``, ``k``, ``v`` and ``attn_out`` entries, with RoPE given to the attention as
``position_embeddings``). The prompt's part does not depend on earlier tokens, so generation
with the key/value cache needs nothing extra. Its scores do depend on the queries' absolute
positions (RoPE on ``q``, none on the prompt's keys), so a left-padded row's positions are
counted from its first real token (the backbone hook of :mod:`deltatune.kv_prefix`; unpadded
and right-padded inputs keep the model's own positions), and a padded batch computes what each
example computes alone. Saved in Hugging Face PEFT's ``ADAPTION_PROMPT``
format (``<attention path>.adaption_prompt`` of shape ``(1, K, hidden)`` and
``<attention path>.adaption_gate`` of shape ``(1,)``), so adapters move both ways. The gated
softmax cannot be folded into weights: no merge.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar

import torch
from torch import nn

from deltatune.arch import (
    ArchConfig,
    block_submodule,
    resolve_arch,
    transformer_blocks,
)
from deltatune.errors import ConfigError, DeltatuneError
from deltatune.kv_prefix import backbone_of, install_hook
from deltatune.layers import AdapterLayer
from deltatune.registry import Capabilities, MethodConfig, MethodSpec, register
from deltatune.targeting import set_submodule


@dataclasses.dataclass
class LlamaAdapterConfig(MethodConfig):
    """LLaMA-Adapter settings; field names are PEFT's ``AdaptionPromptConfig`` (every field).

    - ``adapter_len`` (10): prompt tokens ``K`` per adapted layer.
    - ``adapter_layers`` (8): adapt the top ``L`` blocks (the paper: 30 of LLaMA-7B's 32).
    - ``target_modules`` (None = the architecture's attention, e.g. ``self_attn``): the name
      of the attention module inside a block.
    - ``arch`` (empty = the model type's entry): module names, see :mod:`deltatune.arch`;
      needs ``layers``, ``attention``, ``q``, ``k``, ``v``, ``attn_out`` (inside the attention).
    - ``task_type``, ``base_model_name_or_path`` (None): as in every method config.
    """

    method_name: ClassVar[str] = "llama_adapter"
    peft_type: ClassVar[str] = "ADAPTION_PROMPT"

    adapter_len: int = 10
    adapter_layers: int = 8
    target_modules: str | None = None
    arch: ArchConfig = dataclasses.field(default_factory=ArchConfig)

    def validate(self) -> None:
        if self.adapter_len <= 0:
            raise ConfigError(f"adapter_len={self.adapter_len} must be a positive integer (try 10)")
        if self.adapter_layers <= 0:
            raise ConfigError(
                f"adapter_layers={self.adapter_layers} must be a positive integer (the number "
                "of top blocks to adapt, e.g. 8)"
            )
        if self.target_modules is not None and (
            not self.target_modules or self.target_modules.startswith(".")
        ):
            raise ConfigError(
                f"target_modules={self.target_modules!r} must name the attention module inside "
                "a block, e.g. 'self_attn'"
            )


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """RoPE's rotation of the two halves of the last axis: ``(x1, x2) -> (-x2, x1)``."""
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class AdaptionPromptLayer(AdapterLayer):
    """Wraps one attention module; adds each active adapter's gated prompt attention."""

    adapter_attributes = ("adaption_prompt", "adaption_gate")
    #: The prompt's scores depend on the queries' absolute RoPE angles, so the backbone hook of
    #: :mod:`deltatune.kv_prefix` counts positions from each row's first real token.
    needs_real_positions = True

    def __init__(
        self,
        base_layer: nn.Module,
        names: dict[str, str],
        hidden: int,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
    ) -> None:
        super().__init__(base_layer)
        #: ``q``, ``k``, ``v``, ``o``: module paths relative to the attention module (looked up
        #: at call time, so a LoRA wrapped around them later is used too).
        self.names = names
        self.hidden = hidden
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.adaption_prompt = nn.ParameterDict()
        self.adaption_gate = nn.ParameterDict()

    def _attention(self) -> nn.Module:
        module = self.base_layer
        while isinstance(module, AdapterLayer):
            module = module.base_layer
        return module

    def add_adapter(self, adapter_name: str, config: Any = None) -> None:
        ref = next((p for p in self._attention().parameters() if p.is_floating_point()), None)
        dtype = ref.dtype if ref is not None else torch.float32
        device = ref.device if ref is not None else torch.device("cpu")
        n = config.adapter_len
        # PEFT's init: prompt ~ N(0, 1), gate = 0 (the zero-init attention).
        self.adaption_prompt[adapter_name] = nn.Parameter(
            torch.randn(1, n, self.hidden).to(device=device, dtype=dtype)
        )
        self.adaption_gate[adapter_name] = nn.Parameter(torch.zeros(1, device=device, dtype=dtype))

    def adapter_tensors(self, adapter_name: str) -> dict[str, torch.Tensor]:
        return {
            "adaption_prompt": self.adaption_prompt[adapter_name],
            "adaption_gate": self.adaption_gate[adapter_name],
        }

    def prompt_attention(
        self, adapter_name: str, q: torch.Tensor, attention: nn.Module
    ) -> torch.Tensor:
        """``g · softmax(q k^T / sqrt(d)) v`` for one adapter, ``(batch, heads, q_len, d)``."""
        prompt = self.adaption_prompt[adapter_name].to(q.dtype)
        n = prompt.shape[1]
        k = attention.get_submodule(self.names["k"])(prompt)
        v = attention.get_submodule(self.names["v"])(prompt)
        k = k.view(1, n, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = v.view(1, n, self.num_kv_heads, self.head_dim).transpose(1, 2)
        groups = self.num_heads // self.num_kv_heads
        if groups > 1:  # grouped-query attention: each key/value head serves `groups` heads
            k = k.repeat_interleave(groups, dim=1)
            v = v.repeat_interleave(groups, dim=1)
        scores = torch.matmul(q, k.transpose(2, 3)) / math.sqrt(self.head_dim)
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
        return torch.matmul(self.adaption_gate[adapter_name] * probs, v)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        out = self.base_layer(*args, **kwargs)
        names = self.adapters_to_run()
        if not names:
            return out
        hidden_states = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        rope = kwargs.get("position_embeddings")
        if rope is None:
            raise DeltatuneError(
                f"llama_adapter: {type(self._attention()).__name__} was called without "
                "position_embeddings (cos, sin); it needs a LLaMA-like attention with RoPE"
            )
        attention = self._attention()
        batch, q_len, _ = hidden_states.shape
        q = attention.get_submodule(self.names["q"])(hidden_states)
        q = q.view(batch, q_len, self.num_heads, self.head_dim).transpose(1, 2)
        cos, sin = (t.unsqueeze(1) for t in rope)
        q = q * cos + rotate_half(q) * sin
        mixed = sum(self.prompt_attention(a, q, attention) for a in names)
        assert isinstance(mixed, torch.Tensor)
        mixed = mixed.transpose(1, 2).reshape(batch, q_len, self.num_heads * self.head_dim)
        o_proj = attention.get_submodule(self.names["o"])
        delta = o_proj(mixed)
        bias = getattr(o_proj, "bias", None)
        if isinstance(bias, torch.Tensor):  # W_o only: the base attention already added b_o
            delta = delta - bias
        attn_out = out[0] if isinstance(out, tuple) else out
        result = attn_out + delta.to(attn_out.dtype)
        return (result, *out[1:]) if isinstance(out, tuple) else result


def _relative(path: str | None, attention: str, field: str) -> str:
    if not path or not path.startswith(attention + "."):
        raise ConfigError(
            f"llama_adapter: arch.{field}={path!r} must lie inside the attention module "
            f"'{attention}' (e.g. '{attention}.{field}_proj'); LLaMA-Adapter needs a LLaMA-like "
            "attention that owns its q, k, v and output projections"
        )
    return path[len(attention) + 1 :]


def inject_llama_adapter(model: nn.Module, config: LlamaAdapterConfig, adapter_name: str) -> None:
    user = config.arch
    if config.target_modules is not None:
        user = dataclasses.replace(user, attention=config.target_modules)
    arch = resolve_arch(
        model, user, ("layers", "attention", "q", "k", "v", "attn_out"), "llama_adapter"
    )
    assert arch.attention is not None
    names = {
        "q": _relative(arch.q, arch.attention, "q"),
        "k": _relative(arch.k, arch.attention, "k"),
        "v": _relative(arch.v, arch.attention, "v"),
        "o": _relative(arch.attn_out, arch.attention, "attn_out"),
    }
    blocks = transformer_blocks(model, arch)
    if config.adapter_layers > len(blocks):
        raise ConfigError(
            f"adapter_layers={config.adapter_layers} is more than the model's {len(blocks)} "
            f"blocks; give 1 to {len(blocks)}"
        )
    cfg = getattr(model, "config", None)
    hidden = getattr(cfg, "hidden_size", None)
    heads = getattr(cfg, "num_attention_heads", None)
    if not isinstance(hidden, int) or not isinstance(heads, int):
        raise ConfigError(
            f"llama_adapter: {type(model).__name__} has no transformers config with hidden_size "
            "and num_attention_heads; it needs a LLaMA-like transformers model"
        )
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or hidden // heads
    for block_name, block in blocks[-config.adapter_layers :]:
        name, attention = block_submodule(block_name, block, arch.attention, "attention")
        if isinstance(attention, AdaptionPromptLayer):
            attention.add_adapter(adapter_name, config)
            continue
        layer = AdaptionPromptLayer(attention, names, hidden, heads, kv_heads, head_dim)
        inner = layer._attention()
        for field, rel in names.items():
            try:
                inner.get_submodule(rel)
            except AttributeError:
                raise ConfigError(
                    f"llama_adapter: '{name}' ({type(inner).__name__}) has no submodule "
                    f"'{rel}' ({field} projection); set arch.{'attn_out' if field == 'o' else field}"
                ) from None
        layer.add_adapter(adapter_name, config)
        set_submodule(model, name, layer)
    install_hook(backbone_of(model, arch)[1])


register(
    MethodSpec(
        name="llama_adapter",
        config_cls=LlamaAdapterConfig,
        inject=inject_llama_adapter,
        capabilities=Capabilities(peft_compatible=True, multi_adapter=True, disable=True),
        default_lr=9e-3,
        summary="Zero-gated adaption prompts (keys/values) in the top layers of LLaMA-like models",
        family="prompt",
    )
)

__all__ = ["AdaptionPromptLayer", "LlamaAdapterConfig", "inject_llama_adapter", "rotate_half"]

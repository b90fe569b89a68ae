r"""Input-level virtual tokens: the machinery shared by prompt tuning and P-Tuning (v1).

Both methods put ``n`` trainable vectors ``P = [p_1 .. p_n]`` (each of the model's hidden size)
in front of the embedded input, and nothing else changes::

    input_ids ──► embedding E ──► [e_1 .. e_L] ──┐
                                                 ├─► cat ──► [p_1..p_n, e_1..e_L] ──► model
    prompt tuning:  P  (a table, n x d) ─────────┤
    P-Tuning:       P = MLP(LSTM(U)) or MLP(U) ──┘          attention_mask: [1 ... 1, m_1..m_L]
                                                            labels:         [-100 .. -100, y]

Everything is plain ``nn.Module`` plumbing, no wrapper model:

- the input embedding module (``model.get_input_embeddings()``) is wrapped in a
  :class:`VirtualTokenLayer` that keeps its ``base_layer`` (so the word embedding keeps its
  name and any weight tying) and holds every adapter's prompt parameters;
- one forward pre-hook on the root model (``with_kwargs``) prepends the prompts to
  ``inputs_embeds`` on the first forward and extends ``attention_mask`` (ones),
  ``token_type_ids`` (zeros), ``position_ids`` (``0..n-1`` for the prompts, the given ones
  shifted by ``n``) and token-level ``labels`` (``-100``). On cached steps (``past_key_values``
  already holds the prompts) only the mask is extended and ``position_ids`` shifted;
- one forward hook drops the ``n`` prompt positions from 3-D ``logits``, so the logits line up
  with ``input_ids`` exactly as for the base model (``loss`` is computed by the model on the
  extended labels, as Hugging Face PEFT does). ``hidden_states``/``attentions`` returned on
  request keep the prompt positions at the front.

Several active adapters put their prompts one after another (in activation order). The hooks
are removed when the last adapter is deleted or the model is unloaded. Merging is not defined.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import nn

from deltatune.errors import ConfigError, DeltatuneError
from deltatune.layers import AdapterLayer, ModulesToSave
from deltatune.targeting import set_submodule


class PromptEncoder(nn.Module):
    r"""P-Tuning's prompt encoder: ``P = MLP(U)`` or ``P = MLP(BiLSTM(U))`` for a table ``U``.

    MLP: ``Linear(d, h) -> ReLU -> Linear(h, h) -> ReLU -> Linear(h, d)`` (3 layers whatever
    ``encoder_num_layers`` says, as in PEFT). LSTM: a bidirectional ``encoder_num_layers``-layer
    LSTM of hidden size ``h`` followed by ``Linear(2h, 2h) -> ReLU -> Linear(2h, d)``.
    Attribute names (``embedding``, ``lstm_head``, ``mlp_head``) are PEFT's.
    """

    def __init__(
        self, n: int, dim: int, hidden: int, kind: str, num_layers: int, dropout: float
    ) -> None:
        super().__init__()
        self.kind = kind
        self.embedding = nn.Embedding(n, dim)
        if kind == "LSTM":
            self.lstm_head = nn.LSTM(
                input_size=dim,
                hidden_size=hidden,
                num_layers=num_layers,
                dropout=dropout,
                bidirectional=True,
                batch_first=True,
            )
            self.mlp_head = nn.Sequential(
                nn.Linear(2 * hidden, 2 * hidden), nn.ReLU(), nn.Linear(2 * hidden, dim)
            )
        else:
            self.mlp_head = nn.Sequential(
                nn.Linear(dim, hidden),
                nn.ReLU(),
                nn.Linear(hidden, hidden),
                nn.ReLU(),
                nn.Linear(hidden, dim),
            )

    def forward(self) -> torch.Tensor:
        u = self.embedding.weight.unsqueeze(0)  # (1, n, d): the LSTM reads the tokens in order
        if self.kind == "LSTM":
            u = self.lstm_head(u)[0]
        out: torch.Tensor = self.mlp_head(u)[0]
        return out


class VirtualTokenLayer(AdapterLayer):
    """Wraps the input embedding; holds prompt tables (prompt tuning) and prompt encoders
    (P-Tuning) per adapter. Its own forward is the plain embedding; the root-model hooks
    installed by :func:`inject_virtual_tokens` add the prompts."""

    adapter_attributes = ("prompt_embeddings", "prompt_encoder")
    absolute_keys = True

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.prompt_embeddings = nn.ParameterDict()
        self.prompt_encoder = nn.ModuleDict()
        self.hook: VirtualTokenHook | None = None

    # The wrapped embedding still looks like one to transformers (weight tying, resizing).
    @property
    def weight(self) -> torch.Tensor:
        return self.base_weight_param

    @property
    def num_embeddings(self) -> int:
        return int(self.base_weight_param.shape[0])

    @property
    def embedding_dim(self) -> int:
        return int(self.base_weight_param.shape[1])

    def add_adapter(self, adapter_name: str, config: Any) -> None:
        raise DeltatuneError("use add_table / add_encoder")

    def add_table(self, adapter_name: str, table: torch.Tensor) -> None:
        self.prompt_embeddings[adapter_name] = nn.Parameter(table)

    def add_encoder(self, adapter_name: str, encoder: PromptEncoder) -> None:
        self.prompt_encoder[adapter_name] = encoder

    def num_virtual_tokens(self, names: list[str]) -> int:
        return sum(self._n(name) for name in names)

    def _n(self, name: str) -> int:
        if name in self.prompt_embeddings:
            return int(self.prompt_embeddings[name].shape[0])
        enc: PromptEncoder = self.prompt_encoder[name]  # type: ignore[assignment]
        return int(enc.embedding.weight.shape[0])

    def prompts(self, names: list[str]) -> torch.Tensor:
        """The active adapters' virtual tokens, ``(n_total, d)``, in activation order."""
        parts = [
            self.prompt_embeddings[n] if n in self.prompt_embeddings else self.prompt_encoder[n]()
            for n in names
        ]
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)

    def adapter_tensors(self, adapter_name: str) -> dict[str, torch.Tensor]:
        if adapter_name in self.prompt_embeddings:
            return {"prompt_embeddings": self.prompt_embeddings[adapter_name]}
        encoder = self.prompt_encoder[adapter_name]
        # PEFT's file holds the encoder's *output* (what inference uses); the encoder's own
        # weights go along under PEFT's in-memory names so training can resume exactly.
        with torch.no_grad():
            out: dict[str, torch.Tensor] = {"prompt_embeddings": encoder().detach().clone()}
        for key, param in encoder.named_parameters():
            out[f"prompt_encoder.{key}"] = param
        return out

    def delete_adapter(self, adapter_name: str) -> None:
        super().delete_adapter(adapter_name)
        if not self.adapter_names:
            self.remove_hook()

    def remove_hook(self) -> None:
        if self.hook is not None:
            self.hook.remove()
            self.hook = None

    def unloaded(self, merge: bool) -> nn.Module:
        self.remove_hook()
        return self.base_layer

    def active_names(self) -> list[str]:
        return self.adapters_to_run()

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.base_layer(*args, **kwargs)


def _cache_length(past: Any) -> int:
    if past is None:
        return 0
    if hasattr(past, "get_seq_length"):
        return int(past.get_seq_length())
    if isinstance(past, tuple | list) and past and past[0] is not None:
        return int(past[0][0].shape[-2])
    return 0


class VirtualTokenHook:
    """The root model's pre-hook and forward hook (a callable object, so ``copy.deepcopy`` of
    the model copies it along with a reference to the copied layer)."""

    def __init__(self, root: nn.Module, layer: VirtualTokenLayer) -> None:
        self.root = root
        self.layer = layer
        self.params = list(inspect.signature(root.forward).parameters)
        self.pending: tuple[int, int] | None = None
        self.pre_id = root.register_forward_pre_hook(self.pre, with_kwargs=True).id
        self.post_id = root.register_forward_hook(self.post).id

    def remove(self) -> None:
        for hooks in (
            self.root._forward_pre_hooks,
            self.root._forward_pre_hooks_with_kwargs,
        ):
            hooks.pop(self.pre_id, None)
        self.root._forward_hooks.pop(self.post_id, None)

    def pre(
        self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[tuple[Any, ...], dict[str, Any]] | None:
        self.pending = None
        names = self.layer.active_names()
        if not names:
            return None
        if self.layer.routing is not None:
            raise DeltatuneError(
                "per-example routing / Parallel is not supported for prompt tuning or P-Tuning "
                "adapters; activate one set of adapters for the whole batch"
            )
        kwargs = dict(kwargs)
        if args:
            # Move positional arguments to their names (input_ids is usually positional).
            for name, value in zip(self.params, args, strict=False):
                kwargs[name] = value
        n = self.layer.num_virtual_tokens(names)
        input_ids = kwargs.get("input_ids")
        embeds = kwargs.get("inputs_embeds")
        if input_ids is None and embeds is None:
            return None
        ref = embeds if embeds is not None else input_ids
        assert ref is not None
        batch, length = int(ref.shape[0]), int(ref.shape[1])
        past = _cache_length(kwargs.get("past_key_values"))
        mask = kwargs.get("attention_mask")
        if isinstance(mask, torch.Tensor) and mask.dim() != 2:
            raise ConfigError(
                f"attention_mask of shape {tuple(mask.shape)}: prompt tuning / P-Tuning need the "
                "2-D (batch, seq) padding mask; pass that instead of a prepared 4-D mask"
            )
        if past > 0:
            # Cached step: the cache already holds the virtual tokens (unless the mask says so).
            holds = mask is None or mask.shape[1] + n == past + length
            if holds:
                if mask is not None:
                    kwargs["attention_mask"] = torch.cat([mask.new_ones(batch, n), mask], dim=1)
                if kwargs.get("position_ids") is not None:
                    kwargs["position_ids"] = kwargs["position_ids"] + n
            return (), kwargs
        if embeds is None:
            embeds = self.layer(input_ids)
        kwargs["input_ids"] = None
        prompts = self.layer.prompts(names).to(dtype=embeds.dtype, device=embeds.device)
        kwargs["inputs_embeds"] = torch.cat([prompts.unsqueeze(0).expand(batch, -1, -1), embeds], 1)
        if mask is not None:
            kwargs["attention_mask"] = torch.cat([mask.new_ones(batch, n), mask], dim=1)
        token_types = kwargs.get("token_type_ids")
        if token_types is not None:
            kwargs["token_type_ids"] = torch.cat([token_types.new_zeros(batch, n), token_types], 1)
        positions = kwargs.get("position_ids")
        if positions is not None:
            front = torch.arange(n, device=positions.device, dtype=positions.dtype)
            front = front.expand(*positions.shape[:-1], n)
            kwargs["position_ids"] = torch.cat([front, positions + n], dim=-1)
        labels = kwargs.get("labels")
        if isinstance(labels, torch.Tensor) and labels.dim() == 2 and labels.shape[1] == length:
            kwargs["labels"] = torch.cat([labels.new_full((batch, n), -100), labels], dim=1)
        self.pending = (n, length)
        return (), kwargs

    def post(self, module: nn.Module, args: Any, output: Any) -> Any:
        pending, self.pending = self.pending, None
        if pending is None:
            return None
        n, length = pending
        logits = getattr(output, "logits", None)
        if isinstance(logits, torch.Tensor) and logits.dim() == 3 and logits.shape[1] == n + length:
            output.logits = logits[:, n:]
        elif (
            isinstance(output, torch.Tensor) and output.dim() == 3 and output.shape[1] == n + length
        ):
            return output[:, n:]
        return output


def embedding_layer(model: nn.Module) -> tuple[str, nn.Module]:
    """``(path, module)`` of the model's input embedding (``get_input_embeddings()``)."""
    getter = getattr(model, "get_input_embeddings", None)
    emb = getter() if callable(getter) else None
    if not isinstance(emb, nn.Module):
        raise ConfigError(
            f"{type(model).__name__} has no get_input_embeddings(); prompt tuning and P-Tuning "
            "need a transformers-style model whose input embedding they can extend"
        )
    for path, module in model.named_modules():
        if module is emb and path:
            return path, module
    raise ConfigError(f"the input embedding of {type(model).__name__} is not one of its submodules")


def check_model(model: nn.Module, token_dim: int | None, method: str) -> tuple[str, nn.Module, int]:
    """Find the embedding, check the model kind and ``token_dim``; returns (path, module, d)."""
    cfg = getattr(model, "config", None)
    if getattr(cfg, "is_encoder_decoder", False):
        raise ConfigError(
            f"{method}: encoder-decoder models ({type(model).__name__}) are not supported; use an "
            "encoder (BERT-like) or a decoder (GPT-2, LLaMA-like) model"
        )
    path, emb = embedding_layer(model)
    weight = emb.weight if isinstance(emb, VirtualTokenLayer) else getattr(emb, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise ConfigError(
            f"{method}: the input embedding '{path}' ({type(emb).__name__}) has no 2-D weight"
        )
    dim = int(weight.shape[1])
    if token_dim is not None and token_dim != dim:
        raise ConfigError(
            f"{method}: token_dim={token_dim} but the model's embeddings have size {dim}; "
            f"set token_dim: {dim} or leave it unset"
        )
    return path, emb, dim


def layer_for(model: nn.Module, path: str, emb: nn.Module) -> VirtualTokenLayer:
    """The model's :class:`VirtualTokenLayer`, created (with its root hooks) on first use."""
    if isinstance(emb, VirtualTokenLayer):
        return emb
    layer = VirtualTokenLayer(emb)
    set_submodule(model, path, layer)
    layer.hook = VirtualTokenHook(model, layer)
    return layer


class PromptModulesToSave(ModulesToSave):
    """A module trained whole (``modules_to_save``, e.g. the classifier of ``task_type:
    SEQ_CLS``) beside a prompt adapter, saved under PEFT's prompt-learning key.

    PEFT's prompt-learning models have no tuner wrapper, so the key is
    ``base_model.<path>.weight`` (not ``base_model.model.<path>.weight`` as for LoRA); other
    adapters that share the module keep the ``base_model.model.`` form.
    """

    absolute_keys = True

    def __init__(self, base_layer: nn.Module, path: str) -> None:
        super().__init__(base_layer)
        self.path = path
        self.prompt_adapters: set[str] = set()

    def delete_adapter(self, adapter_name: str) -> None:
        super().delete_adapter(adapter_name)
        self.prompt_adapters.discard(adapter_name)

    def adapter_tensors(self, adapter_name: str) -> dict[str, torch.Tensor]:
        prefix = "base_model." if adapter_name in self.prompt_adapters else "base_model.model."
        local = super().adapter_tensors(adapter_name)
        return {f"{prefix}{self.path}.{key}": value for key, value in local.items()}


def prepare_modules_to_save(model: nn.Module, config: Any, adapter_name: str) -> None:
    """Pre-wrap the config's ``modules_to_save`` so that :func:`deltatune.inject` adds the
    adapter's copy to a :class:`PromptModulesToSave` (PEFT's prompt-learning key names)."""
    from deltatune.model import modules_to_save_of

    patterns = modules_to_save_of(config)
    if not patterns:
        return
    for name, module in list(model.named_modules()):
        if not name or not any(name == p or name.endswith("." + p) for p in patterns):
            continue
        if isinstance(module, PromptModulesToSave):
            module.prompt_adapters.add(adapter_name)
        elif not isinstance(module, AdapterLayer) and not any(
            isinstance(model.get_submodule(".".join(name.split(".")[:i])), AdapterLayer)
            for i in range(1, name.count(".") + 1)
        ):
            wrapper = PromptModulesToSave(module, name)
            wrapper.prompt_adapters.add(adapter_name)
            set_submodule(model, name, wrapper)


def param_dtype_device(emb: nn.Module) -> tuple[torch.dtype, torch.device]:
    weight = emb.weight
    assert isinstance(weight, torch.Tensor)
    # Prompts train in float32 even on a half-precision base (cast to the embedding's dtype in
    # the forward), as PEFT does.
    return torch.float32, weight.device


__all__ = [
    "PromptEncoder",
    "PromptModulesToSave",
    "VirtualTokenHook",
    "VirtualTokenLayer",
    "check_model",
    "embedding_layer",
    "layer_for",
    "prepare_modules_to_save",
]

r"""Prompt tuning (Lester et al., 2021, "The Power of Scale for Parameter-Efficient Prompt
Tuning"): ``n`` trainable virtual-token embeddings ``P ∈ R^{n x d}`` prepended to the embedded
input; the model is frozen.

::

    input_ids ──► E ──► [e_1 .. e_L]
                                  └─► [p_1 .. p_n, e_1 .. e_L] ──► frozen model ──► y
    P (n x d, trainable) ─────────┘

    h_0 = [P ; E(x)],   attention_mask = [1_n ; m],   labels = [-100_n ; y]

Initialisation (``prompt_tuning_init``, PEFT's names): ``RANDOM`` draws ``P`` from N(0, 1)
(``nn.Embedding``'s default); ``TEXT`` copies the word embeddings of
``prompt_tuning_init_text`` tokenised with ``tokenizer_name_or_path`` (repeated or cut to
``n`` tokens); ``SAMPLE_VOCAB`` copies the embeddings of ``n`` random vocabulary ids.

Saved exactly as Hugging Face PEFT saves it: ``peft_type`` ``PROMPT_TUNING`` and one tensor,
``prompt_embeddings`` ``(n, d)``, at the top level of ``adapter_model.safetensors``. Works on
BERT-like encoders (classification) and GPT-2 / LLaMA-like decoders (training and cached
generation); see :mod:`deltatune.virtual_tokens` for masks, positions and labels. Not
mergeable; several named adapters, ``disable``/``enable`` and ``unload`` work.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar, Literal

import torch
from torch import nn

from deltatune.errors import ConfigError
from deltatune.registry import Capabilities, MethodConfig, MethodSpec, register
from deltatune.virtual_tokens import (
    check_model,
    layer_for,
    param_dtype_device,
    prepare_modules_to_save,
)


@dataclasses.dataclass
class PromptTuningConfig(MethodConfig):
    """Prompt tuning settings; field names and meanings are Hugging Face PEFT's.

    - ``num_virtual_tokens`` (20): ``n``, the number of virtual tokens.
    - ``prompt_tuning_init`` (``RANDOM``): ``RANDOM``, ``TEXT`` or ``SAMPLE_VOCAB``.
    - ``prompt_tuning_init_text`` (None): the text for ``TEXT``.
    - ``tokenizer_name_or_path`` (None): the tokenizer for ``TEXT``: a local folder, a hub id,
      or ``embedded-minilm`` / ``embedded-smollm2`` (the embedded models' tokenizers).
    - ``tokenizer_kwargs`` (None): extra ``AutoTokenizer.from_pretrained`` arguments for
      ``TEXT`` (``trust_remote_code`` is always dropped).
    - ``token_dim``, ``num_transformer_submodules``, ``num_attention_heads``, ``num_layers``
      (None): PEFT's model facts; ``token_dim`` is checked against the embedding size when set,
      the others are carried along.
    - ``modules_to_save`` (None), ``task_type``, ``base_model_name_or_path``: as in every
      method (``task_type: SEQ_CLS`` also trains and saves ``classifier``/``score``).
    """

    method_name: ClassVar[str] = "prompt_tuning"
    peft_type: ClassVar[str] = "PROMPT_TUNING"

    num_virtual_tokens: int = 20
    prompt_tuning_init: Literal["RANDOM", "TEXT", "SAMPLE_VOCAB"] = "RANDOM"
    prompt_tuning_init_text: str | None = None
    tokenizer_name_or_path: str | None = None
    tokenizer_kwargs: dict[str, Any] | None = None
    token_dim: int | None = None
    num_transformer_submodules: int | None = None
    num_attention_heads: int | None = None
    num_layers: int | None = None
    modules_to_save: list[str] | None = None

    def validate(self) -> None:
        if self.num_virtual_tokens < 1:
            raise ConfigError(
                f"num_virtual_tokens={self.num_virtual_tokens} must be a positive integer (try 20)"
            )
        if self.prompt_tuning_init == "TEXT":
            if not self.tokenizer_name_or_path:
                raise ConfigError(
                    "prompt_tuning_init=TEXT needs tokenizer_name_or_path (the base model's "
                    "tokenizer folder or hub id)"
                )
            if not self.prompt_tuning_init_text:
                raise ConfigError(
                    "prompt_tuning_init=TEXT needs prompt_tuning_init_text (e.g. 'Classify the "
                    "topic of this article:')"
                )
        elif self.tokenizer_kwargs:
            raise ConfigError(
                f"tokenizer_kwargs is only used with prompt_tuning_init=TEXT, not "
                f"{self.prompt_tuning_init}; remove it"
            )
        if self.num_transformer_submodules not in (None, 1):
            raise ConfigError(
                f"num_transformer_submodules={self.num_transformer_submodules}: only 1 (encoder-"
                "only or decoder-only models) is supported; remove the field"
            )


def init_text_ids(config: PromptTuningConfig, n: int) -> list[int]:
    """Token ids of the init text, repeated or cut to ``n`` (PEFT's rule)."""
    from transformers import AutoTokenizer

    from deltatune.models import resolve_model_path

    kwargs = dict(config.tokenizer_kwargs or {})
    kwargs.pop("trust_remote_code", None)  # loading an adapter never runs code
    try:
        # ``embedded-minilm`` / ``embedded-smollm2`` name the embedded models' tokenizers.
        path, local_only = resolve_model_path(str(config.tokenizer_name_or_path))
        if local_only:
            kwargs.setdefault("local_files_only", True)
        tokenizer = AutoTokenizer.from_pretrained(path, **kwargs)
    except (OSError, ValueError, ConfigError) as exc:
        raise ConfigError(
            f"tokenizer_name_or_path={config.tokenizer_name_or_path!r} cannot be loaded ({exc}); "
            "give the base model's tokenizer folder"
        ) from None
    ids = list(tokenizer(config.prompt_tuning_init_text)["input_ids"])
    if not ids:
        raise ConfigError("prompt_tuning_init_text tokenises to no token; give a longer text")
    if len(ids) < n:
        ids = ids * math.ceil(n / len(ids))
    return ids[:n]


def initial_table(emb: nn.Module, config: PromptTuningConfig, dim: int) -> torch.Tensor:
    n = config.num_virtual_tokens
    dtype, device = param_dtype_device(emb)
    if config.prompt_tuning_init == "RANDOM":
        return torch.randn(n, dim, device=device, dtype=dtype)
    weight = emb.weight
    assert isinstance(weight, torch.Tensor)
    vocab = int(weight.shape[0])
    if config.prompt_tuning_init == "SAMPLE_VOCAB":
        ids = torch.randint(0, vocab, (n,), device=device)
    else:
        ids = torch.tensor(init_text_ids(config, n), device=device)
        if int(ids.max()) >= vocab:
            raise ConfigError(
                f"tokenizer_name_or_path={config.tokenizer_name_or_path!r} gives token id "
                f"{int(ids.max())} but the model's vocabulary has {vocab} entries; use the base "
                "model's own tokenizer"
            )
    with torch.no_grad():
        return weight[ids].detach().to(dtype).clone()


def inject_prompt_tuning(model: nn.Module, config: PromptTuningConfig, adapter_name: str) -> None:
    path, emb, dim = check_model(model, config.token_dim, "prompt_tuning")
    table = initial_table(emb, config, dim)
    prepare_modules_to_save(model, config, adapter_name)
    layer_for(model, path, emb).add_table(adapter_name, table)


register(
    MethodSpec(
        name="prompt_tuning",
        config_cls=PromptTuningConfig,
        inject=inject_prompt_tuning,
        capabilities=Capabilities(peft_compatible=True, multi_adapter=True, disable=True),
        default_lr=3e-2,
        summary="Prompt tuning: trainable virtual-token embeddings prepended to the input",
        family="prompt",
    )
)

__all__ = ["PromptTuningConfig", "inject_prompt_tuning"]

"""Load a decoder and its tokenizer: the embedded SmolLM2, a local folder, or a hub id."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from torch import nn

from deltatune.errors import ConfigError, DeltatuneError
from deltatune.models import EMBEDDED_DECODER, EMBEDDED_ENCODER, ModelConfig, resolve_model_path

#: Class-name endings of transformers models with a next-token head.
_CAUSAL_SUFFIXES = ("ForCausalLM", "LMHeadModel")


def _not_causal(name: str, arch: str) -> ConfigError:
    return ConfigError(
        f"model.name_or_path: '{name}' is a {arch}, not a causal language model; use "
        f"'{EMBEDDED_DECODER}' or a folder/hub id of a *ForCausalLM decoder, or "
        "model.task=sequence-classification"
    )


def check_causal_lm(cfg: ModelConfig, path: str, local_only: bool) -> None:
    """Refuse encoders (MiniLM, BERT) before loading them as a half-random decoder.

    transformers would happily build ``BertLMHeadModel`` from a BERT folder with a new,
    random LM head; this reads ``config.json``'s ``architectures`` instead.
    """
    if cfg.name_or_path == EMBEDDED_ENCODER:
        raise _not_causal(cfg.name_or_path, "BertModel (the embedded encoder)")
    if not local_only:
        return  # a hub id: its config is checked after download by transformers itself
    config = json.loads((Path(path) / "config.json").read_text(encoding="utf-8"))
    archs = config.get("architectures") or []
    if archs and not any(a.endswith(_CAUSAL_SUFFIXES) for a in archs):
        raise _not_causal(cfg.name_or_path, ", ".join(archs))
    if config.get("is_encoder_decoder"):
        raise _not_causal(cfg.name_or_path, "encoder-decoder model")


def load_causal_lm(model: ModelConfig | str) -> tuple[nn.Module, Any]:
    """``(model, tokenizer)`` for a decoder, ready to train or generate.

    ``model`` is a :class:`~deltatune.models.ModelConfig` or a name: ``"embedded-smollm2"``
    (converted once from the embedded GGUF, see :mod:`deltatune.lm.smollm2`), a local folder or
    a hub id. The tokenizer gets a pad token (its EOS) when it has none, and the model's
    ``config.pad_token_id`` follows it. The model is returned in eval mode.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    cfg = ModelConfig(name_or_path=model, task="causal-lm") if isinstance(model, str) else model
    path, local_only = resolve_model_path(cfg.name_or_path)
    check_causal_lm(cfg, path, local_only)
    verbosity = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            path, local_files_only=local_only, trust_remote_code=cfg.trust_remote_code
        )
        lm = AutoModelForCausalLM.from_pretrained(
            path,
            local_files_only=local_only,
            trust_remote_code=cfg.trust_remote_code,
            dtype=getattr(torch, cfg.dtype),
        )
    except OSError as exc:
        raise DeltatuneError(f"cannot load model '{cfg.name_or_path}': {exc}") from None
    except ValueError as exc:
        if "Unrecognized configuration class" in str(exc):
            raise _not_causal(cfg.name_or_path, "model without a causal-LM class") from None
        raise
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise DeltatuneError(
                f"the tokenizer of '{cfg.name_or_path}' has neither a pad nor an EOS token; "
                "set tokenizer.pad_token before training"
            )
        tokenizer.pad_token = tokenizer.eos_token
    lm.config.pad_token_id = tokenizer.pad_token_id
    if getattr(lm, "generation_config", None) is not None:
        lm.generation_config.pad_token_id = tokenizer.pad_token_id
    from deltatune.models import quantize_base

    quantize_base(lm, cfg)  # model.quantize: nf4 / int8 (QLoRA's base)
    return lm.eval(), tokenizer

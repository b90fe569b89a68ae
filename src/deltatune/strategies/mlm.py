r"""Masked-language modelling (MLM) on unlabelled in-domain text, for encoders.

BERT's objective (Devlin et al., 2019): pick each ordinary token with probability ``p``
(``mlm_probability``); of the picked ones 80% become ``[MASK]``, 10% a random token, 10% stay;
the loss is the cross-entropy of the original token at the picked positions only:

    L = - (1 / |M|) * sum_{i in M} log softmax(W_e h_i + b)[x_i]

where ``h_i`` is the head's transform (dense, GELU, LayerNorm) of the encoder's output and
``W_e`` is the input word-embedding matrix (the prediction head is *tied* to it)::

    input ids ─► encoder ─► h ─► dense ─► gelu ─► LayerNorm ─► · W_eᵀ + b ─► vocab logits
       │                                                       ▲
       └──────── word embeddings W_e ──────────────────────────┘ (same tensor)

Embedding checkpoints such as the embedded MiniLM ship without an MLM head:
:func:`with_mlm_head` builds the model's ``*ForMaskedLM`` class from the same config and puts
the *given* encoder module inside it (no copy), so training the MLM model trains the encoder
in place, adapters and all; the head's transform is new (random) and trains with it. Masking
is transformers' ``DataCollatorForLanguageModeling`` (special tokens and padding are never
picked); its draws come from the global torch RNG, which :func:`deltatune.train.fit` seeds
and checkpoints.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from deltatune.errors import ConfigError, DeltatuneError
from deltatune.train.trainer import model_device, move_to_device


def encoder_of(model: nn.Module) -> nn.Module:
    """The bare encoder (e.g. ``BertModel``) of a transformers encoder model or head model."""
    base = getattr(model, "base_model", None)
    if not isinstance(base, nn.Module):
        raise ConfigError(
            f"{type(model).__name__} is not a transformers model (no .base_model); MLM needs an "
            "encoder such as BertModel"
        )
    return base


def with_mlm_head(encoder: nn.Module) -> nn.Module:
    """A ``*ForMaskedLM`` model around ``encoder`` (shared, not copied) with a tied new head.

    ``encoder`` is a bare transformers encoder or a model holding one (its ``base_model``).
    The returned model's head decoder weight *is* the encoder's word-embedding matrix; the
    head's other parameters are new, trainable, and not part of the encoder.
    """
    from transformers import AutoModelForMaskedLM

    base = encoder_of(encoder)
    config = getattr(base, "config", None)
    if config is None:
        raise ConfigError(f"{type(base).__name__} has no .config; give a transformers encoder")
    try:
        mlm = AutoModelForMaskedLM.from_config(config)
    except ValueError as exc:
        raise ConfigError(
            f"model type '{getattr(config, 'model_type', '?')}' has no masked-LM class in "
            f"transformers ({exc}); MLM needs an encoder such as BERT or RoBERTa"
        ) from None
    prefix = mlm.base_model_prefix
    setattr(mlm, prefix, base)
    out_emb = mlm.get_output_embeddings()
    in_emb = base.get_input_embeddings()  # type: ignore[operator]
    if out_emb is None or in_emb is None:
        raise ConfigError(f"{type(mlm).__name__} has no output embeddings to tie")
    out_emb.weight = in_emb.weight  # tie: the decoder is the embedding matrix itself
    mlm.to(device=in_emb.weight.device)
    mlm.train(base.training)
    return mlm


def head_parameters(mlm: nn.Module) -> list[nn.Parameter]:
    """The parameters of ``mlm`` that are not its encoder's (the new head, minus the tie)."""
    inside = {id(p) for p in encoder_of(mlm).parameters()}
    return [p for p in mlm.parameters() if id(p) not in inside]


class MLMDataset(Dataset[dict[str, list[int]]]):
    """Texts tokenised once (truncated to ``max_length``, special tokens added, not padded)."""

    def __init__(self, texts: list[str], tokenizer: Any, max_length: int) -> None:
        if max_length < 4:
            raise ConfigError(f"objective.max_length: value {max_length!r} must be >= 4")
        for i, t in enumerate(texts):
            if not isinstance(t, str) or not t.strip():
                raise DeltatuneError(f"corpus text {i} is empty; remove it or add text")
        enc = tokenizer(list(texts), truncation=True, max_length=max_length)
        self.features = {k: list(v) for k, v in enc.items() if k != "labels"}

    def __len__(self) -> int:
        return len(self.features["input_ids"])

    def __getitem__(self, index: int) -> dict[str, list[int]]:
        return {k: v[index] for k, v in self.features.items()}


def mlm_collator(tokenizer: Any, mlm_probability: float, seed: int | None = None) -> Any:
    """transformers' BERT masking collator (80% [MASK], 10% random, 10% kept)."""
    from transformers import DataCollatorForLanguageModeling

    if not 0.0 < mlm_probability < 1.0:
        raise ConfigError(
            f"objective.mlm_probability: value {mlm_probability!r} must be in (0, 1), e.g. 0.15"
        )
    if getattr(tokenizer, "mask_token", None) is None:
        raise ConfigError(
            f"tokenizer {type(tokenizer).__name__} has no mask token; MLM needs one "
            "(use objective.name=simcse or causal-lm)"
        )
    return DataCollatorForLanguageModeling(
        tokenizer, mlm=True, mlm_probability=mlm_probability, seed=seed
    )


class MLMTask:
    """:func:`deltatune.train.fit` task: the masked-LM loss; evaluation gives ``loss`` and
    ``perplexity`` (``exp`` of the mean loss per masked token) over a loader."""

    metric_names = ("loss", "perplexity")

    def loss(self, model: nn.Module, batch: Mapping[str, Any]) -> torch.Tensor:
        if "labels" not in batch:
            raise DeltatuneError("an MLM batch needs 'labels' (use mlm_collator)")
        return model(**batch).loss

    def evaluate(self, model: nn.Module, loader: Iterable[Any]) -> dict[str, float]:
        device = model_device(model)
        total, count = 0.0, 0
        with torch.no_grad():
            for raw in loader:
                batch = move_to_device(raw, device)
                n = int((batch["labels"] != -100).sum())
                if n == 0:
                    continue
                total += float(model(**batch).loss) * n
                count += n
        if count == 0:
            raise DeltatuneError("the MLM evaluation set has no masked token; give longer texts")
        loss = total / count
        return {"loss": loss, "perplexity": math.exp(min(loss, 50.0))}

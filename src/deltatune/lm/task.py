"""The causal-LM task for the trainer: next-token cross-entropy on the answer tokens.

For a batch with token ids ``x`` and labels ``y`` (``y_t = x_t`` on answer tokens, -100
elsewhere) the model's logits at position ``t`` predict token ``t + 1``, so::

    loss = - (1 / N) * sum_{b, t : y[b, t+1] != -100} log softmax(logits[b, t])[y[b, t+1]]

with ``N`` the number of answer tokens in the batch (a token-level mean, as transformers'
``ForCausalLMLoss`` computes it). Evaluation sums the same negative log-likelihood over every
answer token of the set and reports ``loss`` (the per-token mean), ``perplexity`` =
``exp(loss)`` and ``token_accuracy`` (how often the arg-max next token is the answer's).
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Iterable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from deltatune.errors import DeltatuneError
from deltatune.lm.instructions import IGNORE_INDEX


def _takes_use_cache(model: nn.Module) -> bool:
    try:
        return "use_cache" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def _shifted(model: nn.Module, batch: Mapping[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits predicting each next token, the next-token labels), both flattened."""
    if "labels" not in batch:
        raise DeltatuneError(
            f"the batch has no 'labels' (keys: {', '.join(batch)}); CausalLMTask needs "
            "answer labels (-100 on prompt and padding), e.g. from InstructionDataset"
        )
    from deltatune.train.trainer import output_logits  # lazily: it imports scikit-learn

    inputs = {k: v for k, v in batch.items() if k != "labels"}
    if _takes_use_cache(model):
        # No key/value cache in training: it costs memory, and with one transformers skips
        # the packed-sequence (block-diagonal) mask that packed batches rely on.
        inputs["use_cache"] = False
    logits = output_logits(model(**inputs))
    labels = batch["labels"]
    # Methods that prepend virtual tokens (prompt tuning) return longer logits; the labelled
    # positions are the last ones.
    logits = logits[:, -labels.shape[1] :]
    return (
        logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
        labels[:, 1:].reshape(-1),
    )


class CausalLMTask:
    """Supervised fine-tuning of a decoder: see the module docstring for the loss."""

    metric_names = ("loss", "perplexity", "token_accuracy")

    def loss(self, model: nn.Module, batch: Mapping[str, Any]) -> torch.Tensor:
        """Mean next-token cross-entropy over the batch's answer tokens (fp32)."""
        logits, labels = _shifted(model, batch)
        if not bool((labels != IGNORE_INDEX).any()):
            # A batch whose answers were all truncated away: no signal, but keep the graph.
            return logits.sum() * 0.0
        return F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX)

    def evaluate(self, model: nn.Module, loader: Iterable[Any]) -> dict[str, float]:
        """``loss`` (per answer token), ``perplexity`` and ``token_accuracy`` over the loader."""
        from deltatune.train.trainer import model_device, move_to_device

        device = model_device(model)
        was_training = model.training
        model.eval()
        total_nll = 0.0
        tokens = 0
        correct = 0
        try:
            with torch.no_grad():
                for raw in loader:
                    batch = move_to_device(raw, device)
                    logits, labels = _shifted(model, batch)
                    keep = labels != IGNORE_INDEX
                    total_nll += float(
                        F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX, reduction="sum")
                    )
                    tokens += int(keep.sum())
                    correct += int((logits.argmax(-1)[keep] == labels[keep]).sum())
        finally:
            model.train(was_training)
        if tokens == 0:
            raise DeltatuneError("the evaluation set has no answer tokens; give it examples")
        loss = total_nll / tokens
        return {
            "loss": loss,
            "perplexity": math.exp(min(loss, 700.0)),
            "token_accuracy": correct / tokens,
            "tokens": float(tokens),
        }

r"""Token classification (sequence labelling, e.g. named entities or part-of-speech tags).

The model (e.g. ``BertForTokenClassification``) gives one row of logits per token,
``(batch, length, num_labels)``; ``labels`` is ``(batch, length)`` with ``-100`` on tokens that
carry no label (padding, special tokens, a word's later sub-word pieces). Over the labelled
set ``T = {(b, t) : y_bt != -100}``::

    loss     = (1 / |T|) Σ_{(b,t) ∈ T} -log softmax(z_bt)[y_bt]
    accuracy = (1 / |T|) Σ_{(b,t) ∈ T} [argmax z_bt = y_bt]

:func:`align_word_labels` turns word-level labels into such token labels from a fast
tokenizer's ``word_ids()``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from deltatune.errors import DeltatuneError
from deltatune.train.trainer import model_device, move_to_device, output_logits

IGNORE_INDEX = -100


def align_word_labels(
    word_ids: Sequence[int | None], word_labels: Sequence[int], *, label_all_pieces: bool = False
) -> list[int]:
    """Token labels from word labels: a word's first piece gets its label, its other pieces
    (unless ``label_all_pieces``) and special tokens (``word_id`` None) get ``-100``."""
    out: list[int] = []
    previous: int | None = None
    for wid in word_ids:
        if wid is None:
            out.append(IGNORE_INDEX)
        elif wid >= len(word_labels) or wid < 0:
            raise DeltatuneError(
                f"word id {wid} has no label (the example has {len(word_labels)} word labels)"
            )
        elif wid != previous or label_all_pieces:
            out.append(int(word_labels[wid]))
        else:
            out.append(IGNORE_INDEX)
        previous = wid
    return out


class TokenClassificationTask:
    """The trainer's Task for sequence labelling: cross-entropy and accuracy over the tokens
    whose label is not ``-100``.

    The model is called with every batch entry except ``labels`` and returns logits
    ``(batch, length, num_labels)`` (or an object with ``.logits``).
    """

    metric_names = ("loss", "accuracy")

    def __init__(self, num_labels: int | None = None) -> None:
        self.num_labels = num_labels

    def _logits_labels(
        self, model: nn.Module, batch: Mapping[str, Any]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if "labels" not in batch:
            raise DeltatuneError(
                f"the batch has no 'labels' (keys: {', '.join(batch)}); TokenClassificationTask "
                "needs per-token integer labels (-100 for unlabelled tokens)"
            )
        labels = batch["labels"]
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        logits = output_logits(model(**inputs)).float()
        if logits.dim() != 3 or logits.shape[:2] != labels.shape:
            raise DeltatuneError(
                f"token classification needs logits (batch, length, labels) matching labels "
                f"{tuple(labels.shape)}; the model gave {tuple(logits.shape)} (use a "
                "...ForTokenClassification model)"
            )
        if self.num_labels is not None and logits.shape[-1] != self.num_labels:
            raise DeltatuneError(
                f"the model has {logits.shape[-1]} labels, the task num_labels={self.num_labels}"
            )
        return logits, labels

    def loss(self, model: nn.Module, batch: Mapping[str, Any]) -> torch.Tensor:
        """Mean cross-entropy over the labelled tokens (0 with a gradient if there are none)."""
        logits, labels = self._logits_labels(model, batch)
        if not (labels != IGNORE_INDEX).any():
            return logits.sum() * 0.0
        return F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX)

    def evaluate(self, model: nn.Module, loader: Iterable[Any]) -> dict[str, float]:
        """``loss`` and ``accuracy`` over every labelled token of the loader."""
        device = model_device(model)
        was_training = model.training
        model.eval()
        total_loss = 0.0
        correct = 0
        count = 0
        try:
            with torch.no_grad():
                for raw in loader:
                    batch = move_to_device(raw, device)
                    logits, labels = self._logits_labels(model, batch)
                    keep = labels != IGNORE_INDEX
                    total_loss += float(
                        F.cross_entropy(logits[keep], labels[keep], reduction="sum")
                    )
                    correct += int((logits[keep].argmax(-1) == labels[keep]).sum())
                    count += int(keep.sum())
        finally:
            model.train(was_training)
        if count == 0:
            raise DeltatuneError(
                "the evaluation set has no labelled token (every label is -100); give labels"
            )
        return {"loss": total_loss / count, "accuracy": correct / count}


__all__ = ["IGNORE_INDEX", "TokenClassificationTask", "align_word_labels"]

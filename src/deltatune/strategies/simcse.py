r"""Unsupervised SimCSE: contrastive sentence embeddings from two dropout views.

Gao, Yao and Chen (2021). Each sentence of a batch goes through the encoder twice in training
mode; the two dropout masks make two different embeddings ``z_i`` and ``z_i'`` of the same
sentence, which are the positive pair, while the other sentences of the batch are negatives:

    l_i = - log( exp(sim(z_i, z_i') / tau) / sum_{j=1..N} exp(sim(z_i, z_j') / tau) )
    L   = (1 / N) * sum_i l_i,          sim(a, b) = a·b / (|a| |b|)

i.e. a cross-entropy over the ``N x N`` cosine-similarity matrix scaled by ``1 / tau`` whose
targets are its diagonal::

    batch ──► encoder (dropout A) ──► pool ──► z  ─┐
          └─► encoder (dropout B) ──► pool ──► z' ─┴─► cos(z_i, z'_j) / tau ──► CE(diagonal)

Pooling is the attention-masked mean of the last hidden states (what sentence-transformers
models such as the embedded MiniLM use) or the ``[CLS]`` vector. The encoder needs dropout
(MiniLM has 0.1); with none the two views are equal and the task is trivial.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from deltatune.errors import ConfigError, DeltatuneError
from deltatune.train.trainer import model_device, move_to_device

Pooling = Literal["mean", "cls"]


def pool(hidden: torch.Tensor, attention_mask: torch.Tensor, pooling: Pooling) -> torch.Tensor:
    """Sentence vectors ``(batch, hidden)`` from last hidden states ``(batch, seq, hidden)``."""
    if pooling == "cls":
        return hidden[:, 0]
    if pooling != "mean":
        raise ConfigError(f"objective.pooling: value {pooling!r} is not one of 'mean', 'cls'")
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)


def simcse_loss(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> torch.Tensor:
    """The SimCSE loss of two views ``(N, d)``: cross-entropy of cos-sim / tau vs the diagonal."""
    if z1.shape != z2.shape or z1.dim() != 2:
        raise ValueError(f"two (N, d) views needed, got {tuple(z1.shape)} and {tuple(z2.shape)}")
    sim = F.cosine_similarity(z1.unsqueeze(1), z2.unsqueeze(0), dim=-1) / temperature
    return F.cross_entropy(sim.float(), torch.arange(len(z1), device=z1.device))


def embed(model: nn.Module, batch: Mapping[str, Any], pooling: Pooling) -> torch.Tensor:
    """Pooled sentence embeddings of a bare encoder (or a model whose output has hidden states)."""
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    out = model(**inputs)
    hidden = getattr(out, "last_hidden_state", None)
    if hidden is None:
        raise DeltatuneError(
            f"{type(model).__name__} returned no last_hidden_state; SimCSE needs a bare encoder "
            "(transformers.AutoModel)"
        )
    return pool(hidden, inputs["attention_mask"], pooling)


class SimCSETask:
    """:func:`deltatune.train.fit` task for unsupervised SimCSE on batches of unlabelled texts.

    ``evaluate`` reports the same loss on held-out texts with dropout on (the objective itself;
    with dropout off it would be trivial), under a fixed seed so that "before" and "after"
    see the same masks, plus ``top1``: the share of sentences whose own second view is their
    nearest neighbour among the batch's.
    """

    metric_names = ("loss", "top1")

    def __init__(self, temperature: float = 0.05, pooling: Pooling = "mean") -> None:
        if not temperature > 0:
            raise ConfigError(
                f"objective.temperature: value {temperature!r} must be > 0 (e.g. 0.05)"
            )
        self.temperature = temperature
        self.pooling = pooling

    def loss(self, model: nn.Module, batch: Mapping[str, Any]) -> torch.Tensor:
        if len(batch["input_ids"]) < 2:
            raise DeltatuneError("SimCSE needs at least 2 texts per batch (the negatives)")
        z1 = embed(model, batch, self.pooling)
        z2 = embed(model, batch, self.pooling)
        return simcse_loss(z1, z2, self.temperature)

    def evaluate(self, model: nn.Module, loader: Iterable[Any]) -> dict[str, float]:
        device = model_device(model)
        was = model.training
        total, hits, count = 0.0, 0, 0
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(0)
            model.train()  # dropout on: the two views must differ
            try:
                with torch.no_grad():
                    for raw in loader:
                        batch = move_to_device(raw, device)
                        n = len(batch["input_ids"])
                        if n < 2:
                            continue
                        z1 = embed(model, batch, self.pooling)
                        z2 = embed(model, batch, self.pooling)
                        total += float(simcse_loss(z1, z2, self.temperature)) * n
                        sim = F.cosine_similarity(z1.unsqueeze(1), z2.unsqueeze(0), dim=-1)
                        hits += int((sim.argmax(1) == torch.arange(n, device=sim.device)).sum())
                        count += n
            finally:
                model.train(was)
        if count == 0:
            raise DeltatuneError("the SimCSE evaluation set needs batches of at least 2 texts")
        return {"loss": total / count, "top1": hits / count}

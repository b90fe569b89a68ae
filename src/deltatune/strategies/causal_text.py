r"""Causal-LM training on raw text documents, packed into fixed-length blocks.

Each document is tokenised without special tokens and followed by the end-of-text token; the
documents are concatenated into one stream and cut into blocks of ``block_size`` tokens, so no
compute is spent on padding and the model learns where a document ends::

    doc 1 tokens  <eos>  doc 2 tokens ...  <eos>  doc 3 ...
    |──────── block 0 ────────|──────── block 1 ────────|── last (shorter) ──|

The loss is the next-token cross-entropy over every position of the block:

    L = - (1 / (T - 1)) * sum_{t=1..T-1} log p(x_{t+1} | x_{1..t})

(the labels are the inputs shifted by one). A block may start in the middle of a
document; attention crosses document boundaries inside a block, as in GPT-style pretraining.
The last, shorter block is kept (padded in its batch, padding ignored by the loss) unless
``drop_last`` is set.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.data import Dataset

from deltatune.errors import ConfigError, DeltatuneError


def pack_texts(
    texts: list[str], tokenizer: Any, block_size: int, *, drop_last: bool = False
) -> list[list[int]]:
    """Token blocks of ``block_size`` from the documents, each followed by the EOS token."""
    if block_size < 2:
        raise ConfigError(f"objective.block_size: value {block_size!r} must be >= 2")
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None:
        raise ConfigError(
            f"tokenizer {type(tokenizer).__name__} has no end-of-text token (eos_token); set "
            "tokenizer.eos_token before packing"
        )
    stream: list[int] = []
    for i, text in enumerate(texts):
        if not isinstance(text, str) or not text.strip():
            raise DeltatuneError(f"corpus text {i} is empty; remove it or add text")
        stream.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
        stream.append(int(eos))
    blocks = [stream[i : i + block_size] for i in range(0, len(stream), block_size)]
    if blocks and (drop_last or len(blocks[-1]) < 2) and len(blocks[-1]) < block_size:
        blocks.pop()
    if not blocks:
        raise DeltatuneError(
            f"the corpus has {len(stream)} tokens, fewer than one block of {block_size}; "
            "lower objective.block_size or add text"
        )
    return blocks


class PackedDataset(Dataset[dict[str, list[int]]]):
    """Items ``{"input_ids": block}``; :class:`PackedCollator` adds the mask and labels."""

    def __init__(self, blocks: list[list[int]]) -> None:
        self.blocks = blocks

    def __len__(self) -> int:
        return len(self.blocks)

    def __getitem__(self, index: int) -> dict[str, list[int]]:
        return {"input_ids": self.blocks[index]}


class PackedCollator:
    """Stack blocks (right-padding a shorter last one); labels = input ids, -100 on padding."""

    def __init__(self, pad_token_id: int) -> None:
        self.pad_token_id = pad_token_id

    def __call__(self, features: list[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
        width = max(len(f["input_ids"]) for f in features)
        ids = torch.full((len(features), width), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(features), width), dtype=torch.long)
        for row, f in enumerate(features):
            n = len(f["input_ids"])
            ids[row, :n] = torch.tensor(f["input_ids"], dtype=torch.long)
            mask[row, :n] = 1
        labels = ids.masked_fill(mask == 0, -100)
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def causal_lm_task() -> Any:
    """The trainer task for packed blocks: :class:`deltatune.lm.task.CausalLMTask` (mean
    next-token cross-entropy over the labelled positions; ``loss``, ``perplexity`` and
    ``token_accuracy`` in evaluation), shared with supervised fine-tuning."""
    from deltatune.lm.task import CausalLMTask

    return CausalLMTask()

"""Text generation from a (fine-tuned) decoder: batched, left-padded, key/value cache, streaming.

``generate(model, tokenizer, prompts)`` renders each prompt as in training
(:func:`~deltatune.lm.instructions.encode_prompt`: the chat template and its assistant header),
left-pads the batch and calls transformers' ``model.generate`` with a key/value cache::

    row 0   <pad> <pad> [prompt 0 ............] -> new tokens ...
    row 1   [prompt 1 ........................] -> new tokens ...
            attention_mask 0 on <pad>; positions count real tokens only

Left padding puts every prompt's last token in the last column, so all rows produce their next
token from the same position, and the cache grows by one column per step. With
``temperature == 0`` decoding is greedy (arg-max); otherwise tokens are sampled from
``softmax(logits / temperature)`` restricted to the smallest set whose probability reaches
``top_p`` (nucleus sampling). A row stops at EOS or after ``max_new_tokens``.

``stream(index, text)`` receives each prompt's new text as it is produced (for a terminal:
print it without a newline). The model is used as is: base, with active adapters, or merged.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from deltatune.errors import ConfigError, DeltatuneError
from deltatune.lm.instructions import encode_prompt

#: ``stream(prompt_index, new_text)``.
StreamFn = Callable[[int, str], None]


class _RowStreamer:
    """A transformers streamer (``put``/``end``) that decodes every row of a batch separately.

    ``TextStreamer`` handles one row only. Text is emitted when it decodes cleanly (a token
    that ends inside a multi-byte character waits for the next one); a row is silent after
    its EOS.
    """

    def __init__(
        self, tokenizer: Any, offset: int, stream: StreamFn, eos_ids: set[int], rows: int
    ) -> None:
        self.tokenizer = tokenizer
        self.offset = offset
        self.stream = stream
        self.eos_ids = eos_ids
        self.tokens: list[list[int]] = [[] for _ in range(rows)]
        self.printed = [0] * rows
        self.done = [False] * rows
        self.prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:  # generate() first hands over the prompt ids
            self.prompt_seen = True
            return
        new = value.reshape(len(self.tokens), -1).tolist()
        for row, ids in enumerate(new):
            for token in ids:
                if self.done[row]:
                    break
                if token in self.eos_ids:
                    self.done[row] = True
                    break
                self.tokens[row].append(int(token))
            self._flush(row, final=False)

    def _flush(self, row: int, final: bool) -> None:
        text = self.tokenizer.decode(self.tokens[row], skip_special_tokens=True)
        if not final and text.endswith("\ufffd"):
            return
        if len(text) > self.printed[row]:
            self.stream(self.offset + row, text[self.printed[row] :])
            self.printed[row] = len(text)

    def end(self) -> None:
        for row in range(len(self.tokens)):
            self._flush(row, final=True)


def _eos_ids(model: nn.Module, tokenizer: Any) -> set[int]:
    ids: set[int] = set()
    gen_cfg = getattr(model, "generation_config", None)
    value = getattr(gen_cfg, "eos_token_id", None) if gen_cfg is not None else None
    for v in value if isinstance(value, list) else [value]:
        if v is not None:
            ids.add(int(v))
    if getattr(tokenizer, "eos_token_id", None) is not None:
        ids.add(int(tokenizer.eos_token_id))
    return ids


def left_pad(rows: Sequence[Sequence[int]], pad_id: int) -> dict[str, torch.Tensor]:
    """``input_ids``/``attention_mask`` with every row right-aligned (padding on the left)."""
    width = max(len(r) for r in rows)
    ids = [[pad_id] * (width - len(r)) + list(r) for r in rows]
    mask = [[0] * (width - len(r)) + [1] * len(r) for r in rows]
    return {
        "input_ids": torch.tensor(ids, dtype=torch.long),
        "attention_mask": torch.tensor(mask, dtype=torch.long),
    }


def check_sampling(temperature: float, top_p: float, max_new_tokens: int) -> None:
    if not temperature >= 0:
        raise ConfigError(f"temperature: value {temperature!r} must be >= 0 (0 = greedy)")
    if not 0.0 < top_p <= 1.0:
        raise ConfigError(f"top_p: value {top_p!r} must be in (0, 1] (1 = no nucleus cut)")
    if max_new_tokens < 1:
        raise ConfigError(f"max_new_tokens: value {max_new_tokens!r} must be >= 1")


@torch.no_grad()
def generate(
    model: nn.Module,
    tokenizer: Any,
    prompts: Sequence[str],
    *,
    max_new_tokens: int = 128,
    temperature: float = 0.0,
    top_p: float = 1.0,
    batch_size: int = 8,
    use_cache: bool = True,
    chat_template: bool = True,
    system_prompt: str | None = None,
    raw: bool = False,
    seed: int | None = None,
    stream: StreamFn | None = None,
) -> list[str]:
    """Generate an answer to each prompt; returns the new text only (special tokens dropped).

    Args:
        prompts: user prompts; rendered like training examples unless ``raw`` (then used as
            is, with the tokenizer's usual special tokens).
        max_new_tokens / temperature / top_p: see the module docstring; ``temperature=0``
            is greedy and ignores ``top_p``.
        batch_size: prompts per ``model.generate`` call (left-padded together).
        use_cache: keep the key/value cache (the default); ``False`` re-runs the whole
            sequence each step (same greedy output, much slower: for checking).
        chat_template / system_prompt: as in training (:class:`InstructionConfig`).
        seed: seeds torch before sampling, for repeatable samples.
        stream: ``stream(index, text)`` gets each prompt's text as it is generated.
    """
    from transformers import GenerationConfig

    from deltatune.train.trainer import model_device

    check_sampling(temperature, top_p, max_new_tokens)
    if batch_size < 1:
        raise ConfigError(f"batch_size: value {batch_size!r} must be >= 1")
    if not callable(getattr(model, "generate", None)):
        raise DeltatuneError(
            f"{type(model).__name__} has no generate(); give a transformers causal LM "
            "(e.g. from deltatune.lm.load_causal_lm)"
        )
    pad_id = tokenizer.pad_token_id
    if pad_id is None:
        pad_id = tokenizer.eos_token_id
    if pad_id is None:
        raise DeltatuneError("the tokenizer has neither a pad nor an EOS token; set one")
    eos_ids = _eos_ids(model, tokenizer)
    sample = temperature > 0
    gen_cfg = GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=sample,
        temperature=temperature if sample else None,
        top_p=top_p if sample else None,
        top_k=None,
        pad_token_id=int(pad_id),
        eos_token_id=sorted(eos_ids) or None,
        use_cache=use_cache,
    )
    if seed is not None:
        torch.manual_seed(seed)
    device = model_device(model)
    was_training = model.training
    model.eval()
    outputs: list[str] = []
    try:
        for start in range(0, len(prompts), batch_size):
            chunk = prompts[start : start + batch_size]
            rows = [
                list(tokenizer(p)["input_ids"])
                if raw
                else encode_prompt(
                    tokenizer, p, chat_template=chat_template, system_prompt=system_prompt
                )
                for p in chunk
            ]
            batch = {k: v.to(device) for k, v in left_pad(rows, int(pad_id)).items()}
            streamer = (
                _RowStreamer(tokenizer, start, stream, eos_ids, len(chunk))
                if stream is not None
                else None
            )
            out = model.generate(  # type: ignore[operator]
                **batch, generation_config=gen_cfg, streamer=streamer
            )
            new = out[:, batch["input_ids"].shape[1] :].tolist()
            for ids in new:
                cut = next((i for i, t in enumerate(ids) if t in eos_ids), len(ids))
                outputs.append(tokenizer.decode(ids[:cut], skip_special_tokens=True))
    finally:
        model.train(was_training)
    return outputs

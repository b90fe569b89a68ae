"""Instruction data for supervised fine-tuning of a decoder: pairs, template, labels, batches.

The flow::

    pairs  = load_instruction_pairs("chatterbot")            # [InstructionPair(prompt, response)]
    splits = split_pairs(pairs, val_fraction=0.1, test_fraction=0.1, seed=0)
    ds     = InstructionDataset(splits.train, tokenizer, max_length=64)
    loader = make_loader(ds, 8, shuffle=True, seed=0, collate=CausalLMCollator(pad_id))

One example is the prompt rendered by the tokenizer's chat template (with the assistant header
that opens the answer) followed by the answer and the end-of-sequence token::

    tokens  <|im_start|>system ... <|im_start|>user\\nWhat is AI?<|im_end|>\\n<|im_start|>assistant\\n | AI is ... <|im_end|>
    labels  -100        -100       -100                                  -100                    | AI is ... <|im_end|>

so the loss ``-1/N sum_t log p(y_t | y_<t, prompt)`` runs over the N answer tokens only
(label -100 is ignored by cross-entropy). A tokenizer without a chat template gets the plain
``"User: {prompt}\\nAssistant: "``. Batches are right-padded for training (the answer stays
where the model saw it; padding sits after it with attention mask 0 and label -100).

Packing (optional) concatenates several examples into one row of at most ``max_length``
tokens and gives each its own positions (``position_ids`` restart at 0). transformers then
builds a block-diagonal causal mask from the restarts (the 2-D ``attention_mask`` is left
out of packed batches on purpose), so packed examples never see each other and the loss is
the one of the unpacked batch (checked in the tests), with fewer padding tokens.
"""

from __future__ import annotations

import csv
import dataclasses
import itertools
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from torch.utils.data import Dataset

from deltatune.config import BaseConfig
from deltatune.errors import ConfigError, DeltatuneError, did_you_mean

#: The ``data.source`` value that selects the embedded chatterbot English corpus.
CHATTERBOT = "chatterbot"
#: Label of tokens that carry no loss (PyTorch's cross-entropy ``ignore_index``).
IGNORE_INDEX = -100
#: The prompt layout for tokenizers without a chat template.
PLAIN_TEMPLATE = "User: {prompt}\nAssistant: "


@dataclasses.dataclass(frozen=True)
class InstructionPair:
    """One prompt and the answer the model should learn to give."""

    prompt: str
    response: str


@dataclasses.dataclass
class InstructionSplits:
    """Train / validation / test pairs; no prompt appears in more than one split."""

    train: list[InstructionPair]
    val: list[InstructionPair]
    test: list[InstructionPair]


@dataclasses.dataclass
class InstructionConfig(BaseConfig):
    """How a causal-LM run (``model.task: causal-lm``) reads and formats its pairs.

    Fields:
        prompt_column: the CSV column / JSON key holding the prompt. Default ``"prompt"``.
        response_column: the CSV column / JSON key holding the answer. Default ``"response"``.
        chat_template: render prompts with the tokenizer's chat template when it has one
            (else the plain ``"User: ...\\nAssistant: "``). Default ``true``.
        system_prompt: a system message put before every prompt; ``null`` keeps the
            template's own default (SmolLM2's names itself). Default ``null``.
        packing: concatenate several examples into each row of ``data.max_length`` tokens
            (block-diagonal attention, positions restart per example). Default ``false``.
    """

    prompt_column: str = "prompt"
    response_column: str = "response"
    chat_template: bool = True
    system_prompt: str | None = None
    packing: bool = False

    def validate(self) -> None:
        for name in ("prompt_column", "response_column"):
            if not getattr(self, name):
                raise ConfigError(f"sft.{name}: must name a column, got an empty string")
        if self.prompt_column == self.response_column:
            raise ConfigError(
                f"sft.response_column: value {self.response_column!r} is also the "
                "prompt_column; they must differ"
            )


# --------------------------------------------------------------------------- loading


def load_chatterbot_pairs(folder: str | Path | None = None) -> list[InstructionPair]:
    """Every consecutive (turn, next turn) of the chatterbot English corpus, in file order.

    ``folder`` defaults to the installed ``chatterbot-corpus`` package's ``data/english``.
    A dialogue ``[a, b, c]`` gives the pairs ``a -> b`` and ``b -> c``; entries that are not
    lists of strings (one trivia line is a bare string) are skipped.
    """
    from deltatune.data.assets import chatterbot_english_path

    root = Path(folder) if folder is not None else chatterbot_english_path()
    pairs: list[InstructionPair] = []
    for path in sorted(root.glob("*.yml")):
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        for dialogue in data.get("conversations") or []:
            if not isinstance(dialogue, list):
                continue
            turns = [str(t).strip() for t in dialogue if isinstance(t, str | int | float)]
            for prompt, response in itertools.pairwise(turns):
                if prompt and response:
                    pairs.append(InstructionPair(prompt, response))
    if not pairs:
        raise DeltatuneError(f"no conversations found in '{root}' (*.yml with 'conversations')")
    return pairs


def _field(row: dict[str, Any], column: str, where: str, field: str) -> str:
    if column not in row:
        raise ConfigError(
            f"sft.{field}: {where} has no field '{column}'"
            f"{did_you_mean(column, [str(k) for k in row])} (fields: {', '.join(map(str, row))}); "
            f"set sft.{field}=<name>"
        )
    value = row[column]
    return "" if value is None else str(value).strip()


def load_pair_file(
    path: str | Path, prompt_column: str = "prompt", response_column: str = "response"
) -> list[InstructionPair]:
    """Prompt/response pairs from a ``.jsonl``/``.json``/``.ndjson`` (one object a line) or a
    ``.csv``/``.tsv`` with a header row. Rows with an empty prompt or answer are errors."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise ConfigError(
            f"data.source: '{path}' is not a file; give a .jsonl or .csv with "
            f"'{prompt_column}' and '{response_column}' fields, or '{CHATTERBOT}'"
        )
    suffix = p.suffix.lower()
    rows: list[tuple[str, dict[str, Any]]] = []
    if suffix in (".jsonl", ".json", ".ndjson"):
        for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DeltatuneError(f"{p}:{n}: not a JSON object per line ({exc.msg})") from None
            if not isinstance(obj, dict):
                raise DeltatuneError(f"{p}:{n}: expected a JSON object, got {type(obj).__name__}")
            rows.append((f"{p.name} line {n}", obj))
    elif suffix in (".csv", ".tsv"):
        with p.open(newline="", encoding="utf-8") as fh:
            reader = csv.DictReader(fh, delimiter="\t" if suffix == ".tsv" else ",")
            for n, row in enumerate(reader, 2):
                rows.append((f"{p.name} row {n}", dict(row)))
    else:
        raise ConfigError(
            f"data.source: '{p.name}' has suffix '{p.suffix}'; use .jsonl/.json/.ndjson or "
            ".csv/.tsv"
        )
    pairs: list[InstructionPair] = []
    for where, row in rows:
        prompt = _field(row, prompt_column, where, "prompt_column")
        response = _field(row, response_column, where, "response_column")
        if not prompt or not response:
            empty = prompt_column if not prompt else response_column
            raise DeltatuneError(f"{where}: field '{empty}' is empty; every row needs both")
        pairs.append(InstructionPair(prompt, response))
    if not pairs:
        raise DeltatuneError(f"data.source: '{p}' holds no rows")
    return pairs


def load_instruction_pairs(
    source: str = CHATTERBOT, prompt_column: str = "prompt", response_column: str = "response"
) -> list[InstructionPair]:
    """``"chatterbot"`` (the embedded corpus, ~2.4k pairs) or a JSONL/CSV file of pairs."""
    if source == CHATTERBOT:
        return load_chatterbot_pairs()
    return load_pair_file(source, prompt_column, response_column)


def split_pairs(
    pairs: Sequence[InstructionPair],
    val_fraction: float = 0.1,
    test_fraction: float = 0.1,
    seed: int = 0,
    max_train: int | None = None,
    max_eval: int | None = None,
) -> InstructionSplits:
    """Random held-out split by prompt: all answers to one prompt land in the same split.

    The corpus repeats prompts with different answers ("What is AI?" twice); splitting by
    prompt keeps the held-out loss a measure of unseen questions. Fractions count prompts.
    ``max_train``/``max_eval`` cap the splits after the split (a seeded random subset).
    """
    prompts = sorted({p.prompt for p in pairs})
    order = np.random.default_rng(seed).permutation(len(prompts))
    n_test = round(len(prompts) * test_fraction)
    n_val = round(len(prompts) * val_fraction)
    if (test_fraction > 0 and n_test == 0) or (val_fraction > 0 and n_val == 0):
        raise DeltatuneError(
            f"{len(prompts)} distinct prompts are too few for val_fraction={val_fraction} and "
            f"test_fraction={test_fraction}; give more data or raise the fractions"
        )
    where = {}
    for rank, i in enumerate(order):
        where[prompts[i]] = "test" if rank < n_test else "val" if rank < n_test + n_val else "train"
    out: dict[str, list[InstructionPair]] = {"train": [], "val": [], "test": []}
    for pair in pairs:
        out[where[pair.prompt]].append(pair)
    if not out["train"]:
        raise DeltatuneError("the split left no training pairs; lower val/test fractions")
    rng = np.random.default_rng(seed + 1)

    def cap(items: list[InstructionPair], n: int | None) -> list[InstructionPair]:
        if n is None or len(items) <= n:
            return items
        keep = sorted(rng.choice(len(items), size=n, replace=False).tolist())
        return [items[k] for k in keep]

    return InstructionSplits(
        train=cap(out["train"], max_train),
        val=cap(out["val"], max_eval),
        test=cap(out["test"], max_eval),
    )


# --------------------------------------------------------------------------- formatting


def has_chat_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def format_prompt(
    tokenizer: Any, prompt: str, *, chat_template: bool = True, system_prompt: str | None = None
) -> str:
    """The prompt as the model sees it, ending where the answer begins.

    With a chat template: ``apply_chat_template([system?, user], add_generation_prompt=True)``;
    without: :data:`PLAIN_TEMPLATE` (a system prompt, if given, goes on the line before).
    """
    if chat_template and has_chat_template(tokenizer):
        messages = [{"role": "user", "content": prompt}]
        if system_prompt is not None:
            messages.insert(0, {"role": "system", "content": system_prompt})
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return str(text)
    head = f"{system_prompt}\n" if system_prompt else ""
    return head + PLAIN_TEMPLATE.format(prompt=prompt)


def encode_prompt(
    tokenizer: Any, prompt: str, *, chat_template: bool = True, system_prompt: str | None = None
) -> list[int]:
    """Token ids of :func:`format_prompt`; training and generation share this encoding.

    A chat template writes its own special tokens, so none are added then; the plain template
    gets the tokenizer's usual ones (e.g. a LLaMA tokenizer's BOS).
    """
    templated = chat_template and has_chat_template(tokenizer)
    text = format_prompt(
        tokenizer, prompt, chat_template=chat_template, system_prompt=system_prompt
    )
    return list(tokenizer(text, add_special_tokens=not templated)["input_ids"])


def encode_answer(tokenizer: Any, response: str) -> list[int]:
    """The answer's ids followed by EOS, so that the model learns where to stop."""
    ids = list(tokenizer(response, add_special_tokens=False)["input_ids"])
    eos = getattr(tokenizer, "eos_token_id", None)
    return [*ids, int(eos)] if eos is not None else ids


def build_example(prompt_ids: list[int], answer_ids: list[int], max_length: int) -> dict[str, Any]:
    """``input_ids``/``attention_mask``/``labels`` for one pair, at most ``max_length`` tokens.

    Too long: the answer keeps at least a quarter of the budget (its start), and the prompt
    loses tokens from its beginning (its end, the assistant header, stays next to the answer).
    """
    if max_length < 2:
        raise ConfigError(f"data.max_length: value {max_length!r} must be >= 2")
    if not answer_ids:
        raise DeltatuneError("an answer encodes to no tokens; every pair needs a response")
    answer_keep = min(len(answer_ids), max(max_length - len(prompt_ids), max_length // 4, 1))
    prompt_keep = min(len(prompt_ids), max_length - answer_keep)
    prompt = prompt_ids[len(prompt_ids) - prompt_keep :]
    answer = answer_ids[:answer_keep]
    ids = prompt + answer
    return {
        "input_ids": ids,
        "attention_mask": [1] * len(ids),
        "labels": [IGNORE_INDEX] * len(prompt) + answer,
    }


class InstructionDataset(Dataset[dict[str, Any]]):
    """Pairs tokenised once: item ``i`` is ``{input_ids, attention_mask, labels}`` (lists).

    ``labels`` equal ``input_ids`` on the answer (and its EOS) and -100 on the prompt. With
    ``packing=True`` items are packed rows instead and carry ``position_ids`` (see the module
    docstring); ``len`` is then the number of rows.
    """

    def __init__(
        self,
        pairs: Sequence[InstructionPair],
        tokenizer: Any,
        max_length: int,
        *,
        chat_template: bool = True,
        system_prompt: str | None = None,
        packing: bool = False,
    ) -> None:
        if max_length < 2:
            raise ConfigError(f"data.max_length: value {max_length!r} must be >= 2")
        examples = [
            build_example(
                encode_prompt(
                    tokenizer, p.prompt, chat_template=chat_template, system_prompt=system_prompt
                ),
                encode_answer(tokenizer, p.response),
                max_length,
            )
            for p in pairs
        ]
        self.num_pairs = len(examples)
        self.items = pack_examples(examples, max_length) if packing else examples

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.items[index]

    @property
    def num_answer_tokens(self) -> int:
        return sum(sum(1 for t in item["labels"] if t != IGNORE_INDEX) for item in self.items)


def pack_examples(examples: Sequence[dict[str, Any]], max_length: int) -> list[dict[str, Any]]:
    """Greedy in-order packing: start a new row when the next example does not fit.

    Each row carries ``position_ids`` that restart at 0 for every example; this is what marks
    the example boundaries for transformers' packed-sequence masking.
    """
    rows: list[dict[str, Any]] = []
    current: dict[str, list[int]] = {"input_ids": [], "labels": [], "position_ids": []}
    for ex in examples:
        n = len(ex["input_ids"])
        if current["input_ids"] and len(current["input_ids"]) + n > max_length:
            rows.append(current)
            current = {"input_ids": [], "labels": [], "position_ids": []}
        current["input_ids"] += ex["input_ids"]
        current["labels"] += ex["labels"]
        current["position_ids"] += list(range(n))
    if current["input_ids"]:
        rows.append(current)
    return [dict(r) for r in rows]


class CausalLMCollator:
    """Right-pad a list of :class:`InstructionDataset` items into tensors.

    Unpacked items give ``input_ids``, ``attention_mask`` (0 on padding) and ``labels`` (-100
    on padding). Packed items give ``input_ids``, ``position_ids`` and ``labels`` and no
    ``attention_mask``: the padding continues the positions of its own pseudo-example
    (0, 1, ...), so it is masked off from the real ones, and its labels are -100.
    """

    def __init__(self, pad_token_id: int, pad_to_multiple_of: int | None = None) -> None:
        self.pad_token_id = int(pad_token_id)
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        if not features:
            raise DeltatuneError("cannot collate an empty batch")
        width = max(len(f["input_ids"]) for f in features)
        if self.pad_to_multiple_of:
            m = self.pad_to_multiple_of
            width = (width + m - 1) // m * m
        packed = "position_ids" in features[0]
        ids, labels, masks, positions = [], [], [], []
        for f in features:
            pad = width - len(f["input_ids"])
            ids.append(list(f["input_ids"]) + [self.pad_token_id] * pad)
            labels.append(list(f["labels"]) + [IGNORE_INDEX] * pad)
            if packed:
                positions.append(list(f["position_ids"]) + list(range(pad)))
            else:
                masks.append(list(f["attention_mask"]) + [0] * pad)
        batch = {
            "input_ids": torch.tensor(ids, dtype=torch.long),
            "labels": torch.tensor(labels, dtype=torch.long),
        }
        if packed:
            batch["position_ids"] = torch.tensor(positions, dtype=torch.long)
        else:
            batch["attention_mask"] = torch.tensor(masks, dtype=torch.long)
        return batch

"""Text classification data: load (embedded BBC News, CSV, JSON lines), split, tokenise, batch.

The flow is ``load_text_splits(cfg)`` -> :class:`TextSplits` of plain Python lists, then
:class:`TokenizedDataset` (tokenised once, truncated to ``max_length``) and :class:`PadCollator`
(pads each batch only to its own longest example) for training.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.model_selection import train_test_split
from torch.utils.data import Dataset

from deltatune.config import BaseConfig
from deltatune.data.assets import bbc_news_path
from deltatune.errors import ConfigError, DeltatuneError, did_you_mean

#: The ``source`` value that selects the embedded BBC News corpus.
BBC_NEWS = "bbc_news"
#: File suffixes read as CSV (with the delimiter) or as JSON lines.
_CSV_SUFFIXES = {".csv": ",", ".tsv": "\t"}
_JSONL_SUFFIXES = {".jsonl", ".json", ".ndjson"}
_INT_LIKE = re.compile(r"^[+-]?\d+$")


@dataclasses.dataclass
class DataConfig(BaseConfig):
    """Where the text classification data comes from and how it is split.

    Fields:
        source: ``"bbc_news"`` (the embedded BBC News corpus, 2,225 articles, 5 topics) or a
            path to a ``.csv``/``.tsv`` file with a header row or a ``.jsonl``/``.json``/
            ``.ndjson`` file of one JSON object per line. Default ``"bbc_news"``.
        text_column: column (CSV) or key (JSON lines) holding the text. Default ``"text"``.
        label_column: column or key holding the label, a string or an integer.
            Default ``"label"``.
        val_fraction: fraction of all examples held out for validation (early stopping,
            choosing the best step), in [0, 1). Default ``0.1``.
        test_fraction: fraction of all examples held out for the final test, in [0, 1).
            Default ``0.1``.
        seed: seed of the stratified split and the subsampling. Default ``0``.
        max_length: tokens per example after truncation. Default ``128``.
        max_train_examples: keep at most this many training examples (a stratified
            subsample), for quick runs; ``None`` keeps all. Default ``None``.
        max_eval_examples: the same cap for the validation and test splits each.
            Default ``None``.
    """

    source: str = BBC_NEWS
    text_column: str = "text"
    label_column: str = "label"
    val_fraction: float = 0.1
    test_fraction: float = 0.1
    seed: int = 0
    max_length: int = 128
    max_train_examples: int | None = None
    max_eval_examples: int | None = None

    def validate(self) -> None:
        """Raise :class:`ConfigError` naming the field for out-of-range values."""
        if not self.source.strip():
            raise ConfigError(
                f"data.source: value {self.source!r} is empty; use '{BBC_NEWS}' or a file path"
            )
        for name in ("text_column", "label_column"):
            if not getattr(self, name):
                raise ConfigError(f"data.{name}: must name a column, got an empty string")
        if self.text_column == self.label_column:
            raise ConfigError(
                f"data.label_column: value {self.label_column!r} is also the text_column; "
                "they must differ"
            )
        for name in ("val_fraction", "test_fraction"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise ConfigError(f"data.{name}: value {value!r} must be in [0, 1)")
        if self.val_fraction + self.test_fraction >= 1.0:
            raise ConfigError(
                f"data.val_fraction + data.test_fraction = "
                f"{self.val_fraction + self.test_fraction:g} leaves no training data; "
                "their sum must be below 1"
            )
        if self.max_length < 2:
            raise ConfigError(f"data.max_length: value {self.max_length!r} must be >= 2")
        for name in ("max_train_examples", "max_eval_examples"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"data.{name}: value {value!r} must be >= 1 or null (no cap)")


@dataclasses.dataclass
class TextExamples:
    """Parallel lists of texts and integer label ids."""

    texts: list[str]
    labels: list[int]

    def __post_init__(self) -> None:
        if len(self.texts) != len(self.labels):
            raise ValueError(f"{len(self.texts)} texts but {len(self.labels)} labels")

    def __len__(self) -> int:
        return len(self.texts)


@dataclasses.dataclass
class TextSplits:
    """Train/validation/test examples; ``label_names[i]`` is the name of label id ``i``."""

    train: TextExamples
    val: TextExamples
    test: TextExamples
    label_names: list[str]

    @property
    def num_labels(self) -> int:
        return len(self.label_names)


# --------------------------------------------------------------------------- loading


def _read_text_file(path: Path) -> str:
    """Read a corpus file as UTF-8, falling back to cp1252 (one BBC article is not UTF-8)."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return data.decode("cp1252", errors="replace")


def load_bbc_news() -> tuple[list[str], list[str]]:
    """Return (texts, label names) of the embedded BBC News corpus, in a fixed order.

    Labels are the folder names, sorted; files are read in sorted order within each folder.
    """
    root = bbc_news_path()
    texts: list[str] = []
    labels: list[str] = []
    for label_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        for file in sorted(label_dir.glob("*.txt")):
            text = _read_text_file(file).strip()
            if text:
                texts.append(text)
                labels.append(label_dir.name)
    if not texts:
        raise DeltatuneError(f"the BBC News folder '{root}' holds no .txt files; reinstall it")
    return texts, labels


def _check_columns(
    present: Sequence[str], path: Path, where: str, text_column: str, label_column: str
) -> None:
    """Raise a ConfigError naming the missing column, the file and the columns present."""
    for field, column in (("text_column", text_column), ("label_column", label_column)):
        if column not in present:
            raise ConfigError(
                f"data.{field}: column '{column}' is not in '{path}'{where} "
                f"(columns: {', '.join(map(repr, present)) or 'none'})"
                + did_you_mean(column, present)
            )


def _clean_row(
    text: Any, label: Any, path: Path, where: str, text_column: str, label_column: str
) -> tuple[str, str | int]:
    """Check one row's text and label; return them as (str, str | int)."""
    if not isinstance(text, str):
        if text is None:
            raise DeltatuneError(f"'{path}'{where}: column '{text_column}' is empty")
        raise DeltatuneError(
            f"'{path}'{where}: column '{text_column}' must hold text, got {text!r}"
        )
    if not text.strip():
        raise DeltatuneError(f"'{path}'{where}: column '{text_column}' is empty")
    if label is None:
        raise DeltatuneError(f"'{path}'{where}: column '{label_column}' is empty")
    if isinstance(label, bool) or not isinstance(label, str | int):
        if isinstance(label, float) and label.is_integer():
            label = int(label)
        else:
            raise DeltatuneError(
                f"'{path}'{where}: label {label!r} in column '{label_column}' must be a "
                "string or an integer"
            )
    if isinstance(label, str):
        label = label.strip()
        if not label:
            raise DeltatuneError(f"'{path}'{where}: column '{label_column}' is empty")
    return text, label


def _load_csv(
    path: Path, delimiter: str, text_column: str, label_column: str
) -> tuple[list[str], list[str | int]]:
    texts: list[str] = []
    labels: list[str | int] = []
    # News articles exceed csv's default 128 KiB field limit.
    csv.field_size_limit(max(csv.field_size_limit(), 2**31 - 1))
    with open(path, encoding="utf-8-sig", newline="") as fh:
        reader = csv.DictReader(fh, delimiter=delimiter)
        present = list(reader.fieldnames or [])
        _check_columns(present, path, "", text_column, label_column)
        for row in reader:
            where = f" line {reader.line_num}"
            text, label = _clean_row(
                row.get(text_column), row.get(label_column), path, where, text_column, label_column
            )
            texts.append(text)
            labels.append(label)
    return texts, labels


def _load_jsonl(
    path: Path, text_column: str, label_column: str
) -> tuple[list[str], list[str | int]]:
    content = path.read_text(encoding="utf-8-sig")
    rows: list[tuple[str, Any]] = []
    if content.lstrip().startswith("["):
        # A .json file holding one array of objects: accepted as well as JSON lines.
        try:
            data = json.loads(content)
        except json.JSONDecodeError as exc:
            raise DeltatuneError(f"'{path}' is not valid JSON: {exc}") from None
        rows = [(f" item {i}", row) for i, row in enumerate(data)]
    else:
        for number, line in enumerate(content.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                rows.append((f" line {number}", json.loads(line)))
            except json.JSONDecodeError as exc:
                raise DeltatuneError(
                    f"'{path}' line {number} is not valid JSON ({exc.msg}); "
                    "expected one JSON object per line"
                ) from None
    texts: list[str] = []
    labels: list[str | int] = []
    for where, row in rows:
        if not isinstance(row, dict):
            raise DeltatuneError(f"'{path}'{where}: expected a JSON object, got {row!r:.60}")
        _check_columns(list(row), path, where, text_column, label_column)
        text, label = _clean_row(
            row[text_column], row[label_column], path, where, text_column, label_column
        )
        texts.append(text)
        labels.append(label)
    return texts, labels


def load_table(
    path: str | Path, text_column: str = "text", label_column: str = "label"
) -> tuple[list[str], list[str | int]]:
    """Read (texts, raw labels) from a CSV/TSV file with a header or a JSON-lines file."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(
            f"data.source: file '{p}' does not exist; use '{BBC_NEWS}' or a path to a "
            ".csv or .jsonl file"
        )
    suffix = p.suffix.lower()
    if suffix in _CSV_SUFFIXES:
        texts, labels = _load_csv(p, _CSV_SUFFIXES[suffix], text_column, label_column)
    elif suffix in _JSONL_SUFFIXES:
        texts, labels = _load_jsonl(p, text_column, label_column)
    else:
        supported = sorted([*_CSV_SUFFIXES, *_JSONL_SUFFIXES])
        raise ConfigError(
            f"data.source: file '{p}' has suffix '{suffix}'; supported: {', '.join(supported)}"
        )
    if not texts:
        raise DeltatuneError(f"'{p}' holds no examples")
    return texts, labels


def encode_labels(raw: Sequence[str | int]) -> tuple[list[int], list[str]]:
    """Map raw labels to ids by sorted label name; return (ids, label_names).

    Integer labels (or strings that all look like integers, as CSV gives them) sort
    numerically, so ``2`` comes before ``10``; other labels sort as strings. Fewer than two
    distinct labels is an error: there is nothing to classify.
    """
    names = [str(v).strip() for v in raw]
    distinct = set(names)
    if all(_INT_LIKE.match(n) for n in distinct):
        by_value = {int(n): n for n in distinct}
        ordered = [str(v) for v in sorted(by_value)]
        names = [str(int(n)) for n in names]
    else:
        ordered = sorted(distinct)
    if len(ordered) < 2:
        raise DeltatuneError(
            f"the data has {len(ordered)} distinct label(s) ({', '.join(ordered) or 'none'}); "
            "classification needs at least 2 (check data.label_column)"
        )
    index = {name: i for i, name in enumerate(ordered)}
    return [index[n] for n in names], ordered


def load_examples(cfg: DataConfig) -> tuple[TextExamples, list[str]]:
    """Load all examples named by ``cfg.source``; return them and the label names."""
    if cfg.source == BBC_NEWS:
        texts, raw_labels = load_bbc_news()
        labels, names = encode_labels(raw_labels)
    else:
        texts, raw = load_table(cfg.source, cfg.text_column, cfg.label_column)
        labels, names = encode_labels(raw)
    return TextExamples(texts, labels), names


# --------------------------------------------------------------------------- splitting


def _fraction_count(fraction: float, n: int) -> int:
    """Examples a fraction asks for: rounded, and at least one when the fraction is positive."""
    return 0 if fraction <= 0 else max(1, round(fraction * n))


def _stratified_take(
    indices: np.ndarray, y: np.ndarray, count: int, seed: int, what: str
) -> tuple[np.ndarray, np.ndarray]:
    """Split ``indices`` into (rest, taken) with ``count`` taken, stratified by ``y``."""
    if count == 0:
        return indices, indices[:0]
    if count >= len(indices):
        raise DeltatuneError(
            f"cannot hold out {count} {what} examples from {len(indices)}; "
            "lower data.val_fraction/data.test_fraction or add data"
        )
    try:
        rest, taken = train_test_split(
            indices, test_size=count, stratify=y[indices], random_state=seed
        )
    except ValueError as exc:
        raise DeltatuneError(
            f"cannot make a stratified {what} split of {count} from {len(indices)} examples "
            f"({exc}); every label needs at least 2 examples and the split at least one per "
            "label: add examples of the rare labels or change data.val_fraction/"
            "data.test_fraction"
        ) from None
    return np.asarray(rest), np.asarray(taken)


def _subsample(indices: np.ndarray, y: np.ndarray, cap: int | None, seed: int) -> np.ndarray:
    """At most ``cap`` of ``indices``: stratified when possible, else uniformly at random."""
    if cap is None or len(indices) <= cap:
        return indices
    try:
        kept, _ = train_test_split(indices, train_size=cap, stratify=y[indices], random_state=seed)
    except ValueError:
        # Too few per label to stratify (e.g. cap < number of labels): a seeded uniform draw.
        kept = np.random.default_rng(seed).choice(indices, size=cap, replace=False)
    return np.asarray(kept)


def split_examples(
    examples: TextExamples,
    label_names: list[str],
    *,
    val_fraction: float = 0.1,
    test_fraction: float = 0.1,
    seed: int = 0,
    max_train_examples: int | None = None,
    max_eval_examples: int | None = None,
) -> TextSplits:
    """Stratified, seeded train/val/test split, with optional stratified caps per split.

    The same inputs and seed give the same splits. Each split keeps the source order.
    """
    n = len(examples)
    y = np.asarray(examples.labels)
    all_idx = np.arange(n)
    rest, test = _stratified_take(all_idx, y, _fraction_count(test_fraction, n), seed, "test")
    rest, val = _stratified_take(rest, y, _fraction_count(val_fraction, n), seed, "validation")
    train = _subsample(rest, y, max_train_examples, seed)
    val = _subsample(val, y, max_eval_examples, seed)
    test = _subsample(test, y, max_eval_examples, seed)

    def take(idx: np.ndarray) -> TextExamples:
        order = sorted(int(i) for i in idx)
        return TextExamples([examples.texts[i] for i in order], [examples.labels[i] for i in order])

    return TextSplits(take(train), take(val), take(test), list(label_names))


def load_text_splits(cfg: DataConfig) -> TextSplits:
    """Load the data ``cfg`` names and split it into stratified train/val/test."""
    examples, names = load_examples(cfg)
    return split_examples(
        examples,
        names,
        val_fraction=cfg.val_fraction,
        test_fraction=cfg.test_fraction,
        seed=cfg.seed,
        max_train_examples=cfg.max_train_examples,
        max_eval_examples=cfg.max_eval_examples,
    )


# --------------------------------------------------------------------------- tokenising


class TokenizedDataset(Dataset[dict[str, Any]]):
    """Examples tokenised once up front (truncated to ``max_length``, not padded).

    Item ``i`` is a dict of the tokenizer's outputs as lists of ints (``input_ids``,
    ``attention_mask`` and, for tokenizers that give them, ``token_type_ids``) plus ``labels``.
    Padding is left to :class:`PadCollator`, per batch.
    """

    def __init__(self, examples: TextExamples, tokenizer: Any, max_length: int) -> None:
        if max_length < 2:
            raise ConfigError(f"data.max_length: value {max_length!r} must be >= 2")
        encoded = tokenizer(list(examples.texts), truncation=True, max_length=max_length)
        self.features: dict[str, list[list[int]]] = {k: list(v) for k, v in encoded.items()}
        self.labels = list(examples.labels)
        if "input_ids" not in self.features:
            raise DeltatuneError("the tokenizer returned no 'input_ids'; is it a text tokenizer?")

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict[str, Any]:
        item: dict[str, Any] = {k: v[index] for k, v in self.features.items()}
        item["labels"] = self.labels[index]
        return item


class PadCollator:
    """Pad a list of :class:`TokenizedDataset` items to the batch's longest, as tensors.

    Returns ``input_ids``, ``attention_mask`` (and ``token_type_ids`` when present) and
    ``labels`` (int64). Padding per batch rather than to ``max_length`` saves compute on
    short texts.
    """

    def __init__(self, tokenizer: Any, pad_to_multiple_of: int | None = None) -> None:
        if getattr(tokenizer, "pad_token", None) is None:
            raise DeltatuneError(
                f"tokenizer {type(tokenizer).__name__} has no pad token; set one first, "
                "e.g. tokenizer.pad_token = tokenizer.eos_token"
            )
        self.tokenizer = tokenizer
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        labels = torch.tensor([f["labels"] for f in features], dtype=torch.long)
        inputs = [{k: v for k, v in f.items() if k != "labels"} for f in features]
        padded = self.tokenizer.pad(
            inputs, padding=True, pad_to_multiple_of=self.pad_to_multiple_of, return_tensors="pt"
        )
        batch = {k: torch.as_tensor(v) for k, v in padded.items()}
        batch["labels"] = labels
        return batch

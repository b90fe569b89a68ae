"""Unlabelled text for domain-adaptive training: a text file, a folder of ``.txt``, a column.

``load_corpus(cfg)`` returns a plain list of texts from one of:

- ``bbc_news``: the texts of the embedded BBC News *training split* (the same stratified split
  ``deltatune train`` makes with ``data.seed``/``val_fraction``/``test_fraction``), labels
  dropped, so adapting on it never sees a validation or test article;
- a ``.txt`` file: one text per non-empty line (``unit: line``) or the whole file as one
  text (``unit: file``);
- a folder: every ``*.txt`` under it (sorted, recursively), one text per file (or per line
  with ``unit: line``);
- a ``.csv``/``.tsv`` (header row) or ``.jsonl``/``.json`` file: the ``text_column``.

Empty texts are errors naming the file and the line (a blank line in a ``unit: line`` text
file is only a separator and is skipped).
"""

from __future__ import annotations

import csv
import dataclasses
import json
import random
from pathlib import Path
from typing import Literal

from deltatune.config import BaseConfig
from deltatune.data.text import BBC_NEWS, DataConfig, load_text_splits
from deltatune.errors import ConfigError, DeltatuneError, did_you_mean

_CSV = {".csv": ",", ".tsv": "\t"}
_JSONL = {".jsonl", ".json", ".ndjson"}


@dataclasses.dataclass
class CorpusConfig(BaseConfig):
    """Where the unlabelled texts come from (the ``corpus:`` section).

    Fields:
        source: ``"bbc_news"`` (the embedded corpus' training-split texts), a ``.txt`` file,
            a folder of ``.txt`` files, or a ``.csv``/``.tsv``/``.jsonl``/``.json`` file.
            Default ``"bbc_news"``.
        text_column: the column (CSV) or key (JSON lines) holding the text. Default ``"text"``.
        unit: for text files: ``"line"`` (one text per non-empty line) or ``"file"`` (one text
            per file); ``"auto"`` is ``line`` for a single file and ``file`` for a folder.
            Default ``"auto"``.
        max_texts: keep at most this many texts (a seeded random subset); ``None`` keeps all.
            Default ``None``.
        seed: seed of that subset and of ``bbc_news``'s split (as ``data.seed``). Default ``0``.
        val_fraction: fraction of the texts held out to report the objective before and after
            (``0`` holds out none). Default ``0.05``.
    """

    source: str = BBC_NEWS
    text_column: str = "text"
    unit: Literal["auto", "line", "file"] = "auto"
    max_texts: int | None = None
    seed: int = 0
    val_fraction: float = 0.05

    def validate(self) -> None:
        if not self.source.strip():
            raise ConfigError(
                f"corpus.source: value {self.source!r} is empty; use '{BBC_NEWS}', a .txt file, "
                "a folder of .txt files or a .csv/.jsonl file"
            )
        if not self.text_column:
            raise ConfigError("corpus.text_column: must name a column, got an empty string")
        if self.max_texts is not None and self.max_texts < 1:
            raise ConfigError(
                f"corpus.max_texts: value {self.max_texts!r} must be >= 1 or null (all)"
            )
        if not 0.0 <= self.val_fraction < 1.0:
            raise ConfigError(f"corpus.val_fraction: value {self.val_fraction!r} must be in [0, 1)")


def _read(path: Path) -> str:
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return data.decode("cp1252", errors="replace")


def _from_text_file(path: Path, unit: str) -> list[str]:
    content = _read(path)
    if unit == "file":
        if not content.strip():
            raise DeltatuneError(f"corpus.source: '{path}' is empty; remove it or add text")
        return [content.strip()]
    texts = [line.strip() for line in content.splitlines() if line.strip()]
    if not texts:
        raise DeltatuneError(f"corpus.source: '{path}' holds no non-empty line")
    return texts


def _column_error(column: str, path: Path, where: str, present: list[str]) -> ConfigError:
    return ConfigError(
        f"corpus.text_column: column '{column}' is not in '{path}'{where} "
        f"(columns: {', '.join(map(repr, present)) or 'none'})" + did_you_mean(column, present)
    )


def _check_text(value: object, path: Path, where: str, column: str) -> str:
    if not isinstance(value, str):
        raise DeltatuneError(
            f"'{path}'{where}: column '{column}' must hold text, got {value!r:.40}"
        )
    if not value.strip():
        raise DeltatuneError(f"'{path}'{where}: column '{column}' is empty")
    return value.strip()


def _from_table(path: Path, column: str) -> list[str]:
    texts: list[str] = []
    suffix = path.suffix.lower()
    if suffix in _CSV:
        csv.field_size_limit(max(csv.field_size_limit(), 2**31 - 1))
        with open(path, encoding="utf-8-sig", newline="") as fh:
            reader = csv.DictReader(fh, delimiter=_CSV[suffix])
            present = list(reader.fieldnames or [])
            if column not in present:
                raise _column_error(column, path, "", present)
            for row in reader:
                texts.append(_check_text(row.get(column), path, f" line {reader.line_num}", column))
        return texts
    for number, line in enumerate(path.read_text(encoding="utf-8-sig").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DeltatuneError(
                f"'{path}' line {number} is not valid JSON ({exc.msg}); expected one object per line"
            ) from None
        if not isinstance(row, dict):
            raise DeltatuneError(f"'{path}' line {number}: expected a JSON object, got {row!r:.40}")
        if column not in row:
            raise _column_error(column, path, f" line {number}", list(row))
        texts.append(_check_text(row[column], path, f" line {number}", column))
    return texts


def bbc_news_train_texts(seed: int = 0) -> list[str]:
    """The texts of the embedded BBC News training split that ``deltatune train`` uses."""
    return list(load_text_splits(DataConfig(seed=seed)).train.texts)


def load_corpus(cfg: CorpusConfig) -> list[str]:
    """All texts ``cfg.source`` names (see the module docstring), capped by ``max_texts``."""
    if cfg.source == BBC_NEWS:
        texts = bbc_news_train_texts(cfg.seed)
    else:
        path = Path(cfg.source).expanduser()
        if path.is_dir():
            files = sorted(p for p in path.rglob("*.txt") if p.is_file())
            if not files:
                raise ConfigError(f"corpus.source: folder '{path}' holds no .txt file")
            unit = "file" if cfg.unit == "auto" else cfg.unit
            texts = [t for f in files for t in _from_text_file(f, unit)]
        elif not path.is_file():
            raise ConfigError(
                f"corpus.source: '{path}' does not exist; give '{BBC_NEWS}', a .txt file, a "
                "folder of .txt files or a .csv/.jsonl file"
            )
        elif path.suffix.lower() == ".txt":
            texts = _from_text_file(path, "line" if cfg.unit == "auto" else cfg.unit)
        elif path.suffix.lower() in _CSV or path.suffix.lower() in _JSONL:
            texts = _from_table(path, cfg.text_column)
        else:
            raise ConfigError(
                f"corpus.source: '{path}' has suffix '{path.suffix}'; supported: .txt, a folder, "
                ".csv, .tsv, .jsonl, .json"
            )
    if not texts:
        raise DeltatuneError(f"corpus.source: '{cfg.source}' holds no text")
    if cfg.max_texts is not None and len(texts) > cfg.max_texts:
        keep = sorted(random.Random(cfg.seed).sample(range(len(texts)), cfg.max_texts))
        texts = [texts[i] for i in keep]
    return texts


def split_corpus(texts: list[str], val_fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """(train, held-out) texts; the held-out part is a seeded random ``val_fraction``."""
    n_val = round(val_fraction * len(texts)) if val_fraction > 0 else 0
    if n_val == 0:
        return list(texts), []
    if n_val >= len(texts):
        raise DeltatuneError(
            f"corpus.val_fraction: {val_fraction} of {len(texts)} texts leaves none to train on"
        )
    held = set(random.Random(seed).sample(range(len(texts)), n_val))
    return (
        [t for i, t in enumerate(texts) if i not in held],
        [t for i, t in enumerate(texts) if i in held],
    )

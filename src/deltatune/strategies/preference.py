"""Preference data: ``{"prompt", "chosen", "rejected"}`` rows, and a built-in toy set.

The common JSONL form (one object per line; ``.json`` holding one array also works)::

    {"prompt": "What is AI?", "chosen": "Artificial intelligence is ...", "rejected": "I like pie."}

Every row needs the three fields as non-empty strings; a missing or empty one is an error
naming the file, the line and the field.

``source: toy`` builds pairs from the embedded chatterbot instruction corpus (the pairs
:func:`deltatune.lm.instructions.load_instruction_pairs` gives): *chosen* is the corpus
answer and *rejected* the answer to another, randomly drawn question. It is a **toy**: the
rejected answers are fluent but off-topic, so "prefer the on-topic answer" is all it can
teach; it exercises the mechanics of reward models and DPO, it does not measure alignment.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np

from deltatune.config import BaseConfig
from deltatune.errors import ConfigError, DeltatuneError

TOY = "toy"
FIELDS = ("prompt", "chosen", "rejected")


@dataclasses.dataclass(frozen=True)
class PreferencePair:
    """A prompt with a preferred (``chosen``) and a dispreferred (``rejected``) answer."""

    prompt: str
    chosen: str
    rejected: str


@dataclasses.dataclass
class PreferenceDataConfig(BaseConfig):
    """The ``data:`` section of ``deltatune reward`` / ``deltatune dpo``.

    Fields:
        source: ``"toy"`` (built from the embedded instruction pairs, see the module
            docstring) or a ``.jsonl``/``.json`` file of ``{"prompt","chosen","rejected"}``
            rows. Default ``"toy"``.
        eval_fraction: share of the prompts held out to report on (split by prompt, so no
            held-out prompt is trained on). Default ``0.1``.
        seed: seed of the split, the toy pairing and the caps. Default ``0``.
        max_train_pairs: keep at most this many training pairs (seeded); ``None``: all.
            Default ``None``.
        max_eval_pairs: the same cap for the held-out pairs. Default ``None``.
        max_length: tokens per prompt + answer (longer ones lose the prompt's start first).
            Default ``96``.
    """

    source: str = TOY
    eval_fraction: float = 0.1
    seed: int = 0
    max_train_pairs: int | None = None
    max_eval_pairs: int | None = None
    max_length: int = 96

    def validate(self) -> None:
        if not self.source.strip():
            raise ConfigError(
                "data.source: is empty; use 'toy' or a .jsonl file of preference rows"
            )
        if not 0.0 < self.eval_fraction < 1.0:
            raise ConfigError(f"data.eval_fraction: value {self.eval_fraction!r} must be in (0, 1)")
        for name in ("max_train_pairs", "max_eval_pairs"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"data.{name}: value {value!r} must be >= 1 or null (all)")
        if self.max_length < 8:
            raise ConfigError(f"data.max_length: value {self.max_length!r} must be >= 8")


def _check_row(row: object, path: Path, where: str) -> PreferencePair:
    if not isinstance(row, dict):
        raise DeltatuneError(f"'{path}'{where}: expected a JSON object, got {row!r:.60}")
    values = []
    for field in FIELDS:
        if field not in row:
            raise DeltatuneError(
                f"'{path}'{where}: missing field '{field}' (a preference row needs "
                f"{', '.join(FIELDS)})"
            )
        value = row[field]
        if not isinstance(value, str):
            raise DeltatuneError(
                f"'{path}'{where}: field '{field}' must be a string, got {value!r:.40}"
            )
        if not value.strip():
            raise DeltatuneError(f"'{path}'{where}: field '{field}' is empty")
        values.append(value.strip())
    return PreferencePair(*values)


def load_preference_file(path: str | Path) -> list[PreferencePair]:
    """Rows of a JSONL file (or a ``.json`` array) with prompt, chosen and rejected."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise ConfigError(
            f"data.source: '{p}' does not exist; use 'toy' or a .jsonl file of "
            '{"prompt", "chosen", "rejected"} rows'
        )
    content = p.read_text(encoding="utf-8-sig")
    pairs: list[PreferencePair] = []
    if content.lstrip().startswith("["):
        try:
            rows = json.loads(content)
        except json.JSONDecodeError as exc:
            raise DeltatuneError(f"'{p}' is not valid JSON: {exc}") from None
        pairs = [_check_row(r, p, f" item {i}") for i, r in enumerate(rows)]
    else:
        for number, line in enumerate(content.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DeltatuneError(
                    f"'{p}' line {number} is not valid JSON ({exc.msg}); expected one object per line"
                ) from None
            pairs.append(_check_row(row, p, f" line {number}"))
    if not pairs:
        raise DeltatuneError(f"'{p}' holds no preference rows")
    return pairs


def toy_preference_pairs(seed: int = 0) -> list[PreferencePair]:
    """The toy set: chosen = the corpus answer, rejected = the answer to another question."""
    from deltatune.lm.instructions import load_instruction_pairs

    pairs = load_instruction_pairs("chatterbot")
    rng = np.random.default_rng(seed)
    out: list[PreferencePair] = []
    n = len(pairs)
    for _i, pair in enumerate(pairs):
        # Draw until the other answer is a different text to a different question.
        for _ in range(100):
            j = int(rng.integers(n))
            other = pairs[j]
            if other.prompt != pair.prompt and other.response != pair.response:
                out.append(PreferencePair(pair.prompt, pair.response, other.response))
                break
    return out


def load_preference_pairs(source: str = TOY, seed: int = 0) -> list[PreferencePair]:
    return toy_preference_pairs(seed) if source == TOY else load_preference_file(source)


def split_preference_pairs(
    pairs: list[PreferencePair],
    eval_fraction: float,
    seed: int = 0,
    max_train: int | None = None,
    max_eval: int | None = None,
) -> tuple[list[PreferencePair], list[PreferencePair]]:
    """(train, held-out) split by prompt (every pair of one prompt lands on one side)."""
    prompts = sorted({p.prompt for p in pairs})
    n_eval = round(len(prompts) * eval_fraction)
    if n_eval == 0 or n_eval >= len(prompts):
        raise DeltatuneError(
            f"{len(prompts)} distinct prompts cannot be split with eval_fraction={eval_fraction}; "
            "give more rows or change data.eval_fraction"
        )
    order = np.random.default_rng(seed).permutation(len(prompts))
    held = {prompts[i] for i in order[:n_eval]}
    train = [p for p in pairs if p.prompt not in held]
    evals = [p for p in pairs if p.prompt in held]
    rng = np.random.default_rng(seed + 1)

    def cap(items: list[PreferencePair], n: int | None) -> list[PreferencePair]:
        if n is None or len(items) <= n:
            return items
        return [items[k] for k in sorted(rng.choice(len(items), size=n, replace=False).tolist())]

    return cap(train, max_train), cap(evals, max_eval)


def load_preference_splits(
    cfg: PreferenceDataConfig,
) -> tuple[list[PreferencePair], list[PreferencePair]]:
    pairs = load_preference_pairs(cfg.source, cfg.seed)
    return split_preference_pairs(
        pairs, cfg.eval_fraction, cfg.seed, cfg.max_train_pairs, cfg.max_eval_pairs
    )

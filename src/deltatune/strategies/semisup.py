r"""Semi-supervised fine-tuning: a few labels plus many unlabelled examples.

The training split is cut into ``labels_per_class`` labelled examples per class (a seeded
draw) and an unlabelled pool (the rest, labels hidden; they are read only to report how
accurate the pseudo-labels were). Round 0 trains on the labelled examples alone (the
baseline). Then one of:

**Self-training** (pseudo-labels; Scudder 1965, Lee 2013): for ``rounds`` rounds, the latest
model (the teacher) labels the pool; an example is kept when its top probability reaches
``threshold``; with ``class_balance`` every class keeps the same number ``k`` of its most
confident examples (``k`` = ``max_pseudo_per_class``, or the count of the class with the
fewest confident examples), so the pseudo-labelled set does not drift toward the easy
classes. A new student, initialised from the pretrained base as in round 0, trains on the
labelled plus the kept pseudo-labelled examples and becomes the next teacher::

    labelled ──► train ──► teacher ──► label pool ──► keep p >= threshold (balanced)
                              ▲                                   │
                              └──── train fresh student ◄─────────┘  (x rounds)

**Consistency** (FixMatch-style, Sohn et al. 2020, with text augmentations): continue from
the round-0 model on the combined loss, each step one labelled batch ``(x, y)`` and one
unlabelled batch ``u`` with an augmented view ``A(u)`` (token dropout / neighbour swap from
:mod:`deltatune.data.augment`):

    q_i  = softmax(f(u_i))                      (no gradient)
    L    = CE(f(x), y) + lambda * (1/|u|) * sum_i 1[max q_i >= threshold] * CE(f(A(u_i)), argmax q_i)

Every model and optimiser state comes from the same ``train`` section; rounds after 0 are
capped by ``train.max_steps`` when it is set.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from deltatune.config import BaseConfig
from deltatune.data import DataConfig, PadCollator, TextExamples, TokenizedDataset, make_loader
from deltatune.data.augment import AugmentConfig, AugmentedTextDataset
from deltatune.data.text import load_text_splits
from deltatune.errors import ConfigError, DeltatuneError
from deltatune.io import write_json, write_text
from deltatune.models import ModelConfig, load_tokenizer
from deltatune.registry import get_method
from deltatune.train import ClassificationTask, TrainerConfig, fit, resolve_device, seed_everything
from deltatune.train.trainer import model_device, move_to_device


def _default_augment() -> AugmentConfig:
    return AugmentConfig(text=["token_dropout", "swap"])


@dataclasses.dataclass
class SemisupOptions(BaseConfig):
    """The ``semisup:`` section.

    Fields:
        strategy: ``"self-training"`` (pseudo-labels, fresh students) or ``"consistency"``
            (augmented views must agree with confident predictions). Default
            ``"self-training"``.
        labels_per_class: labelled training examples kept per class; the rest of the training
            split is the unlabelled pool. Default ``8``.
        rounds: self-training rounds after the labelled-only round 0. Default ``2``.
        threshold: least top probability for a prediction to become a pseudo-label (both
            strategies). Default ``0.8``.
        class_balance: keep the same number of pseudo-labels for every class. Default ``true``.
        max_pseudo_per_class: at most this many pseudo-labels per class and round; ``None``:
            no cap (with ``class_balance``: the smallest class's count). Default ``None``.
        max_unlabelled: use at most this many unlabelled examples (a seeded subset); ``None``
            uses the whole pool. Default ``None``.
        consistency_weight: lambda, the weight of the unlabelled loss. Default ``1.0``.
        augment: the augmentation of the consistency strategy's unlabelled view
            (:class:`~deltatune.data.augment.AugmentConfig`). Default token dropout + swap.
    """

    strategy: Literal["self-training", "consistency"] = "self-training"
    labels_per_class: int = 8
    rounds: int = 2
    threshold: float = 0.8
    class_balance: bool = True
    max_pseudo_per_class: int | None = None
    max_unlabelled: int | None = None
    consistency_weight: float = 1.0
    augment: AugmentConfig = dataclasses.field(default_factory=_default_augment)

    def validate(self) -> None:
        if self.labels_per_class < 1:
            raise ConfigError(
                f"semisup.labels_per_class: value {self.labels_per_class!r} must be >= 1"
            )
        if self.rounds < 1:
            raise ConfigError(f"semisup.rounds: value {self.rounds!r} must be >= 1")
        if not 0.0 <= self.threshold <= 1.0:
            raise ConfigError(f"semisup.threshold: value {self.threshold!r} must be in [0, 1]")
        for name in ("max_pseudo_per_class", "max_unlabelled"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"semisup.{name}: value {value!r} must be >= 1 or null")
        if not self.consistency_weight >= 0:
            raise ConfigError(
                f"semisup.consistency_weight: value {self.consistency_weight!r} must be >= 0"
            )
        if self.strategy == "consistency" and not self.augment.text:
            raise ConfigError(
                "semisup.augment.text: the consistency strategy needs an augmentation, e.g. "
                "[token_dropout, swap]"
            )


def _semisup_method() -> dict[str, Any]:
    return {
        "name": "lora",
        "r": 8,
        "lora_alpha": 16,
        "lora_dropout": 0.05,
        "target_modules": "all-linear",
    }


def _semisup_data() -> DataConfig:
    return DataConfig(max_length=64)


def _semisup_train() -> TrainerConfig:
    return TrainerConfig(epochs=15, batch_size=16, learning_rate=2e-3, max_steps=60)


@dataclasses.dataclass
class SemisupConfig(BaseConfig):
    """One ``deltatune semisup`` run (``configs/semisup.yaml``)."""

    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    data: DataConfig = dataclasses.field(default_factory=_semisup_data)
    semisup: SemisupOptions = dataclasses.field(default_factory=SemisupOptions)
    method: dict[str, Any] = dataclasses.field(default_factory=_semisup_method)
    train: TrainerConfig = dataclasses.field(default_factory=_semisup_train)
    output_dir: str = "runs/semisup"

    def validate(self) -> None:
        from deltatune.registry import config_from_dict

        config_from_dict(self.method, where="method")


# --------------------------------------------------------------------------- labels


def split_labelled(
    examples: TextExamples,
    label_names: list[str],
    per_class: int,
    seed: int,
    max_unlabelled: int | None = None,
) -> tuple[TextExamples, TextExamples]:
    """(labelled: ``per_class`` per class, unlabelled pool: the rest), seeded, source order."""
    y = np.asarray(examples.labels)
    rng = np.random.default_rng(seed)
    chosen: list[int] = []
    for k, name in enumerate(label_names):
        idx = np.flatnonzero(y == k)
        if per_class > len(idx):
            raise ConfigError(
                f"semisup.labels_per_class: value {per_class} is larger than the {len(idx)} "
                f"training examples of label '{name}'; lower it (at most {len(idx)})"
            )
        if per_class == len(idx):
            raise ConfigError(
                f"semisup.labels_per_class: value {per_class} uses every training example of "
                f"label '{name}' and leaves no unlabelled one; lower it"
            )
        chosen.extend(int(i) for i in rng.choice(idx, size=per_class, replace=False))
    taken = set(chosen)
    rest = [i for i in range(len(y)) if i not in taken]
    if max_unlabelled is not None and len(rest) > max_unlabelled:
        rest = sorted(int(i) for i in rng.choice(rest, size=max_unlabelled, replace=False))

    def take(ids: Iterable[int]) -> TextExamples:
        ids = sorted(ids)
        return TextExamples([examples.texts[i] for i in ids], [examples.labels[i] for i in ids])

    return take(chosen), take(rest)


def select_pseudo_labels(
    probs: torch.Tensor,
    threshold: float,
    class_balance: bool = True,
    max_per_class: int | None = None,
) -> tuple[list[int], list[int]]:
    """Pick pseudo-labels from class probabilities ``(N, C)``; returns (indices, labels).

    An example qualifies when its top probability is ``>= threshold``; its pseudo-label is
    the argmax. Per class the most confident qualifying examples come first; every class
    keeps at most ``max_per_class``, and with ``class_balance`` every class keeps the same
    number ``k = min(max_per_class, fewest qualifying in any class)`` (0 when some class has
    none). Ties in confidence keep the lower index. Indices come back sorted.
    """
    if probs.dim() != 2:
        raise ValueError(f"probs must be (N, C), got {tuple(probs.shape)}")
    conf, pred = probs.max(dim=1)
    per_class: list[list[int]] = []
    for c in range(probs.shape[1]):
        idx = [int(i) for i in torch.nonzero((pred == c) & (conf >= threshold)).flatten()]
        idx.sort(key=lambda i: (-float(conf[i]), i))
        per_class.append(idx)
    cap = max_per_class if max_per_class is not None else max(map(len, per_class), default=0)
    if class_balance:
        cap = min(cap, min(map(len, per_class), default=0))
    picked = sorted((i, c) for c, idx in enumerate(per_class) for i in idx[:cap])
    return [i for i, _ in picked], [c for _, c in picked]


# --------------------------------------------------------------------------- training pieces


def build_classifier(cfg: SemisupConfig, label_names: list[str]) -> nn.Module:
    """A fresh base classifier with the configured method (as ``deltatune train`` builds it)."""
    from deltatune.run import RunConfig, build_model

    run_cfg = RunConfig(model=cfg.model, data=cfg.data, method=dict(cfg.method), train=cfg.train)
    return build_model(run_cfg, label_names)


def _train_cfg(cfg: SemisupConfig) -> TrainerConfig:
    train = cfg.train
    if train.learning_rate is None:
        train = train.replace(learning_rate=get_method(str(cfg.method["name"])).default_lr)
    return train


def train_labelled(
    model: nn.Module,
    examples: TextExamples,
    tokenizer: Any,
    cfg: SemisupConfig,
    output_dir: Path | None = None,
) -> nn.Module:
    """Fit ``model`` on labelled examples (no validation set: few labels means none spare)."""
    ds = TokenizedDataset(examples, tokenizer, cfg.data.max_length)
    fit(
        model,
        ClassificationTask(num_labels=None),
        ds,
        None,
        _train_cfg(cfg),
        output_dir,
        collate_fn=PadCollator(tokenizer),
    )
    return model


@torch.no_grad()
def predict_probs(
    model: nn.Module, examples: TextExamples, tokenizer: Any, max_length: int, batch_size: int = 64
) -> torch.Tensor:
    """Softmax probabilities ``(N, C)`` of ``model`` in eval mode."""
    ds = TokenizedDataset(examples, tokenizer, max_length)
    loader = make_loader(ds, batch_size, shuffle=False, seed=0, collate=PadCollator(tokenizer))
    device = model_device(model)
    was = model.training
    model.eval()
    out = []
    try:
        for raw in loader:
            batch = move_to_device(raw, device)
            batch.pop("labels")
            logits = model(**batch)
            logits = logits if isinstance(logits, torch.Tensor) else logits.logits
            out.append(logits.float().softmax(-1).cpu())
    finally:
        model.train(was)
    return torch.cat(out)


def accuracy(model: nn.Module, examples: TextExamples, tokenizer: Any, max_length: int) -> float:
    probs = predict_probs(model, examples, tokenizer, max_length)
    return float((probs.argmax(1) == torch.tensor(examples.labels)).float().mean())


class ConsistencyDataset(Dataset[dict[str, Any]]):
    """Item ``i``: ``{"labelled": labelled[i % L], "weak": pool[i], "strong": A(pool[i])}``."""

    def __init__(
        self,
        labelled: TokenizedDataset,
        pool: TokenizedDataset,
        augment: AugmentConfig,
        tokenizer: Any,
    ) -> None:
        if len(labelled) == 0 or len(pool) == 0:
            raise DeltatuneError("consistency training needs labelled and unlabelled examples")
        self.labelled = labelled
        self.pool = pool
        special = set(getattr(tokenizer, "all_special_ids", []) or [])
        self.strong = AugmentedTextDataset(
            pool, augment, special, getattr(tokenizer, "mask_token_id", None)
        )

    def __len__(self) -> int:
        return len(self.pool)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {
            "labelled": self.labelled[index % len(self.labelled)],
            "weak": self.pool[index],
            "strong": self.strong[index],
        }


class ConsistencyCollator:
    def __init__(self, tokenizer: Any) -> None:
        self.pad = PadCollator(tokenizer)

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, dict[str, torch.Tensor]]:
        return {
            part: self.pad([it[part] for it in items]) for part in ("labelled", "weak", "strong")
        }


class ConsistencyTask:
    """The combined loss of the module docstring; ``last`` keeps the latest step's parts."""

    def __init__(self, threshold: float, weight: float) -> None:
        self.threshold = threshold
        self.weight = weight
        self.last: dict[str, float] = {}

    @staticmethod
    def _logits(model: nn.Module, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        out = model(**{k: v for k, v in batch.items() if k != "labels"})
        return (out if isinstance(out, torch.Tensor) else out.logits).float()

    def loss(self, model: nn.Module, batch: Mapping[str, Any]) -> torch.Tensor:
        lab = batch["labelled"]
        sup = F.cross_entropy(self._logits(model, lab), lab["labels"])
        with torch.no_grad():
            q = self._logits(model, batch["weak"]).softmax(-1)
        conf, pseudo = q.max(-1)
        mask = (conf >= self.threshold).float()
        strong = self._logits(model, batch["strong"])
        unsup = (F.cross_entropy(strong, pseudo, reduction="none") * mask).sum() / len(mask)
        self.last = {
            "sup": float(sup.detach()),
            "unsup": float(unsup.detach()),
            "mask_rate": float(mask.mean()),
        }
        return sup + self.weight * unsup

    def evaluate(self, model: nn.Module, loader: Iterable[Any]) -> dict[str, float]:
        raise DeltatuneError("ConsistencyTask has no validation; evaluate with ClassificationTask")


def train_consistency(
    model: nn.Module,
    labelled: TextExamples,
    pool: TextExamples,
    tokenizer: Any,
    cfg: SemisupConfig,
    output_dir: Path | None = None,
) -> dict[str, float]:
    """Continue training ``model`` with the consistency loss; returns the last step's parts."""
    n = cfg.data.max_length
    hidden = TextExamples(list(pool.texts), [0] * len(pool))  # the pool's labels stay unseen
    ds = ConsistencyDataset(
        TokenizedDataset(labelled, tokenizer, n),
        TokenizedDataset(hidden, tokenizer, n),
        cfg.semisup.augment,
        tokenizer,
    )
    task = ConsistencyTask(cfg.semisup.threshold, cfg.semisup.consistency_weight)
    fit(
        model,
        task,
        ds,
        None,
        _train_cfg(cfg),
        output_dir,
        collate_fn=ConsistencyCollator(tokenizer),
    )
    return dict(task.last)


# --------------------------------------------------------------------------- the run


def semisup_run(cfg: SemisupConfig, *, echo: Any = print) -> dict[str, Any]:
    """Labelled-only round 0, then self-training rounds or consistency training.

    Returns (and writes to ``metrics.json``) the test accuracy of every round, the
    pseudo-label counts and their accuracy against the hidden labels.
    """
    start = time.perf_counter()
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_text(out / "semisup_config.yaml", cfg.to_yaml())
    opts = cfg.semisup
    splits = load_text_splits(cfg.data)
    labelled, pool = split_labelled(
        splits.train, splits.label_names, opts.labels_per_class, cfg.train.seed, opts.max_unlabelled
    )
    tokenizer = load_tokenizer(cfg.model)
    device = resolve_device(cfg.train.device)
    n = cfg.data.max_length
    echo(
        f"semisup ({opts.strategy}): {len(labelled)} labelled ({opts.labels_per_class} per class), "
        f"{len(pool)} unlabelled, {len(splits.test)} test"
    )
    seed_everything(cfg.train.seed)
    model = build_classifier(cfg, splits.label_names).to(device)
    train_labelled(model, labelled, tokenizer, cfg, out / "round0")
    rounds: list[dict[str, Any]] = [
        {
            "round": 0,
            "train_examples": len(labelled),
            "test_accuracy": accuracy(model, splits.test, tokenizer, n),
        }
    ]
    echo(f"round 0 (labelled only): test accuracy {rounds[0]['test_accuracy']:.4f}")
    if opts.strategy == "self-training":
        for r in range(1, opts.rounds + 1):
            probs = predict_probs(model, pool, tokenizer, n)
            idx, pseudo = select_pseudo_labels(
                probs, opts.threshold, opts.class_balance, opts.max_pseudo_per_class
            )
            true = [pool.labels[i] for i in idx]
            pseudo_acc = float(np.mean([a == b for a, b in zip(pseudo, true)])) if idx else None
            train = TextExamples(
                labelled.texts + [pool.texts[i] for i in idx], labelled.labels + pseudo
            )
            seed_everything(cfg.train.seed)
            model = build_classifier(cfg, splits.label_names).to(device)
            train_labelled(model, train, tokenizer, cfg, out / f"round{r}")
            acc = accuracy(model, splits.test, tokenizer, n)
            rounds.append(
                {
                    "round": r,
                    "pseudo_labels": len(idx),
                    "pseudo_label_accuracy": pseudo_acc,
                    "train_examples": len(train),
                    "test_accuracy": acc,
                }
            )
            echo(
                f"round {r}: {len(idx)} pseudo-labels (accuracy {pseudo_acc}), test accuracy {acc:.4f}"
            )
    else:
        parts = train_consistency(model, labelled, pool, tokenizer, cfg, out / "consistency")
        acc = accuracy(model, splits.test, tokenizer, n)
        rounds.append({"round": 1, "consistency": parts, "test_accuracy": acc})
        echo(f"consistency: test accuracy {acc:.4f} (last step {parts})")
    from deltatune.checkpoint import save_adapter

    save_adapter(model, out)
    write_json(out / "labels.json", splits.label_names)
    metrics = {
        "strategy": opts.strategy,
        "labels_per_class": opts.labels_per_class,
        "labelled": len(labelled),
        "unlabelled": len(pool),
        "labelled_only_accuracy": rounds[0]["test_accuracy"],
        "semisup_accuracy": rounds[-1]["test_accuracy"],
        "rounds": rounds,
        "wall_time_s": time.perf_counter() - start,
    }
    write_json(out / "metrics.json", metrics)
    return metrics


def load_semisup_config(path: str | Path | None, overrides: list[str]) -> SemisupConfig:
    from deltatune.strategies.adapt import _load_sectioned

    cfg: SemisupConfig = _load_sectioned(SemisupConfig, path, overrides)
    return cfg


__all__ = [
    "ConsistencyTask",
    "SemisupConfig",
    "SemisupOptions",
    "predict_probs",
    "select_pseudo_labels",
    "semisup_run",
    "split_labelled",
]

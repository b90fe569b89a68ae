r"""Forgetting: measure it, and limit it with replay, L2-SP, EWC or parameter isolation.

Fine-tuning on a new task B moves weights that an earlier task A (or the pretrained model's
own skill) relied on. The *forgetting figure* compares a reference set's metrics before and
after fine-tuning::

    loss_increase  = L_ref(after) - L_ref(before)          (> 0: worse on the reference)
    accuracy_drop  = acc_ref(before) - acc_ref(after)      (> 0: forgot)

:func:`forgetting` computes it from two metric dicts (any task's ``evaluate`` output: a
classifier's loss/accuracy, a decoder's LM loss on reference text), so a run's
``metrics.json`` and a later comparison of runs show the same numbers.

Ways to limit it (they combine):

- **Replay** (:func:`replay_dataset`): mix reference examples into the training set so a
  fraction ``f`` of the mixed set (and so, on average, of every shuffled batch) is old data.
- **L2-SP** (Li et al., 2018, "Explicit inductive bias for transfer learning"): pull the
  trained weights toward their starting point ``w0``::

      Omega(w) = alpha / 2 * sum_i (w_i - w0_i)^2

- **EWC** (Kirkpatrick et al., 2017): the same pull, weighted per parameter by how much the
  reference task's log-likelihood depends on it (the diagonal Fisher information)::

      Omega(w) = lambda / 2 * sum_i F_i (w_i - w0_i)^2,
      F_i      = 1/N sum_n (d log p(y_n | x_n; w0) / d w_i)^2

  estimated by :func:`estimate_fisher` on reference examples, one example at a time, with
  their true labels (the *empirical* Fisher).
- **Parameter isolation**: train an adapter (LoRA, IA3, bottleneck adapters, ...) so the base
  weights never change; disabling the adapter (``dt.disabled(model)``) gives back the model
  before fine-tuning exactly, i.e. zero forgetting when the task is known at inference.
  :func:`measure_isolated` reports that figure next to the adapter-on one.

In a run config these are the ``continual`` section (see :class:`ContinualConfig`).
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Literal

import torch
from torch import nn
from torch.utils.data import ConcatDataset, Dataset, Subset

from deltatune.config import BaseConfig
from deltatune.errors import ConfigError, DeltatuneError
from deltatune.train.trainer import (
    Task,
    evaluate_dataset,
    model_device,
    move_to_device,
)


@dataclasses.dataclass
class ContinualConfig(BaseConfig):
    """The ``continual`` section of a run: new-task data, the reference set, the remedies.

    Fields:
        train_labels: train (and validate/test) only on examples of these labels; the head
            keeps every label of the data, so a later step can add the others (a
            class-incremental step). ``None`` uses every example. Default ``None``.
        reference_labels: the reference set for the forgetting figure: the examples of these
            labels (e.g. the labels an earlier step trained on). ``None`` measures nothing.
            Default ``None``.
        reference_source: where the reference examples come from (a ``data.source`` value);
            ``None`` = the run's own data. Its labels are matched to the run's by name.
            Default ``None``.
        reference_split: which split of the reference data the forgetting figure uses,
            ``"test"`` or ``"val"``; replay and the Fisher draw from its ``train`` split.
            Default ``"test"``.
        penalty: ``"none"``, ``"l2sp"`` or ``"ewc"`` (see the module docstring).
            Default ``"none"``.
        strength: ``alpha`` of L2-SP or ``lambda`` of EWC. Default ``0.0``.
        fisher_examples: reference training examples EWC's Fisher is estimated on.
            Default ``100``.
        penalty_exclude: parameters the penalty leaves free (regex full-match or name
            suffix), e.g. ``[classifier]`` for a new head. Default ``[]``.
        replay_fraction: fraction of the training set that is replayed reference examples,
            in [0, 1). Default ``0.0``.
    """

    train_labels: list[str] | None = None
    reference_labels: list[str] | None = None
    reference_source: str | None = None
    reference_split: Literal["val", "test"] = "test"
    penalty: Literal["none", "l2sp", "ewc"] = "none"
    strength: float = 0.0
    fisher_examples: int = 100
    penalty_exclude: list[str] = dataclasses.field(default_factory=list)
    replay_fraction: float = 0.0

    def validate(self) -> None:
        if not (math.isfinite(self.strength) and self.strength >= 0):
            raise ConfigError(f"continual.strength: value {self.strength!r} must be >= 0")
        if self.penalty != "none" and self.strength == 0:
            raise ConfigError(
                f"continual.strength: is 0 with continual.penalty={self.penalty!r}; set a "
                "positive strength (e.g. 0.01 for l2sp, 100 for ewc) or penalty=none"
            )
        if not 0.0 <= self.replay_fraction < 1.0:
            raise ConfigError(
                f"continual.replay_fraction: value {self.replay_fraction!r} must be in [0, 1)"
            )
        if self.fisher_examples < 1:
            raise ConfigError(
                f"continual.fisher_examples: value {self.fisher_examples!r} must be >= 1"
            )
        needs_reference = self.penalty == "ewc" or self.replay_fraction > 0
        if needs_reference and not self.reference_labels:
            what = "penalty=ewc" if self.penalty == "ewc" else "replay_fraction > 0"
            raise ConfigError(
                f"continual.reference_labels: {what} needs reference examples; name their "
                "labels, e.g. continual.reference_labels=[business,politics]"
            )
        for name in ("train_labels", "reference_labels"):
            value = getattr(self, name)
            if value is not None and not value:
                raise ConfigError(f"continual.{name}: is empty; name labels or use null")

    @property
    def active(self) -> bool:
        return self != ContinualConfig()


# --------------------------------------------------------------------------- the figure


def forgetting(before: Mapping[str, float], after: Mapping[str, float]) -> dict[str, float]:
    """The forgetting figure from a reference set's metrics before and after fine-tuning.

    Keeps ``loss`` and ``accuracy`` (when both dicts have them): ``<key>_before``,
    ``<key>_after``, ``loss_increase = after - before`` and ``accuracy_drop = before - after``
    (both positive when the model got worse on the reference set).
    """
    out: dict[str, float] = {}
    for key in ("loss", "accuracy"):
        if key in before and key in after:
            out[f"{key}_before"] = float(before[key])
            out[f"{key}_after"] = float(after[key])
    if "loss_before" in out:
        out["loss_increase"] = out["loss_after"] - out["loss_before"]
    if "accuracy_before" in out:
        out["accuracy_drop"] = out["accuracy_before"] - out["accuracy_after"]
    if not out:
        raise DeltatuneError(
            f"cannot compute forgetting: the metrics have neither 'loss' nor 'accuracy' "
            f"(before: {sorted(before)}, after: {sorted(after)})"
        )
    return out


def measure_isolated(
    model: nn.Module,
    task: Task,
    dataset: Dataset[Any],
    *,
    batch_size: int = 64,
    collate_fn: Callable[[list[Any]], Any] | None = None,
) -> dict[str, float] | None:
    """Reference metrics with the adapters switched off (parameter isolation), or ``None``.

    ``None`` when the model's method changes the base weights in place (full fine-tuning,
    layer freezing) or has no adapter to disable.
    """
    from deltatune.model import adapter_layers, disabled, state_of

    state = state_of(model)
    if state.in_place_params or not any(True for _ in adapter_layers(model)):
        return None
    with disabled(model):
        return evaluate_dataset(model, task, dataset, batch_size=batch_size, collate_fn=collate_fn)


# --------------------------------------------------------------------------- penalties


def _matches(name: str, patterns: Sequence[str]) -> bool:
    """A regex full match, or the pattern is a run of whole name segments (``classifier``
    matches ``classifier.weight`` and ``classifier.modules_to_save.default.bias``)."""
    return any(re.fullmatch(p, name) or f".{p}." in f".{name}." for p in patterns)


def anchored_parameters(model: nn.Module, exclude: Sequence[str] = ()) -> dict[str, nn.Parameter]:
    """The trainable parameters a penalty anchors (all but those ``exclude`` names)."""
    return {
        n: p for n, p in model.named_parameters() if p.requires_grad and not _matches(n, exclude)
    }


class L2SP:
    """``alpha/2 * sum_i (w_i - w0_i)^2`` over the trainable parameters, ``w0`` = their values
    when this object is made (the pretrained / previous-step weights).

    Call it with no argument to get the penalty (a scalar with gradient).
    """

    def __init__(self, model: nn.Module, alpha: float, exclude: Sequence[str] = ()) -> None:
        if not alpha >= 0:
            raise ConfigError(f"L2-SP alpha: value {alpha!r} must be >= 0")
        self.alpha = alpha
        self.params = anchored_parameters(model, exclude)
        if not self.params:
            raise ConfigError(
                "L2-SP: no trainable parameter to anchor (check the exclude patterns and that "
                "a method was injected)"
            )
        self.anchor = {n: p.detach().clone() for n, p in self.params.items()}

    def __call__(self) -> torch.Tensor:
        total = sum(((p - self.anchor[n].to(p.device)) ** 2).sum() for n, p in self.params.items())
        assert isinstance(total, torch.Tensor)
        return 0.5 * self.alpha * total


class EWC:
    """``lambda/2 * sum_i F_i (w_i - w0_i)^2`` with ``F`` from :func:`estimate_fisher`;
    ``w0`` are the parameters' values when this object is made."""

    def __init__(self, model: nn.Module, fisher: Mapping[str, torch.Tensor], lam: float) -> None:
        if not lam >= 0:
            raise ConfigError(f"EWC lambda: value {lam!r} must be >= 0")
        named = dict(model.named_parameters())
        unknown = [n for n in fisher if n not in named]
        if unknown:
            raise DeltatuneError(f"EWC: the Fisher names parameters the model lacks: {unknown[:3]}")
        if not fisher:
            raise DeltatuneError("EWC: the Fisher is empty (no trainable parameter?)")
        self.lam = lam
        self.params = {n: named[n] for n in fisher}
        self.fisher = {n: f.detach().clone() for n, f in fisher.items()}
        self.anchor = {n: p.detach().clone() for n, p in self.params.items()}

    def __call__(self) -> torch.Tensor:
        total = sum(
            (self.fisher[n].to(p.device) * (p - self.anchor[n].to(p.device)) ** 2).sum()
            for n, p in self.params.items()
        )
        assert isinstance(total, torch.Tensor)
        return 0.5 * self.lam * total


def estimate_fisher(
    model: nn.Module,
    task: Task,
    examples: Iterable[Any],
    *,
    collate_fn: Callable[[list[Any]], Any] | None = None,
    exclude: Sequence[str] = (),
) -> dict[str, torch.Tensor]:
    """Diagonal empirical Fisher of the trainable parameters on ``examples`` (dataset items).

    ``F_i = 1/N sum_n (d loss_n / d w_i)^2`` where ``loss_n`` is the task's loss on example
    ``n`` alone (cross-entropy = ``-log p(y_n | x_n)`` for a classifier). Computed in eval mode
    (no dropout); gradients already on the parameters are left untouched.
    """
    params = anchored_parameters(model, exclude)
    if not params:
        raise DeltatuneError("EWC: no trainable parameter to estimate the Fisher of")
    fisher = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in params.items()}
    device = model_device(model)
    was_training = model.training
    model.eval()
    count = 0
    try:
        for item in examples:
            batch = collate_fn([item]) if collate_fn is not None else _stack_one(item)
            batch = move_to_device(batch, device)
            grads = torch.autograd.grad(
                task.loss(model, batch), list(params.values()), allow_unused=True
            )
            for (n, _), g in zip(params.items(), grads):
                if g is not None:
                    fisher[n] += g.detach().float() ** 2
            count += 1
    finally:
        model.train(was_training)
    if count == 0:
        raise DeltatuneError("EWC: no reference example to estimate the Fisher on")
    return {n: f / count for n, f in fisher.items()}


def _stack_one(item: Any) -> Any:
    if isinstance(item, Mapping):
        return {k: torch.as_tensor(v).unsqueeze(0) for k, v in item.items()}
    raise DeltatuneError("estimate_fisher needs a collate_fn for items that are not dicts")


class PenalizedTask:
    """A task whose training loss adds penalties: ``task.loss + sum(penalty())``.

    Evaluation is the wrapped task's (metrics without the penalty).
    """

    def __init__(self, task: Task, penalties: Sequence[Callable[[], torch.Tensor]]) -> None:
        self.task = task
        self.penalties = list(penalties)
        names = getattr(task, "metric_names", None)
        if names is not None:
            self.metric_names = names

    def loss(self, model: nn.Module, batch: Mapping[str, Any]) -> torch.Tensor:
        loss = self.task.loss(model, batch)
        for penalty in self.penalties:
            loss = loss + penalty()
        return loss

    def evaluate(self, model: nn.Module, loader: Iterable[Any]) -> dict[str, float]:
        return self.task.evaluate(model, loader)


# --------------------------------------------------------------------------- replay


def replay_count(n_train: int, fraction: float) -> int:
    """Reference examples to add so they are ``fraction`` of the mixed training set."""
    if not 0.0 <= fraction < 1.0:
        raise ConfigError(f"replay fraction: value {fraction!r} must be in [0, 1)")
    return round(fraction / (1.0 - fraction) * n_train)


def replay_dataset(
    train: Dataset[Any], reference: Dataset[Any], fraction: float, seed: int = 0
) -> Dataset[Any]:
    """``train`` plus a seeded sample of ``reference`` making up ``fraction`` of the result.

    The trainer shuffles the mixed set, so every batch holds old examples in that proportion
    on average. When the reference set is smaller than needed, it is repeated.
    """
    n_train = len(train)  # type: ignore[arg-type]
    n_ref = len(reference)  # type: ignore[arg-type]
    k = replay_count(n_train, fraction)
    if k == 0:
        return train
    if n_ref == 0:
        raise DeltatuneError("replay: the reference set is empty")
    gen = torch.Generator().manual_seed(seed)
    rounds = -(-k // n_ref)
    picks = torch.cat([torch.randperm(n_ref, generator=gen) for _ in range(rounds)])[:k]
    return ConcatDataset([train, Subset(reference, picks.tolist())])


# --------------------------------------------------------------------------- in a run


def keep_labels(examples: Any, label_ids: set[int]) -> Any:
    """The examples (a :class:`~deltatune.data.TextExamples`) whose label id is in the set."""
    from deltatune.data import TextExamples

    pairs = [(t, y) for t, y in zip(examples.texts, examples.labels) if y in label_ids]
    return TextExamples([t for t, _ in pairs], [y for _, y in pairs])


def label_ids(names: Sequence[str], label_names: Sequence[str], field: str) -> set[int]:
    """Ids of ``names`` among the run's ``label_names``; an unknown name is a ConfigError."""
    from deltatune.errors import did_you_mean

    out = set()
    for name in names:
        if name not in label_names:
            raise ConfigError(
                f"continual.{field}: label {name!r} is not one of the data's labels "
                f"({', '.join(label_names)})" + did_you_mean(str(name), label_names)
            )
        out.add(list(label_names).index(name))
    return out


def continual_splits(cfg: ContinualConfig, data: Any, splits: Any) -> tuple[Any, Any, Any]:
    """Apply ``train_labels`` to a run's splits; return (splits, reference train, reference eval).

    The reference examples (``None`` when ``reference_labels`` is unset) carry the run's label
    ids, matched by name when they come from another ``reference_source``.
    """
    import dataclasses as dc

    from deltatune.data import TextExamples, load_text_splits

    names = splits.label_names
    if cfg.train_labels is not None:
        ids = label_ids(cfg.train_labels, names, "train_labels")
        splits = dc.replace(
            splits,
            train=keep_labels(splits.train, ids),
            val=keep_labels(splits.val, ids),
            test=keep_labels(splits.test, ids),
        )
        if len(splits.train) == 0:
            raise ConfigError(f"continual.train_labels: {cfg.train_labels} leave no example")
    if cfg.reference_labels is None:
        return splits, None, None
    if cfg.reference_source is None:
        ref = splits if cfg.train_labels is None else load_text_splits(data)
        ref_names = names
    else:
        ref = load_text_splits(data.replace(source=cfg.reference_source))
        ref_names = ref.label_names
    wanted = label_ids(cfg.reference_labels, ref_names, "reference_labels")

    def to_run_ids(examples: Any) -> Any:
        kept = keep_labels(examples, wanted)
        mapped = []
        for y in kept.labels:
            name = ref_names[y]
            if name not in names:
                raise ConfigError(
                    f"continual.reference_source: label {name!r} is not one of the run's labels "
                    f"({', '.join(names)})"
                )
            mapped.append(list(names).index(name))
        return TextExamples(kept.texts, mapped)

    split = ref.test if cfg.reference_split == "test" else ref.val
    ref_train, ref_eval = to_run_ids(ref.train), to_run_ids(split)
    if len(ref_eval) == 0:
        raise ConfigError(
            f"continual.reference_labels: {cfg.reference_labels} have no example in the "
            f"reference {cfg.reference_split} split"
        )
    return splits, ref_train, ref_eval


def prepare_continual(
    cfg: ContinualConfig,
    model: nn.Module,
    task: Task,
    train_ds: Dataset[Any],
    ref_train: Dataset[Any] | None,
    ref_eval: Dataset[Any] | None,
    *,
    collate_fn: Callable[[list[Any]], Any] | None,
    batch_size: int,
    seed: int,
) -> tuple[Task, Dataset[Any], dict[str, float] | None]:
    """Before training: the reference metrics, the penalty and the replay mix.

    Returns (the task to train with, the training set to train on, the reference metrics
    before training or ``None``).
    """
    before = None
    if ref_eval is not None:
        before = evaluate_dataset(
            model, task, ref_eval, batch_size=batch_size, collate_fn=collate_fn
        )
    penalties: list[Callable[[], torch.Tensor]] = []
    if cfg.penalty == "l2sp":
        penalties.append(L2SP(model, cfg.strength, cfg.penalty_exclude))
    elif cfg.penalty == "ewc":
        assert ref_train is not None  # ContinualConfig.validate
        n = min(cfg.fisher_examples, len(ref_train))  # type: ignore[arg-type]
        picks = torch.randperm(len(ref_train), generator=torch.Generator().manual_seed(seed))[:n]  # type: ignore[arg-type]
        fisher = estimate_fisher(
            model,
            task,
            (ref_train[int(i)] for i in picks),
            collate_fn=collate_fn,
            exclude=cfg.penalty_exclude,
        )
        penalties.append(EWC(model, fisher, cfg.strength))
    if cfg.replay_fraction > 0:
        assert ref_train is not None
        train_ds = replay_dataset(train_ds, ref_train, cfg.replay_fraction, seed)
    return (PenalizedTask(task, penalties) if penalties else task), train_ds, before


def report_forgetting(
    model: nn.Module,
    task: Task,
    ref_eval: Dataset[Any],
    before: Mapping[str, float],
    *,
    collate_fn: Callable[[list[Any]], Any] | None,
    batch_size: int,
) -> dict[str, Any]:
    """After training: ``{"forgetting": figure, "forgetting_isolated": figure | None}``."""
    after = evaluate_dataset(model, task, ref_eval, batch_size=batch_size, collate_fn=collate_fn)
    isolated = measure_isolated(model, task, ref_eval, batch_size=batch_size, collate_fn=collate_fn)
    return {
        "forgetting": forgetting(before, after),
        "forgetting_isolated": forgetting(before, isolated) if isolated is not None else None,
        "reference_examples": len(ref_eval),  # type: ignore[arg-type]
    }

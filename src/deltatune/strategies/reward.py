r"""A reward model: a sequence-classification head with one output, trained on preference pairs.

The Bradley-Terry model says the chosen answer ``y_c`` beats the rejected ``y_r`` with
probability ``sigma(r(x, y_c) - r(x, y_r))``, where ``r`` is the model's scalar score of the
prompt ``x`` with an answer. Training maximises that likelihood (Ouyang et al., 2022, eq. 1):

    L = - (1 / N) * sum_i log sigma( r(x_i, y_c,i) - r(x_i, y_r,i) )

::

    (prompt, chosen)   ─► encoder/decoder ─► head ─► r_c ─┐
    (prompt, rejected) ─► (same weights)  ─► head ─► r_r ─┴─► -log sigma(r_c - r_r)

The pair is encoded as a text pair (``tokenizer(prompt, answer)``: ``[CLS] x [SEP] y [SEP]``
for BERT-like encoders, the two texts one after the other for decoders). Reported: pairwise
accuracy (share of held-out pairs with ``r_c > r_r``) and the mean margin ``r_c - r_r``.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from deltatune.config import BaseConfig
from deltatune.data.loader import make_loader
from deltatune.errors import DeltatuneError
from deltatune.io import write_json, write_text
from deltatune.model import inject, trainable_report
from deltatune.models import ModelConfig, load_classifier, load_tokenizer
from deltatune.registry import config_from_dict, get_method
from deltatune.strategies.preference import (
    PreferenceDataConfig,
    PreferencePair,
    load_preference_splits,
)
from deltatune.train import TrainerConfig, fit, resolve_device, seed_everything
from deltatune.train.trainer import model_device, move_to_device, output_logits


def pairwise_loss(chosen: torch.Tensor, rejected: torch.Tensor) -> torch.Tensor:
    """Bradley-Terry loss ``mean(-log sigma(r_c - r_r))`` (``logsigmoid`` for stability)."""
    return -F.logsigmoid(chosen.float() - rejected.float()).mean()


class PairDataset(Dataset[dict[str, Any]]):
    """Items ``{"chosen": enc(prompt, chosen), "rejected": enc(prompt, rejected)}``."""

    def __init__(self, pairs: list[PreferencePair], tokenizer: Any, max_length: int) -> None:
        if not pairs:
            raise DeltatuneError("no preference pairs to train or evaluate on")
        prompts = [p.prompt for p in pairs]
        kw = {"truncation": True, "max_length": max_length}
        self.chosen = tokenizer(prompts, [p.chosen for p in pairs], **kw)
        self.rejected = tokenizer(prompts, [p.rejected for p in pairs], **kw)
        self.n = len(pairs)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {
            "chosen": {k: v[index] for k, v in self.chosen.items()},
            "rejected": {k: v[index] for k, v in self.rejected.items()},
        }


class PairCollator:
    """Pad the chosen and the rejected halves together (one forward pass for both)."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        rows = [it["chosen"] for it in items] + [it["rejected"] for it in items]
        batch = self.tokenizer.pad(rows, padding=True, return_tensors="pt")
        return {k: torch.as_tensor(v) for k, v in batch.items()}


def _rewards(
    model: nn.Module, batch: Mapping[str, torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    scores = output_logits(model(**batch)).float()
    if scores.dim() == 2:
        if scores.shape[1] != 1:
            raise DeltatuneError(
                f"a reward model has one output; this one has {scores.shape[1]} (num_labels=1)"
            )
        scores = scores[:, 0]
    half = len(scores) // 2
    return scores[:half], scores[half:]


class RewardTask:
    """:func:`deltatune.train.fit` task: pairwise loss; ``accuracy`` and ``margin`` on pairs."""

    metric_names = ("loss", "accuracy", "margin")

    def loss(self, model: nn.Module, batch: Mapping[str, Any]) -> torch.Tensor:
        chosen, rejected = _rewards(model, batch)
        return pairwise_loss(chosen, rejected)

    def evaluate(self, model: nn.Module, loader: Iterable[Any]) -> dict[str, float]:
        device = model_device(model)
        total, wins, margin, n = 0.0, 0, 0.0, 0
        with torch.no_grad():
            for raw in loader:
                chosen, rejected = _rewards(model, move_to_device(raw, device))
                total += float(pairwise_loss(chosen, rejected)) * len(chosen)
                wins += int((chosen > rejected).sum())
                margin += float((chosen - rejected).sum())
                n += len(chosen)
        if n == 0:
            raise DeltatuneError("no held-out pairs to evaluate the reward model on")
        return {"loss": total / n, "accuracy": wins / n, "margin": margin / n}


def _reward_method() -> dict[str, Any]:
    return {
        "name": "lora",
        "r": 8,
        "lora_alpha": 16,
        "lora_dropout": 0.05,
        "target_modules": "all-linear",
    }


def _reward_train() -> TrainerConfig:
    return TrainerConfig(epochs=1, batch_size=16)


def _reward_data() -> PreferenceDataConfig:
    return PreferenceDataConfig(max_length=64)


@dataclasses.dataclass
class RewardConfig(BaseConfig):
    """One ``deltatune reward`` run (``configs/reward.yaml``)::

    model:  {name_or_path: embedded-minilm}   # any sequence-classification-capable model
    data:   {source: toy, ...}                # PreferenceDataConfig
    method: {name: lora, ...}                 # the head is always trained (modules_to_save)
    train:  {epochs: 1, ...}
    output_dir: runs/reward
    """

    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    data: PreferenceDataConfig = dataclasses.field(default_factory=_reward_data)
    method: dict[str, Any] = dataclasses.field(default_factory=_reward_method)
    train: TrainerConfig = dataclasses.field(default_factory=_reward_train)
    output_dir: str = "runs/reward"

    def validate(self) -> None:
        config_from_dict(self.method, where="method")


def build_reward_model(cfg: RewardConfig) -> nn.Module:
    """The base with a new one-output head and the configured method (head trainable)."""
    model = load_classifier(cfg.model, ["reward"])
    method_cfg = config_from_dict(cfg.method, where="method")
    if method_cfg.task_type is None and "modules_to_save" in method_cfg.field_types():
        method_cfg = method_cfg.replace(task_type="SEQ_CLS")
    if method_cfg.base_model_name_or_path is None:
        method_cfg = method_cfg.replace(base_model_name_or_path=cfg.model.name_or_path)
    inject(model, method_cfg)
    return model


def reward_run(cfg: RewardConfig, *, echo: Any = print) -> dict[str, Any]:
    """Train the reward model; held-out pairwise accuracy before and after -> ``metrics.json``."""
    start = time.perf_counter()
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_text(out / "reward_config.yaml", cfg.to_yaml())
    seed_everything(cfg.train.seed)
    train_pairs, eval_pairs = load_preference_splits(cfg.data)
    tokenizer = load_tokenizer(cfg.model)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = build_reward_model(cfg).to(resolve_device(cfg.train.device))
    spec = get_method(str(cfg.method["name"]))
    report = trainable_report(model)
    echo(
        f"reward model ({spec.name}): {len(train_pairs)} training pairs, {len(eval_pairs)} held "
        f"out, {report.trainable:,} trainable of {report.total:,} parameters"
    )
    collate = PairCollator(tokenizer)
    train_ds = PairDataset(train_pairs, tokenizer, cfg.data.max_length)
    eval_ds = PairDataset(eval_pairs, tokenizer, cfg.data.max_length)
    task = RewardTask()

    def evaluate() -> dict[str, float]:
        loader = make_loader(
            eval_ds, cfg.train.eval_batch_size, shuffle=False, seed=0, collate=collate
        )
        was = model.training
        model.eval()
        try:
            return task.evaluate(model, loader)
        finally:
            model.train(was)

    before = evaluate()
    train_cfg = cfg.train
    if train_cfg.learning_rate is None:
        train_cfg = train_cfg.replace(learning_rate=spec.default_lr)
    result = fit(model, task, train_ds, None, train_cfg, out, collate_fn=collate)
    after = evaluate()
    from deltatune.checkpoint import save_adapter

    save_adapter(model, out)
    metrics = {
        "train_pairs": len(train_pairs),
        "eval_pairs": len(eval_pairs),
        "steps": result.steps,
        "before": before,
        "after": after,
        "trainable_params": report.trainable,
        "wall_time_s": time.perf_counter() - start,
    }
    write_json(out / "metrics.json", metrics)
    echo(
        f"held-out pairwise accuracy {before['accuracy']:.3f} -> {after['accuracy']:.3f} "
        f"(margin {before['margin']:.3f} -> {after['margin']:.3f})"
    )
    return metrics


def load_reward_config(path: str | Path | None, overrides: list[str]) -> RewardConfig:
    from deltatune.strategies.adapt import _load_sectioned

    cfg: RewardConfig = _load_sectioned(RewardConfig, path, overrides)
    return cfg

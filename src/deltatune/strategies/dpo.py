r"""Direct Preference Optimization (DPO; Rafailov et al., 2023) with an adapter.

For a prompt ``x`` with a chosen answer ``y_c`` and a rejected ``y_r``, the policy
``pi`` (the model with its adapter) and the reference ``pi_ref`` (the same model with the
adapter disabled: no second copy in memory):

    h   = beta * [ (log pi(y_c|x) - log pi_ref(y_c|x)) - (log pi(y_r|x) - log pi_ref(y_r|x)) ]
    L   = - (1 / N) * sum_i log sigma(h_i)

where ``log pi(y|x) = sum_t log p(y_t | x, y_<t)`` over the answer tokens only. The implicit
reward of an answer is ``beta * (log pi(y|x) - log pi_ref(y|x))``; ``h`` is the reward
margin, and "chosen beats rejected" means ``h > 0``::

    (x, y_c), (x, y_r) ─► policy (adapter on)        ─► log pi(y_c), log pi(y_r)     (grad)
                      └─► same model, adapter off    ─► log pi_ref(y_c), log pi_ref(y_r)  (no grad)
                                      └──► h = beta·(Δ_c − Δ_r) ──► −log σ(h)

Methods that change the base weights in place (``full``, ``freeze``) have no adapter to turn
off: the reference is then a frozen copy taken before training (twice the memory; said so in
the log). Before training the policy *is* the reference, so every margin is 0; the held-out
report therefore also gives the policy's own log-probability preference
``log pi(y_c|x) - log pi(y_r|x)`` (and the share of pairs where it is > 0), before and after.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import time
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from deltatune.config import BaseConfig
from deltatune.data.loader import make_loader
from deltatune.errors import ConfigError, DeltatuneError
from deltatune.io import write_json, write_text
from deltatune.model import disabled, inject, state_of, trainable_report
from deltatune.registry import config_from_dict, get_method
from deltatune.strategies.adapt import StrategyModelConfig, load_lm
from deltatune.strategies.preference import (
    PreferenceDataConfig,
    PreferencePair,
    load_preference_splits,
)
from deltatune.train import TrainerConfig, fit, resolve_device, seed_everything
from deltatune.train.trainer import model_device, move_to_device, output_logits

IGNORE_INDEX = -100


def dpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    beta: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(loss, chosen_rewards, rejected_rewards)`` from summed answer log-probs ``(N,)``."""
    chosen_rewards = beta * (policy_chosen - ref_chosen)
    rejected_rewards = beta * (policy_rejected - ref_rejected)
    loss = -F.logsigmoid(chosen_rewards - rejected_rewards).mean()
    return loss, chosen_rewards.detach(), rejected_rewards.detach()


def sequence_logprobs(model: nn.Module, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """``sum_t log p(y_t | ...)`` per row over the positions whose label is not -100."""
    from deltatune.lm.task import _takes_use_cache

    inputs: dict[str, Any] = {k: v for k, v in batch.items() if k != "labels"}
    if _takes_use_cache(model):
        inputs["use_cache"] = False  # no key/value cache in training: memory only
    labels = batch["labels"]
    # Methods that prepend virtual tokens (prompt tuning) return longer logits; the labelled
    # positions are the last ones.
    logits = output_logits(model(**inputs))[:, -labels.shape[1] :][:, :-1].float()
    labels = labels[:, 1:]
    mask = labels != IGNORE_INDEX
    picked = torch.gather(logits.log_softmax(-1), 2, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (picked * mask).sum(-1)


def encode_pair(
    tokenizer: Any, pair: PreferencePair, max_length: int, chat_template: bool = True
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The chosen and rejected examples as SFT examples (labels on the answer only)."""
    from deltatune.lm.instructions import build_example, encode_answer, encode_prompt

    prompt = encode_prompt(tokenizer, pair.prompt, chat_template=chat_template)
    return (
        build_example(prompt, encode_answer(tokenizer, pair.chosen), max_length),
        build_example(prompt, encode_answer(tokenizer, pair.rejected), max_length),
    )


class DPODataset(Dataset[dict[str, Any]]):
    def __init__(self, pairs: list[PreferencePair], tokenizer: Any, max_length: int) -> None:
        if not pairs:
            raise DeltatuneError("no preference pairs to train or evaluate on")
        self.items = [encode_pair(tokenizer, p, max_length) for p in pairs]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, Any]:
        chosen, rejected = self.items[index]
        return {"chosen": chosen, "rejected": rejected}


class DPOCollator:
    """One right-padded batch: the chosen rows first, then the rejected rows."""

    def __init__(self, pad_token_id: int) -> None:
        from deltatune.lm.instructions import CausalLMCollator

        self.pad = CausalLMCollator(pad_token_id)

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        return dict(self.pad([it["chosen"] for it in items] + [it["rejected"] for it in items]))


@contextlib.contextmanager
def reference_of(model: nn.Module, reference: nn.Module | None) -> Iterator[nn.Module]:
    """The reference policy: ``reference`` if given, else ``model`` with adapters disabled."""
    if reference is not None:
        yield reference
        return
    with disabled(model):
        yield model


class DPOTask:
    """:func:`deltatune.train.fit` task for DPO (see the module docstring).

    ``evaluate`` returns ``loss``, ``margin`` (mean ``h``), ``accuracy`` (share with
    ``h > 0``), ``logp_margin`` (mean ``log pi(y_c) - log pi(y_r)``) and ``logp_accuracy``.
    """

    metric_names = ("loss", "margin", "accuracy", "logp_margin", "logp_accuracy")

    def __init__(self, beta: float = 0.1, reference: nn.Module | None = None) -> None:
        if not beta > 0:
            raise ConfigError(f"dpo.beta: value {beta!r} must be > 0 (e.g. 0.1)")
        self.beta = beta
        self.reference = reference

    def _logps(
        self, model: nn.Module, batch: Mapping[str, torch.Tensor]
    ) -> tuple[torch.Tensor, ...]:
        policy = sequence_logprobs(model, batch)
        with torch.no_grad(), reference_of(model, self.reference) as ref:
            reference = sequence_logprobs(ref, batch)
        half = len(policy) // 2
        return policy[:half], policy[half:], reference[:half], reference[half:]

    def loss(self, model: nn.Module, batch: Mapping[str, Any]) -> torch.Tensor:
        pc, pr, rc, rr = self._logps(model, batch)
        return dpo_loss(pc, pr, rc, rr, self.beta)[0]

    def evaluate(self, model: nn.Module, loader: Iterable[Any]) -> dict[str, float]:
        device = model_device(model)
        sums = dict.fromkeys(self.metric_names, 0.0)
        n = 0
        with torch.no_grad():
            for raw in loader:
                pc, pr, rc, rr = self._logps(model, move_to_device(raw, device))
                loss, cr, rr_ = dpo_loss(pc, pr, rc, rr, self.beta)
                h = cr - rr_
                sums["loss"] += float(loss) * len(h)
                sums["margin"] += float(h.sum())
                sums["accuracy"] += float((h > 0).sum())
                sums["logp_margin"] += float((pc - pr).sum())
                sums["logp_accuracy"] += float((pc > pr).sum())
                n += len(h)
        if n == 0:
            raise DeltatuneError("no held-out pairs to evaluate DPO on")
        return {k: v / n for k, v in sums.items()}


@dataclasses.dataclass
class DPOOptions(BaseConfig):
    """The ``dpo:`` section.

    Fields:
        beta: strength of the pull toward the reference (the KL weight). Default ``0.1``.
    """

    beta: float = 0.1

    def validate(self) -> None:
        if not self.beta > 0:
            raise ConfigError(f"dpo.beta: value {self.beta!r} must be > 0 (e.g. 0.1)")


def _dpo_model() -> StrategyModelConfig:
    return StrategyModelConfig(name_or_path="embedded-smollm2")


def _dpo_method() -> dict[str, Any]:
    return {
        "name": "lora",
        "r": 8,
        "lora_alpha": 16,
        "lora_dropout": 0.0,
        "target_modules": "all-linear",
    }


def _dpo_train() -> TrainerConfig:
    return TrainerConfig(epochs=1, batch_size=4, learning_rate=5e-4, max_steps=10, warmup_ratio=0.0)


def _dpo_data() -> PreferenceDataConfig:
    return PreferenceDataConfig(max_length=64, max_train_pairs=40, max_eval_pairs=32)


@dataclasses.dataclass
class DPOConfig(BaseConfig):
    """One ``deltatune dpo`` run (``configs/dpo.yaml``)."""

    model: StrategyModelConfig = dataclasses.field(default_factory=_dpo_model)
    data: PreferenceDataConfig = dataclasses.field(default_factory=_dpo_data)
    dpo: DPOOptions = dataclasses.field(default_factory=DPOOptions)
    method: dict[str, Any] = dataclasses.field(default_factory=_dpo_method)
    train: TrainerConfig = dataclasses.field(default_factory=_dpo_train)
    output_dir: str = "runs/dpo"

    def validate(self) -> None:
        config_from_dict(self.method, where="method")


def prepare_dpo(model: nn.Module, beta: float, echo: Any = print) -> DPOTask:
    """The DPO task for ``model`` (adapter already injected): a copy as the reference only when
    the method trains the base in place."""
    reference = None
    if state_of(model).in_place_params:
        echo("the method trains the base in place: the DPO reference is a frozen copy (2x memory)")
        reference = copy.deepcopy(model).eval()
        for p in reference.parameters():
            p.requires_grad_(False)
    return DPOTask(beta, reference)


def dpo_run(cfg: DPOConfig, *, echo: Any = print) -> dict[str, Any]:
    """DPO with the configured method; held-out margins before and after -> ``metrics.json``."""
    start = time.perf_counter()
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_text(out / "dpo_config.yaml", cfg.to_yaml())
    seed_everything(cfg.train.seed)
    train_pairs, eval_pairs = load_preference_splits(cfg.data)
    model, tokenizer = load_lm(cfg.model)
    method_cfg = config_from_dict(cfg.method, where="method")
    if method_cfg.base_model_name_or_path is None:
        method_cfg = method_cfg.replace(base_model_name_or_path=cfg.model.name_or_path)
    inject(model, method_cfg)
    model.to(resolve_device(cfg.train.device))
    spec = get_method(method_cfg.method_name)
    task = prepare_dpo(model, cfg.dpo.beta, echo)
    report = trainable_report(model)
    echo(
        f"dpo ({spec.name}, beta {cfg.dpo.beta}): {len(train_pairs)} training pairs, "
        f"{len(eval_pairs)} held out, {report.trainable:,} trainable of {report.total:,}"
    )
    pad_id = (
        tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    )
    collate = DPOCollator(int(pad_id))
    train_ds = DPODataset(train_pairs, tokenizer, cfg.data.max_length)
    eval_ds = DPODataset(eval_pairs, tokenizer, cfg.data.max_length)

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
    echo(f"before: {before}")
    train_cfg = cfg.train
    if train_cfg.learning_rate is None:
        train_cfg = train_cfg.replace(learning_rate=spec.default_lr)
    result = fit(model, task, train_ds, None, train_cfg, out, collate_fn=collate)
    after = evaluate()
    echo(f"after:  {after}")
    from deltatune.checkpoint import save_adapter

    save_adapter(model, out)
    tokenizer.save_pretrained(out / "tokenizer")
    metrics = {
        "beta": cfg.dpo.beta,
        "method": spec.name,
        "train_pairs": len(train_pairs),
        "eval_pairs": len(eval_pairs),
        "steps": result.steps,
        "before": before,
        "after": after,
        "trainable_params": report.trainable,
        "wall_time_s": time.perf_counter() - start,
    }
    write_json(out / "metrics.json", metrics)
    return metrics


def load_dpo_config(path: str | Path | None, overrides: list[str]) -> DPOConfig:
    from deltatune.strategies.adapt import _load_sectioned

    cfg: DPOConfig = _load_sectioned(DPOConfig, path, overrides)
    return cfg

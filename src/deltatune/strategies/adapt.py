"""``deltatune adapt``: domain-adaptive training on unlabelled text (MLM, SimCSE, causal LM).

The config (YAML, strict)::

    model:     {name_or_path: embedded-minilm}          # an encoder, or a causal LM for causal-lm
    corpus:    {source: bbc_news, ...}                  # CorpusConfig: text file, folder, column
    objective: {name: mlm, mlm_probability: 0.15, ...}  # mlm | simcse | causal-lm
    method:    {name: lora, ...}                        # any registered method (or full)
    train:     {epochs: 1, ...}                         # TrainerConfig
    output_dir: runs/adapt

The run writes into ``output_dir``: the trained adapter (``adapter_config.json`` +
``adapter_model.safetensors``), ``model/`` (the adapted encoder or LM with the adapter merged
in, saved with ``save_pretrained`` with its tokenizer, ready to be the base of the labelled
run: ``deltatune train model.name_or_path=<output_dir>/model``), ``metrics.json`` (the
objective on held-out texts before and after), ``log.jsonl`` and ``config.yaml``. Methods that
cannot be merged (bottleneck adapters) write the adapter only; load it with
``deltatune.load_adapter(model, output_dir, is_trainable=True)`` to continue from it.

The MLM head (built by :func:`~deltatune.strategies.mlm.with_mlm_head` when the checkpoint has
none) is trained along and dropped: only the encoder is kept.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from deltatune.config import BaseConfig
from deltatune.data.loader import make_loader
from deltatune.errors import ConfigError, DeltatuneError
from deltatune.io import write_json, write_text
from deltatune.model import inject, trainable_report
from deltatune.models import resolve_model_path
from deltatune.registry import MethodConfig, config_from_dict, get_method
from deltatune.strategies.causal_text import (
    PackedCollator,
    PackedDataset,
    causal_lm_task,
    pack_texts,
)
from deltatune.strategies.corpus import CorpusConfig, load_corpus, split_corpus
from deltatune.strategies.mlm import MLMDataset, MLMTask, mlm_collator, with_mlm_head
from deltatune.strategies.simcse import SimCSETask
from deltatune.train import TrainerConfig, fit, resolve_device, seed_everything

MODEL_SUBDIR = "model"
#: Not ``config.yaml``: that name marks a ``deltatune train`` run folder for other commands.
CONFIG_NAME = "adapt_config.yaml"


@dataclasses.dataclass
class StrategyModelConfig(BaseConfig):
    """The pretrained model a strategy starts from.

    Fields:
        name_or_path: ``"embedded-minilm"``, ``"embedded-smollm2"`` (causal LM), a local
            transformers folder (e.g. an earlier ``adapt`` run's ``model/``) or a hub id.
            Default ``"embedded-minilm"``.
        trust_remote_code: allow a hub model's own code. Default ``false``.
    """

    name_or_path: str = "embedded-minilm"
    trust_remote_code: bool = False


@dataclasses.dataclass
class ObjectiveConfig(BaseConfig):
    """What the unlabelled text trains.

    Fields:
        name: ``"mlm"`` (encoders: masked-LM with a tied head), ``"simcse"`` (encoders:
            unsupervised contrastive sentence embeddings) or ``"causal-lm"`` (decoders:
            next-token loss on packed documents). Default ``"mlm"``.
        max_length: tokens per text for mlm/simcse (longer texts are truncated). Default ``64``.
        mlm_probability: mlm: share of ordinary tokens picked for prediction. Default ``0.15``.
        temperature: simcse: the softmax temperature tau. Default ``0.05``.
        pooling: simcse: ``"mean"`` (masked mean of the last hidden states) or ``"cls"``.
            Default ``"mean"``.
        block_size: causal-lm: tokens per packed block. Default ``128``.
    """

    name: Literal["mlm", "simcse", "causal-lm"] = "mlm"
    max_length: int = 64
    mlm_probability: float = 0.15
    temperature: float = 0.05
    pooling: Literal["mean", "cls"] = "mean"
    block_size: int = 128

    def validate(self) -> None:
        if self.max_length < 4:
            raise ConfigError(f"objective.max_length: value {self.max_length!r} must be >= 4")
        if not 0.0 < self.mlm_probability < 1.0:
            raise ConfigError(
                f"objective.mlm_probability: value {self.mlm_probability!r} must be in (0, 1), "
                "e.g. 0.15"
            )
        if not self.temperature > 0:
            raise ConfigError(
                f"objective.temperature: value {self.temperature!r} must be > 0, e.g. 0.05"
            )
        if self.block_size < 2:
            raise ConfigError(f"objective.block_size: value {self.block_size!r} must be >= 2")


def _adapt_method() -> dict[str, Any]:
    return {
        "name": "lora",
        "r": 8,
        "lora_alpha": 16,
        "lora_dropout": 0.0,
        "target_modules": "all-linear",
    }


def _adapt_train() -> TrainerConfig:
    return TrainerConfig(epochs=1, batch_size=16)


@dataclasses.dataclass
class AdaptConfig(BaseConfig):
    """One ``deltatune adapt`` run; see the module docstring and ``configs/adapt-*.yaml``."""

    model: StrategyModelConfig = dataclasses.field(default_factory=StrategyModelConfig)
    corpus: CorpusConfig = dataclasses.field(default_factory=CorpusConfig)
    objective: ObjectiveConfig = dataclasses.field(default_factory=ObjectiveConfig)
    method: dict[str, Any] = dataclasses.field(default_factory=_adapt_method)
    train: TrainerConfig = dataclasses.field(default_factory=_adapt_train)
    output_dir: str = "runs/adapt"

    def validate(self) -> None:
        method = self.method_config()  # unknown names and keys fail here, at load time
        spec = get_method(method.method_name)
        if spec.fit is not None:
            raise ConfigError(
                f"method.name: '{spec.name}' is fitted in closed form on labels; unlabelled "
                "training needs a gradient method (e.g. lora, full)"
            )

    def method_config(self) -> MethodConfig:
        return config_from_dict(self.method, where="method")


# --------------------------------------------------------------------------- models


def _quiet_load(fn: Any, *args: Any, **kwargs: Any) -> Any:
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    # The per-tensor loading bar and "newly initialised" notices would bury the run's output.
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        return fn(*args, **kwargs)
    except OSError as exc:
        raise DeltatuneError(f"cannot load '{args[0] if args else ''}': {exc}") from None
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def load_encoder(cfg: StrategyModelConfig) -> tuple[nn.Module, Any]:
    """A bare transformers encoder (``AutoModel``) and its tokenizer."""
    from transformers import AutoModel, AutoTokenizer

    path, local = resolve_model_path(cfg.name_or_path)
    kw = {"local_files_only": local, "trust_remote_code": cfg.trust_remote_code}
    return _quiet_load(AutoModel.from_pretrained, path, **kw), _quiet_load(
        AutoTokenizer.from_pretrained, path, **kw
    )


def load_lm(cfg: StrategyModelConfig) -> tuple[nn.Module, Any]:
    """A causal LM and its tokenizer (pad token set), via :func:`deltatune.lm.load_causal_lm`
    (``embedded-smollm2`` is converted once from its GGUF and cached)."""
    from deltatune.lm.load import load_causal_lm
    from deltatune.models import ModelConfig

    return load_causal_lm(
        ModelConfig(
            name_or_path=cfg.name_or_path, task="causal-lm", trust_remote_code=cfg.trust_remote_code
        )
    )


# --------------------------------------------------------------------------- the run


@dataclasses.dataclass
class Objective:
    """Everything the trainer needs for one objective, built by :func:`prepare_objective`."""

    train_model: nn.Module  # what fit() trains (the MLM model around the encoder, ...)
    task: Any
    train_ds: MLMDataset | PackedDataset
    val_ds: MLMDataset | PackedDataset | None
    collate: Any
    eval_collate: Any  # deterministic masking for before/after comparisons


def prepare_objective(
    model: nn.Module,
    tokenizer: Any,
    objective: ObjectiveConfig,
    train_texts: list[str],
    val_texts: list[str],
    seed: int = 0,
) -> Objective:
    """Wrap ``model`` (already holding its adapter) and tokenise the texts for ``objective``."""
    from transformers import DataCollatorWithPadding

    if objective.name == "mlm":
        mlm = with_mlm_head(model)
        return Objective(
            mlm,
            MLMTask(),
            MLMDataset(train_texts, tokenizer, objective.max_length),
            MLMDataset(val_texts, tokenizer, objective.max_length) if val_texts else None,
            mlm_collator(tokenizer, objective.mlm_probability),
            lambda: mlm_collator(tokenizer, objective.mlm_probability, seed=seed),
        )
    if objective.name == "simcse":
        pad = DataCollatorWithPadding(tokenizer)
        return Objective(
            model,
            SimCSETask(objective.temperature, objective.pooling),
            MLMDataset(train_texts, tokenizer, objective.max_length),
            MLMDataset(val_texts, tokenizer, objective.max_length) if val_texts else None,
            pad,
            lambda: pad,
        )
    pad_id = (
        tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    )
    collate = PackedCollator(int(pad_id))
    return Objective(
        model,
        causal_lm_task(),
        PackedDataset(pack_texts(train_texts, tokenizer, objective.block_size)),
        PackedDataset(pack_texts(val_texts, tokenizer, objective.block_size))
        if val_texts
        else None,
        collate,
        lambda: collate,
    )


def evaluate_objective(obj: Objective, batch_size: int) -> dict[str, float] | None:
    if obj.val_ds is None:
        return None
    loader = make_loader(obj.val_ds, batch_size, shuffle=False, seed=0, collate=obj.eval_collate())
    was = obj.train_model.training
    obj.train_model.eval()
    try:
        with torch.no_grad():
            return dict(obj.task.evaluate(obj.train_model, loader))
    finally:
        obj.train_model.train(was)


def adapt_run(cfg: AdaptConfig, *, echo: Any = print) -> dict[str, Any]:
    """Run domain-adaptive training; returns the metrics written to ``metrics.json``."""
    start = time.perf_counter()
    out = Path(cfg.output_dir)
    seed_everything(cfg.train.seed)
    texts = load_corpus(cfg.corpus)
    train_texts, val_texts = split_corpus(texts, cfg.corpus.val_fraction, cfg.corpus.seed)
    causal = cfg.objective.name == "causal-lm"
    model, tokenizer = load_lm(cfg.model) if causal else load_encoder(cfg.model)
    method_cfg = cfg.method_config()
    if method_cfg.base_model_name_or_path is None:
        method_cfg = method_cfg.replace(base_model_name_or_path=cfg.model.name_or_path)
    inject(model, method_cfg)
    device = resolve_device(cfg.train.device)
    obj = prepare_objective(model, tokenizer, cfg.objective, train_texts, val_texts, cfg.train.seed)
    obj.train_model.to(device)
    spec = get_method(method_cfg.method_name)
    report = trainable_report(obj.train_model)
    echo(
        f"adapt ({cfg.objective.name}, {spec.name}): {len(train_texts)} texts "
        f"({len(obj.train_ds)} training items), {report.trainable:,} trainable of "
        f"{report.total:,} parameters"
    )
    out.mkdir(parents=True, exist_ok=True)
    write_text(out / CONFIG_NAME, cfg.to_yaml())
    before = evaluate_objective(obj, cfg.train.eval_batch_size)
    train_cfg = cfg.train
    if train_cfg.learning_rate is None:
        train_cfg = train_cfg.replace(learning_rate=spec.default_lr)
    result = fit(
        obj.train_model, obj.task, obj.train_ds, None, train_cfg, out, collate_fn=obj.collate
    )
    after = evaluate_objective(obj, cfg.train.eval_batch_size)
    from deltatune.checkpoint import export_merged, save_adapter

    save_adapter(model, out)
    merged_to: str | None = None
    if spec.capabilities.merge or spec.name in ("full", "freeze"):
        merged_to = str(export_merged(model, out / MODEL_SUBDIR, tokenizer=tokenizer))
    metrics: dict[str, Any] = {
        "objective": cfg.objective.name,
        "method": spec.name,
        "train_texts": len(train_texts),
        "val_texts": len(val_texts),
        "train_items": len(obj.train_ds),
        "steps": result.steps,
        "final_train_loss": result.history[-1]["loss"] if result.history else None,
        "val_before": before,
        "val_after": after,
        "trainable_params": report.trainable,
        "model_dir": merged_to,
        "wall_time_s": time.perf_counter() - start,
    }
    write_json(out / "metrics.json", metrics)
    return metrics


def load_adapt_config(path: str | Path | None, overrides: list[str]) -> AdaptConfig:
    """Read an adapt YAML config (or the defaults) and apply ``key=value`` overrides."""
    return _load_sectioned(AdaptConfig, path, overrides)


def _load_sectioned(cls: Any, path: str | Path | None, overrides: list[str]) -> Any:
    """Shared by the strategy commands: YAML over defaults (a ``method`` section replaces the
    default whole, like ``deltatune train``), then dotted overrides, then strict validation."""

    from deltatune.config import apply_overrides, read_config_mapping

    data: dict[str, Any] = cls().to_dict()
    if path is not None:
        user = read_config_mapping(path, "a mapping of sections")
        for key, value in user.items():
            if key == "method" and isinstance(value, dict):
                data["method"] = dict(value)
            elif isinstance(value, dict) and isinstance(data.get(key), dict):
                data[key] = {**data[key], **value}
            else:
                data[key] = value
    for text in overrides:
        key, _, value = text.partition("=")
        same = value.strip() == str(data.get("method", {}).get("name"))
        if key.strip() == "method.name" and "method" in data and not same:
            data["method"] = {}  # switching method drops the previous method's settings
    data = apply_overrides(data, overrides)
    return cls.from_dict(data, where=Path(path).name if path else "config")

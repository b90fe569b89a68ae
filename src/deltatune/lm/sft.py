"""``deltatune train`` for decoders (``model.task: causal-lm``): SFT with held-out perplexity.

The run: load the pairs (``data.source``: ``chatterbot`` or a JSONL/CSV with
``sft.prompt_column``/``sft.response_column``), split them by prompt into train/val/test
(``data.val_fraction``, ``data.test_fraction``, ``data.seed``, the ``max_*_examples`` caps),
load the decoder, inject the method, measure the held-out loss of the base model (adapters
disabled), train with :class:`~deltatune.lm.CausalLMTask`, measure again, and write the usual
run folder: ``adapter_config.json`` + ``adapter_model.safetensors``, ``metrics.json`` (with
``before`` and after, per split: ``loss``, ``perplexity``, ``token_accuracy``),
``log.jsonl``, ``config.yaml``, ``labels.json`` (an empty list: there are no labels) and
``training.png``.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from deltatune.checkpoint import save_adapter
from deltatune.config import apply_overrides
from deltatune.data.loader import make_loader
from deltatune.data.text import DataConfig
from deltatune.errors import ConfigError
from deltatune.io import write_json, write_text
from deltatune.lm.instructions import (
    CausalLMCollator,
    InstructionConfig,
    InstructionDataset,
    InstructionSplits,
    load_instruction_pairs,
    split_pairs,
)
from deltatune.lm.load import load_causal_lm
from deltatune.lm.task import CausalLMTask
from deltatune.model import inject, trainable_report
from deltatune.registry import get_method
from deltatune.run import (
    LABELS_NAME,
    METRICS_NAME,
    PLOT_NAME,
    RUN_CONFIG_NAME,
    RunConfig,
    RunResult,
    load_run,
    seed_everything,
)
from deltatune.train import TrainerConfig, fit, resolve_device


def load_splits(cfg: RunConfig) -> InstructionSplits:
    pairs = load_instruction_pairs(cfg.data.source, cfg.sft.prompt_column, cfg.sft.response_column)
    d = cfg.data
    return split_pairs(
        pairs,
        d.val_fraction,
        d.test_fraction,
        d.seed,
        max_train=d.max_train_examples,
        max_eval=d.max_eval_examples,
    )


def build_causal_model(cfg: RunConfig) -> tuple[nn.Module, Any]:
    """The decoder with the configured method injected, and its tokenizer."""
    model, tokenizer = load_causal_lm(cfg.model)
    inject_method(cfg, model)
    return model, tokenizer


def check_trained_method(spec: Any) -> None:
    if spec.fit is not None:
        raise ConfigError(
            f"method.name: '{spec.name}' is fitted in closed form for classification; for "
            "model.task=causal-lm use a trained method such as lora"
        )


def inject_method(cfg: RunConfig, model: nn.Module) -> None:
    """Inject ``cfg.method`` (``task_type`` defaults to ``CAUSAL_LM``)."""
    method_cfg = cfg.method_config()
    check_trained_method(get_method(method_cfg.method_name))
    fields = method_cfg.field_types()
    if "task_type" in fields and method_cfg.task_type is None:
        method_cfg = method_cfg.replace(task_type="CAUSAL_LM")
    if method_cfg.base_model_name_or_path is None:
        method_cfg = method_cfg.replace(base_model_name_or_path=cfg.model.name_or_path)
    inject(model, method_cfg)


def datasets(
    cfg: RunConfig, splits: InstructionSplits, tokenizer: Any
) -> tuple[InstructionDataset, InstructionDataset, InstructionDataset]:
    """Train (packed when ``sft.packing``), validation and test datasets."""
    s = cfg.sft
    kw = {"chat_template": s.chat_template, "system_prompt": s.system_prompt}
    n = cfg.data.max_length
    train = InstructionDataset(splits.train, tokenizer, n, packing=s.packing, **kw)  # type: ignore[arg-type]
    val = InstructionDataset(splits.val, tokenizer, n, **kw)  # type: ignore[arg-type]
    test = InstructionDataset(splits.test, tokenizer, n, **kw)  # type: ignore[arg-type]
    return train, val, test


def sft_trainer_config(cfg: RunConfig, default_lr: float) -> TrainerConfig:
    """The run's trainer config; the classification default ``accuracy`` becomes ``loss``."""
    train_cfg = cfg.train
    if train_cfg.learning_rate is None:
        train_cfg = train_cfg.replace(learning_rate=default_lr)
    if train_cfg.metric_for_best in ("accuracy", "val_accuracy"):
        train_cfg = train_cfg.replace(metric_for_best="loss", greater_is_better=False)
    return train_cfg


def train_causal_run(cfg: RunConfig, *, resume: bool = False, echo: Any = print) -> RunResult:
    """Run a causal-LM job (see the module docstring); returns what ``metrics.json`` holds."""
    start = time.perf_counter()
    out = Path(cfg.output_dir)
    seed_everything(cfg.train.seed)
    splits = load_splits(cfg)
    spec = get_method(cfg.method_config().method_name)
    check_trained_method(spec)
    model, tokenizer = load_causal_lm(cfg.model)
    device = resolve_device(cfg.train.device)
    model.to(device)
    train_ds, val_ds, test_ds = datasets(cfg, splits, tokenizer)
    collate = CausalLMCollator(tokenizer.pad_token_id)
    echo(
        f"data: {len(splits.train)} training pairs ({len(train_ds)} rows), "
        f"{len(splits.val)} validation, {len(splits.test)} test"
    )
    task = CausalLMTask()
    out.mkdir(parents=True, exist_ok=True)
    write_text(out / RUN_CONFIG_NAME, cfg.to_yaml())
    write_json(out / LABELS_NAME, [])

    def evaluate(ds: Dataset[Any]) -> dict[str, float]:
        loader = make_loader(ds, cfg.train.eval_batch_size, shuffle=False, seed=0, collate=collate)
        return task.evaluate(model, loader)

    # The base model, measured before injection: prompt methods are not the identity at
    # initialisation, and full fine-tuning has no adapter to switch off.
    before = {"val": evaluate(val_ds), "test": evaluate(test_ds)}
    echo(
        f"before training: held-out loss {before['test']['loss']:.4f} "
        f"(perplexity {before['test']['perplexity']:.2f})"
    )
    seed_everything(cfg.train.seed)  # the method's initial weights do not depend on the data
    inject_method(cfg, model)
    model.to(device)
    report = trainable_report(model)
    echo(
        f"method {spec.name}: {report.trainable:,} trainable of {report.total:,} parameters "
        f"({report.percent:.3f}%)"
    )
    result = fit(
        model,
        task,
        train_ds,
        val_ds,
        sft_trainer_config(cfg, spec.default_lr),
        out,
        collate_fn=collate,
        resume=resume,
    )
    val_after = (
        result.last_metrics
        if result.last_metrics and not result.restored_best
        else evaluate(val_ds)
    )
    test_after = evaluate(test_ds)
    save_adapter(model, out)
    metrics = {
        "task": "causal-lm",
        "method": spec.name,
        "before": before,
        "val": val_after,
        "test": test_after,
        "trainable_params": report.trainable,
        "total_params": report.total,
        "trainable_percent": report.percent,
        "train_examples": len(splits.train),
        "train_rows": len(train_ds),
        "steps": result.steps,
        "best_step": result.best_step,
        "stopped_early": result.stopped_early,
        "wall_time_s": time.perf_counter() - start,
    }
    write_json(out / METRICS_NAME, metrics)
    if result.history:
        from deltatune.plot import plot_history

        # The base model's validation loss, as step 0, shows where training started from.
        start_row = [{"step": 0, "val_loss": before["val"]["loss"]}]
        plot_history([*start_row, *result.history], out / PLOT_NAME)
    return RunResult(out, metrics)


def load_causal_run(run_dir: str | Path) -> tuple[RunConfig, nn.Module, Any]:
    """A causal-LM run's ``(config, model with its adapter, tokenizer)``, in eval mode."""
    cfg, model, tokenizer, _ = load_run(run_dir)
    if cfg.model.task != "causal-lm":
        raise ConfigError(
            f"'{run_dir}' is a {cfg.model.task} run, not a causal-LM one; use deltatune "
            "predict for it"
        )
    if tokenizer.pad_token is None:  # as load_causal_lm does for training
        tokenizer.pad_token = tokenizer.eos_token
    return cfg, model, tokenizer


def evaluate_causal_run(
    run_dir: str | Path, overrides: list[str], split: str = "test"
) -> dict[str, float]:
    """Held-out ``loss``/``perplexity``/``token_accuracy`` of a trained causal-LM run."""
    cfg, model, tokenizer = load_causal_run(run_dir)
    if overrides:
        data = apply_overrides({"data": cfg.data.to_dict()}, overrides)
        cfg = dataclasses.replace(cfg, data=DataConfig.from_dict(data["data"], where="data"))
    splits = load_splits(cfg)
    examples = {"train": splits.train, "val": splits.val, "test": splits.test}[split]
    ds = InstructionDataset(
        examples,
        tokenizer,
        cfg.data.max_length,
        chat_template=cfg.sft.chat_template,
        system_prompt=cfg.sft.system_prompt,
    )
    loader = make_loader(
        ds,
        cfg.train.eval_batch_size,
        shuffle=False,
        seed=0,
        collate=CausalLMCollator(tokenizer.pad_token_id),
    )
    with torch.no_grad():
        return CausalLMTask().evaluate(model, loader)


def load_for_generation(
    run_dir: str | Path | None = None,
    *,
    model: str | None = None,
    adapter: str | Path | None = None,
    merged: bool = False,
) -> tuple[nn.Module, Any, InstructionConfig]:
    """``(model, tokenizer, prompt format)`` for ``deltatune generate``.

    Either a causal-LM run folder (its base, adapter and ``sft`` prompt format), or a base
    ``model`` (name or folder) with an optional ``adapter`` folder of any method
    (``save_adapter``/``save_adapters`` output, or a run folder). ``merged=True`` folds the
    adapters into the base weights first (methods that cannot merge say so).
    """
    from deltatune.checkpoint import load_adapters
    from deltatune.model import unload

    if (run_dir is None) == (model is None):
        raise ConfigError("give either a run folder or --model NAME_OR_FOLDER (not both)")
    fmt = InstructionConfig()
    if run_dir is not None:
        if adapter is not None:
            raise ConfigError("--adapter goes with --model; a run folder has its own adapter")
        cfg, lm, tokenizer = load_causal_run(run_dir)
        fmt = cfg.sft
    else:
        assert model is not None
        lm, tokenizer = load_causal_lm(model)
        if adapter is not None:
            folder = Path(adapter)
            if not folder.is_dir():
                raise ConfigError(f"--adapter: '{folder}' is not a folder; give an adapter folder")
            run_cfg = folder / RUN_CONFIG_NAME
            if run_cfg.is_file():
                fmt = RunConfig.from_file(run_cfg).sft
            load_adapters(lm, folder)
        lm.to(resolve_device("auto"))
    if merged:
        lm = unload(lm, merge=True)
    return lm.eval(), tokenizer, fmt

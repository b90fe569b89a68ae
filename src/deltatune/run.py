"""A whole fine-tuning run: config -> data -> model -> method -> train -> evaluate -> files.

``RunConfig`` is the YAML schema of ``deltatune train``::

    model:   {name_or_path: embedded-minilm, ...}       # ModelConfig
    data:    {source: bbc_news, max_length: 128, ...}    # DataConfig
    image:   {size: 32, augment: [], ...}                # ImageConfig (image data only)
    method:  {name: lora, r: 8, ...}                      # any registered method's config
    train:   {epochs: 3, learning_rate: null, ...}        # TrainerConfig (null lr = method default)
    output_dir: runs/default

Image data (``data.source: fashion_mnist | digits | <folder per class>``) goes with a CNN
(``model.name_or_path: embedded-vgg16bn``, a class path, ``torchvision:<name>``): the same
methods, trainer and output files, with batches ``{"pixel_values", "labels"}`` (see
:mod:`deltatune.vision`).

The run folder receives ``adapter_config.json`` + ``adapter_model.safetensors`` (the trained
adapter, PEFT format), ``metrics.json``, ``log.jsonl`` (one line per step), ``config.yaml``
(the resolved config), ``labels.json`` and ``training.png``.
"""

from __future__ import annotations

import dataclasses
import json
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from deltatune.checkpoint import load_adapter, save_adapter
from deltatune.config import BaseConfig, apply_overrides, read_config_mapping
from deltatune.data import DataConfig, PadCollator, TokenizedDataset, load_text_splits, make_loader
from deltatune.data.augment import AugmentConfig, augment_text_dataset
from deltatune.errors import ConfigError, DeltatuneError
from deltatune.io import write_json, write_text
from deltatune.lm.instructions import CHATTERBOT, InstructionConfig
from deltatune.model import inject, trainable_report
from deltatune.models import ModelConfig, load_classifier, load_tokenizer
from deltatune.prune import PruneConfig
from deltatune.registry import MethodConfig, config_from_dict, get_method
from deltatune.train import ClassificationTask, TrainerConfig, fit, resolve_device
from deltatune.train.cv import CVConfig
from deltatune.train.distill import DistillConfig
from deltatune.train.forgetting import ContinualConfig
from deltatune.vision.cnn import build_image_classifier, is_image_model
from deltatune.vision.images import (
    IMAGE_SOURCES,
    ImageConfig,
    ImageDataset,
    image_datasets,
    is_image_source,
    load_image_splits,
    preprocess,
    read_image_file,
)
from deltatune.vision.vgg import EMBEDDED_VGG

RUN_CONFIG_NAME = "config.yaml"
#: Every Conv2d of the embedded VGG16-BN (a LoRA/IA3 ``target_modules`` regex).
CNN_CONV_TARGETS = r"backbone\.blocks\.\d+\.(conv\d|fc\d)"
LABELS_NAME = "labels.json"
METRICS_NAME = "metrics.json"
PLOT_NAME = "training.png"


# The embedded default job (`deltatune train` with no config) is sized to finish in a few
# minutes on 2 CPU cores: a BBC article's topic shows in its first 64 tokens (98% test accuracy
# measured), and 2 epochs of LoRA on every linear layer reach it.
def default_data() -> DataConfig:
    return DataConfig(max_length=64)


def default_train() -> TrainerConfig:
    return TrainerConfig(epochs=2, eval_every_steps=40)


def default_method() -> dict[str, Any]:
    return {
        "name": "lora",
        "r": 8,
        "lora_alpha": 16,
        "lora_dropout": 0.05,
        "target_modules": "all-linear",
    }


@dataclasses.dataclass
class RunConfig(BaseConfig):
    """One run of ``deltatune train``; see the module docstring and ``configs/reference.yaml``."""

    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    data: DataConfig = dataclasses.field(default_factory=default_data)
    image: ImageConfig = dataclasses.field(default_factory=ImageConfig)
    method: dict[str, Any] = dataclasses.field(default_factory=default_method)
    train: TrainerConfig = dataclasses.field(default_factory=default_train)
    output_dir: str = "runs/default"
    # Causal-LM runs (model.task: causal-lm, docs/generation.md): prompt/response pairs.
    sft: InstructionConfig = dataclasses.field(default_factory=InstructionConfig)
    # Practices (docs/practices.md): text augmentation, `deltatune cv|distill|prune` settings.
    augment: AugmentConfig = dataclasses.field(default_factory=AugmentConfig)
    cv: CVConfig = dataclasses.field(default_factory=CVConfig)
    distill: DistillConfig = dataclasses.field(default_factory=DistillConfig)
    prune: PruneConfig = dataclasses.field(default_factory=PruneConfig)
    # Incremental fine-tuning (docs/practices.md): start from an earlier run / saved adapter.
    init_from: str | None = None
    # Forgetting: new-task labels, the reference set, replay / L2-SP / EWC (docs/practices.md).
    continual: ContinualConfig = dataclasses.field(default_factory=ContinualConfig)

    def validate(self) -> None:
        self.method_config()  # unknown method names and keys fail here, at load time
        if self.model.quantize is not None and self.method.get("name") in ("full", "freeze"):
            raise ConfigError(
                f"model.quantize: {self.model.quantize} freezes the linear weights in 4/8 bits, "
                f"but method {self.method.get('name')} trains base weights in place; use "
                "method qlora or lora on a quantised base, or model.quantize: null"
            )
        if self.augment.enabled and is_image_model(self.model.name_or_path):
            raise ConfigError(
                f"augment.text: {self.augment.text} is text augmentation but the model is a "
                "CNN; use image.augment=[crop,flip] for images"
            )
        _check_model_fits_data(self)
        _check_task_fits_data(self)

    def method_config(self) -> MethodConfig:
        return config_from_dict(self.method, where="method")


def load_run_config(path: str | Path | None, overrides: list[str]) -> RunConfig:
    """Read a YAML config (or the embedded default) and apply ``key=value`` overrides."""
    data: dict[str, Any] = RunConfig().to_dict()
    if path is not None:
        user = read_config_mapping(path, "a mapping of sections (model, data, method, train)")
        if "method" in user and isinstance(user["method"], dict):
            data["method"] = {}  # a config's method section replaces the default one whole
        data = _deep_update(data, user)
    for text in overrides:
        key, _, value = text.partition("=")
        if key.strip() == "method.name" and value.strip() != str(data["method"].get("name")):
            data["method"] = {}  # switching method drops the previous method's settings
    data = apply_overrides(data, overrides)
    return RunConfig.from_dict(data, where=Path(path).name if path else "config")


def is_image_run(cfg: RunConfig) -> bool:
    """Whether the run fine-tunes a CNN on images (decided by the model, see :func:`_check_model_fits_data`)."""
    return is_image_model(cfg.model.name_or_path)


def _check_model_fits_data(cfg: RunConfig) -> None:
    """A text model with image data (or the reverse) is a config error naming the fix."""
    model, source = cfg.model, cfg.data.source
    cnn = is_image_model(model.name_or_path)
    if not cnn:
        if is_image_source(source):
            raise ConfigError(
                f"data.source: '{source}' is image data but model.name_or_path "
                f"'{model.name_or_path}' is a text model; use model.name_or_path={EMBEDDED_VGG} "
                "(see configs/cnn-*.yaml) or your own CNN ('package.module:ClassName')"
            )
        cnn_only = {
            "pretrained": not model.pretrained,
            "weights": model.weights is not None,
            "head": model.head is not None,
            "model_kwargs": bool(model.model_kwargs),
        }
        used = [k for k, v in cnn_only.items() if v]
        if used:
            raise ConfigError(
                f"model.{used[0]}: applies to CNNs (image data) only; remove it for the text "
                f"model '{model.name_or_path}'"
            )
        return
    if source not in IMAGE_SOURCES and Path(source).expanduser().is_file():
        raise ConfigError(
            f"data.source: '{source}' is a text file but model.name_or_path "
            f"'{model.name_or_path}' is a CNN; use {', '.join(IMAGE_SOURCES)} or a folder with "
            "one sub-folder of images per class"
        )
    if model.dtype != "float32":
        raise ConfigError(
            f"model.dtype: '{model.dtype}' is for text models; CNNs keep float32 weights "
            "(use train.precision=bf16 for mixed precision)"
        )


def _check_task_fits_data(cfg: RunConfig) -> None:
    """Instruction pairs go with ``model.task: causal-lm`` and a decoder, labels with a head."""
    from deltatune.models import EMBEDDED_DECODER, EMBEDDED_ENCODER

    model, source = cfg.model, cfg.data.source
    if model.task != "causal-lm":
        if source == CHATTERBOT:
            raise ConfigError(
                f"data.source: '{CHATTERBOT}' holds prompt/response pairs; set "
                f"model.task=causal-lm and model.name_or_path={EMBEDDED_DECODER} "
                "(see configs/sft-smollm2.yaml)"
            )
        return
    if is_image_model(model.name_or_path) or model.name_or_path == EMBEDDED_ENCODER:
        raise ConfigError(
            f"model.name_or_path: '{model.name_or_path}' is not a decoder; model.task=causal-lm "
            f"needs a causal LM such as '{EMBEDDED_DECODER}'"
        )
    if source == "bbc_news" or is_image_source(source):
        raise ConfigError(
            f"data.source: '{source}' is classification data; model.task=causal-lm needs "
            f"'{CHATTERBOT}' or a .jsonl/.csv with sft.prompt_column/sft.response_column fields"
        )


def _deep_update(base: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in new.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_update(out[key], value)
        else:
            out[key] = value
    return out


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@dataclasses.dataclass
class RunResult:
    output_dir: Path
    metrics: dict[str, Any]


def load_base_model(cfg: RunConfig, label_names: list[str]) -> nn.Module:
    """The base classifier with a new head sized to ``label_names`` (a CNN for image runs).

    A causal-LM run (``model.task: causal-lm``) gets its decoder instead (no head, no labels).
    """
    if cfg.model.task == "causal-lm":
        from deltatune.lm.load import load_causal_lm

        return load_causal_lm(cfg.model)[0]
    if is_image_run(cfg):
        return build_image_classifier(
            cfg.model.name_or_path,
            len(label_names),
            image_size=cfg.image.size,
            pretrained=cfg.model.pretrained,
            weights=cfg.model.weights,
            head=cfg.model.head,
            model_kwargs=cfg.model.model_kwargs,
        )
    return load_classifier(cfg.model, label_names)


def build_model(cfg: RunConfig, label_names: list[str]) -> nn.Module:
    """The base classifier with the configured method injected."""
    model = load_base_model(cfg, label_names)
    method_cfg = cfg.method_config()
    if cfg.model.task == "sequence-classification" and method_cfg.task_type is None:
        method_cfg = (
            method_cfg.replace(task_type="SEQ_CLS")
            if _has_field(method_cfg, "modules_to_save")
            else method_cfg
        )
    if method_cfg.base_model_name_or_path is None:
        method_cfg = method_cfg.replace(base_model_name_or_path=cfg.model.name_or_path)
    try:
        if cfg.init_from is not None:
            from deltatune.train.incremental import start_from

            start_from(model, cfg.init_from, method_cfg)
        else:
            inject(model, method_cfg)
    except ConfigError as exc:
        if is_image_run(cfg) and "matches no module" in str(exc):
            raise ConfigError(
                f"{exc}. A CNN's layers are convolutions: e.g. method.target_modules="
                f"'{CNN_CONV_TARGETS}' (the embedded VGG16-BN's, see configs/cnn-lora.yaml)"
            ) from None
        raise
    return model


def _has_field(config: MethodConfig, name: str) -> bool:
    return name in config.field_types()


def train_run(cfg: RunConfig, *, resume: bool = False, echo: Any = print) -> RunResult:
    """Run the whole job; returns the metrics written to ``metrics.json``."""
    from deltatune.train.distributed import is_main

    if not is_main():  # under torchrun, rank 0 alone reports progress

        def echo(*args: Any, **kwargs: Any) -> None:
            return None

    if cfg.model.task == "causal-lm":
        from deltatune.lm.sft import train_causal_run

        return train_causal_run(cfg, resume=resume, echo=echo)
    start = time.perf_counter()
    out = Path(cfg.output_dir)
    seed_everything(cfg.train.seed)
    image_run = is_image_run(cfg)
    splits: Any
    if image_run:
        splits = load_image_splits(cfg.data, cfg.image)
    else:
        splits = load_text_splits(cfg.data)
        tokenizer = load_tokenizer(cfg.model)
    ref_examples: tuple[Any, Any] = (None, None)
    if cfg.continual.active:
        if image_run:
            raise ConfigError("continual: is implemented for text classification runs")
        from deltatune.train.forgetting import continual_splits

        splits, ref_train_examples, ref_eval_examples = continual_splits(
            cfg.continual, cfg.data, splits
        )
        ref_examples = (ref_train_examples, ref_eval_examples)
    if cfg.init_from is not None:
        from deltatune.train.incremental import check_labels

        check_labels(cfg.init_from, splits.label_names)
    model = build_model(cfg, splits.label_names)
    device = resolve_device(cfg.train.device)
    model.to(device)
    spec = get_method(cfg.method_config().method_name)
    report = trainable_report(model)
    echo(
        f"method {spec.name}: {report.trainable:,} trainable of {report.total:,} parameters ({report.percent:.3f}%)"
    )

    collate: PadCollator | None
    train_ds: Dataset[Any]
    val_ds: Dataset[Any]
    test_ds: Dataset[Any]
    if image_run:
        collate = None  # image items stack with the default collate
        train_ds, val_ds, test_ds = image_datasets(splits, cfg.image)
    else:
        collate = PadCollator(tokenizer)
        train_ds = TokenizedDataset(splits.train, tokenizer, cfg.data.max_length)
        val_ds = TokenizedDataset(splits.val, tokenizer, cfg.data.max_length)
        test_ds = TokenizedDataset(splits.test, tokenizer, cfg.data.max_length)
    task = ClassificationTask(num_labels=len(splits.label_names))
    from deltatune.train.distributed import is_main

    writer = is_main()  # under torchrun, rank 0 writes the run's files
    out.mkdir(parents=True, exist_ok=True)
    if writer:
        write_text(out / RUN_CONFIG_NAME, cfg.to_yaml())
        write_json(out / LABELS_NAME, splits.label_names)

    history: list[dict[str, Any]] = []
    fit_info: dict[str, Any] = {}
    if spec.fit is not None:
        # Closed-form fits see each training example once, as it is (no augmentation).
        fit_ds = ImageDataset(splits.train, cfg.image, train=False) if image_run else train_ds
        loader = make_loader(
            fit_ds, cfg.train.eval_batch_size, shuffle=False, seed=cfg.train.seed, collate=collate
        )
        batches = ({k: v.to(device) for k, v in b.items()} for b in loader)
        fit_info = spec.fit(model, model_method_config(model), batches)
        echo(f"fitted in closed form: {fit_info}")
    else:
        train_cfg = cfg.train
        if train_cfg.learning_rate is None:
            train_cfg = train_cfg.replace(learning_rate=spec.default_lr)
        if not image_run:  # training batches only; image runs augment via image.augment
            train_ds = augment_text_dataset(train_ds, cfg.augment, tokenizer)
        fit_task: Any = task
        if cfg.continual.active:
            from deltatune.train.forgetting import prepare_continual

            ref_train_ds, ref_eval_ds = (
                TokenizedDataset(x, tokenizer, cfg.data.max_length) if x is not None else None
                for x in ref_examples
            )
            fit_task, train_ds, ref_before = prepare_continual(
                cfg.continual,
                model,
                task,
                train_ds,
                ref_train_ds,
                ref_eval_ds,
                collate_fn=collate,
                batch_size=cfg.train.eval_batch_size,
                seed=cfg.train.seed,
            )
        result = fit(
            model, fit_task, train_ds, val_ds, train_cfg, out, collate_fn=collate, resume=resume
        )
        history = result.history
        fit_info = {
            "steps": result.steps,
            "best_step": result.best_step,
            "stopped_early": result.stopped_early,
        }

    def evaluate(ds: Dataset[Any]) -> dict[str, float]:
        loader = make_loader(ds, cfg.train.eval_batch_size, shuffle=False, seed=0, collate=collate)
        return task.evaluate(model, loader)

    val_metrics = evaluate(val_ds)
    test_metrics = evaluate(test_ds)
    if cfg.continual.active and ref_examples[1] is not None and spec.fit is None:
        from deltatune.train.forgetting import report_forgetting

        assert ref_eval_ds is not None and ref_before is not None
        fit_info.update(
            report_forgetting(
                model,
                task,
                ref_eval_ds,
                ref_before,
                collate_fn=collate,
                batch_size=cfg.train.eval_batch_size,
            )
        )
    if not writer:
        return RunResult(out, {"val": val_metrics, "test": test_metrics, **fit_info})
    save_adapter(model, out)
    wall = time.perf_counter() - start
    metrics = {
        "method": spec.name,
        "val": val_metrics,
        "test": test_metrics,
        "trainable_params": report.trainable,
        "total_params": report.total,
        "trainable_percent": report.percent,
        "train_examples": len(splits.train),
        "wall_time_s": wall,
        **fit_info,
    }
    write_json(out / METRICS_NAME, metrics)
    rows = history or _read_log(out / "log.jsonl")
    if rows:
        from deltatune.plot import plot_history

        plot_history(rows, out / PLOT_NAME)
    return RunResult(out, metrics)


def model_method_config(model: nn.Module) -> MethodConfig:
    from deltatune.model import state_of

    return next(iter(state_of(model).configs.values()))


def _read_log(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def load_run(run_dir: str | Path) -> tuple[RunConfig, nn.Module, Any, list[str]]:
    """Rebuild a trained run's model (base + saved adapter), tokenizer and label names.

    The tokenizer is ``None`` for an image run. A CNN's base is rebuilt after seeding with
    ``train.seed``, as in training, so a random-init base (``model.pretrained: false``) is the
    same network the adapter was trained on.
    """
    folder = Path(run_dir)
    cfg_path = folder / RUN_CONFIG_NAME
    if not cfg_path.is_file():
        raise DeltatuneError(
            f"'{folder}' is not a deltatune run folder (no {RUN_CONFIG_NAME}); give a `deltatune train` output_dir"
        )
    cfg = RunConfig.from_file(cfg_path)
    labels_path = folder / LABELS_NAME
    if not labels_path.is_file():
        raise DeltatuneError(f"'{folder}' has no {LABELS_NAME}; the run did not finish")
    label_names = json.loads(labels_path.read_text())
    if is_image_run(cfg):
        seed_everything(cfg.train.seed)
    model = load_base_model(cfg, label_names)
    if cfg.init_from is not None:  # the adapter is relative to the weights the run began with
        from deltatune.train.incremental import restore_base

        restore_base(model, cfg.init_from, cfg.method_config().method_name)
    load_adapter(model, folder)
    model.to(resolve_device(cfg.train.device)).eval()
    tokenizer = None if is_image_run(cfg) else load_tokenizer(cfg.model)
    return cfg, model, tokenizer, label_names


def evaluate_run(
    run_dir: str | Path, overrides: list[str], split: str = "test"
) -> dict[str, float]:
    cfg_path = Path(run_dir) / RUN_CONFIG_NAME
    if cfg_path.is_file() and RunConfig.from_file(cfg_path).model.task == "causal-lm":
        from deltatune.lm.sft import evaluate_causal_run

        return evaluate_causal_run(run_dir, overrides, split)
    cfg, model, tokenizer, label_names = load_run(run_dir)
    if overrides:
        data = apply_overrides({"data": cfg.data.to_dict()}, overrides)
        cfg = dataclasses.replace(cfg, data=DataConfig.from_dict(data["data"], where="data"))
    image_run = is_image_run(cfg)
    splits: Any = (
        load_image_splits(cfg.data, cfg.image) if image_run else load_text_splits(cfg.data)
    )
    if cfg.continual.train_labels is not None and not image_run:  # the run's own labels only
        from deltatune.train.forgetting import continual_splits

        only_train = ContinualConfig(train_labels=cfg.continual.train_labels)
        splits = continual_splits(only_train, cfg.data, splits)[0]
    if splits.label_names != label_names:
        raise DeltatuneError(
            f"the data's labels {splits.label_names} differ from the run's {label_names}"
        )
    ds: Dataset[Any]
    if image_run:
        examples = {"train": splits.train, "val": splits.val, "test": splits.test}[split]
        ds = ImageDataset(examples, cfg.image, train=False)  # evaluation never augments
        collate = None
    else:
        examples = {"train": splits.train, "val": splits.val, "test": splits.test}[split]
        ds = TokenizedDataset(examples, tokenizer, cfg.data.max_length)
        collate = PadCollator(tokenizer)
    loader = make_loader(ds, cfg.train.eval_batch_size, shuffle=False, seed=0, collate=collate)
    return ClassificationTask(num_labels=len(label_names)).evaluate(model, loader)


@torch.no_grad()
def predict_texts(
    run_dir: str | Path, texts: list[str], batch_size: int = 32
) -> list[dict[str, Any]]:
    """Label each text with the run's adapter: ``[{text, label, score}]``."""
    cfg, model, tokenizer, label_names = load_run(run_dir)
    if cfg.model.task == "causal-lm":
        raise DeltatuneError(
            f"run '{run_dir}' is a causal-LM run; generate text with `deltatune generate "
            f"{run_dir} --prompt ...`"
        )
    if tokenizer is None:
        raise DeltatuneError(
            f"run '{run_dir}' classifies images; give image files (deltatune predict RUN --image FILE)"
        )
    device = next(model.parameters()).device
    out: list[dict[str, Any]] = []
    for i in range(0, len(texts), batch_size):
        chunk = texts[i : i + batch_size]
        enc = tokenizer(
            chunk,
            truncation=True,
            max_length=cfg.data.max_length,
            padding=True,
            return_tensors="pt",
        )
        logits = model(**{k: v.to(device) for k, v in enc.items()}).logits
        probs = logits.float().softmax(-1)
        for text, p in zip(chunk, probs):
            k = int(p.argmax())
            out.append({"text": text, "label": label_names[k], "score": float(p[k])})
    return out


@torch.no_grad()
def predict_images(
    run_dir: str | Path, paths: list[str | Path], batch_size: int = 32
) -> list[dict[str, Any]]:
    """Label each image file with an image run's model: ``[{image, label, score}]``."""
    cfg, model, tokenizer, label_names = load_run(run_dir)
    if tokenizer is not None:
        raise DeltatuneError(
            f"run '{run_dir}' classifies texts; give texts (deltatune predict RUN --text ...)"
        )
    device = next(model.parameters()).device
    out: list[dict[str, Any]] = []
    for i in range(0, len(paths), batch_size):
        chunk = paths[i : i + batch_size]
        pixels = preprocess(
            torch.stack([read_image_file(p, cfg.image.size) for p in chunk]), cfg.image
        )
        probs = model(pixel_values=pixels.to(device)).float().softmax(-1)
        for path, p in zip(chunk, probs):
            k = int(p.argmax())
            out.append({"image": str(path), "label": label_names[k], "score": float(p[k])})
    return out


MERGED_WEIGHTS = "model.safetensors"


def merge_run(run_dir: str | Path, out_dir: str | Path) -> Path:
    """Write the run's model with the adapter merged.

    Text runs: a transformers model folder (loads with transformers alone). Image runs:
    ``model.safetensors`` (the plain :class:`~deltatune.vision.ImageClassifier` state dict)
    with the run's ``config.yaml`` and ``labels.json``.
    """
    from deltatune.checkpoint import export_merged

    cfg, model, tokenizer, label_names = load_run(run_dir)
    if tokenizer is not None:
        return export_merged(model, out_dir, tokenizer=tokenizer)
    import copy

    from deltatune.io import save_safetensors
    from deltatune.model import unload

    merged = unload(copy.deepcopy(model), merge=True)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_safetensors(out / MERGED_WEIGHTS, dict(merged.state_dict()), metadata={"format": "pt"})
    write_text(out / RUN_CONFIG_NAME, cfg.to_yaml())
    write_json(out / LABELS_NAME, label_names)
    return out


MERGE_REPORT_NAME = "merge_report.json"


def merge_quantized_run(
    run_dir: str | Path,
    out_dir: str | Path,
    mode: str = "dequantize",
    dtype: str = "float32",
    n_sample: int = 16,
) -> tuple[Path, Any]:
    """Merge a text-classification run whose base is quantised (``method: qlora`` or
    ``model.quantize``) and report the output change it introduces (docs/qlora.md).

    ``mode="dequantize"``: the adapter goes into a float copy (``dtype``) of the dequantised
    base, written with ``save_pretrained`` (loads with transformers alone).
    ``mode="requantize"``: merged then re-quantised; written as ``model.safetensors`` (the
    state dict: quantise a fresh base with the same scheme, then ``load_state_dict``) with the
    run's ``config.yaml`` and ``labels.json``. Both write ``merge_report.json``: the max and
    mean absolute change of the logits on ``n_sample`` validation texts.
    """
    import os
    import shutil
    import tempfile

    from deltatune.io import save_safetensors
    from deltatune.quant import MERGE_MODES, merge_quantized

    if mode not in MERGE_MODES:
        raise ConfigError(f"mode={mode!r} is not one of {', '.join(MERGE_MODES)}")
    if dtype not in ("float32", "bfloat16", "float16"):
        raise ConfigError(f"dtype={dtype!r} must be float32, bfloat16 or float16")
    cfg, model, tokenizer, label_names = load_run(run_dir)
    if tokenizer is None or cfg.model.task != "sequence-classification":
        raise DeltatuneError(
            f"run '{run_dir}': quantised merges are written for text-classification runs; "
            "for others use deltatune.quant.merge_quantized(model, sample) in Python"
        )
    splits = load_text_splits(cfg.data)
    texts = (splits.val.texts or splits.train.texts)[:n_sample]
    device = next(model.parameters()).device
    enc = tokenizer(
        texts, truncation=True, max_length=cfg.data.max_length, padding=True, return_tensors="pt"
    )
    sample = {k: v.to(device) for k, v in enc.items()}
    report = merge_quantized(model, sample, mode=mode, dtype=getattr(torch, dtype))  # type: ignore[arg-type]
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        if mode == "dequantize":
            model.save_pretrained(tmp)  # type: ignore[operator]
            tokenizer.save_pretrained(tmp)
        else:
            save_safetensors(
                tmp / MERGED_WEIGHTS, dict(model.state_dict()), metadata={"format": "pt"}
            )
            write_text(tmp / RUN_CONFIG_NAME, cfg.to_yaml())
            write_json(tmp / LABELS_NAME, label_names)
        write_json(tmp / MERGE_REPORT_NAME, dataclasses.asdict(report))
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return out, report

r"""Knowledge distillation: train a student on a teacher's softened logits and the labels.

Hinton et al. (2015), with student logits ``s``, teacher logits ``t``, temperature ``T`` and
weight ``alpha``::

    L = alpha * T^2 * KL( softmax(t / T) || softmax(s / T) ) + (1 - alpha) * CE(s, y)

The ``T^2`` keeps the soft term's gradients on the scale of the hard term's as ``T`` grows.
``KL`` is averaged over the batch (``batchmean``), ``CE`` is the mean cross-entropy.

::

    batch ─┬─► teacher (frozen, eval) ─► t ─┐
           │                                ├─► alpha T² KL(t/T ‖ s/T) + (1-alpha) CE(s, y)
           └─► student (trained) ───────► s ─┘

The student is the run config's model and method: the same encoder with a PEFT method, or a
smaller one, e.g. the first ``distill.student_layers`` blocks of the teacher's base. The
teacher is a trained run folder (its adapter merged), a ``deltatune prune`` output folder, or a
transformers sequence-classification model folder; it must use the same tokenizer and labels.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from deltatune.config import BaseConfig
from deltatune.errors import ConfigError, DeltatuneError
from deltatune.train.trainer import ClassificationTask, model_device, output_logits

STUDENT_BASE_DIR = "student_base"


@dataclasses.dataclass
class DistillConfig(BaseConfig):
    """The ``distill:`` section of a run config (``deltatune distill CONFIG``).

    Fields:
        teacher: a trained run folder, a ``deltatune prune`` output folder, or a transformers
            sequence-classification model folder; ``None`` means no distillation.
            Default ``None``.
        temperature: softmax temperature ``T`` of both logits in the KL term (> 0).
            Default ``2.0``.
        alpha: weight of the distillation term; ``1 - alpha`` weighs the label loss, in [0, 1].
            Default ``0.5``.
        student_layers: keep only the first N transformer blocks of the student's base model
            (top blocks removed); ``None`` keeps them all. Default ``None``.
        latency_batch: examples in the batch whose forward time is compared. Default ``32``.
        latency_repeats: timed forward passes per model (median reported). Default ``5``.
    """

    teacher: str | None = None
    temperature: float = 2.0
    alpha: float = 0.5
    student_layers: int | None = None
    latency_batch: int = 32
    latency_repeats: int = 5

    def validate(self) -> None:
        if not self.temperature > 0:
            raise ConfigError(
                f"distill.temperature: value {self.temperature!r} must be > 0 (e.g. 2.0)"
            )
        if not 0.0 <= self.alpha <= 1.0:
            raise ConfigError(f"distill.alpha: value {self.alpha!r} must be in [0, 1]")
        if self.student_layers is not None and self.student_layers < 1:
            raise ConfigError(
                f"distill.student_layers: value {self.student_layers!r} must be >= 1 or null"
            )
        for name in ("latency_batch", "latency_repeats"):
            if getattr(self, name) < 1:
                raise ConfigError(f"distill.{name}: value {getattr(self, name)!r} must be >= 1")


def distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    temperature: float,
    alpha: float,
) -> torch.Tensor:
    """``alpha * T^2 * KL(softmax(t/T) || softmax(s/T)) + (1 - alpha) * CE(s, y)`` (fp32)."""
    s = student_logits.float()
    t = teacher_logits.float().detach()
    if s.shape != t.shape:
        raise DeltatuneError(
            f"the student's logits {tuple(s.shape)} and the teacher's {tuple(t.shape)} differ; "
            "both must classify the same labels"
        )
    kl = F.kl_div(
        F.log_softmax(s / temperature, dim=-1),
        F.log_softmax(t / temperature, dim=-1),
        log_target=True,
        reduction="batchmean",
    )
    return alpha * temperature**2 * kl + (1.0 - alpha) * F.cross_entropy(s, labels)


class DistillationTask:
    """A trainer :class:`~deltatune.train.Task`: distillation loss in training, plain
    classification metrics (the student's) in evaluation."""

    metric_names = ClassificationTask.metric_names

    def __init__(
        self,
        teacher: nn.Module,
        temperature: float = 2.0,
        alpha: float = 0.5,
        num_labels: int | None = None,
    ) -> None:
        DistillConfig(temperature=temperature, alpha=alpha)  # validates
        self.teacher = teacher.eval()
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        self.temperature = temperature
        self.alpha = alpha
        self.classification = ClassificationTask(num_labels=num_labels)

    def loss(self, model: nn.Module, batch: Mapping[str, Any]) -> torch.Tensor:
        if "labels" not in batch:
            raise DeltatuneError("the batch has no 'labels'; distillation mixes in the label loss")
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        student = output_logits(model(**inputs))
        device = model_device(self.teacher)
        with torch.no_grad():
            teacher = output_logits(self.teacher(**{k: v.to(device) for k, v in inputs.items()}))
        return distillation_loss(
            student, teacher.to(student.device), batch["labels"], self.temperature, self.alpha
        )

    def evaluate(self, model: nn.Module, loader: Iterable[Any]) -> dict[str, float]:
        return self.classification.evaluate(model, loader)


def load_teacher(path: str | Path) -> tuple[nn.Module, Any, list[str]]:
    """``(model, tokenizer, label names)`` of a run folder, pruned folder or transformers folder."""
    from deltatune.model import unload
    from deltatune.prune import PRUNE_FILE, load_pruned
    from deltatune.run import RUN_CONFIG_NAME, load_run

    folder = Path(path)
    if not folder.is_dir():
        raise ConfigError(
            f"distill.teacher: '{folder}' is not a folder; give a trained run folder "
            "(deltatune train output_dir) or a transformers model folder"
        )
    if (folder / PRUNE_FILE).is_file():
        return load_pruned(folder)
    if (folder / RUN_CONFIG_NAME).is_file():
        _, model, tokenizer, labels = load_run(folder)
        if tokenizer is None:
            raise ConfigError(f"distill.teacher: run '{folder}' is an image run; text only")
        # A non-mergeable adapter (e.g. Houlsby) stays in place: merge refuses before
        # changing anything, and the model is a teacher all the same.
        with contextlib.suppress(DeltatuneError):
            model = unload(model, merge=True)
        return model.eval(), tokenizer, labels
    if (folder / "config.json").is_file():
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        model = AutoModelForSequenceClassification.from_pretrained(folder, local_files_only=True)
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        id2label = model.config.id2label
        return model.eval(), tokenizer, [id2label[i] for i in range(len(id2label))]
    raise ConfigError(
        f"distill.teacher: '{folder}' has neither config.yaml (a deltatune run), prune.json nor "
        "config.json (a transformers model)"
    )


def _size(model: nn.Module) -> dict[str, Any]:
    params = sum(p.numel() for p in model.parameters())
    size = sum(p.numel() * p.element_size() for p in model.parameters())
    return {"params": params, "size_mb": round(size / 2**20, 2)}


def distill_run(cfg: Any, *, echo: Any = print) -> Any:
    """Train the config's model + method as a student of ``cfg.distill.teacher``.

    Writes a normal run folder (so ``deltatune eval/predict/merge`` work on it) whose
    ``metrics.json`` also holds ``distill``: teacher and student accuracy (validation, test),
    parameters, size and forward latency. With ``student_layers`` the truncated base is saved
    to ``output_dir/student_base`` (a transformers folder) and the run's ``config.yaml``
    points ``model.name_or_path`` at it.
    """
    import time

    from deltatune.checkpoint import save_adapter
    from deltatune.data import PadCollator, TokenizedDataset, load_text_splits
    from deltatune.data.augment import augment_text_dataset
    from deltatune.io import write_json, write_text
    from deltatune.model import trainable_report
    from deltatune.models import load_classifier, load_tokenizer
    from deltatune.prune import blocks_of, compare_latency, drop_top_layers
    from deltatune.registry import get_method
    from deltatune.run import (
        LABELS_NAME,
        METRICS_NAME,
        RUN_CONFIG_NAME,
        RunResult,
        build_model,
        is_image_run,
        seed_everything,
    )
    from deltatune.train.trainer import evaluate_dataset, fit, resolve_device

    start = time.perf_counter()
    dcfg: DistillConfig = cfg.distill
    if dcfg.teacher is None:
        raise ConfigError(
            "distill.teacher: is null; give a trained run folder, e.g. distill.teacher=runs/teacher"
        )
    if is_image_run(cfg):
        raise ConfigError("distill: image runs are not supported yet; use a text model")
    spec = get_method(cfg.method_config().method_name)
    if spec.fit is not None:
        raise ConfigError(
            f"method.name: '{spec.name}' is fitted in closed form; distillation needs a method "
            "trained by gradient steps (e.g. full, lora)"
        )
    out = Path(cfg.output_dir)
    seed_everything(cfg.train.seed)
    splits = load_text_splits(cfg.data)
    tokenizer = load_tokenizer(cfg.model)
    teacher, teacher_tok, teacher_labels = load_teacher(dcfg.teacher)
    if teacher_labels != splits.label_names:
        raise DeltatuneError(
            f"distill.teacher: the teacher's labels {teacher_labels} differ from the data's "
            f"{splits.label_names}"
        )
    if teacher_tok.get_vocab() != tokenizer.get_vocab():
        raise ConfigError(
            f"distill.teacher: the teacher's tokenizer differs from model.name_or_path "
            f"'{cfg.model.name_or_path}''s; the student must read the same token ids"
        )
    device = resolve_device(cfg.train.device)
    teacher.to(device)

    out.mkdir(parents=True, exist_ok=True)
    if dcfg.student_layers is not None:
        base = load_classifier(cfg.model, splits.label_names)
        n_blocks = len(blocks_of(base)[1])
        if dcfg.student_layers > n_blocks:
            raise ConfigError(
                f"distill.student_layers: value {dcfg.student_layers} exceeds the "
                f"{n_blocks} blocks of '{cfg.model.name_or_path}'"
            )
        drop_top_layers(base, n_blocks - dcfg.student_layers)
        base_dir = out / STUDENT_BASE_DIR
        base.save_pretrained(base_dir)  # type: ignore[operator]
        tokenizer.save_pretrained(base_dir)
        cfg = cfg.replace(model={**cfg.model.to_dict(), "name_or_path": str(base_dir)})
        echo(f"student base: the first {dcfg.student_layers} of {n_blocks} blocks -> {base_dir}")
    seed_everything(cfg.train.seed)
    model = build_model(cfg, splits.label_names).to(device)
    report = trainable_report(model)
    echo(
        f"student {spec.name}: {report.trainable:,} trainable of {report.total:,} parameters; "
        f"teacher {sum(p.numel() for p in teacher.parameters()):,} parameters"
    )
    length = cfg.data.max_length
    collate = PadCollator(tokenizer)
    train_ds = TokenizedDataset(splits.train, tokenizer, length)
    val_ds = TokenizedDataset(splits.val, tokenizer, length)
    test_ds = TokenizedDataset(splits.test, tokenizer, length)
    num_labels = len(splits.label_names)
    task = DistillationTask(teacher, dcfg.temperature, dcfg.alpha, num_labels)
    write_text(out / RUN_CONFIG_NAME, cfg.to_yaml())
    write_json(out / LABELS_NAME, splits.label_names)
    train_cfg = cfg.train
    if train_cfg.learning_rate is None:
        train_cfg = train_cfg.replace(learning_rate=spec.default_lr)
    result = fit(
        model,
        task,
        augment_text_dataset(train_ds, cfg.augment, tokenizer),
        val_ds,
        train_cfg,
        out,
        collate_fn=collate,
    )
    bs = cfg.train.eval_batch_size
    plain = ClassificationTask(num_labels=num_labels)

    def evaluate(m: nn.Module) -> dict[str, dict[str, float]]:
        return {
            "val": evaluate_dataset(m, plain, val_ds, batch_size=bs, collate_fn=collate),
            "test": evaluate_dataset(m, plain, test_ds, batch_size=bs, collate_fn=collate),
        }

    student_metrics = evaluate(model)
    teacher_metrics = evaluate(teacher)
    items = [test_ds[i] for i in range(min(dcfg.latency_batch, len(test_ds)))]
    batch = {k: v.to(device) for k, v in collate(items).items() if k != "labels"}
    t_ms, s_ms = compare_latency([teacher, model], batch, repeats=dcfg.latency_repeats)
    save_adapter(model, out)
    summary = {
        "teacher": {
            "path": str(dcfg.teacher),
            "val_accuracy": teacher_metrics["val"]["accuracy"],
            "test_accuracy": teacher_metrics["test"]["accuracy"],
            **_size(teacher),
            "latency_ms": t_ms,
        },
        "student": {
            "method": spec.name,
            "layers": len(blocks_of(model)[1]) if _has_blocks(model) else None,
            "val_accuracy": student_metrics["val"]["accuracy"],
            "test_accuracy": student_metrics["test"]["accuracy"],
            **_size(model),
            "trainable_params": report.trainable,
            "latency_ms": s_ms,
        },
        "temperature": dcfg.temperature,
        "alpha": dcfg.alpha,
        "speedup": t_ms / s_ms if s_ms > 0 else None,
    }
    metrics = {
        "method": spec.name,
        "val": student_metrics["val"],
        "test": student_metrics["test"],
        "trainable_params": report.trainable,
        "total_params": report.total,
        "trainable_percent": report.percent,
        "train_examples": len(splits.train),
        "wall_time_s": time.perf_counter() - start,
        "steps": result.steps,
        "best_step": result.best_step,
        "stopped_early": result.stopped_early,
        "distill": summary,
    }
    write_json(out / METRICS_NAME, metrics)
    if result.history:
        from deltatune.plot import plot_history
        from deltatune.run import PLOT_NAME

        plot_history(result.history, out / PLOT_NAME)
    return RunResult(out, metrics)


def _has_blocks(model: nn.Module) -> bool:
    from deltatune.prune import blocks_of

    try:
        blocks_of(model)
    except DeltatuneError:
        return False
    return True


def read_distill_summary(run_dir: str | Path) -> dict[str, Any]:
    """The ``distill`` block of a distillation run's ``metrics.json``."""
    path = Path(run_dir) / "metrics.json"
    if not path.is_file():
        raise DeltatuneError(f"'{run_dir}' has no metrics.json; the run did not finish")
    data = json.loads(path.read_text())
    if "distill" not in data:
        raise DeltatuneError(f"'{run_dir}' is not a distillation run (no 'distill' metrics)")
    return dict(data["distill"])

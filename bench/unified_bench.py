#!/usr/bin/env python
"""The unified methods (UniPELT, a free combination) beside the single methods they combine, on
the embedded MiniLM + BBC News task.

Variants (the single methods get exactly UniPELT's parts, so UniPELT's cost is their union plus
the gates):

- ``bound``: the frozen MiniLM with no trainable parameter; the embedding output requires grad
  (a forward hook), so backward runs through every block but computes no weight gradient and
  there is no optimizer (as in ``bench/mam_bench.py``).
- ``lora``: r = 8, alpha 16 on query and value (UniPELT's LoRA part).
- ``prefix_tuning``: 10 key/value prefixes per layer through the MLP (UniPELT's prefix part).
- ``pfeiffer``: bottleneck 384 / 16 = 24 after each feed-forward block (UniPELT's adapter part).
- ``unipelt``: all three, each behind its learned per-layer gate (``configs/unipelt.yaml``).
- ``combine``: ``configs/combine.yaml``'s method, LoRA q/v (r = 8, dropout 0.05) + Pfeiffer
  (reduction 16) + the head, ungated, as one adapter.

Every variant has a new classification head (``task_type: SEQ_CLS``; the bound's is frozen).

Part 1, cost: one batch (16 BBC articles x 64 tokens). Step time = forward + backward + AdamW,
median over interleaved rounds (a rotating order, so load from other processes hits all
variants alike), as process CPU time (steadier on a shared machine; the ratio column uses it).
Memory of a step, counted with :mod:`deltatune.memory` (``bench/mam_bench.py``'s ``memory``)::

    peak = weights + gradients + optimizer state + activations saved for backward

Part 2, accuracy: ``deltatune train`` of each variant (its ``method:`` section in a run config,
everything else the embedded defaults) with ``data.max_train_examples=320 train.epochs=2``
(each method's default learning rate, 1e-3), test accuracy on the held-out split (max 64
tokens). For UniPELT the learned gates (mean over layers of the per-layer means on the test
batch) are reported too.

Usage::

    nice -n 10 .venv/bin/python bench/unified_bench.py           # ~10 min on one thread
    nice -n 10 .venv/bin/python bench/unified_bench.py --quick   # smoke run

Results: ``bench/results/unified.json`` (``unified_quick.json`` with ``--quick``; written
atomically) and a Markdown table on stdout.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import yaml

import deltatune as dt
from deltatune.io import write_json

sys.path.insert(0, str(Path(__file__).resolve().parent))
from mam_bench import run_cost as mam_run_cost

RESULTS = Path(__file__).resolve().parent / "results"
CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def combine_method() -> dict[str, Any]:
    """``configs/combine.yaml``'s method section (read, so the bench follows the config)."""
    method: dict[str, Any] = yaml.safe_load((CONFIGS / "combine.yaml").read_text())["method"]
    return method


METHODS: dict[str, dict[str, Any]] = {
    "lora": {"name": "lora", "r": 8, "lora_alpha": 16, "target_modules": ["query", "value"]},
    "prefix_tuning": {"name": "prefix_tuning", "num_virtual_tokens": 10, "prefix_projection": True},
    "pfeiffer": {"name": "pfeiffer", "reduction_factor": 16},
    "unipelt": {"name": "unipelt"},
    "combine": combine_method(),
}


def _learned_gates(output_dir: Path, examples: Any, labels: list[str]) -> dict[str, Any]:
    """UniPELT's gates after training: per-layer means on (up to) 64 test articles."""
    from deltatune.data import PadCollator, TokenizedDataset
    from deltatune.methods.unipelt import gate_values
    from deltatune.models import ModelConfig, load_classifier, load_tokenizer

    tokenizer = load_tokenizer(ModelConfig())
    model = load_classifier(ModelConfig(), labels)
    dt.load_adapter(model, output_dir)
    model.eval()
    ds = TokenizedDataset(examples, tokenizer, 64)
    batch = PadCollator(tokenizer)([ds[i] for i in range(min(64, len(ds)))])
    batch.pop("labels", None)
    per_layer = gate_values(model, batch)
    mean = {g: statistics.fmean(row[g] for row in per_layer.values()) for g in per_layer[0]}
    return {"per_layer": {str(k): v for k, v in per_layer.items()}, "mean": mean}


def run_accuracy(args: argparse.Namespace) -> dict[str, Any]:
    from deltatune.data import DataConfig, load_text_splits
    from deltatune.run import load_run_config, train_run

    out: dict[str, Any] = {}
    for n, method in METHODS.items():
        with tempfile.TemporaryDirectory() as tmp:
            run_yaml = Path(tmp) / "run.yaml"
            run_yaml.write_text(yaml.safe_dump({"method": method}))
            overrides = [
                f"data.max_train_examples={args.train_examples}",
                f"train.epochs={args.epochs}",
                f"output_dir={tmp}/out",
                "train.progress=false",
            ]
            cfg = load_run_config(run_yaml, overrides)
            t0 = time.perf_counter()
            result = train_run(cfg, echo=lambda *_a, **_k: None)
            wall = time.perf_counter() - t0
            m = result.metrics
            out[n] = {
                "test_accuracy": m["test"]["accuracy"],
                "test_macro_f1": m["test"].get("macro_f1"),
                "val_accuracy": m["val"]["accuracy"] if m.get("val") else None,
                "trainable_params": m["trainable_params"],
                "trainable_percent": m["trainable_percent"],
                "train_wall_s": wall,
            }
            if n == "unipelt":
                splits = load_text_splits(DataConfig(max_length=64))
                out[n]["gates"] = _learned_gates(Path(tmp) / "out", splits.test, splits.label_names)
        print(f"  {n}: {out[n]}", file=sys.stderr, flush=True)
    return {"train_examples": args.train_examples, "epochs": args.epochs, **out}


def table(r: dict[str, Any]) -> str:
    lines = [
        "| variant | trainable | step CPU s | x bound | saved act. MiB | peak MiB (+bound) | "
        "test acc. |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for n in ["bound", *METHODS]:
        c = r["cost"][n]
        acc = r["accuracy"].get(n, {}).get("test_accuracy")
        lines.append(
            f"| {n} | {c['memory']['trainable_params']:,} | {c['cpu_s']:.3f} | "
            f"{c['ratio_vs_bound']:.2f} | {c['memory']['saved'] / 2**20:.1f} | "
            f"{c['memory']['peak'] / 2**20:.1f} ({c['extra_mib_vs_bound']:+.1f}) | "
            + (f"{acc:.3f} |" if acc is not None else "- |")
        )
    gates = r["accuracy"].get("unipelt", {}).get("gates")
    if gates:
        lines += ["", "UniPELT's learned gates (mean on 64 test articles):", ""]
        lines += ["| layer | G_L (LoRA) | G_P (prefix) | G_A (adapter) |", "|---|---:|---:|---:|"]
        for layer, row in [*gates["per_layer"].items(), ("mean", gates["mean"])]:
            lines.append(
                f"| {layer} | {row['lora']:.3f} | {row['prefix']:.3f} | {row['adapter']:.3f} |"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="smoke run: fewer rounds, steps")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--train-examples", type=int, default=320)
    ap.add_argument("--epochs", type=int, default=2)
    args = ap.parse_args(argv)
    if args.quick:
        args.rounds, args.steps, args.train_examples, args.epochs = 2, 1, 64, 1
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    result: dict[str, Any] = {
        "command": "bench/unified_bench.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "threads": args.threads,
        "torch": torch.__version__,
        "platform": platform.platform(),
        "methods": METHODS,
    }
    print("== cost (MiniLM, one batch)", file=sys.stderr)
    result["cost"] = mam_run_cost(args, METHODS)
    print("== accuracy (MiniLM + BBC News)", file=sys.stderr)
    result["accuracy"] = run_accuracy(args)
    result["wall_s"] = time.perf_counter() - t0
    name = "unified_quick.json" if args.quick else "unified.json"
    write_json(RESULTS / name, result)
    print(table(result))
    print(f"\nwrote {RESULTS / name} in {result['wall_s']:.0f} s", file=sys.stderr)


if __name__ == "__main__":
    main()

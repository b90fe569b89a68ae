#!/usr/bin/env python
"""MAM Adapter beside the two single methods it combines, on the embedded MiniLM + BBC News task.

Variants (the single methods get exactly MAM's halves, so MAM's cost is their union):

- ``bound``: the frozen MiniLM with no trainable parameter; the embedding output requires grad
  (a forward hook), so backward runs through every block but computes no weight gradient and
  there is no optimizer (as in ``bench/adapters_bench.py``).
- ``prefix_tuning``: 30 key/value prefixes per layer through the paper's MLP (MAM's prefix half).
- ``parallel_adapter``: its defaults, bottleneck 384 / 2 = 192, s = 4 (MAM's FFN half).
- ``mam``: both, one adapter (``configs/mam.yaml``'s method).

Every variant has a new classification head (``task_type: SEQ_CLS``; the bound's is frozen).

Part 1, cost: one batch (16 BBC articles x 64 tokens). Step time = forward + backward + AdamW,
median over interleaved rounds (a rotating order, so load from other processes hits all
variants alike), as process CPU time (steadier on a shared machine; the ratio column uses it).
Memory of a step, counted with :mod:`deltatune.memory`::

    peak = weights + gradients + optimizer state + activations saved for backward

(saved activations = unique storages packed by ``saved_tensors_hooks`` in the forward).

Part 2, accuracy: ``deltatune train`` of each variant with ``data.max_train_examples=320
train.epochs=2`` (each method's default learning rate, 1e-3), test accuracy on the held-out
split (max 64 tokens).

Usage::

    nice -n 10 .venv/bin/python bench/mam_bench.py           # ~5 min on one thread
    nice -n 10 .venv/bin/python bench/mam_bench.py --quick   # smoke run (fewer rounds/steps)

Results: ``bench/results/mam.json`` (``mam_quick.json`` with ``--quick``; written atomically)
and a Markdown table on stdout.
"""

from __future__ import annotations

import argparse
import copy
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

import deltatune as dt
from deltatune.io import write_json
from deltatune.memory import count_saved, storage_key, unique_bytes

RESULTS = Path(__file__).resolve().parent / "results"
PREFIX = {"num_virtual_tokens": 30, "prefix_projection": True}
METHODS: dict[str, dict[str, Any]] = {
    "prefix_tuning": {"name": "prefix_tuning", **PREFIX},
    "parallel_adapter": {"name": "parallel_adapter"},
    "mam": {"name": "mam", **PREFIX},
}


def make_variant(
    base: nn.Module, name: str, methods: dict[str, dict[str, Any]] = METHODS
) -> tuple[nn.Module, torch.optim.Optimizer | None]:
    model = copy.deepcopy(base)
    if name == "bound":
        for p in model.parameters():
            p.requires_grad_(False)
        model.bert.embeddings.register_forward_hook(  # type: ignore[union-attr]
            lambda _m, _i, out: out.detach().requires_grad_()
        )
    else:
        dt.inject(model, dt.config_from_dict({**methods[name], "task_type": "SEQ_CLS"}))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    return model, (torch.optim.AdamW(params, lr=1e-4) if params else None)


def step(model: nn.Module, opt: torch.optim.Optimizer | None, batch: dict[str, Any]) -> None:
    model(**batch).loss.backward()
    if opt is not None:
        opt.step()
        opt.zero_grad(set_to_none=True)


def memory(model: nn.Module, opt: torch.optim.Optimizer | None, batch: dict[str, Any]) -> dict:
    params = list(model.parameters())
    trainable = [p for p in params if p.requires_grad]
    state: list[torch.Tensor] = []
    if opt is not None:
        for s in opt.state.values():
            state += [t for t in s.values() if isinstance(t, torch.Tensor) and t.numel() > 1]
    exclude = {storage_key(t) for t in [*params, *model.buffers()]}
    with count_saved(exclude) as seen:
        loss = model(**batch).loss
    saved = sum(seen.values())
    loss.backward()
    if opt is not None:
        opt.step()
        opt.zero_grad(set_to_none=True)
    mem = {
        "weights": unique_bytes(params),
        "grads": sum(p.numel() * p.element_size() for p in trainable),
        "optimizer": unique_bytes(state) if state else 0,
        "saved": saved,
    }
    mem["peak"] = sum(mem.values())
    mem["trainable_params"] = sum(p.numel() for p in trainable)
    return mem


def run_cost(
    args: argparse.Namespace, methods: dict[str, dict[str, Any]] = METHODS
) -> dict[str, Any]:
    """Step time and memory of the bound and each of ``methods`` (``bench/unified_bench.py``
    passes its own)."""
    from deltatune.data import DataConfig, PadCollator, TokenizedDataset, load_text_splits
    from deltatune.models import ModelConfig, load_classifier, load_tokenizer

    splits = load_text_splits(DataConfig(max_length=64, max_train_examples=64))
    tokenizer = load_tokenizer(ModelConfig())
    ds = TokenizedDataset(splits.train, tokenizer, 64)
    batch = PadCollator(tokenizer)([ds[i] for i in range(args.batch)])
    torch.manual_seed(0)
    base = load_classifier(ModelConfig(), splits.label_names)
    names = ["bound", *methods]
    variants = {n: make_variant(base, n, methods) for n in names}
    out: dict[str, Any] = {}
    for n, (model, opt) in variants.items():
        step(model, opt, batch)  # warm-up (creates the optimizer state)
        out[n] = {"memory": memory(model, opt, batch), "cpu_rounds": [], "wall_rounds": []}
    for rep in range(args.rounds):
        k = rep % len(names)
        for n in names[k:] + names[:k]:
            model, opt = variants[n]
            t0, c0 = time.perf_counter(), time.process_time()
            for _ in range(args.steps):
                step(model, opt, batch)
            out[n]["wall_rounds"].append((time.perf_counter() - t0) / args.steps)
            out[n]["cpu_rounds"].append((time.process_time() - c0) / args.steps)
        print(f"  round {rep + 1}/{args.rounds}", file=sys.stderr, flush=True)
    bound_cpu = statistics.median(out["bound"]["cpu_rounds"])
    bound_peak = out["bound"]["memory"]["peak"]
    for n in names:
        r = out[n]
        r["cpu_s"] = statistics.median(r["cpu_rounds"])
        r["wall_s"] = statistics.median(r["wall_rounds"])
        r["ratio_vs_bound"] = r["cpu_s"] / bound_cpu
        r["extra_mib_vs_bound"] = (r["memory"]["peak"] - bound_peak) / 2**20
    return {"batch": args.batch, "seq": 64, "rounds": args.rounds, "steps": args.steps, **out}


def run_accuracy(args: argparse.Namespace) -> dict[str, Any]:
    from deltatune.run import load_run_config, train_run

    out: dict[str, Any] = {}
    for n, method in METHODS.items():
        with tempfile.TemporaryDirectory() as tmp:
            overrides = [
                f"data.max_train_examples={args.train_examples}",
                f"train.epochs={args.epochs}",
                f"output_dir={tmp}",
                "train.progress=false",
                *(
                    f"method.{k}={str(v).lower() if isinstance(v, bool) else v}"
                    for k, v in method.items()
                    if k != "name"
                ),
            ]
            cfg = load_run_config(None, [f"method.name={method['name']}", *overrides])
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
        print(f"  {n}: {out[n]}", file=sys.stderr, flush=True)
    return {"train_examples": args.train_examples, "epochs": args.epochs, **out}


def table(r: dict[str, Any]) -> str:
    lines = [
        "| variant | trainable | step CPU s | x bound | saved act. MiB | peak MiB (vs bound) | "
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
        "command": "bench/mam_bench.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "threads": args.threads,
        "torch": torch.__version__,
        "platform": platform.platform(),
        "methods": METHODS,
    }
    print("== cost (MiniLM, one batch)", file=sys.stderr)
    result["cost"] = run_cost(args)
    print("== accuracy (MiniLM + BBC News)", file=sys.stderr)
    result["accuracy"] = run_accuracy(args)
    result["wall_s"] = time.perf_counter() - t0
    name = "mam_quick.json" if args.quick else "mam.json"
    write_json(RESULTS / name, result)
    print(table(result))
    print(f"\nwrote {RESULTS / name} in {result['wall_s']:.0f} s", file=sys.stderr)


if __name__ == "__main__":
    main()

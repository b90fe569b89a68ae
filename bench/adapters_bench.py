#!/usr/bin/env python
"""Adapter-family benchmark: cost of each method against the frozen-base bound, and AdapterDrop.

Part 1 (``methods``): a random-init BERT-like encoder (default 4 layers, hidden 256, 4 heads,
FFN 1024, sequence classification) on one batch (default 8 x 128 tokens). Variants:

- ``bound``: the frozen base with no trainable parameter. The embedding output is made to
  require grad (a forward hook returning ``out.detach().requires_grad_()``), so backward runs
  through every block's activations but computes no weight gradient and there is no optimizer:
  the cost of backpropagating from the head down to the embeddings. A method whose lowest
  trainable tensor sits above block 0's attention (Pfeiffer: after block 0's feed-forward)
  skips that last piece of backward and can come out slightly below it.
- ``houlsby``, ``pfeiffer``, ``parallel_adapter``, ``ia3`` (their config defaults), ``lora``
  (r = 8 on query/value, PEFT's default targets) and ``fusion`` (AdapterFusion over two frozen
  Pfeiffer adapters): forward + backward + AdamW step on the method's parameters.

Reported per training variant: the median step time over interleaved rounds (each round runs
every variant once, in a rotating order, so that load from other processes hits all variants
alike), as process CPU time (``time.process_time``: it leaves out time spent waiting for a
core, so it is the steadier measure on a shared machine, and the ratio columns use it) and as
wall time; and the peak memory of a step, counted as

    peak = weights + gradients + optimizer state + activations saved for backward

where the saved activations are the unique storages packed by
``torch.autograd.graph.saved_tensors_hooks`` during the forward pass (parameter and buffer
storages excluded: they are counted as weights), gradients are the trainable parameters'
sizes and the optimizer state is AdamW's ``exp_avg``/``exp_avg_sq`` tensors. Transient working
buffers (and the autograd graph's own bookkeeping) are not counted, so this is a lower bound of
the allocator's peak; it is the same measure for every variant. ``extra MiB`` is the peak minus
the bound's. Inference (``eval()``, ``torch.inference_mode``): the base model without adapters,
every method unmerged, LoRA and IA3 merged.

Part 2 (``drop``): AdapterDrop on the embedded MiniLM (6 layers) + BBC News task. A Pfeiffer
adapter with a new head (``task_type: SEQ_CLS``) is trained briefly on a stratified subset,
once plainly and once with robust AdapterDrop (``random_max = 5``: each training step drops the
lowest k ~ U{0..5} blocks). Each is then evaluated (test-subset accuracy, inference latency of
one batch) with the adapters of the lowest k = 0, 2, 4, 6 blocks dropped, and the training step
time with k blocks dropped during training (nothing below the first adapter needs a backward
pass) is timed on the plain model.

Usage::

    .venv/bin/python bench/adapters_bench.py            # both parts, ~6 min on 2 idle cores
    .venv/bin/python bench/adapters_bench.py --threads 1  # steadier on a shared machine
    .venv/bin/python bench/adapters_bench.py --quick    # a smoke run, ~1.5 min
    .venv/bin/python bench/adapters_bench.py --part methods --batch 8 --seq 128

Results: ``bench/results/adapters[_quick].json`` (written atomically) and a Markdown table on
stdout.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

import deltatune as dt
from deltatune.io import write_json
from deltatune.memory import count_saved, storage_key, unique_bytes

RESULTS = Path(__file__).resolve().parent / "results"
DROP_KS = (0, 2, 4, 6)


# --------------------------------------------------------------------------------------------
# timing and memory
# --------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Timing:
    """Per-round times of one item: wall clock and this process's CPU time (all threads)."""

    wall: list[float] = dataclasses.field(default_factory=list)
    cpu: list[float] = dataclasses.field(default_factory=list)

    @property
    def wall_s(self) -> float:
        return statistics.median(self.wall)

    @property
    def cpu_s(self) -> float:
        return statistics.median(self.cpu)

    def to_dict(self) -> dict[str, Any]:
        return {
            "wall_s": self.wall_s,
            "cpu_s": self.cpu_s,
            "wall_rounds": self.wall,
            "cpu_rounds": self.cpu,
        }


def interleaved(
    items: list[Any], call: Callable[[Any], None], repeats: int, steps: int
) -> list[Timing]:
    """Per item, the mean wall and CPU time of ``steps`` calls in each of ``repeats`` rounds.

    The order rotates every round, so that no item always runs after the same one. The CPU
    time (``time.process_time``) leaves out time the process waits for a core, so on a shared
    machine it is the steadier measure; the ratio columns use it.
    """
    times = [Timing() for _ in items]
    for rep in range(repeats):
        order = list(range(len(items)))
        k = rep % len(order)
        for i in order[k:] + order[:k]:
            t0, c0 = time.perf_counter(), time.process_time()
            for _ in range(steps):
                call(items[i])
            times[i].wall.append((time.perf_counter() - t0) / steps)
            times[i].cpu.append((time.process_time() - c0) / steps)
        print(f"  round {rep + 1}/{repeats}", file=sys.stderr, flush=True)
    return times


# --------------------------------------------------------------------------------------------
# part 1: the methods
# --------------------------------------------------------------------------------------------
def build_encoder(args: argparse.Namespace) -> nn.Module:
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    cfg = BertConfig(  # type: ignore[call-arg]
        hidden_size=args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=args.hidden // 64,
        intermediate_size=4 * args.hidden,
        vocab_size=30522,
        num_labels=2,
        hidden_dropout_prob=0.1,
        attention_probs_dropout_prob=0.1,
    )
    return BertForSequenceClassification(cfg)


def method_configs() -> dict[str, list[tuple[str, dt.MethodConfig]]]:
    """Variant name -> the adapters to inject, in order (the last one trains)."""
    return {
        "houlsby": [("default", dt.HoulsbyConfig())],
        "pfeiffer": [("default", dt.PfeifferConfig())],
        "parallel_adapter": [("default", dt.ParallelAdapterConfig())],
        "ia3": [("default", dt.IA3Config())],
        "lora": [("default", dt.LoraConfig(r=8, target_modules=["query", "value"]))],
        "fusion": [
            ("t1", dt.PfeifferConfig()),
            ("t2", dt.PfeifferConfig()),
            ("default", dt.FusionConfig(adapter_names=["t1", "t2"])),
        ],
    }


@dataclasses.dataclass
class Variant:
    name: str
    model: nn.Module
    optimizer: torch.optim.Optimizer | None
    trainable: int
    memory: dict[str, int] = dataclasses.field(default_factory=dict)
    times: Timing = dataclasses.field(default_factory=Timing)


def make_variant(base: nn.Module, name: str) -> Variant:
    model = copy.deepcopy(base)
    if name == "bound":
        for p in model.parameters():
            p.requires_grad_(False)
        model.bert.embeddings.register_forward_hook(  # type: ignore[union-attr]
            lambda _m, _i, out: out.detach().requires_grad_()
        )
    else:
        for adapter_name, config in method_configs()[name]:
            dt.inject(model, config, adapter_name)
            if adapter_name != "default":  # a stage-one task adapter: give it some weight
                with torch.no_grad():
                    for t in dt.adapter_state_dict(model, adapter_name).values():
                        t.add_(0.02 * torch.randn_like(t))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4) if params else None
    return Variant(name, model, optimizer, sum(p.numel() for p in params))


def train_step(v: Variant, batch: dict[str, torch.Tensor]) -> None:
    loss = v.model(**batch).loss
    loss.backward()
    if v.optimizer is not None:
        v.optimizer.step()
        v.optimizer.zero_grad(set_to_none=True)


def measure_memory(v: Variant, batch: dict[str, torch.Tensor]) -> None:
    """One instrumented step (after a warm-up step, so the optimizer state exists)."""
    params = list(v.model.parameters())
    trainable = [p for p in params if p.requires_grad]
    state: list[torch.Tensor] = []
    if v.optimizer is not None:
        for s in v.optimizer.state.values():
            state += [t for t in s.values() if isinstance(t, torch.Tensor) and t.numel() > 1]
    exclude = {storage_key(t) for t in [*params, *v.model.buffers()]}
    with count_saved(exclude) as seen:
        loss = v.model(**batch).loss
    saved = sum(seen.values())
    loss.backward()
    if v.optimizer is not None:
        v.optimizer.step()
        v.optimizer.zero_grad(set_to_none=True)
    mem = {
        "weights": unique_bytes(params),
        "grads": sum(p.numel() * p.element_size() for p in trainable),
        "optimizer": unique_bytes(state) if state else 0,
        "saved": saved,
    }
    mem["peak"] = mem["weights"] + mem["grads"] + mem["optimizer"] + mem["saved"]
    v.memory = mem


def run_methods(args: argparse.Namespace) -> dict[str, Any]:
    base = build_encoder(args)
    g = torch.Generator().manual_seed(0)
    batch = {
        "input_ids": torch.randint(0, 30522, (args.batch, args.seq), generator=g),
        "labels": torch.randint(0, 2, (args.batch,), generator=g),
    }
    n_params = sum(p.numel() for p in base.parameters())
    print(
        f"\n== methods: BERT-like {args.layers}x{args.hidden}, {n_params / 1e6:.1f}M params, "
        f"batch {args.batch}x{args.seq}",
        file=sys.stderr,
    )
    variants = [make_variant(base, n) for n in ["bound", *method_configs()]]
    for v in variants:
        train_step(v, batch)  # warm-up; creates the optimizer state
    for v in variants:
        measure_memory(v, batch)
    print(f"  timing {len(variants)} training variants", file=sys.stderr)
    times = interleaved(variants, lambda v: train_step(v, batch), args.repeats, 1)
    for v, t in zip(variants, times, strict=True):
        v.times = t

    # inference
    infer: list[tuple[str, nn.Module]] = [("base", copy.deepcopy(base).eval())]
    for v in variants[1:]:
        v.model.eval()
        infer.append((v.name, v.model))
        if v.name in ("lora", "ia3"):
            merged = copy.deepcopy(v.model)
            dt.merge(merged)
            infer.append((f"{v.name} merged", merged))
    ids = batch["input_ids"]

    def infer_once(item: tuple[str, nn.Module]) -> None:
        with torch.inference_mode():
            item[1](input_ids=ids)

    for item in infer:
        infer_once(item)
    print(f"  timing {len(infer)} inference variants", file=sys.stderr)
    itimes = interleaved(infer, infer_once, args.repeats, 1)

    bound = variants[0]
    train_rows = [
        {
            "variant": v.name,
            "trainable_params": v.trainable,
            "step": v.times.to_dict(),
            "cpu_x_bound": v.times.cpu_s / bound.times.cpu_s,
            "wall_x_bound": v.times.wall_s / bound.times.wall_s,
            "memory_bytes": v.memory,
            "extra_over_bound_bytes": v.memory["peak"] - bound.memory["peak"],
        }
        for v in variants
    ]
    infer_rows = [
        {
            "variant": name,
            "latency": t.to_dict(),
            "cpu_x_base": t.cpu_s / itimes[0].cpu_s,
            "wall_x_base": t.wall_s / itimes[0].wall_s,
        }
        for (name, _), t in zip(infer, itimes, strict=True)
    ]
    return {
        "model": f"bert-like {args.layers} layers, hidden {args.hidden}",
        "params": n_params,
        "batch": args.batch,
        "seq": args.seq,
        "train": train_rows,
        "inference": infer_rows,
    }


# --------------------------------------------------------------------------------------------
# part 2: AdapterDrop on MiniLM + BBC News
# --------------------------------------------------------------------------------------------
def run_drop(args: argparse.Namespace) -> dict[str, Any]:
    from deltatune.data import DataConfig, PadCollator, TokenizedDataset, load_text_splits
    from deltatune.models import ModelConfig, load_classifier, load_tokenizer
    from deltatune.train import ClassificationTask, TrainerConfig, evaluate_dataset, fit

    data_cfg = DataConfig(
        max_length=args.drop_seq,
        max_train_examples=args.train_examples,
        max_eval_examples=args.eval_examples,
    )
    splits = load_text_splits(data_cfg)
    tokenizer = load_tokenizer(ModelConfig())
    collate = PadCollator(tokenizer)
    train_ds = TokenizedDataset(splits.train, tokenizer, args.drop_seq)
    test_ds = TokenizedDataset(splits.test, tokenizer, args.drop_seq)
    task = ClassificationTask(num_labels=splits.num_labels)
    latency_batch = collate([test_ds[i] for i in range(args.latency_batch)])
    latency_inputs = {k: v for k, v in latency_batch.items() if k != "labels"}
    train_batch = collate([train_ds[i] for i in range(16)])
    print(
        f"\n== AdapterDrop: MiniLM + BBC News, {len(splits.train)} train / {len(splits.test)} test "
        f"examples, {args.drop_seq} tokens",
        file=sys.stderr,
    )
    trainer = TrainerConfig(
        epochs=args.epochs,
        batch_size=16,
        learning_rate=args.lr,
        progress=False,
        device="cpu",
        seed=0,
    )
    results: dict[str, Any] = {}
    models: dict[str, nn.Module] = {}
    for mode in ("plain", "robust"):
        torch.manual_seed(0)
        model = load_classifier(ModelConfig(), splits.label_names)
        dt.inject(model, dt.PfeifferConfig(task_type="SEQ_CLS"))
        if mode == "robust":
            dt.adapter_drop(model, 0, random_max=5, seed=0)
        t0 = time.perf_counter()
        fit(model, task, train_ds, None, trainer, None, collate_fn=collate)
        train_s = time.perf_counter() - t0
        model.eval()
        rows = []
        for k in DROP_KS:
            dt.adapter_drop(model, k)
            metrics = evaluate_dataset(model, task, test_ds, batch_size=32, collate_fn=collate)
            rows.append({"k": k, "accuracy": metrics["accuracy"], "macro_f1": metrics["macro_f1"]})
        dt.adapter_drop(model, 0)
        print(f"  {mode}: trained in {train_s:.0f} s; {rows}", file=sys.stderr)
        results[mode] = {"train_s": train_s, "rows": rows}
        models[mode] = model

    # inference latency per k (one model; dropping is the same operation for both)
    model = models["plain"]
    items: list[int | None] = [None, *DROP_KS]  # None: the base model, adapters disabled

    def infer_once(k: int | None) -> None:
        with torch.inference_mode():
            if k is None:
                with dt.disabled(model):
                    model(**latency_inputs)
            else:
                dt.adapter_drop(model, k)
                model(**latency_inputs)

    for item in items:
        infer_once(item)
    print("  timing inference per k", file=sys.stderr)
    lat = interleaved(items, infer_once, args.repeats, 1)
    dt.adapter_drop(model, 0)

    # training step time with k blocks dropped during training
    step_model = copy.deepcopy(model).train()
    params = [p for p in step_model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5)

    def step(k: int) -> None:
        dt.adapter_drop(step_model, k)
        step_model(**train_batch).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for k in DROP_KS:
        step(k)
    print("  timing training steps per k", file=sys.stderr)
    steps = interleaved(list(DROP_KS), step, args.repeats, 1)

    table = []
    for i, k in enumerate(DROP_KS):
        table.append(
            {
                "k": k,
                "latency": lat[i + 1].to_dict(),
                "latency_cpu_x_k0": lat[i + 1].cpu_s / lat[1].cpu_s,
                "latency_cpu_x_base": lat[i + 1].cpu_s / lat[0].cpu_s,
                "train_step": steps[i].to_dict(),
                "train_step_cpu_x_k0": steps[i].cpu_s / steps[0].cpu_s,
                "accuracy_plain": results["plain"]["rows"][i]["accuracy"],
                "accuracy_robust": results["robust"]["rows"][i]["accuracy"],
                "macro_f1_plain": results["plain"]["rows"][i]["macro_f1"],
                "macro_f1_robust": results["robust"]["rows"][i]["macro_f1"],
            }
        )
    return {
        "model": "all-MiniLM-L6-v2 (6 layers, hidden 384) + Pfeiffer (m = 24) + new head",
        "train_examples": len(splits.train),
        "test_examples": len(splits.test),
        "tokens": args.drop_seq,
        "epochs": args.epochs,
        "learning_rate": args.lr,
        "latency_batch": args.latency_batch,
        "base_latency": lat[0].to_dict(),
        "train_s": {m: results[m]["train_s"] for m in results},
        "table": table,
    }


# --------------------------------------------------------------------------------------------
# reporting
# --------------------------------------------------------------------------------------------
def _mib(n: float) -> str:
    return f"{n / 2**20:,.1f}"


def format_methods(r: dict[str, Any]) -> str:
    lines = [
        f"### Methods: {r['model']} ({r['params'] / 1e6:.1f}M params), batch {r['batch']}x{r['seq']}",
        "",
        "| variant | trainable | step cpu s | x bound | step wall s | peak MiB | saved MiB "
        "| extra MiB |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in r["train"]:
        m = row["memory_bytes"]
        lines.append(
            f"| {row['variant']} | {row['trainable_params']:,} | {row['step']['cpu_s']:.3f} "
            f"| {row['cpu_x_bound']:.2f} | {row['step']['wall_s']:.3f} | {_mib(m['peak'])} "
            f"| {_mib(m['saved'])} | {_mib(row['extra_over_bound_bytes'])} |"
        )
    lines += [
        "",
        "| inference | cpu s | x base | wall s |",
        "| --- | ---: | ---: | ---: |",
    ]
    for row in r["inference"]:
        lines.append(
            f"| {row['variant']} | {row['latency']['cpu_s']:.4f} | {row['cpu_x_base']:.3f} "
            f"| {row['latency']['wall_s']:.4f} |"
        )
    return "\n".join(lines)


def format_drop(r: dict[str, Any]) -> str:
    lines = [
        f"### AdapterDrop: {r['model']}",
        f"{r['train_examples']} training examples x {r['epochs']} epochs (lr {r['learning_rate']:g}), "
        f"{r['test_examples']} test examples, {r['tokens']} tokens; inference: one "
        f"{r['latency_batch']}x{r['tokens']} batch (the base model without adapters: "
        f"{r['base_latency']['cpu_s']:.4f} cpu s); training step: 16 examples, AdamW",
        "",
        "| dropped blocks k | infer cpu s | x k=0 | x base | train step cpu s | x k=0 "
        "| acc (plain) | acc (robust) |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in r["table"]:
        lines.append(
            f"| {row['k']} | {row['latency']['cpu_s']:.4f} | {row['latency_cpu_x_k0']:.3f} "
            f"| {row['latency_cpu_x_base']:.3f} | {row['train_step']['cpu_s']:.3f} "
            f"| {row['train_step_cpu_x_k0']:.3f} | {row['accuracy_plain']:.3f} "
            f"| {row['accuracy_robust']:.3f} |"
        )
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--part", choices=["methods", "drop", "both"], default="both")
    p.add_argument("--quick", action="store_true", help="small sizes and 3 rounds: a smoke run")
    p.add_argument("--layers", type=int, default=4, help="encoder layers (part 1)")
    p.add_argument(
        "--hidden", type=int, default=256, help="hidden size (part 1; heads = hidden/64)"
    )
    p.add_argument("--batch", type=int, default=None, help="sequences per batch (8; quick 4)")
    p.add_argument("--seq", type=int, default=None, help="tokens per sequence (128; quick 64)")
    p.add_argument("--repeats", type=int, default=None, help="interleaved rounds (5; quick 3)")
    p.add_argument("--train-examples", type=int, default=None, help="part 2 (320; quick 160)")
    p.add_argument(
        "--eval-examples", type=int, default=None, help="part 2 test cap (160; quick 80)"
    )
    p.add_argument("--epochs", type=int, default=None, help="part 2 (2; quick 1)")
    p.add_argument("--lr", type=float, default=5e-3, help="part 2 learning rate")
    p.add_argument("--drop-seq", type=int, default=64, help="part 2 tokens per example")
    p.add_argument("--latency-batch", type=int, default=16, help="part 2 latency batch size")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    p.add_argument("--out", type=Path, default=None, help="JSON path")
    args = p.parse_args(argv)
    q = args.quick
    args.batch = args.batch or (4 if q else 8)
    args.seq = args.seq or (64 if q else 128)
    args.repeats = args.repeats or (3 if q else 5)
    args.train_examples = args.train_examples or (160 if q else 320)
    args.eval_examples = args.eval_examples or (80 if q else 160)
    args.epochs = args.epochs or (1 if q else 2)
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    import transformers

    start = time.perf_counter()
    result: dict[str, Any] = {
        "meta": {
            "command": " ".join(
                [Path(sys.argv[0]).as_posix(), *(argv if argv is not None else sys.argv[1:])]
            ),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "device": "cpu",
            "cpu": platform.processor() or platform.machine(),
            "threads": torch.get_num_threads(),
            "repeats": args.repeats,
            "memory_method": "weights + grads + AdamW state + unique storages saved for backward",
            "time": time.strftime("%Y-%m-%d %H:%M:%S"),
        }
    }
    tables = []
    if args.part in ("methods", "both"):
        result["methods"] = run_methods(args)
        tables.append(format_methods(result["methods"]))
    if args.part in ("drop", "both"):
        result["adapter_drop"] = run_drop(args)
        tables.append(format_drop(result["adapter_drop"]))
    result["meta"]["wall_s"] = time.perf_counter() - start
    out = args.out or RESULTS / f"adapters{'_quick' if args.quick else ''}.json"
    write_json(out, result)
    print("\n\n".join(tables))
    print(f"\n(total {result['meta']['wall_s']:.0f} s; written to {out})", flush=True)


if __name__ == "__main__":
    main()

#!/usr/bin/env python
"""LoRA training and inference benchmark: deltatune vs Hugging Face PEFT vs the frozen-base bound.

Every variant of one model runs in the same process on the same batch; the timing loop
interleaves the variants (one round = each variant once, in a rotating order) and reports the
median over rounds, so that load from other processes hits all variants alike.

Training variants (per model):

- ``bound``: the frozen base with no trainable parameter. The embedding output is made to
  require grad (a forward hook returning ``out.detach().requires_grad_()``) and the same loss is
  back-propagated, so backward runs through every activation but computes no weight gradient.
  No optimizer. Nothing a LoRA step does can be cheaper than this.
- ``dt`` / ``peft``: deltatune / PEFT LoRA for each target set (``qv``: query/value projections;
  ``all``: every Linear of the blocks) and rank; forward + backward + AdamW step on the trainable
  parameters. ``dt-plain`` (``--plain``): deltatune with its fast LoRA kernel switched off.
  ``dt-keep`` (``--keep``, all-linear only): the kernel with input rebuilding off, i.e. keeping
  every adapted layer's input itself (``deltatune.kernels.lora_linear.rebuild_inputs``).
  ``--dora`` adds ``dt-dora`` / ``peft-dora`` on the q,v targets.

Arithmetic floor (``--floor``): ``floor <targets> r<r>`` is the bound's step followed by the
LoRA matrix products alone, on tensors of the adapted layers' real shapes (per layer
``v = x Aᵀ``, ``v Bᵀ``; backward ``gᵀ v``, ``g B``, ``duᵀ x``, ``du A``; no dropout, no adds, no
optimizer), timed in the same interleaved rounds. Any implementation that computes LoRA's exact
result does at least these multiply-adds, so ``floor x bound`` is the lowest ``step x bound`` it
can reach on this machine at this matmul throughput. Inference: ``floor`` is the base forward
followed by ``v = x Aᵀ``, ``v Bᵀ`` per layer.

Peak memory. On CUDA: ``torch.cuda.max_memory_allocated`` during one step, minus what the other
variants' models hold. On CPU (no allocator statistics): the parameters, gradients and
optimizer state plus the activations saved for backward, counted with
``torch.autograd.graph.saved_tensors_hooks`` as unique storages (parameter storages excluded,
they are already counted). Transient working buffers are not counted. See bench/README.md.

Inference (``eval()``, ``torch.inference_mode``): the base model, deltatune unmerged, deltatune
merged (``deltatune.merge``) and PEFT unmerged.

Usage::

    .venv/bin/python bench/lora_bench.py --model bert          # full run, ~15 min on 2 cores
    .venv/bin/python bench/lora_bench.py --quick               # small batch, both models
    .venv/bin/python bench/lora_bench.py --memory-only         # peak memory of bound and dt only
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import gc
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

import deltatune as dt
from deltatune.memory import count_saved, storage_key, unique_bytes
from deltatune.targeting import select_modules

RESULTS = Path(__file__).resolve().parent / "results"
LORA_ALPHA = 16
ALL_DROPOUT = 0.05


# --------------------------------------------------------------------------------------------
# models and batches
# --------------------------------------------------------------------------------------------
def build_model(kind: str, seed: int = 0) -> nn.Module:
    """Random-init BERT-like encoder (sequence classification) or LLaMA-like decoder (~8 layers)."""
    from transformers import (
        BertConfig,
        BertForSequenceClassification,
        LlamaConfig,
        LlamaForCausalLM,
    )

    torch.manual_seed(seed)
    if kind == "bert":
        return BertForSequenceClassification(
            BertConfig(
                hidden_size=512,
                num_hidden_layers=8,
                num_attention_heads=8,
                intermediate_size=2048,
                vocab_size=30522,
                num_labels=2,
            )
        )
    if kind == "llama":
        return LlamaForCausalLM(
            LlamaConfig(
                hidden_size=512,
                num_hidden_layers=8,
                num_attention_heads=8,
                num_key_value_heads=8,
                intermediate_size=1376,
                vocab_size=32000,
                max_position_embeddings=2048,
            )
        )
    raise SystemExit(f"--model {kind!r}: choose bert or llama")


def embedding_module(model: nn.Module, kind: str) -> nn.Module:
    return model.bert.embeddings if kind == "bert" else model.model.embed_tokens  # type: ignore[union-attr,return-value]


def make_batch(
    kind: str, batch: int, seq: int, vocab: int, device: torch.device
) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1234)
    ids = torch.randint(0, vocab, (batch, seq), generator=g)
    if kind == "bert":
        labels = torch.randint(0, 2, (batch,), generator=g)
    else:
        labels = ids.clone()
    return {"input_ids": ids.to(device), "labels": labels.to(device)}


def target_names(model: nn.Module, kind: str, targets: str) -> list[str]:
    """Exact module names, so that deltatune and PEFT adapt the very same layers."""
    if targets == "qv":
        pattern: str | list[str] = ["query", "value"] if kind == "bert" else ["q_proj", "v_proj"]
    else:
        pattern = "all-linear"
    return select_modules(model, pattern)


# --------------------------------------------------------------------------------------------
# variants
# --------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Variant:
    name: str  # e.g. "dt qv r8"
    method: str  # bound | dt | dt-plain | peft | dt-dora | peft-dora
    targets: str  # "-" for the bound
    r: int
    dropout: float
    model: nn.Module
    optimizer: torch.optim.Optimizer | None
    fast: bool = True
    rebuild: bool = True  # False for dt-keep: the kernel keeps every input (no rebuilding)
    extra: Callable[[], None] | None = None  # floor rows: the LoRA matmuls after the bound step
    times: list[float] = dataclasses.field(default_factory=list)
    cpu_times: list[float] = dataclasses.field(default_factory=list)
    memory: dict[str, int] = dataclasses.field(default_factory=dict)


def _fast_context(enabled: bool, rebuild: bool = True) -> contextlib.AbstractContextManager[Any]:
    try:
        from deltatune.kernels import fast_lora
        from deltatune.kernels.lora_linear import rebuild_inputs
    except ImportError:  # Part 1: no kernel yet
        return contextlib.nullcontext()
    stack = contextlib.ExitStack()
    stack.enter_context(fast_lora(enabled))
    if not rebuild:
        stack.enter_context(rebuild_inputs(False))
    return stack


def make_variant(
    base: nn.Module,
    kind: str,
    method: str,
    targets: str,
    r: int,
    dropout: float,
    device: torch.device,
) -> Variant:
    model = copy.deepcopy(base)
    names = target_names(model, kind, targets) if targets != "-" else []
    dora = method.endswith("dora")
    if method == "bound":
        for p in model.parameters():
            p.requires_grad_(False)
        embedding_module(model, kind).register_forward_hook(
            lambda _m, _i, out: out.detach().requires_grad_()
        )
    elif method in ("dt", "dt-plain", "dt-keep", "dt-dora"):
        dt.inject(
            model,
            dt.LoraConfig(
                r=r,
                lora_alpha=LORA_ALPHA,
                lora_dropout=dropout,
                target_modules=names,
                use_dora=dora,
            ),
        )
    elif method in ("peft", "peft-dora"):
        import peft

        regex = "^(" + "|".join(n.replace(".", r"\.") for n in names) + ")$"
        cfg = peft.LoraConfig(
            r=r, lora_alpha=LORA_ALPHA, lora_dropout=dropout, target_modules=regex, use_dora=dora
        )
        model = peft.get_peft_model(model, cfg)
    else:
        raise ValueError(method)
    model.to(device).train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4) if params else None
    label = "bound" if method == "bound" else f"{method} {targets} r{r}"
    return Variant(
        label,
        method,
        targets,
        r,
        dropout,
        model,
        optimizer,
        fast=method != "dt-plain",
        rebuild=method != "dt-keep",
    )


def adapted_shapes(
    model: nn.Module, names: list[str], batch: dict[str, torch.Tensor]
) -> list[tuple[int, int, int]]:
    """``(rows, in, out)`` of every adapted layer's input in one forward of ``batch``."""
    shapes: list[tuple[int, int, int]] = []
    hooks = []
    for name in names:
        layer = model.get_submodule(name)

        def record(mod: nn.Module, inputs: tuple[Any, ...]) -> None:
            in_f, out_f = mod.in_features, mod.out_features
            shapes.append((inputs[0].numel() // in_f, in_f, out_f))  # type: ignore[arg-type]

        hooks.append(layer.register_forward_pre_hook(record))
    try:
        with torch.no_grad():
            model(**batch)
    finally:
        for h in hooks:
            h.remove()
    return shapes


class LoraMatmuls:
    """The LoRA matrix products of one step on random tensors of the adapted layers' shapes."""

    def __init__(
        self, shapes: list[tuple[int, int, int]], r: int, device: torch.device, dtype: torch.dtype
    ) -> None:
        g = torch.Generator().manual_seed(0)

        def rand(*size: int) -> torch.Tensor:
            return torch.randn(*size, generator=g).to(device, dtype)

        self.layers = [
            (rand(n, d_in), rand(n, d_out), rand(r, d_in), rand(d_out, r))
            for n, d_in, d_out in shapes
        ]

    def forward(self) -> None:
        for x, _g, a, b in self.layers:
            torch.mm(torch.mm(x, a.t()), b.t())

    def forward_backward(self) -> None:
        for x, g, a, b in self.layers:
            v = torch.mm(x, a.t())
            torch.mm(v, b.t())
            torch.mm(g.t(), v)  # dL/dB
            du = torch.mm(g, b)
            torch.mm(du.t(), x)  # dL/dA
            torch.mm(du, a)  # the input gradient's LoRA part


def _autocast(device: torch.device, amp: str | None) -> contextlib.AbstractContextManager[Any]:
    if amp is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


def train_step(
    v: Variant, batch: dict[str, torch.Tensor], device: torch.device, amp: str | None
) -> torch.Tensor:
    with _fast_context(v.fast, v.rebuild), _autocast(device, amp):
        loss = v.model(**batch).loss
    loss.backward()
    if v.optimizer is not None:
        v.optimizer.step()
        v.optimizer.zero_grad(set_to_none=True)
    if v.extra is not None:
        with _autocast(device, amp):
            v.extra()
    return loss.detach()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


# --------------------------------------------------------------------------------------------
# memory
# --------------------------------------------------------------------------------------------
def static_bytes(v: Variant) -> dict[str, int]:
    params = list(v.model.parameters())
    trainable = [p for p in params if p.requires_grad]
    opt_state: list[torch.Tensor] = []
    if v.optimizer is not None:
        for state in v.optimizer.state.values():
            opt_state += [
                t for t in state.values() if isinstance(t, torch.Tensor) and t.numel() > 1
            ]
    return {
        "weights": unique_bytes(params),
        "adapter_weights": unique_bytes(trainable) if trainable else 0,
        "grads": sum(p.numel() * p.element_size() for p in trainable),
        "optimizer": unique_bytes(opt_state) if opt_state else 0,
    }


def measure_memory(
    v: Variant, batch: dict[str, torch.Tensor], device: torch.device, amp: str | None
) -> None:
    """One instrumented step (after a warm-up step, so that the optimizer state exists)."""
    static = static_bytes(v)
    exclude = {storage_key(p) for p in v.model.parameters()}
    exclude |= {storage_key(b) for b in v.model.buffers()}
    if device.type == "cuda":
        gc.collect()
        torch.cuda.synchronize()
        others = torch.cuda.memory_allocated() - static["weights"] - static["optimizer"]
        torch.cuda.reset_peak_memory_stats()
    with count_saved(exclude) as seen, _fast_context(v.fast, v.rebuild), _autocast(device, amp):
        loss = v.model(**batch).loss
    saved = sum(seen.values())
    loss.backward()
    del loss
    if v.optimizer is not None:
        v.optimizer.step()
    peak = static["weights"] + static["grads"] + static["optimizer"] + saved
    if device.type == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - others
    if v.optimizer is not None:
        v.optimizer.zero_grad(set_to_none=True)
    v.memory = {**static, "saved": saved, "peak": peak}


# --------------------------------------------------------------------------------------------
# timing loops
# --------------------------------------------------------------------------------------------
def interleaved(
    items: list[Any], run: Callable[[Any], None], repeats: int, steps: int, device: torch.device
) -> tuple[dict[int, list[float]], dict[int, list[float]]]:
    """Per item, the mean wall and process-CPU time of ``steps`` calls in each of ``repeats`` rounds.

    The order rotates every round, so that no variant always runs after the same one.
    """
    wall: dict[int, list[float]] = {i: [] for i in range(len(items))}
    cpu: dict[int, list[float]] = {i: [] for i in range(len(items))}
    for rep in range(repeats):
        order = list(range(len(items)))
        k = rep % len(order)
        order = order[k:] + order[:k]
        for i in order:
            _sync(device)
            t0, c0 = time.perf_counter(), time.process_time()
            for _ in range(steps):
                run(items[i])
            _sync(device)
            wall[i].append((time.perf_counter() - t0) / steps)
            cpu[i].append((time.process_time() - c0) / steps)
        print(f"  round {rep + 1}/{repeats} done", file=sys.stderr, flush=True)
    return wall, cpu


@dataclasses.dataclass
class InferVariant:
    name: str
    targets: str
    r: int
    model: nn.Module
    extra: Callable[[], None] | None = None
    times: list[float] = dataclasses.field(default_factory=list)
    cpu_times: list[float] = dataclasses.field(default_factory=list)


def run_model(kind: str, args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    base = build_model(kind).to(device)
    vocab = base.config.vocab_size
    batch = make_batch(kind, args.batch, args.seq, vocab, device)
    n_params = sum(p.numel() for p in base.parameters())
    print(
        f"\n== {kind}: {n_params / 1e6:.1f}M params, batch {args.batch}x{args.seq}, {device}",
        file=sys.stderr,
    )

    if args.memory_only:  # PEFT's and the plain path's memory do not depend on the kernel
        methods = ["dt"]
    else:
        methods = ["dt", "peft"] + (["dt-plain"] if args.plain else [])
    variants = [make_variant(base, kind, "bound", "-", 0, 0.0, device)]
    for targets in args.targets:
        dropout = ALL_DROPOUT if targets == "all" else args.qv_dropout
        for r in args.ranks:
            for method in methods + (["dt-keep"] if args.keep and targets == "all" else []):
                variants.append(make_variant(base, kind, method, targets, r, dropout, device))
    if args.dora:
        for r in args.ranks:
            for method in ("dt-dora", "peft-dora"):
                variants.append(make_variant(base, kind, method, "qv", r, args.qv_dropout, device))

    # warm-up (allocates optimizer state), then memory, then the interleaved timing
    for v in variants:
        for _ in range(args.warmup):
            train_step(v, batch, device, args.amp)
    for v in variants:
        measure_memory(v, batch, device, args.amp)
    if args.memory_only:
        return memory_rows(kind, n_params, variants)
    floors: dict[tuple[str, int], LoraMatmuls] = {}
    if args.floor:  # the bound's model and memory; only the time differs
        dtype = torch.bfloat16 if args.amp else torch.float32
        for targets in args.targets:
            shapes = adapted_shapes(base, target_names(base, kind, targets), batch)
            for r in args.ranks:
                work = LoraMatmuls(shapes, r, device, dtype)
                floors[(targets, r)] = work
                variants.append(
                    dataclasses.replace(
                        variants[0],
                        name=f"floor {targets} r{r}",
                        method="floor",
                        targets=targets,
                        r=r,
                        extra=work.forward_backward,
                        times=[],
                        cpu_times=[],
                    )
                )
    print(f"  timing {len(variants)} training variants", file=sys.stderr)
    times, cpu = interleaved(
        variants, lambda v: train_step(v, batch, device, args.amp), args.repeats, args.steps, device
    )
    for i, v in enumerate(variants):
        v.times, v.cpu_times = times[i], cpu[i]

    # inference
    infer: list[InferVariant] = [InferVariant("base", "-", 0, copy.deepcopy(base).eval())]
    merged_ok: dict[str, float] = {}
    for v in variants:
        if v.method not in ("dt", "peft"):
            continue
        v.model.eval()
        infer.append(InferVariant(f"{v.method} unmerged", v.targets, v.r, v.model))
        if v.method == "dt":
            merged = copy.deepcopy(v.model)
            dt.merge(merged)
            infer.append(InferVariant("dt merged", v.targets, v.r, merged))
            with torch.inference_mode(), _autocast(device, args.amp):
                a = v.model(input_ids=batch["input_ids"]).logits.float()
                b = merged(input_ids=batch["input_ids"]).logits.float()
            merged_ok[f"{v.targets} r{v.r}"] = float((a - b).abs().max())
    ids = batch["input_ids"]

    for (targets, r), work in floors.items():
        infer.append(InferVariant("floor", targets, r, infer[0].model, work.forward))

    def infer_once(iv: InferVariant) -> None:
        with torch.inference_mode(), _fast_context(True), _autocast(device, args.amp):
            iv.model(input_ids=ids)
            if iv.extra is not None:
                iv.extra()

    for iv in infer:
        infer_once(iv)
    print(f"  timing {len(infer)} inference variants", file=sys.stderr)
    itimes, icpu = interleaved(infer, infer_once, args.repeats, args.steps, device)
    for i, iv in enumerate(infer):
        iv.times, iv.cpu_times = itimes[i], icpu[i]

    bound = variants[0]
    b_growth = bound.memory["peak"] - bound.memory["weights"]
    train_rows = []
    for v in variants:
        extra = v.memory["peak"] - bound.memory["peak"]
        train_rows.append(
            {
                "variant": v.name,
                "method": v.method,
                "targets": v.targets,
                "r": v.r,
                "lora_dropout": v.dropout,
                "step_s": statistics.median(v.times),
                "step_s_rounds": v.times,
                "cpu_s": statistics.median(v.cpu_times),
                "cpu_s_rounds": v.cpu_times,
                "memory_bytes": v.memory,
                "extra_over_bound_bytes": extra,
                "mem_extra_x_bound_growth": extra / b_growth,
                "mem_growth_x_bound_growth": (v.memory["peak"] - bound.memory["weights"])
                / b_growth,
            }
        )
    infer_rows = [
        {
            "variant": iv.name,
            "targets": iv.targets,
            "r": iv.r,
            "latency_s": statistics.median(iv.times),
            "latency_s_rounds": iv.times,
            "cpu_s_rounds": iv.cpu_times,
        }
        for iv in infer
    ]
    return summarize(
        {
            "model": kind,
            "params": n_params,
            "train": train_rows,
            "inference": infer_rows,
            "merged_max_abs_diff": merged_ok,
            "bound_growth_bytes": b_growth,
        }
    )


def memory_rows(kind: str, n_params: int, variants: list[Variant]) -> dict[str, Any]:
    """``--memory-only``: the peak-memory columns of the training variants, no timing."""
    bound = variants[0]
    b_growth = bound.memory["peak"] - bound.memory["weights"]
    rows = [
        {
            "variant": v.name,
            "lora_dropout": v.dropout,
            "memory_bytes": v.memory,
            "extra_over_bound_bytes": v.memory["peak"] - bound.memory["peak"],
            "mem_extra_x_bound_growth": (v.memory["peak"] - bound.memory["peak"]) / b_growth,
            "mem_growth_x_bound_growth": (v.memory["peak"] - bound.memory["weights"]) / b_growth,
        }
        for v in variants
    ]
    return {"model": kind, "params": n_params, "memory_only": True, "train": rows}


def format_memory_table(result: dict[str, Any]) -> str:
    lines = [
        f"### {result['model']} ({result['params'] / 1e6:.1f}M params), memory only",
        "",
        "| variant | dropout | peak MiB | saved MiB | extra MiB | extra / bound growth | growth / bound growth |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in result["train"]:
        mem = row["memory_bytes"]
        lines.append(
            f"| {row['variant']} | {row['lora_dropout']:g} | {_mb(mem['peak'])} "
            f"| {_mb(mem['saved'])} | {_mb(row['extra_over_bound_bytes'])} "
            f"| {row['mem_extra_x_bound_growth']:.3f} | {row['mem_growth_x_bound_growth']:.3f} |"
        )
    return "\n".join(lines)


def _paired(rounds: list[float], ref: list[float]) -> tuple[float, float, float]:
    """Median, min and max over rounds of ``rounds[i] / ref[i]`` (same round, close in time)."""
    ratios = [a / b for a, b in zip(rounds, ref)]
    return statistics.median(ratios), min(ratios), max(ratios)


def summarize(result: dict[str, Any]) -> dict[str, Any]:
    """(Re)compute the ratio columns from the per-round times stored in ``result``.

    ``x bound`` / ``x base`` is the median over rounds of the ratio within each round, which
    cancels slow drifts in machine load better than the ratio of the two medians (also kept,
    as ``*_of_medians``).
    """
    bound = result["train"][0]
    for row in result["train"]:
        med, lo, hi = _paired(row["step_s_rounds"], bound["step_s_rounds"])
        row["time_x_bound"], row["time_x_bound_range"] = med, [lo, hi]
        row["time_x_bound_of_medians"] = row["step_s"] / bound["step_s"]
        row["cpu_x_bound"] = _paired(row["cpu_s_rounds"], bound["cpu_s_rounds"])[0]
    base = result["inference"][0]
    for row in result["inference"]:
        med, lo, hi = _paired(row["latency_s_rounds"], base["latency_s_rounds"])
        row["x_base"], row["x_base_range"] = med, [lo, hi]
        row["x_base_of_medians"] = row["latency_s"] / base["latency_s"]
        if "cpu_s_rounds" in row and "cpu_s_rounds" in base:
            row["cpu_x_base"] = _paired(row["cpu_s_rounds"], base["cpu_s_rounds"])[0]
    return result


# --------------------------------------------------------------------------------------------
# reporting
# --------------------------------------------------------------------------------------------
def _mb(n: float) -> str:
    return f"{n / 2**20:,.0f}"


def _range(lo_hi: list[float]) -> str:
    return f"{lo_hi[0]:.2f}-{lo_hi[1]:.2f}"


def format_table(result: dict[str, Any]) -> str:
    lines = [
        f"### {result['model']} ({result['params'] / 1e6:.1f}M params)",
        "",
        "| variant | dropout | step s | x bound (min-max) | cpu x bound | peak MiB | extra MiB | extra / bound growth | growth / bound growth |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in result["train"]:
        memory = (
            "| - | - | - | - |"  # a floor row runs the bound's model: memory is not its point
            if row["method"] == "floor"
            else f"| {_mb(row['memory_bytes']['peak'])} | {_mb(row['extra_over_bound_bytes'])} "
            f"| {row['mem_extra_x_bound_growth']:.3f} | {row['mem_growth_x_bound_growth']:.3f} |"
        )
        lines.append(
            f"| {row['variant']} | {row['lora_dropout']:g} | {row['step_s']:.3f} "
            f"| {row['time_x_bound']:.3f} ({_range(row['time_x_bound_range'])}) "
            f"| {row['cpu_x_bound']:.3f} " + memory
        )
    lines += [
        "",
        "| inference | targets | r | latency s | x base (min-max) | cpu x base |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for row in result["inference"]:
        lines.append(
            f"| {row['variant']} | {row['targets']} | {row['r']} | {row['latency_s']:.4f} "
            f"| {row['x_base']:.3f} ({_range(row['x_base_range'])}) "
            f"| {row['cpu_x_base']:.3f} |"
            if "cpu_x_base" in row
            else f"| {row['variant']} | {row['targets']} | {row['r']} | {row['latency_s']:.4f} "
            f"| {row['x_base']:.3f} ({_range(row['x_base_range'])}) | - |"
        )
    diffs = ", ".join(f"{k}: {v:.1e}" for k, v in result["merged_max_abs_diff"].items())
    lines += ["", f"merged vs unmerged logits, max abs diff: {diffs}"]
    return "\n".join(lines)


def write_json_atomic(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(obj, fh, indent=1)
            fh.write("\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=["bert", "llama", "both"], default="both")
    p.add_argument(
        "--quick", action="store_true", help="batch 2x128, 3 rounds of 1 step: a smoke run"
    )
    p.add_argument(
        "--batch", type=int, default=None, help="sequences per batch (default 8; quick 2)"
    )
    p.add_argument(
        "--seq", type=int, default=None, help="tokens per sequence (default 256; quick 128)"
    )
    p.add_argument(
        "--repeats", type=int, default=None, help="interleaved rounds (default 7; quick 3)"
    )
    p.add_argument("--steps", type=int, default=1, help="steps per variant per round")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--ranks", type=int, nargs="+", default=[8, 64])
    p.add_argument("--targets", nargs="+", choices=["qv", "all"], default=["qv", "all"])
    p.add_argument(
        "--qv-dropout", type=float, default=0.05, help="lora_dropout for q,v (all-linear: 0.05)"
    )
    p.add_argument(
        "--plain", action="store_true", help="also time deltatune with the fast kernel off"
    )
    p.add_argument(
        "--keep",
        action="store_true",
        help="also run dt-keep on all-linear: the kernel keeps every input (no input rebuilding)",
    )
    p.add_argument("--dora", action="store_true", help="also time DoRA (q,v) in deltatune and PEFT")
    p.add_argument(
        "--floor",
        action="store_true",
        help="also time the arithmetic floor: the bound (base) plus LoRA's matrix products alone",
    )
    p.add_argument(
        "--memory-only",
        action="store_true",
        help="bound and deltatune variants, peak memory only (no timing, no inference); "
        "prints the table, writes JSON only with --out",
    )
    p.add_argument(
        "--keep-inputs",
        action="store_true",
        help="kernel saves every adapted layer's input (input rebuilding off, see "
        "deltatune.kernels.lora_linear)",
    )
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--amp", choices=["bf16"], default=None, help="bf16 autocast")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    p.add_argument(
        "--out", type=Path, default=None, help="JSON path (default bench/results/lora_<model>.json)"
    )
    p.add_argument(
        "--table",
        type=Path,
        nargs="+",
        default=None,
        help="recompute the ratio columns of these result files (rewritten) and print their tables",
    )
    args = p.parse_args(argv)
    args.batch = args.batch or (2 if args.quick else 8)
    args.seq = args.seq or (128 if args.quick else 256)
    args.repeats = args.repeats or (3 if args.quick else 7)
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.table:
        for path in args.table:
            result = summarize(json.loads(path.read_text(encoding="utf-8")))
            write_json_atomic(path, result)
            print(format_table(result) + "\n")
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.keep_inputs:
        from deltatune.kernels.lora_linear import set_rebuild_inputs

        set_rebuild_inputs(False)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    kinds = ["bert", "llama"] if args.model == "both" else [args.model]
    import peft
    import transformers

    meta = {
        "command": " ".join(
            [Path(sys.argv[0]).as_posix(), *(argv if argv is not None else sys.argv[1:])]
        ),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "device": str(device) if device.type == "cpu" else torch.cuda.get_device_name(device),
        "cpu": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "batch": args.batch,
        "seq": args.seq,
        "repeats": args.repeats,
        "steps_per_round": args.steps,
        "amp": args.amp,
        "lora_alpha": LORA_ALPHA,
        "dropout": {"qv": args.qv_dropout, "all": ALL_DROPOUT},
        "memory_method": "cuda max_memory_allocated"
        if device.type == "cuda"
        else "static + saved-for-backward",
        "time": time.strftime("%Y-%m-%d %H:%M:%S"),
        "rebuild_inputs": not args.keep_inputs,
    }
    for kind in kinds:
        result = run_model(kind, args, device)
        result["meta"] = meta
        if args.memory_only:
            if args.out:
                write_json_atomic(args.out, result)
            print(format_memory_table(result) + "\n", flush=True)
            continue
        out = (
            args.out
            if args.out and len(kinds) == 1
            else RESULTS / f"lora_{kind}{'_quick' if args.quick else ''}.json"
        )
        write_json_atomic(out, result)
        print(format_table(result))
        print(f"\n(written to {out})\n", flush=True)
        del result
        gc.collect()


if __name__ == "__main__":
    main()

#!/usr/bin/env python
"""Prompt-family benchmark on a LLaMA-like decoder: deltatune vs Hugging Face PEFT vs the
frozen-base bound (training), and generation tokens/s of the base vs each adapter.

Every prompt-family method registered when the script runs is covered (``family ==
"prompt"``: prompt tuning, P-Tuning, prefix tuning, P-Tuning v2, LLaMA-Adapter, ...), each with
the same settings in deltatune and in PEFT where PEFT has it (P-Tuning v2 is PEFT's
``PrefixTuningConfig`` without projection; LLaMA-Adapter is PEFT's ``AdaptionPromptConfig``).

Training variants: ``bound`` is the frozen base with no trainable parameter (the embedding
output is made to require grad, so backward runs through every activation but computes no
weight gradient, no optimizer step): nothing a prompt method does can be cheaper. ``dt-<m>`` /
``peft-<m>``: forward + backward + AdamW step on the method's parameters. All variants run in one
process on the same batch; the timing loop interleaves them (one round = every variant once, in
a rotating order) and reports the median over rounds and the median per-round ratio dt/peft.

Times: wall clock on CUDA; on CPU the process CPU time (one thread, so it equals the compute
time and is robust to other processes on a shared machine).

Peak memory: on CUDA ``torch.cuda.max_memory_allocated`` over one step minus what the other
variants hold; on CPU the weights + gradients + optimizer state + activations saved for backward
(``deltatune.memory``; transient buffers are not counted).

Generation: ``eval()``, greedy, key/value cache, batch ``--gen-batch`` of ``--prompt-len``
tokens, exactly ``--new-tokens`` new tokens per row; tokens/s = batch * new tokens / time.

Usage::

    .venv/bin/python bench/prompt_bench.py --quick     # ~2 min on one CPU thread
    .venv/bin/python bench/prompt_bench.py             # ~30M-parameter model, ~15 min
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import platform
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

import deltatune as dt
from deltatune.memory import count_saved, storage_key, unique_bytes

RESULTS = Path(__file__).resolve().parent / "results"


def build_model(args: argparse.Namespace) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        hidden_size=args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=args.hidden // 64,
        num_key_value_heads=args.hidden // 64,
        intermediate_size=int(args.hidden * 2.6875),
        vocab_size=args.vocab,
        max_position_embeddings=1024,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    return LlamaForCausalLM(cfg).eval()


def method_settings(name: str, args: argparse.Namespace) -> tuple[dict[str, Any], Any]:
    """(deltatune options, PEFT config or None) with the same settings."""
    import peft

    n = args.virtual_tokens
    lm = "CAUSAL_LM"
    if name == "prompt_tuning":
        return {"num_virtual_tokens": n}, peft.PromptTuningConfig(
            task_type=lm, num_virtual_tokens=n
        )
    if name == "p_tuning":
        h = args.hidden // 2
        return {"num_virtual_tokens": n, "encoder_hidden_size": h}, peft.PromptEncoderConfig(
            task_type=lm, num_virtual_tokens=n, encoder_hidden_size=h
        )
    if name == "prefix_tuning":
        return {"num_virtual_tokens": n, "prefix_projection": False}, peft.PrefixTuningConfig(
            task_type=lm, num_virtual_tokens=n, prefix_projection=False
        )
    if name == "p_tuning_v2":
        return {"num_virtual_tokens": n}, peft.PrefixTuningConfig(
            task_type=lm, num_virtual_tokens=n
        )
    if name == "llama_adapter":
        layers = min(args.layers, 8)
        return {"adapter_len": n, "adapter_layers": layers}, peft.AdaptionPromptConfig(
            task_type=lm, adapter_len=n, adapter_layers=layers
        )
    return {}, None  # a method registered later: deltatune only, its defaults


def prompt_methods() -> list[str]:
    return [name for name, spec in dt.methods().items() if spec.family == "prompt"]


class Variant:
    def __init__(self, name: str, model: nn.Module, peft_model: bool = False) -> None:
        self.name = name
        self.model = model
        self.peft = peft_model
        trainable = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(trainable, lr=1e-3) if trainable else None
        self.trainable = sum(p.numel() for p in trainable)
        self.memory: dict[str, int] = {}


def make_variants(base: nn.Module, args: argparse.Namespace) -> tuple[list[Variant], list[str]]:
    import peft

    variants: list[Variant] = []
    bound = copy.deepcopy(base)
    for p in bound.parameters():
        p.requires_grad_(False)
    emb: nn.Module = bound.get_input_embeddings()  # type: ignore[operator]
    emb.register_forward_hook(lambda m, i, o: o.detach().requires_grad_())
    variants.append(Variant("bound", bound))
    skipped: list[str] = []
    for name in prompt_methods():
        options, peft_cfg = method_settings(name, args)
        model = copy.deepcopy(base)
        try:
            dt.inject(
                model, dt.config_from_dict({"name": name, "task_type": "CAUSAL_LM", **options})
            )
        except dt.DeltatuneError as exc:
            skipped.append(f"{name}: {exc}")
            continue
        variants.append(Variant(f"dt-{name}", model))
        if peft_cfg is not None:
            torch.manual_seed(0)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                pm = peft.get_peft_model(copy.deepcopy(base), peft_cfg)
            variants.append(Variant(f"peft-{name}", pm, peft_model=True))
    for v in variants:
        v.model.train()
    return variants, skipped


def train_step(v: Variant, batch: dict[str, torch.Tensor]) -> None:
    loss = v.model(**batch).loss
    loss.backward()
    if v.optimizer is not None:
        v.optimizer.step()
        v.optimizer.zero_grad(set_to_none=True)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def measure_memory(v: Variant, batch: dict[str, torch.Tensor], device: torch.device) -> None:
    params = list(v.model.parameters())
    trainable = [p for p in params if p.requires_grad]
    state = [
        t
        for s in (v.optimizer.state.values() if v.optimizer else [])
        for t in s.values()
        if isinstance(t, torch.Tensor) and t.numel() > 1
    ]
    static = {
        "weights": unique_bytes(params),
        "grads": sum(p.numel() * p.element_size() for p in trainable),
        "optimizer": unique_bytes(state) if state else 0,
    }
    exclude = {storage_key(t) for t in [*params, *v.model.buffers()]}
    if device.type == "cuda":
        gc.collect()
        sync(device)
        others = torch.cuda.memory_allocated() - static["weights"] - static["optimizer"]
        torch.cuda.reset_peak_memory_stats()
    with count_saved(exclude) as seen:
        loss = v.model(**batch).loss
    saved = sum(seen.values())
    loss.backward()
    del loss
    if v.optimizer is not None:
        v.optimizer.step()
    peak = static["weights"] + static["grads"] + static["optimizer"] + saved
    if device.type == "cuda":
        sync(device)
        peak = torch.cuda.max_memory_allocated() - others
    if v.optimizer is not None:
        v.optimizer.zero_grad(set_to_none=True)
    v.memory = {**static, "saved": saved, "peak": peak}


def interleaved(
    items: list[Any], run: Callable[[Any], None], rounds: int, steps: int, device: torch.device
) -> dict[int, list[float]]:
    times: dict[int, list[float]] = {i: [] for i in range(len(items))}
    for rep in range(rounds):
        order = list(range(len(items)))
        order = order[rep % len(order) :] + order[: rep % len(order)]
        for i in order:
            sync(device)
            t0, c0 = time.perf_counter(), time.process_time()
            for _ in range(steps):
                run(items[i])
            sync(device)
            if device.type == "cuda":
                times[i].append((time.perf_counter() - t0) / steps)
            else:  # one thread: process CPU time is robust to other load on a shared machine
                times[i].append((time.process_time() - c0) / steps)
        print(f"  round {rep + 1}/{rounds}", file=sys.stderr, flush=True)
    return times


def paired_ratio(ours: list[float], ref: list[float]) -> float:
    return statistics.median(a / b for a, b in zip(ours, ref, strict=True))


def run(args: argparse.Namespace) -> dict[str, Any]:
    device = torch.device("cuda" if torch.cuda.is_available() and not args.cpu else "cpu")
    base = build_model(args).to(device)
    g = torch.Generator().manual_seed(1234)
    ids = torch.randint(3, args.vocab, (args.batch, args.seq), generator=g).to(device)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    variants, skipped = make_variants(base, args)
    print(f"variants: {[v.name for v in variants]}", file=sys.stderr)
    for v in variants:  # warm-up (creates the optimizer state), then memory
        train_step(v, batch)
        measure_memory(v, batch, device)
    times = interleaved(variants, lambda v: train_step(v, batch), args.rounds, args.steps, device)

    # generation: base vs every adapter (deltatune and PEFT), eval mode, greedy, cache
    gen_ids = torch.randint(3, args.vocab, (args.gen_batch, args.prompt_len), generator=g)
    gen_ids = gen_ids.to(device)
    gen_mask = torch.ones_like(gen_ids)
    base_gen = copy.deepcopy(base).eval()
    gens: list[tuple[str, nn.Module]] = [("base", base_gen)]
    for v in variants[1:]:
        v.model.eval()
        gens.append((v.name, v.model))
    n_new = args.new_tokens

    def generate(item: tuple[str, nn.Module]) -> None:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out = item[1].generate(  # type: ignore[operator]
                input_ids=gen_ids,
                attention_mask=gen_mask,
                max_new_tokens=n_new,
                min_new_tokens=n_new,
                do_sample=False,
                use_cache=True,
                pad_token_id=0,
            )
        assert out.shape[1] == args.prompt_len + n_new

    for item in gens:
        generate(item)
    gen_times = interleaved(gens, generate, args.gen_rounds, 1, device)

    train_rows = []
    by_name = {v.name: i for i, v in enumerate(variants)}
    for i, v in enumerate(variants):
        row: dict[str, Any] = {
            "variant": v.name,
            "trainable": v.trainable,
            "step_s": statistics.median(times[i]),
            "vs_bound": paired_ratio(times[i], times[0]),
            "memory": v.memory,
        }
        if v.name.startswith("dt-") and "peft-" + v.name[3:] in by_name:
            j = by_name["peft-" + v.name[3:]]
            row["vs_peft"] = paired_ratio(times[i], times[j])
            row["peak_vs_peft"] = v.memory["peak"] / variants[j].memory["peak"]
        train_rows.append(row)
    gen_rows = []
    for k, (name, _) in enumerate(gens):
        t = statistics.median(gen_times[k])
        gen_rows.append(
            {
                "variant": name,
                "tokens_per_s": args.gen_batch * n_new / t,
                "vs_base": paired_ratio(gen_times[0], gen_times[k]),
            }
        )
    return {
        "device": torch.cuda.get_device_name()
        if device.type == "cuda"
        else platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "settings": {
            k: getattr(args, k)
            for k in (
                "hidden",
                "layers",
                "vocab",
                "batch",
                "seq",
                "virtual_tokens",
                "rounds",
                "steps",
                "gen_batch",
                "prompt_len",
                "new_tokens",
                "gen_rounds",
            )
        },
        "methods": prompt_methods(),
        "skipped": skipped,
        "train": train_rows,
        "generate": gen_rows,
    }


def format_table(result: dict[str, Any]) -> str:
    s = result["settings"]
    lines = [
        f"LLaMA-like {s['layers']}x{s['hidden']}, batch {s['batch']}x{s['seq']}, "
        f"{s['virtual_tokens']} virtual tokens, {result['device']}",
        "",
        "| variant | trainable | step (ms) | vs bound | vs peft | peak MB | peak vs peft |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in result["train"]:
        vs = f"{r['vs_peft']:.2f}x" if "vs_peft" in r else ""
        pk = f"{r['peak_vs_peft']:.2f}x" if "peak_vs_peft" in r else ""
        lines.append(
            f"| {r['variant']} | {r['trainable']:,} | {1000 * r['step_s']:.1f} | "
            f"{r['vs_bound']:.2f}x | {vs} | {r['memory']['peak'] / 2**20:.1f} | {pk} |"
        )
    lines += [
        "",
        f"Generation: batch {s['gen_batch']}, {s['prompt_len']}-token prompts, "
        f"{s['new_tokens']} new tokens, greedy, key/value cache",
        "",
        "| variant | tokens/s | speed vs base |",
        "| --- | ---: | ---: |",
    ]
    for r in result["generate"]:
        lines.append(f"| {r['variant']} | {r['tokens_per_s']:.0f} | {r['vs_base']:.2f}x |")
    if result["skipped"]:
        lines += ["", "skipped: " + "; ".join(result["skipped"])]
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="small model and few rounds (CPU)")
    p.add_argument("--cpu", action="store_true", help="stay on CPU even if CUDA is present")
    # Defaults: a ~30M-parameter LLaMA-like model, sized for a few minutes on one CPU thread
    # (on a GPU pass e.g. --hidden 2048 --layers 16 --batch 8 --seq 512).
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--vocab", type=int, default=16000)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--virtual-tokens", type=int, default=20)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--gen-batch", type=int, default=4)
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--gen-rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=1, help="torch threads on CPU")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    if args.quick:
        args.hidden, args.layers, args.vocab = 256, 4, 8000
        args.batch, args.seq, args.rounds, args.steps = 4, 64, 5, 2
        args.gen_batch, args.prompt_len, args.new_tokens, args.gen_rounds = 4, 32, 16, 3
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    result = run(args)
    table = format_table(result)
    print(table)
    out = args.out or RESULTS / f"prompt_llama{'_quick' if args.quick else ''}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps({**result, "table": table}, indent=2) + "\n")
    os.replace(tmp, out)
    print(f"wrote {out}", file=sys.stderr)


if __name__ == "__main__":
    main()

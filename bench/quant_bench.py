#!/usr/bin/env python
"""QLoRA benchmark: memory and step time of full fine-tuning, LoRA, QLoRA and AdaLoRA, with
Hugging Face PEFT (+ bitsandbytes 4-bit) side by side, and QLoRA's quality against LoRA.

Part ``memory`` (one process, one batch of 16 x 64 BBC News tokens, the embedded MiniLM
classifier, all linear layers adapted, r 8, alpha 16, dropout 0.05, AdamW):

- ``dt-full``      deltatune full fine-tuning
- ``dt-lora``      deltatune LoRA (fp32 base)
- ``dt-qlora-nf4`` deltatune QLoRA, NF4 base (torchao), compute dtype "auto" (bf16 where native)
- ``dt-qlora-int8`` deltatune QLoRA, int8 per-row absmax base
- ``dt-adalora``   deltatune AdaLoRA (init_r 12, target_r 8), when registered
- ``peft-lora``, ``peft-qlora-bnb`` (bitsandbytes ``Linear4bit`` NF4 + double quantisation,
  bf16 compute, built by hand since transformers' 4-bit loader wants CUDA), ``peft-adalora``

A step is forward + backward + ``AdamW.step()`` + ``zero_grad``. Timing: after a warm-up step
each, rounds run every variant once in a rotating order; the median over rounds is reported.
Memory: on CPU there is no allocator peak, so it is counted (deltatune.memory): weights (unique
storages of parameters and buffers, quantisation constants included) + gradients + AdamW state
+ activations saved for backward (unique storages, weights excluded). On CUDA the same columns
plus ``torch.cuda.max_memory_allocated``.

Part ``quality``: the real pipeline (``deltatune.run.train_run``) with the same settings for
``lora`` and ``qlora``: MiniLM + BBC News (test accuracy) and SmolLM2-135M-Instruct + the
chatterbot pairs (configs/sft-smollm2.yaml, test perplexity); then the QLoRA BBC run is merged
both ways (``merge_quantized``) and the output change and the merged model's test accuracy are
reported.

Part ``smol-diagnostics``: the SmolLM2 bases' test perplexity before training (float, nf4 with
bf16 / fp32 compute, int8) and QLoRA trained on other bases (``--train-variants``).

Part ``nf4-check`` (issue #6): the same SmolLM2 linear weights rounded to NF4 by deltatune
(torchao), bitsandbytes (``quantize_4bit``, block 64, double quantisation) and a written-out
reference (the paper's code book, block-64 absmax), put back into a float copy: per-layer mean
|W − Ŵ| and held-out perplexity of each; also which modules get quantised (tied embeddings).

Part ``smol-epochs``: LoRA and QLoRA on SmolLM2 with configs/sft-smollm2.yaml for ``--epochs``
epochs, same settings for both (``--methods lora`` / ``qlora`` may run as two processes);
``--smol-train M`` trains on M pairs instead of the config's 320.

Part ``smol-loftq`` (issue #6): QLoRA with LoftQ initialisation (``init_lora_weights: loftq``)
on SmolLM2. First the held-out perplexity at initialisation, before any training (float base,
plain NF4 QLoRA, NF4 + LoftQ for each ``--loftq-init-iters``), with the weight-space error
``Σ‖W − Ŵ − s·B A‖²`` relative to plain NF4's ``Σ‖W − Ŵ‖²``; then the 1-epoch runs of
configs/sft-smollm2.yaml named in ``--loftq-train`` (``lora``, ``qlora``, ``qlora-loftq<T>``),
the same settings for all (``--loftq-epochs N`` for N epochs). Results merge into
quant_smol_loftq.json (processes may split runs).

Usage::

    .venv/bin/python bench/quant_bench.py --part memory      # ~3 min on 2 cores
    .venv/bin/python bench/quant_bench.py --part quality     # ~30 min on 2 cores
    .venv/bin/python bench/quant_bench.py                    # both
    .venv/bin/python bench/quant_bench.py --part smol-diagnostics --train-variants int8-bf16
    .venv/bin/python bench/quant_bench.py --part nf4-check                   # ~3 min
    .venv/bin/python bench/quant_bench.py --part smol-epochs --epochs 2 --methods lora
    .venv/bin/python bench/quant_bench.py --part smol-epochs --epochs 1 --smol-train 1200
    .venv/bin/python bench/quant_bench.py --part smol-loftq --loftq-train qlora-loftq1,lora

Writes bench/results/quant_memory.json, quant_quality.json, quant_smol_diagnostics.json,
quant_nf4_check.json, quant_smol_epochs.json and quant_smol_loftq.json.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
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
from deltatune.memory import model_storages, storage_key, unique_bytes
from deltatune.quant import QuantLinear

RESULTS = Path(__file__).resolve().parent / "results"
MB = 1024 * 1024
R, ALPHA, DROPOUT = 8, 16, 0.05
# Every Linear of MiniLM but the classifier, by PEFT suffix (deltatune uses "all-linear").
BERT_LINEARS = ["query", "key", "value", "dense"]


# --- memory part ---------------------------------------------------------------------------------


def load_minilm(num_labels: int = 5) -> nn.Module:
    from deltatune.models import ModelConfig, load_classifier

    return load_classifier(ModelConfig(), [f"l{i}" for i in range(num_labels)]).train()


def bbc_batch(batch: int = 16, length: int = 64) -> dict[str, torch.Tensor]:
    from deltatune.data import DataConfig, load_text_splits
    from deltatune.models import ModelConfig, load_tokenizer

    splits = load_text_splits(DataConfig(max_length=length))
    tok = load_tokenizer(ModelConfig())
    enc = tok(
        splits.train.texts[:batch],
        truncation=True,
        max_length=length,
        padding="max_length",
        return_tensors="pt",
    )
    return {**enc, "labels": torch.tensor(splits.train.labels[:batch])}


def bnb_4bit(model: nn.Module) -> nn.Module:
    """Swap every Linear but the classifier for bitsandbytes NF4 (double quantised, bf16 compute)."""
    import bitsandbytes as bnb

    from deltatune.targeting import set_submodule

    for name, module in list(model.named_modules()):
        if type(module) is not nn.Linear or name == "classifier":
            continue
        q = bnb.nn.Linear4bit(
            module.in_features,
            module.out_features,
            bias=module.bias is not None,
            compute_dtype=torch.bfloat16,
            compress_statistics=True,
            quant_type="nf4",
        )
        q.weight = bnb.nn.Params4bit(
            module.weight.data.clone(),
            requires_grad=False,
            compress_statistics=True,
            quant_type="nf4",
        )
        if module.bias is not None:
            q.bias = nn.Parameter(module.bias.data.clone(), requires_grad=False)
        set_submodule(model, name, q.to(module.weight.device))  # .to() quantises
    return model


def bnb_state_bytes(model: nn.Module) -> int:
    """Bytes of bitsandbytes' quantisation state (absmax, nested absmax, code) not in buffers."""
    total = 0
    for module in model.modules():
        state = getattr(getattr(module, "weight", None), "quant_state", None)
        if state is None:
            continue
        for t in (state.absmax, state.code, getattr(state, "offset", None)):
            if isinstance(t, torch.Tensor):
                total += t.nbytes
        nested = getattr(state, "state2", None)
        if nested is not None:
            total += nested.absmax.nbytes + nested.code.nbytes
    return total


def variants(adalora: bool) -> dict[str, Callable[[], nn.Module]]:
    def dt_method(**cfg: Any) -> Callable[[], nn.Module]:
        def build() -> nn.Module:
            model = load_minilm()
            dt.inject(model, dt.config_from_dict({**cfg, "task_type": "SEQ_CLS"}))
            return model

        return build

    def peft_method(kind: str) -> Callable[[], nn.Module]:
        def build() -> nn.Module:
            import peft

            model = load_minilm()
            if kind == "qlora":
                model = bnb_4bit(model)
            common = {"target_modules": BERT_LINEARS, "task_type": "SEQ_CLS"}
            if kind == "adalora":
                cfg: Any = peft.AdaLoraConfig(
                    init_r=12, target_r=R, lora_alpha=ALPHA, total_step=100, **common
                )
            else:
                cfg = peft.LoraConfig(r=R, lora_alpha=ALPHA, lora_dropout=DROPOUT, **common)
            return peft.get_peft_model(model, cfg).train()

        return build

    lora = {"r": R, "lora_alpha": ALPHA, "lora_dropout": DROPOUT, "target_modules": "all-linear"}
    out: dict[str, Callable[[], nn.Module]] = {
        "dt-full": dt_method(name="full"),
        "dt-lora": dt_method(name="lora", **lora),
        "dt-qlora-nf4": dt_method(name="qlora", **lora),
        "dt-qlora-int8": dt_method(name="qlora", quantize="int8", **lora),
    }
    if adalora:
        out["dt-adalora"] = dt_method(
            name="adalora",
            init_r=12,
            target_r=R,
            lora_alpha=ALPHA,
            total_step=100,
            target_modules="all-linear",
        )
    out["peft-lora"] = peft_method("lora")
    out["peft-qlora-bnb"] = peft_method("qlora")
    if adalora:
        out["peft-adalora"] = peft_method("adalora")
    return out


def count_saved_plain(exclude: set[Any]) -> Any:
    """Like deltatune.memory.count_saved, skipping tensor subclasses (NF4 views of buffers)."""
    seen: dict[Any, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if type(t) in (torch.Tensor, nn.Parameter) and t.layout == torch.strided:
            key = storage_key(t)
            if key not in exclude and key[0] != 0:
                seen[key] = max(seen.get(key, 0), t.untyped_storage().nbytes())
        return t

    return seen, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t)


def step(model: nn.Module, opt: torch.optim.Optimizer, batch: dict[str, torch.Tensor]) -> None:
    loss = model(**batch).loss
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def measure_memory(rounds: int, adalora: bool) -> dict[str, Any]:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    batch = {k: v.to(device) for k, v in bbc_batch().items()}
    built: dict[str, tuple[nn.Module, torch.optim.Optimizer]] = {}
    rows: dict[str, dict[str, Any]] = {}
    for name, build in variants(adalora).items():
        torch.manual_seed(0)
        model = build().to(device)
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-4)
        weights = unique_bytes([*model.parameters(), *model.buffers()]) + bnb_state_bytes(model)
        linear_params = linear_bytes = 0
        for module in model.modules():
            if isinstance(module, QuantLinear):
                linear_params += module.in_features * module.out_features
                linear_bytes += module.quantized_bytes()
            elif type(module).__name__ == "Linear4bit":
                linear_params += module.in_features * module.out_features
                linear_bytes += module.weight.nbytes
        if any(type(m).__name__ == "Linear4bit" for m in model.modules()):
            linear_bytes += bnb_state_bytes(model)
        step(model, opt, batch)  # warm-up; creates the AdamW state
        state_bytes = sum(
            t.nbytes for s in opt.state.values() for t in s.values() if isinstance(t, torch.Tensor)
        )
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        seen, hooks = count_saved_plain(model_storages(model))
        with hooks:
            loss = model(**batch).loss
        loss.backward()
        grad_bytes = sum(p.grad.nbytes for p in params if p.grad is not None)
        opt.step()
        opt.zero_grad(set_to_none=True)
        act = sum(seen.values())
        rows[name] = {
            "trainable_params": sum(p.numel() for p in params),
            "weights_mb": weights / MB,
            "quantised_linear_bytes_per_param": (linear_bytes / linear_params)
            if linear_params
            else None,
            "grads_mb": grad_bytes / MB,
            "optimizer_mb": state_bytes / MB,
            "activations_mb": act / MB,
            "peak_mb": (weights + grad_bytes + state_bytes + act) / MB,
            "cuda_max_allocated_mb": torch.cuda.max_memory_allocated() / MB
            if device.type == "cuda"
            else None,
            "step_s": [],
        }
        built[name] = (model, opt)
        print(f"built {name}: peak {rows[name]['peak_mb']:.1f} MB", flush=True)
    names = list(built)
    for r in range(rounds):
        order = names[r % len(names) :] + names[: r % len(names)]
        for name in order:
            model, opt = built[name]
            t0 = time.perf_counter()
            step(model, opt, batch)
            if device.type == "cuda":
                torch.cuda.synchronize()
            rows[name]["step_s"].append(time.perf_counter() - t0)
        print(f"round {r + 1}/{rounds} done", flush=True)
    for row in rows.values():
        row["step_s_median"] = statistics.median(row["step_s"])
    return {"device": str(device), "batch": "16 x 64 tokens (BBC News)", "variants": rows}


def smollm2_bytes() -> dict[str, Any]:
    """Resident bytes per quantised weight on SmolLM2-135M (nf4 and int8)."""
    from deltatune.lm.load import load_causal_lm
    from deltatune.quant import quantize_model, quantized_memory

    out = {}
    for scheme in ("nf4", "int8"):
        model, _ = load_causal_lm("embedded-smollm2")
        quantize_model(model, scheme)  # type: ignore[arg-type]
        mem = quantized_memory(model)
        out[scheme] = {"params": mem.params, "bytes_per_param": mem.bytes_per_param}
        del model
        gc.collect()
    return out


def print_memory(res: dict[str, Any]) -> None:
    print()
    print(
        f"{'variant':<16}{'trainable':>11}{'weights MB':>12}{'B/param':>9}{'grad+opt MB':>13}"
        f"{'activ. MB':>11}{'peak MB':>9}{'step s':>8}"
    )
    for name, r in res["variants"].items():
        bpp = r["quantised_linear_bytes_per_param"]
        print(
            f"{name:<16}{r['trainable_params']:>11,}{r['weights_mb']:>12.1f}"
            f"{(f'{bpp:.3f}' if bpp else '-'):>9}{r['grads_mb'] + r['optimizer_mb']:>13.1f}"
            f"{r['activations_mb']:>11.1f}{r['peak_mb']:>9.1f}{r['step_s_median']:>8.2f}"
        )


# --- quality part -------------------------------------------------------------------------------


def bbc_config(method: dict[str, Any], out: Path, max_train: int) -> Any:
    from deltatune.run import load_run_config

    cfg = load_run_config(None, [])
    data = cfg.to_dict()
    data["data"].update({"max_length": 64, "max_train_examples": max_train})
    data["method"] = method
    data["train"].update(
        {"epochs": 2, "learning_rate": 1e-3, "progress": False, "eval_every_steps": None, "seed": 0}
    )
    data["output_dir"] = str(out)
    return type(cfg).from_dict(data)


def smol_config(
    method: dict[str, Any], out: Path, epochs: int | None = None, max_train: int | None = None
) -> Any:
    from deltatune.run import load_run_config

    root = Path(__file__).resolve().parent.parent
    cfg = load_run_config(root / "configs" / "sft-smollm2.yaml", [])
    data = cfg.to_dict()
    data["method"] = method
    data["train"].update({"progress": False})
    if epochs is not None:
        data["train"]["epochs"] = epochs
    if max_train is not None:  # more pairs: evaluate every 50 steps instead of every 10
        data["data"]["max_train_examples"] = max_train
        data["train"]["eval_every_steps"] = 50
    data["output_dir"] = str(out)
    return type(cfg).from_dict(data)


def merged_accuracy(run_dir: Path, mode: str) -> dict[str, Any]:
    """Merge the run's QLoRA adapter (``mode``) and evaluate the merged model on the test split."""
    from deltatune.data import PadCollator, TokenizedDataset, load_text_splits, make_loader
    from deltatune.quant import merge_quantized
    from deltatune.run import load_run
    from deltatune.train import ClassificationTask

    cfg, model, tok, labels = load_run(run_dir)
    splits = load_text_splits(cfg.data)
    enc = tok(
        splits.val.texts[:16],
        truncation=True,
        max_length=cfg.data.max_length,
        padding=True,
        return_tensors="pt",
    )
    report = merge_quantized(model, dict(enc), mode=mode)  # type: ignore[arg-type]
    ds = TokenizedDataset(splits.test, tok, cfg.data.max_length)
    loader = make_loader(ds, 64, shuffle=False, seed=0, collate=PadCollator(tok))
    metrics = ClassificationTask(num_labels=len(labels)).evaluate(model, loader)
    return {
        "max_abs_diff": report.max_abs_diff,
        "mean_abs_diff": report.mean_abs_diff,
        "test_accuracy": metrics["accuracy"],
    }


def save_partial(res: dict[str, Any]) -> None:
    """Results so far (a later failure keeps what finished)."""
    (RESULTS / "quant_quality.json").write_text(json.dumps(res, indent=2) + "\n")


def measure_quality(max_train: int, smol: bool) -> dict[str, Any]:
    from deltatune.run import train_run

    lora = {
        "r": R,
        "lora_alpha": ALPHA,
        "lora_dropout": DROPOUT,
        "target_modules": "all-linear",
    }
    res: dict[str, Any] = {"bbc": {}, "smollm2": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for name in ("lora", "qlora"):
            t0 = time.perf_counter()
            out = Path(tmp) / f"bbc-{name}"
            m = train_run(bbc_config({"name": name, **lora}, out, max_train), echo=print).metrics
            res["bbc"][name] = {
                "test_accuracy": m["test"]["accuracy"],
                "val_accuracy": m["val"]["accuracy"],
                "wall_s": time.perf_counter() - t0,
            }
            print(f"bbc {name}: {res['bbc'][name]}", flush=True)
            save_partial(res)
        for mode in ("dequantize", "requantize"):
            res["bbc"][f"qlora-merged-{mode}"] = merged_accuracy(Path(tmp) / "bbc-qlora", mode)
            print(f"bbc merge {mode}: {res['bbc'][f'qlora-merged-{mode}']}", flush=True)
            save_partial(res)
        if smol:
            for name in ("lora", "qlora"):
                t0 = time.perf_counter()
                out = Path(tmp) / f"smol-{name}"
                m = train_run(smol_config({"name": name, **lora}, out), echo=print).metrics
                res["smollm2"][name] = {
                    "test_loss": m["test"]["loss"],
                    "test_perplexity": m["test"]["perplexity"],
                    "base_test_perplexity": m["before"]["test"]["perplexity"],
                    "wall_s": time.perf_counter() - t0,
                }
                print(f"smollm2 {name}: {res['smollm2'][name]}", flush=True)
                save_partial(res)
    bbc = res["bbc"]
    res["bbc_accuracy_gap_points"] = 100 * (
        bbc["lora"]["test_accuracy"] - bbc["qlora"]["test_accuracy"]
    )
    if smol:
        s = res["smollm2"]
        res["smollm2_perplexity_gap_percent"] = 100 * (
            s["qlora"]["test_perplexity"] / s["lora"]["test_perplexity"] - 1
        )
    return res


def smol_diagnostics(train_variants: list[str]) -> dict[str, Any]:
    """Where the SmolLM2 QLoRA gap comes from: the quantised bases' test perplexity before any
    training (float / nf4 bf16 / nf4 fp32 / int8), then QLoRA trained with other settings."""
    from deltatune.data.loader import make_loader
    from deltatune.lm.instructions import CausalLMCollator
    from deltatune.lm.load import load_causal_lm
    from deltatune.lm.sft import datasets, load_splits
    from deltatune.lm.task import CausalLMTask
    from deltatune.quant import quantize_model
    from deltatune.run import train_run

    res: dict[str, Any] = {"base_test_perplexity": {}, "qlora": {}}
    cfg = smol_config({"name": "lora"}, Path(tempfile.gettempdir()) / "unused")
    splits = load_splits(cfg)
    for name, scheme, dtype in (
        ("float32", None, None),
        ("nf4-bf16", "nf4", "bfloat16"),
        ("nf4-fp32", "nf4", "float32"),
        ("int8-bf16", "int8", "bfloat16"),
    ):
        model, tok = load_causal_lm("embedded-smollm2")
        if scheme is not None:
            quantize_model(model, scheme, compute_dtype=dtype)  # type: ignore[arg-type]
        _, _, test_ds = datasets(cfg, splits, tok)
        loader = make_loader(
            test_ds, 16, shuffle=False, seed=0, collate=CausalLMCollator(tok.pad_token_id)
        )
        res["base_test_perplexity"][name] = CausalLMTask().evaluate(model, loader)["perplexity"]
        print(f"base {name}: {res['base_test_perplexity'][name]:.3f}", flush=True)
        del model
        gc.collect()
    lora = {"r": R, "lora_alpha": ALPHA, "lora_dropout": DROPOUT, "target_modules": "all-linear"}
    settings = {
        "nf4-fp32": {"quantize": "nf4", "compute_dtype": "float32"},
        "int8-bf16": {"quantize": "int8", "compute_dtype": "bfloat16"},
    }
    with tempfile.TemporaryDirectory() as tmp:
        for name in train_variants:
            method = {"name": "qlora", **lora, **settings[name]}
            m = train_run(smol_config(method, Path(tmp) / name), echo=print).metrics
            res["qlora"][name] = {"test_perplexity": m["test"]["perplexity"]}
            print(f"qlora {name}: {res['qlora'][name]}", flush=True)
            (RESULTS / "quant_smol_diagnostics.json").write_text(json.dumps(res, indent=2) + "\n")
    return res


# The NF4 levels of the QLoRA paper (Appendix E), written out for the hand-made reference.
NF4_LEVELS = [
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
]  # fmt: skip


def nf4_reference(w: torch.Tensor, block: int = 64) -> torch.Tensor:
    """NF4 round trip by the paper's definition, without double quantisation:
    c_b = max|W_b|, Ŵ_i = q_k · c_b with k = argmin_k |W_i / c_b − q_k|."""
    code = torch.tensor(NF4_LEVELS)
    flat = w.reshape(-1, block)
    c = flat.abs().amax(1, keepdim=True)
    idx = (flat / c).unsqueeze(-1).sub(code).abs().argmin(-1)
    return (code[idx] * c).reshape(w.shape)


def nf4_bnb(w: torch.Tensor) -> torch.Tensor:
    """bitsandbytes' NF4 round trip (block 64, double-quantised constants), on CPU."""
    import bitsandbytes.functional as bnbf

    q, state = bnbf.quantize_4bit(w, quant_type="nf4", blocksize=64, compress_statistics=True)
    return bnbf.dequantize_4bit(q, state).to(torch.float32)  # type: ignore[no-any-return]


def nf4_check() -> dict[str, Any]:
    """Is SmolLM2's NF4 perplexity jump our quantisation or NF4 itself? The same SmolLM2 linear
    weights rounded three ways (deltatune/torchao, bitsandbytes, the hand-written reference),
    written back into a float copy; per-layer mean |W − Ŵ| and the held-out perplexity of each
    (the evaluation of part smol-diagnostics)."""
    from deltatune.data.loader import make_loader
    from deltatune.lm.instructions import CausalLMCollator
    from deltatune.lm.load import load_causal_lm
    from deltatune.lm.sft import datasets, load_splits
    from deltatune.lm.task import CausalLMTask
    from deltatune.quant import quantize_model

    cfg = smol_config({"name": "lora"}, Path(tempfile.gettempdir()) / "unused")
    splits = load_splits(cfg)
    model, tok = load_causal_lm("embedded-smollm2")
    _, _, test_ds = datasets(cfg, splits, tok)
    loader = make_loader(
        test_ds, 16, shuffle=False, seed=0, collate=CausalLMCollator(tok.pad_token_id)
    )
    probe, _ = load_causal_lm("embedded-smollm2")
    report = quantize_model(probe, "nf4", compute_dtype="float32")
    res: dict[str, Any] = {
        "tied_embeddings": bool(
            probe.lm_head.weight.data_ptr() == probe.model.embed_tokens.weight.data_ptr()
        ),
        "lm_head_type": type(probe.lm_head).__name__,
        "embed_tokens_type": type(probe.model.embed_tokens).__name__,
        "quantized_layers": len(report.quantized),
        "left_float": report.skipped,
        "scaler_blocks": sorted(
            {
                f"{m.out_features}x{m.in_features}": m.scaler_block_size
                for m in probe.modules()
                if isinstance(m, QuantLinear)
            }.items()
        ),
    }
    del probe
    names = list(report.quantized)
    base = {k: v.clone() for k, v in model.state_dict().items()}
    rounders: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
        "deltatune": lambda w: QuantLinear.from_weight(w, None, "nf4", "float32").dequantize(),
        "bitsandbytes": nf4_bnb,
        "reference": nf4_reference,
    }
    errors: dict[str, list[float]] = {k: [] for k in rounders}
    rounded: dict[str, dict[str, torch.Tensor]] = {k: {} for k in rounders}
    for name in names:
        w = model.get_submodule(name).weight.detach().float()
        for k, f in rounders.items():
            rounded[k][name] = f(w)
            errors[k].append((rounded[k][name] - w).abs().mean().item())
    res["mean_abs_error"] = {k: statistics.fmean(v) for k, v in errors.items()}
    res["mean_abs_error_ratio_to_reference"] = {
        k: statistics.fmean(a / b for a, b in zip(v, errors["reference"], strict=True))
        for k, v in errors.items()
    }
    res["worst_layer_ratio_to_reference"] = {
        k: max(a / b for a, b in zip(v, errors["reference"], strict=True))
        for k, v in errors.items()
    }
    res["test_perplexity"] = {"float32": CausalLMTask().evaluate(model, loader)["perplexity"]}
    print(f"float32: {res['test_perplexity']['float32']:.3f}", flush=True)
    for k in rounders:
        with torch.no_grad():
            for name in names:
                model.get_submodule(name).weight.copy_(rounded[k][name])
        res["test_perplexity"][k] = CausalLMTask().evaluate(model, loader)["perplexity"]
        print(f"{k}: {res['test_perplexity'][k]:.3f}", flush=True)
        model.load_state_dict(base)
    return res


def smol_epochs(epochs: int, names: list[str], max_train: int | None = None) -> dict[str, Any]:
    """LoRA and QLoRA on SmolLM2 with configs/sft-smollm2.yaml trained for ``epochs`` epochs
    (the same settings for every method; the quality part uses the config's 1 epoch), on the
    config's 320 training pairs or ``max_train``. Each method may run in its own process; results
    merge into quant_smol_epochs.json under ``epochs<N>`` (``epochs<N>_train<M>``)."""
    from deltatune.io import write_json
    from deltatune.run import train_run

    lora = {"r": R, "lora_alpha": ALPHA, "lora_dropout": DROPOUT, "target_modules": "all-linear"}
    path = RESULTS / "quant_smol_epochs.json"
    mine: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            t0 = time.perf_counter()
            cfg = smol_config({"name": name, **lora}, Path(tmp) / name, epochs, max_train)
            m = train_run(cfg, echo=print).metrics
            mine[name] = {
                "test_loss": m["test"]["loss"],
                "test_perplexity": m["test"]["perplexity"],
                "wall_s": time.perf_counter() - t0,
            }
            print(f"smollm2 epochs={epochs} {name}: {mine[name]}", flush=True)
            # Re-read just before writing: another process may have added its method meanwhile.
            res = json.loads(path.read_text()) if path.exists() else {}
            key = f"epochs{epochs}" + (f"_train{max_train}" if max_train else "")
            res.setdefault(key, {}).update({name: mine[name]})
            write_json(path, res)
    return mine


def loftq_method(name: str) -> dict[str, Any]:
    """``lora`` / ``qlora`` / ``qlora-loftq<T>`` → the method dict, the same LoRA settings."""
    lora = {"r": R, "lora_alpha": ALPHA, "lora_dropout": DROPOUT, "target_modules": "all-linear"}
    if name in ("lora", "qlora"):
        return {"name": name, **lora}
    if name.startswith("qlora-loftq") and name[len("qlora-loftq") :].isdigit():
        iters = int(name[len("qlora-loftq") :])
        return {
            "name": "qlora",
            **lora,
            "init_lora_weights": "loftq",
            "loftq_config": {"loftq_iter": iters},
        }
    raise SystemExit(f"unknown --loftq-train entry {name!r} (lora, qlora, qlora-loftq<T>)")


def merge_loftq_results(update: dict[str, Any]) -> None:
    """Merge into quant_smol_loftq.json, re-read just before writing (runs may be split)."""
    from deltatune.io import write_json

    path = RESULTS / "quant_smol_loftq.json"
    res = json.loads(path.read_text()) if path.exists() else {}
    for key, value in update.items():
        if isinstance(value, dict):
            res.setdefault(key, {}).update(value)
        else:
            res[key] = value
    write_json(path, res)


def smol_loftq_init(iters: list[int]) -> dict[str, Any]:
    """Held-out perplexity at initialisation (no training) of the float base, plain NF4 QLoRA
    (B = 0: the NF4 base) and NF4 + LoftQ with ``T`` iterations, all with the training runs'
    settings (compute dtype auto); and each one's weight error over the 210 adapted layers."""
    from deltatune.data.loader import make_loader
    from deltatune.lm.instructions import CausalLMCollator
    from deltatune.lm.load import load_causal_lm
    from deltatune.lm.sft import datasets, load_splits
    from deltatune.lm.task import CausalLMTask
    from deltatune.methods.lora import LoraLinear

    cfg = smol_config({"name": "lora"}, Path(tempfile.gettempdir()) / "unused")
    splits = load_splits(cfg)
    model, tok = load_causal_lm("embedded-smollm2")
    _, _, test_ds = datasets(cfg, splits, tok)
    loader = make_loader(
        test_ds, 16, shuffle=False, seed=0, collate=CausalLMCollator(tok.pad_token_id)
    )
    float_weights = {
        n: m.weight.detach().clone() for n, m in model.named_modules() if type(m) is nn.Linear
    }
    res: dict[str, Any] = {
        "init_test_perplexity": {"float32": CausalLMTask().evaluate(model, loader)["perplexity"]},
        "init_weight_error_sq": {},
        "init_s": {},
    }
    print(f"init float32: {res['init_test_perplexity']['float32']:.3f}", flush=True)
    del model
    for name in ["qlora", *(f"qlora-loftq{t}" for t in iters)]:
        model, _ = load_causal_lm("embedded-smollm2")
        torch.manual_seed(0)
        t0 = time.perf_counter()
        dt.inject(model, dt.config_from_dict(loftq_method(name)))
        res["init_s"][name] = time.perf_counter() - t0
        error = 0.0
        with torch.no_grad():
            for path, layer in model.named_modules():
                if isinstance(layer, LoraLinear):
                    w_hat = layer.base_weight() + layer.delta_weight("default")
                    error += float((float_weights[path] - w_hat).pow(2).sum())
        res["init_weight_error_sq"][name] = error
        res["init_test_perplexity"][name] = CausalLMTask().evaluate(model, loader)["perplexity"]
        print(
            f"init {name}: perplexity {res['init_test_perplexity'][name]:.3f}, "
            f"weight error² {error:.2f}, inject {res['init_s'][name]:.1f} s",
            flush=True,
        )
        merge_loftq_results(res)
        del model
        gc.collect()
    plain = res["init_weight_error_sq"]["qlora"]
    res["init_weight_error_ratio_to_nf4"] = {
        k: v / plain for k, v in res["init_weight_error_sq"].items()
    }
    merge_loftq_results(res)
    return res


def smol_loftq_train(names: list[str], epochs: int = 1) -> dict[str, Any]:
    """configs/sft-smollm2.yaml runs named in ``names`` for ``epochs`` epochs (the config's is
    1), the same settings for all; stored under ``train_<epochs>_epoch``."""
    from deltatune.run import train_run

    mine: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            t0 = time.perf_counter()
            cfg = smol_config(loftq_method(name), Path(tmp) / name, epochs)
            m = train_run(cfg, echo=print).metrics
            mine[name] = {
                "test_loss": m["test"]["loss"],
                "test_perplexity": m["test"]["perplexity"],
                "val_loss": m["val"]["loss"],
                "best_step": m["best_step"],
                "wall_s": time.perf_counter() - t0,
            }
            print(f"smollm2 {epochs} epoch(s) {name}: {mine[name]}", flush=True)
            merge_loftq_results({f"train_{epochs}_epoch": {name: mine[name]}})
    return mine


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--part",
        choices=[
            "memory",
            "quality",
            "all",
            "smol-diagnostics",
            "smol-epochs",
            "nf4-check",
            "smol-loftq",
        ],
        default="all",
    )
    parser.add_argument(
        "--train-variants",
        default="nf4-fp32,int8-bf16",
        help="smol-diagnostics: QLoRA settings to train (nf4-fp32, int8-bf16; empty: none)",
    )
    parser.add_argument("--epochs", type=int, default=2, help="smol-epochs: training epochs")
    parser.add_argument(
        "--methods", default="lora,qlora", help="smol-epochs: methods to train (lora, qlora)"
    )
    parser.add_argument(
        "--loftq-init-iters",
        default="1,2,5",
        help="smol-loftq: LoftQ iteration counts whose perplexity at init to measure (empty: none)",
    )
    parser.add_argument(
        "--loftq-train",
        default="qlora-loftq1,lora",
        help="smol-loftq: 1-epoch runs to train (lora, qlora, qlora-loftq<T>; empty: none)",
    )
    parser.add_argument("--loftq-epochs", type=int, default=1, help="smol-loftq: training epochs")
    parser.add_argument(
        "--smol-train",
        type=int,
        default=None,
        help="smol-epochs: training pairs (default: the config's 320; the corpus has ~2,000)",
    )
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--max-train", type=int, default=800, help="BBC training articles")
    parser.add_argument("--no-smollm2", action="store_true", help="skip the SmolLM2 runs")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    RESULTS.mkdir(exist_ok=True)
    meta = {
        "torch": torch.__version__,
        "python": sys.version.split()[0],
        "machine": platform.machine(),
        "threads": torch.get_num_threads(),
    }
    with contextlib.suppress(ImportError):
        import peft

        meta["peft"] = peft.__version__
    if args.part in ("memory", "all"):
        adalora = "adalora" in dt.methods()
        res = measure_memory(args.rounds, adalora)
        if not args.no_smollm2:
            res["smollm2_bytes_per_param"] = smollm2_bytes()
        res["meta"] = meta
        print_memory(res)
        if "smollm2_bytes_per_param" in res:
            print(f"SmolLM2-135M quantised linear weights: {res['smollm2_bytes_per_param']}")
        (RESULTS / "quant_memory.json").write_text(json.dumps(res, indent=2) + "\n")
    if args.part == "smol-diagnostics":
        variants_ = [v for v in args.train_variants.split(",") if v]
        res = smol_diagnostics(variants_)
        res["meta"] = meta
        print(json.dumps(res, indent=2))
        (RESULTS / "quant_smol_diagnostics.json").write_text(json.dumps(res, indent=2) + "\n")
    if args.part == "nf4-check":
        res = nf4_check()
        res["meta"] = meta
        print(json.dumps(res, indent=2))
        (RESULTS / "quant_nf4_check.json").write_text(json.dumps(res, indent=2) + "\n")
    if args.part == "smol-epochs":
        methods = [m for m in args.methods.split(",") if m]
        print(json.dumps(smol_epochs(args.epochs, methods, args.smol_train)))
    if args.part == "smol-loftq":
        iters = [int(t) for t in args.loftq_init_iters.split(",") if t]
        if iters:
            smol_loftq_init(iters)
        smol_loftq_train([m for m in args.loftq_train.split(",") if m], args.loftq_epochs)
        merge_loftq_results({"meta": meta})
        print((RESULTS / "quant_smol_loftq.json").read_text())
    if args.part in ("quality", "all"):
        res = measure_quality(args.max_train, not args.no_smollm2)
        res["meta"] = meta
        print(json.dumps(res, indent=2))
        (RESULTS / "quant_quality.json").write_text(json.dumps(res, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

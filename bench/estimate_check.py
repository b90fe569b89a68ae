#!/usr/bin/env python
"""Check ``deltatune estimate`` against real training steps, one row per method/model config.

For each configuration the estimate (meta model, fake-tensor trace; no weights) is compared
with one real step of the same model and method, built with random weights of the same shapes
(memory and time do not depend on the values) and measured by
:func:`deltatune.estimate.measure_step`:

- ``peak``: the allocator-level high-water mark of the step (forward, backward, AdamW step),
  on top of the weights and optimizer state it holds. CPU: the allocations and frees the PyTorch
  profiler records (``profile_memory=True``); CUDA: ``torch.cuda.max_memory_allocated``.
- ``counted``: weights + gradients + optimizer state + saved activations, as
  :mod:`deltatune.memory` counts them (what bench/lora_bench.py reports on CPU).
- ``time``: median wall time of a few real steps vs the estimate, FLOPs / measured matmul
  throughput + non-matmul bytes / measured copy bandwidth (``mm s``: the FLOPs term alone).

Target: |error| <= 10% on the peak for every row. Usage::

    .venv/bin/python bench/estimate_check.py            # all rows, ~3-5 min on 2 cores
    .venv/bin/python bench/estimate_check.py --quick    # MiniLM rows only
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch

from deltatune.estimate import build_real, estimate, measure_step, real_batch

RESULTS = Path(__file__).resolve().parent / "results"
MINILM = "embedded-minilm"
SMOLLM2 = "embedded-smollm2"

#: (label, model, method, settings)
CONFIGS: list[tuple[str, str, dict[str, Any] | None, dict[str, Any]]] = [
    ("minilm full", MINILM, None, {}),
    ("minilm lora qv r8", MINILM, {"name": "lora", "r": 8}, {}),
    (
        "minilm lora all-linear r8 drop.05",
        MINILM,
        {"name": "lora", "r": 8, "target_modules": "all-linear", "lora_dropout": 0.05},
        {},
    ),
    ("minilm ia3", MINILM, {"name": "ia3"}, {}),
    ("minilm prefix_tuning 20", MINILM, {"name": "prefix_tuning", "num_virtual_tokens": 20}, {}),
    ("minilm houlsby", MINILM, {"name": "houlsby"}, {}),
    ("minilm pfeiffer", MINILM, {"name": "pfeiffer"}, {}),
    ("minilm bitfit", MINILM, {"name": "bitfit"}, {}),
    ("minilm qlora nf4 r8", MINILM, {"name": "qlora", "r": 8}, {}),
    (
        "minilm lora qv + grad ckpt",
        MINILM,
        {"name": "lora", "r": 8},
        {"gradient_checkpointing": True},
    ),
    ("smollm2 lora qv r8", SMOLLM2, {"name": "lora", "r": 8}, {"batch_size": 4, "seq_len": 64}),
    (
        "smollm2 prompt_tuning 20",
        SMOLLM2,
        {"name": "prompt_tuning", "num_virtual_tokens": 20},
        {"batch_size": 4, "seq_len": 64},
    ),
    (
        "smollm2 lora + grad ckpt",
        SMOLLM2,
        {"name": "lora", "r": 8},
        {"batch_size": 4, "seq_len": 64, "gradient_checkpointing": True},
    ),
]


def run_row(
    label: str, model: str, method: dict[str, Any] | None, settings: dict[str, Any], device: str
) -> dict[str, Any]:
    kwargs: dict[str, Any] = {"batch_size": 8, "seq_len": 128, **settings, "device": device}
    t0 = time.perf_counter()
    est = estimate(model, method, **kwargs)
    estimate_s = time.perf_counter() - t0
    build_kwargs = {
        k: v for k, v in kwargs.items() if k in ("gradient_checkpointing", "device", "dtype")
    }
    real, task, vocab = build_real(model, method, **build_kwargs)
    dev = torch.device(device)
    batch = real_batch(task, kwargs["batch_size"], kwargs["seq_len"], vocab, dev)
    measured = measure_step(real, batch, task=task, time_steps=3)
    del real, batch
    gc.collect()
    row = {
        "config": label,
        "model": model,
        "method": method,
        "batch_size": kwargs["batch_size"],
        "seq_len": kwargs["seq_len"],
        "gradient_checkpointing": bool(settings.get("gradient_checkpointing", False)),
        "estimate_s": round(estimate_s, 2),
        "estimated_peak": est.peak,
        "measured_peak": measured.allocator_peak,
        "peak_error_pct": round(
            100.0 * (est.peak - measured.allocator_peak) / measured.allocator_peak, 2
        ),
        "estimated_counted": est.counted_peak,
        "measured_counted": measured.counted_peak,
        "counted_error_pct": round(
            100.0 * (est.counted_peak - measured.counted_peak) / measured.counted_peak, 2
        ),
        "estimated_activations": est.activations,
        "measured_activations": measured.activations,
        "estimated_step_s": round(est.step_time_s, 4),
        # The FLOPs-only part (the estimate before the memory-traffic term was added).
        "estimated_matmul_s": round(est.flops_per_step / est.device_flops_per_s, 4),
        "memory_traffic_bytes": est.memory_traffic,
        "device_bytes_per_s": est.device_bytes_per_s,
        "measured_step_s": round(measured.step_time_s, 4),
        "flops_per_step": est.flops_per_step,
    }
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="MiniLM rows only")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default=str(RESULTS / "estimate_check.json"))
    args = parser.parse_args()
    rows = []
    configs = [c for c in CONFIGS if not (args.quick and c[1] == SMOLLM2)]
    header = f"{'config':<36}{'est peak':>10}{'meas peak':>11}{'err':>8}{'counted err':>13}{'mm s':>7}{'est s':>8}{'meas s':>8}{'trace s':>9}"
    print(header)
    for label, model, method, settings in configs:
        row = run_row(label, model, method, settings, args.device)
        rows.append(row)
        mib = 2**20
        print(
            f"{label:<36}{row['estimated_peak'] / mib:>9.1f}M{row['measured_peak'] / mib:>10.1f}M"
            f"{row['peak_error_pct']:>+7.1f}%{row['counted_error_pct']:>+12.1f}%"
            f"{row['estimated_matmul_s']:>7.2f}{row['estimated_step_s']:>8.2f}"
            f"{row['measured_step_s']:>8.2f}{row['estimate_s']:>9.1f}",
            flush=True,
        )
    worst = max(abs(r["peak_error_pct"]) for r in rows)
    print(f"worst |peak error| {worst:.2f}% over {len(rows)} configurations (target <= 10%)")
    out = {
        "device": args.device,
        "torch": torch.__version__,
        "machine": platform.machine(),
        "threads": torch.get_num_threads(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "worst_peak_error_pct": worst,
        "rows": rows,
    }
    path = Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {path}")
    return 0 if worst <= 10.0 else 1


if __name__ == "__main__":
    sys.exit(main())

"""Measure the fine-tuning practices on the embedded MiniLM + BBC News (small subsets, CPU).

Runs, in one process, with one thread:

1. a teacher: MiniLM (6 layers) fully fine-tuned (``configs/full.yaml`` settings);
2. distillation: a 3-layer student (the base's first 3 blocks, full fine-tuning) trained
   against the teacher (T=2, alpha=0.5), and the same student trained on the labels alone
   (alpha=0) as the control; accuracy, parameters, size and forward latency;
3. pruning of the teacher: heads, feed-forward neurons, top layers, magnitude, each followed
   by a short full fine-tune for recovery; parameters, latency and accuracy before/after;
4. 5-fold stratified cross-validation of LoRA (``configs/cv.yaml``): mean ± std.

Writes ``bench/results/practices_{distill,prune,cv}.json`` and prints markdown tables::

    nice -n 10 .venv/bin/python bench/practices_report.py            # all (~20-30 min on 2 cores)
    nice -n 10 .venv/bin/python bench/practices_report.py --only cv  # one part
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
RUNS = ROOT / "runs" / "practices"


def common(train: int, evals: int) -> list[str]:
    return [
        "data.max_length=64",
        f"data.max_train_examples={train}",
        f"data.max_eval_examples={evals}",
        "train.progress=false",
        "train.eval_every_steps=null",
        "train.device=cpu",
    ]


def teacher(args: argparse.Namespace) -> Path:
    from deltatune.run import load_run_config, train_run

    out = RUNS / "teacher"
    if (out / "metrics.json").is_file() and not args.retrain:
        return out
    cfg = load_run_config(
        ROOT / "configs" / "full.yaml",
        [*common(args.train, args.evals), "train.epochs=2", f"output_dir={out}"],
    )
    m = train_run(cfg).metrics
    print(f"teacher: test accuracy {m['test']['accuracy']:.4f} in {m['wall_time_s']:.0f} s")
    return out


def distill(args: argparse.Namespace, teacher_dir: Path) -> dict[str, Any]:
    from deltatune.run import load_run_config
    from deltatune.train.distill import distill_run

    rows = {}
    for name, alpha in (("distilled", 0.5), ("labels only", 0.0)):
        cfg = load_run_config(
            ROOT / "configs" / "distill.yaml",
            [
                *common(args.train, args.evals),
                f"distill.teacher={teacher_dir}",
                f"distill.alpha={alpha}",
                f"output_dir={RUNS / ('student-a' + str(alpha))}",
            ],
        )
        start = time.perf_counter()
        m = distill_run(cfg).metrics
        rows[name] = {**m["distill"], "wall_time_s": time.perf_counter() - start}
    result = {"train_examples": args.train, "eval_examples": args.evals, "runs": rows}
    (RESULTS / "practices_distill.json").write_text(json.dumps(result, indent=2) + "\n")
    t = rows["distilled"]["teacher"]
    print("\n| model | layers | test acc | val acc | params | MiB | ms / batch of 32 |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    print(
        f"| teacher (full FT) | 6 | {t['test_accuracy']:.3f} | {t['val_accuracy']:.3f} | "
        f"{t['params']:,} | {t['size_mb']:.1f} | {t['latency_ms']:.0f} |"
    )
    for name, r in rows.items():
        s = r["student"]
        print(
            f"| student, {name} (alpha={r['alpha']}) | {s['layers']} | {s['test_accuracy']:.3f} | "
            f"{s['val_accuracy']:.3f} | {s['params']:,} | {s['size_mb']:.1f} | "
            f"{s['latency_ms']:.0f} (teacher {r['teacher']['latency_ms']:.0f}) |"
        )
    return result


def prune(args: argparse.Namespace, teacher_dir: Path) -> dict[str, Any]:
    from deltatune.prune import prune_run
    from deltatune.run import load_run_config

    variants = {
        "heads 50%": ["prune.heads=0.5"],
        "FFN neurons 50%": ["prune.neurons=0.5"],
        "top 3 layers": ["prune.layers=3"],
        "magnitude 50%": ["prune.magnitude=0.5"],
    }
    rows = {}
    for name, extra in variants.items():
        cfg = load_run_config(
            ROOT / "configs" / "prune.yaml",
            [
                *common(args.train, args.evals),
                f"prune.source={teacher_dir}",
                "prune.heads=0",
                "prune.neurons=0",
                "prune.layers=0",
                f"prune.recovery_steps={args.recovery_steps}",
                *extra,
            ],
        )
        out = RUNS / ("pruned-" + name.split()[0])
        start = time.perf_counter()
        m = prune_run(cfg, out)
        rows[name] = {**m, "wall_time_s": time.perf_counter() - start}
    result = {"train_examples": args.train, "eval_examples": args.evals, "runs": rows}
    (RESULTS / "practices_prune.json").write_text(json.dumps(result, indent=2) + "\n")
    print(
        f"\n| pruned | params | non-zero | ms / batch (before) | test acc before | pruned | "
        f"after {args.recovery_steps} recovery steps |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, m in rows.items():
        b, p, r = m["before"], m["pruned"], m["recovered"]
        print(
            f"| {name} | {b['params']:,} -> {p['params']:,} | {p['nonzero_params']:,} | "
            f"{r['latency_ms']:.0f} ({b['latency_ms']:.0f}) | {b['test_accuracy']:.3f} | "
            f"{p['test_accuracy']:.3f} | {r['test_accuracy']:.3f} |"
        )
    return result


def cv(args: argparse.Namespace) -> dict[str, Any]:
    from deltatune.run import load_run_config
    from deltatune.train.cv import cross_validate

    cfg = load_run_config(
        ROOT / "configs" / "cv.yaml",
        [*common(args.train, args.evals), f"output_dir={RUNS / 'cv'}"],
    )
    res = cross_validate(cfg)
    result = {
        "train_examples": args.train,
        "folds": len(res.folds),
        "mean": res.mean,
        "std": res.std,
        "per_fold": [{k: v for k, v in r.items() if k != "held_out_indices"} for r in res.folds],
    }
    (RESULTS / "practices_cv.json").write_text(json.dumps(result, indent=2) + "\n")
    print("\n| fold | accuracy | macro-F1 |")
    print("|---|---:|---:|")
    for r in res.folds:
        print(f"| {r['fold'] + 1} | {r['accuracy']:.3f} | {r['macro_f1']:.3f} |")
    print(
        f"| mean ± std | {res.mean['accuracy']:.3f} ± {res.std['accuracy']:.3f} | "
        f"{res.mean['macro_f1']:.3f} ± {res.std['macro_f1']:.3f} |"
    )
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=["distill", "prune", "cv"], action="append")
    parser.add_argument("--train", type=int, default=300, help="training examples")
    parser.add_argument("--evals", type=int, default=100, help="validation / test examples each")
    parser.add_argument("--recovery-steps", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--retrain", action="store_true", help="retrain the teacher")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    RESULTS.mkdir(parents=True, exist_ok=True)
    parts = args.only or ["distill", "prune", "cv"]
    if "distill" in parts or "prune" in parts:
        t = teacher(args)
    if "distill" in parts:
        distill(args, t)
    if "prune" in parts:
        prune(args, t)
    if "cv" in parts:
        cv(args)


if __name__ == "__main__":
    main()

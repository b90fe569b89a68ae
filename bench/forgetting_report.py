"""Forgetting report: how much of an old task a fine-tuning step forgets, and what limits it.

The embedded MiniLM on BBC News, as a class-incremental sequence with one shared 5-topic head:

    step A  full fine-tuning on business / entertainment / politics
    step B  from step A's model, on sport / tech, five ways:
            none     full fine-tuning
            replay   full fine-tuning, a fraction of the training set replayed from step A's data
            l2sp     full fine-tuning + alpha/2 ||w - w0||^2   (w0 = step A's weights)
            ewc      full fine-tuning + lambda/2 sum F (w - w0)^2 (F: Fisher on step A's data)
            lora     a LoRA adapter on step A's model (parameter isolation): adapter on, and
                     adapter off (task known at inference: step A's model exactly)

Reported per variant: the new task's test accuracy (sport/tech test examples) and the
forgetting figure on the old task's test examples (``deltatune.train.forgetting.forgetting``:
accuracy before -> after, loss increase). Every step is a real ``deltatune train`` run
(``train_run`` with a ``continual`` section and ``init_from``). Small subsets, max_length 64,
one thread; results in ``bench/results/forgetting.json``::

    nice -n 10 .venv/bin/python bench/forgetting_report.py
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from deltatune.run import RunConfig, train_run

OLD = ["business", "entertainment", "politics"]
NEW = ["sports", "tech"]
RESULTS = Path(__file__).parent / "results" / "forgetting.json"


def config(out: Path, args: argparse.Namespace, **sections: Any) -> RunConfig:
    base: dict[str, Any] = {
        "data": {
            "max_length": args.max_length,
            "max_train_examples": args.train_examples,
            "max_eval_examples": args.eval_examples,
        },
        "method": {"name": "full"},
        "train": {
            "epochs": args.epochs,
            "batch_size": 16,
            "learning_rate": args.lr,
            "eval_every_steps": None,
            "progress": False,
            "device": "cpu",
        },
        "output_dir": str(out),
    }
    for key, value in sections.items():
        if isinstance(value, dict) and key != "method":
            base[key] = {**base.get(key, {}), **value}
        else:
            base[key] = value
    return RunConfig.from_dict(base)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--train-examples", type=int, default=250, help="before the label split")
    parser.add_argument("--eval-examples", type=int, default=150, help="per val/test split")
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--lr", type=float, default=1e-4, help="full fine-tuning rate")
    parser.add_argument("--replay", type=float, default=0.25, help="replayed fraction")
    parser.add_argument("--l2sp", type=float, nargs="+", default=[0.1, 10.0], help="L2-SP alphas")
    parser.add_argument("--ewc", type=float, nargs="+", default=[1e4], help="EWC lambdas")
    parser.add_argument(
        "--only", nargs="+", help="run these variants only (e.g. l2sp) and update the JSON"
    )
    parser.add_argument("--fisher-examples", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    work = Path(tempfile.mkdtemp(prefix="forgetting-"))
    quiet = lambda *a, **k: None  # noqa: E731
    rows: list[dict[str, Any]] = []
    try:
        t0 = time.perf_counter()
        first = train_run(
            config(work / "a", args, continual={"train_labels": OLD}), echo=quiet
        ).metrics
        print(
            f"step A: old-task test accuracy {first['test']['accuracy']:.3f} "
            f"({first['train_examples']} examples, {time.perf_counter() - t0:.0f} s)"
        )
        step = {
            "init_from": str(work / "a"),
            "continual": {"train_labels": NEW, "reference_labels": OLD},
        }
        variants: list[tuple[str, dict[str, Any]]] = [
            ("none", {}),
            ("replay", {"continual": {"replay_fraction": args.replay}}),
            *(
                (f"l2sp alpha={a:g}", {"continual": {"penalty": "l2sp", "strength": a}})
                for a in args.l2sp
            ),
            *(
                (
                    f"ewc lambda={lam:g}",
                    {
                        "continual": {
                            "penalty": "ewc",
                            "strength": lam,
                            "fisher_examples": args.fisher_examples,
                        }
                    },
                )
                for lam in args.ewc
            ),
            (
                "lora",
                {
                    "method": {
                        "name": "lora",
                        "r": 8,
                        "lora_alpha": 16,
                        "target_modules": "all-linear",
                    },
                    "train": {"learning_rate": 1e-3},
                },
            ),
        ]
        if args.only:
            variants = [v for v in variants if v[0].split()[0] in args.only]
        for name, extra in variants:
            t0 = time.perf_counter()
            sections: dict[str, Any] = {**step, **extra}
            sections["continual"] = {**step["continual"], **extra.get("continual", {})}
            m = train_run(config(work / name, args, **sections), echo=quiet).metrics
            row = {
                "variant": name,
                "settings": extra,
                "new_task_accuracy": m["test"]["accuracy"],
                "new_task_examples": m["train_examples"],
                "forgetting": m["forgetting"],
                "forgetting_isolated": m.get("forgetting_isolated"),
                "trainable_params": m["trainable_params"],
                "wall_time_s": round(time.perf_counter() - t0, 1),
            }
            rows.append(row)
            f = m["forgetting"]
            print(
                f"{name:<7} new {row['new_task_accuracy']:.3f}  old {f['accuracy_before']:.3f} -> "
                f"{f['accuracy_after']:.3f} (drop {f['accuracy_drop']:+.3f}, loss "
                f"{f['loss_increase']:+.3f})  {row['wall_time_s']:.0f} s"
            )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    result = {
        "setup": {
            "model": "embedded-minilm (all-MiniLM-L6-v2)",
            "data": "BBC News, stratified subset",
            "old_labels": OLD,
            "new_labels": NEW,
            "old_train_examples": first["train_examples"],
            "old_task_test_accuracy": first["test"]["accuracy"],
            **{k: v for k, v in vars(args).items() if k != "out"},
        },
        "rows": rows,
    }
    if args.only and args.out.is_file():  # keep the other variants' rows
        old = json.loads(args.out.read_text())
        names = {r["variant"] for r in rows}
        result["rows"] = [r for r in old["rows"] if r["variant"] not in names] + rows
        result["setup"] = {
            **old["setup"],
            "rerun": {k: v for k, v in vars(args).items() if k != "out"},
        }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print()
    print(table(result))


def table(result: dict[str, Any]) -> str:
    lines = [
        "| step B | new-task accuracy | old-task accuracy before -> after | forgetting (acc. drop) | old-task loss increase |",
        "|---|---:|---:|---:|---:|",
    ]
    for r in result["rows"]:
        f = r["forgetting"]
        lines.append(
            f"| {r['variant']} | {r['new_task_accuracy']:.3f} | {f['accuracy_before']:.3f} -> "
            f"{f['accuracy_after']:.3f} | {f['accuracy_drop']:+.3f} | {f['loss_increase']:+.3f} |"
        )
        iso = r.get("forgetting_isolated")
        if iso:
            lines.append(
                f"| {r['variant']}, adapter off for the old task | - | {iso['accuracy_before']:.3f} -> "
                f"{iso['accuracy_after']:.3f} | {iso['accuracy_drop']:+.3f} | {iso['loss_increase']:+.3f} |"
            )
    return "\n".join(lines)


if __name__ == "__main__":
    main()

"""Measure the "beyond labels" strategies on the embedded assets (issue 10).

Parts (each writes ``bench/results/beyond_labels_<part>.json``):

- ``dapt``: BBC News with few labels (``--per-class``, default 8) per class: test accuracy of
  a LoRA classifier on MiniLM as shipped vs on MiniLM after a domain-adaptive step (MLM and/or
  SimCSE, LoRA merged) on the unlabelled training-split texts; same seeds, mean and std.
- ``semisup``: labelled-only vs self-training vs consistency at several label budgets on the
  same split and seed.
- ``reward``: a MiniLM reward model (pairwise Bradley-Terry loss) on the toy preference pairs
  from the embedded instruction corpus; pairwise accuracy on held-out pairs before and after.
- ``dpo``: DPO with LoRA on the embedded SmolLM2; held-out reward margin and the share of
  pairs where chosen beats rejected, before and after.

Run with ``nice -n 10 .venv/bin/python bench/beyond_labels_report.py --part dapt`` (one
thread; the machine is shared). ``--quick`` shrinks everything for a smoke run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent
RESULTS = ROOT / "results"


def _mean_std(xs: list[float]) -> dict[str, float]:
    return {
        "mean": statistics.fmean(xs),
        "std": statistics.stdev(xs) if len(xs) > 1 else 0.0,
        "n": len(xs),
    }


def _write(name: str, payload: dict[str, Any]) -> Path:
    from deltatune.io import write_json

    path = RESULTS / f"beyond_labels_{name}.json"
    write_json(path, payload)
    print(f"wrote {path}", flush=True)
    return path


def _train_section(args: argparse.Namespace, seed: int) -> dict[str, Any]:
    return {
        "epochs": 100,
        "max_steps": args.steps,
        "batch_size": 16,
        "learning_rate": args.lr,
        "seed": seed,
        "progress": False,
        "device": "cpu",
    }


def few_label_accuracy(model_path: str, args: argparse.Namespace, seed: int) -> float:
    """Labelled-only LoRA classifier on ``args.per_class`` examples per class; test accuracy."""
    from deltatune.data.text import load_text_splits
    from deltatune.models import load_tokenizer
    from deltatune.strategies.semisup import (
        SemisupConfig,
        accuracy,
        build_classifier,
        split_labelled,
        train_labelled,
    )

    cfg = SemisupConfig.from_dict(
        {
            "model": {"name_or_path": model_path},
            "data": {"max_length": 64},
            "train": _train_section(args, seed),
        }
    )
    splits = load_text_splits(cfg.data)
    labelled, _ = split_labelled(splits.train, splits.label_names, args.per_class, seed)
    tokenizer = load_tokenizer(cfg.model)
    torch.manual_seed(seed)
    model = build_classifier(cfg, splits.label_names)
    train_labelled(model, labelled, tokenizer, cfg)
    return accuracy(model, splits.test, tokenizer, cfg.data.max_length)


def part_dapt(args: argparse.Namespace) -> None:
    from deltatune.strategies.adapt import AdaptConfig, adapt_run

    out: dict[str, Any] = {
        "setup": {
            "task": "BBC News test split (222 articles, 5 topics), max_length 64",
            "labels_per_class": args.per_class,
            "classifier": f"LoRA all-linear r=8, lr {args.lr}, {args.steps} steps, batch 16",
            "dapt": f"LoRA all-linear r=8 (merged), up to {args.dapt_steps} steps (1 epoch), batch 16, "
            "unlabelled BBC training-split texts (95%; 5% held out for the objective)",
            "seeds": args.seeds,
        },
        "dapt_runs": {},
        "accuracy": {},
    }
    variants: dict[str, str] = {"none": "embedded-minilm"}
    for objective in args.objectives:
        done = args.work / f"adapt-{objective}" / "metrics.json"
        if args.reuse_dapt and done.is_file():
            metrics = json.loads(done.read_text())
            out["dapt_runs"][objective] = {**metrics, "reused": str(done)}
            variants[objective] = str(metrics["model_dir"])
            print(objective, "reused", json.dumps(metrics), flush=True)
            continue
        t0 = time.perf_counter()
        cfg = AdaptConfig.from_dict(
            {
                "corpus": {"source": "bbc_news", "max_texts": args.max_texts},
                "objective": {"name": objective, "max_length": 64},
                "train": {
                    "max_steps": args.dapt_steps,
                    "epochs": 1,
                    "batch_size": 16,
                    "progress": False,
                    "device": "cpu",
                },
                "output_dir": str(args.work / f"adapt-{objective}"),
            }
        )
        metrics = adapt_run(cfg)
        metrics["wall_time_s"] = time.perf_counter() - t0
        out["dapt_runs"][objective] = metrics
        variants[objective] = str(metrics["model_dir"])
        print(objective, json.dumps(metrics), flush=True)
    for name, path in variants.items():
        if args.variants and name not in args.variants:
            continue
        accs = []
        for seed in args.seeds:
            acc = few_label_accuracy(path, args, seed)
            accs.append(acc)
            print(f"{name} seed {seed}: {acc:.4f}", flush=True)
        out["accuracy"][name] = {"per_seed": accs, **_mean_std(accs)}
        _write("dapt" + args.suffix, out)


def part_semisup(args: argparse.Namespace) -> None:
    from deltatune.data import TextExamples
    from deltatune.data.text import load_text_splits
    from deltatune.models import load_tokenizer
    from deltatune.strategies.semisup import (
        SemisupConfig,
        accuracy,
        build_classifier,
        predict_probs,
        select_pseudo_labels,
        split_labelled,
        train_consistency,
        train_labelled,
    )

    out: dict[str, Any] = {
        "setup": {
            "task": "BBC News test split (222 articles), max_length 64",
            "classifier": f"LoRA all-linear r=8, lr {args.lr}, {args.steps} steps per round, "
            "batch 16",
            "unlabelled_pool": args.max_unlabelled,
            "self_training": f"1 round, threshold {args.threshold}, class-balanced",
            "consistency": f"from the labelled-only model, {args.steps} steps, threshold "
            f"{args.threshold}, token_dropout 0.1 + swap 0.1, lambda 1",
            "seeds": args.seeds,
        },
        "budgets": {},
    }
    for per_class in args.budgets:
        rows = []
        for seed in args.seeds:
            cfg = SemisupConfig.from_dict(
                {
                    "data": {"max_length": 64},
                    "semisup": {
                        "labels_per_class": per_class,
                        "threshold": args.threshold,
                        "max_unlabelled": args.max_unlabelled,
                    },
                    "train": _train_section(args, seed),
                }
            )
            splits = load_text_splits(cfg.data)
            tok = load_tokenizer(cfg.model)
            labelled, pool = split_labelled(
                splits.train, splits.label_names, per_class, seed, args.max_unlabelled
            )
            torch.manual_seed(seed)
            base = build_classifier(cfg, splits.label_names)
            train_labelled(base, labelled, tok, cfg)
            acc0 = accuracy(base, splits.test, tok, 64)
            probs = predict_probs(base, pool, tok, 64)
            idx, pseudo = select_pseudo_labels(probs, args.threshold, True, None)
            pseudo_acc = (
                sum(p == pool.labels[i] for i, p in zip(idx, pseudo)) / len(idx) if idx else None
            )
            torch.manual_seed(seed)
            student = build_classifier(cfg, splits.label_names)
            train = TextExamples(
                labelled.texts + [pool.texts[i] for i in idx], labelled.labels + pseudo
            )
            train_labelled(student, train, tok, cfg)
            acc_st = accuracy(student, splits.test, tok, 64)
            parts = train_consistency(base, labelled, pool, tok, cfg)
            acc_cons = accuracy(base, splits.test, tok, 64)
            row = {
                "seed": seed,
                "labelled": len(labelled),
                "labelled_only": acc0,
                "self_training": acc_st,
                "pseudo_labels": len(idx),
                "pseudo_label_accuracy": pseudo_acc,
                "consistency": acc_cons,
                "consistency_last_step": parts,
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
        out["budgets"][str(per_class)] = {
            "runs": rows,
            **{
                k: _mean_std([r[k] for r in rows])
                for k in ("labelled_only", "self_training", "consistency")
            },
        }
        _write("semisup" + args.suffix, out)


def part_reward(args: argparse.Namespace) -> None:
    from deltatune.strategies.reward import RewardConfig, reward_run

    cfg = RewardConfig.from_dict(
        {
            "data": {
                "source": "toy",
                "max_length": 64,
                "max_train_pairs": args.reward_pairs,
                "max_eval_pairs": 200,
            },
            "train": {
                "epochs": 1,
                "batch_size": 16,
                "learning_rate": 1e-3,
                "progress": False,
                "device": "cpu",
            },
            "output_dir": str(args.work / "reward"),
        }
    )
    metrics = reward_run(cfg)
    _write(
        "reward" + args.suffix,
        {
            "setup": {
                "model": "embedded MiniLM + new 1-output head, LoRA all-linear r=8 (head trained)",
                "data": "toy pairs from the chatterbot corpus (chosen = corpus answer, rejected = "
                "an answer to another question), split by prompt",
                "train": f"{args.reward_pairs} pairs, 1 epoch, batch 16, lr 1e-3, max_length 64",
            },
            **metrics,
        },
    )


def part_dpo(args: argparse.Namespace) -> None:
    from deltatune.strategies.commands import compare_generate
    from deltatune.strategies.dpo import DPOConfig, dpo_run

    cfg = DPOConfig.from_dict(
        {
            "data": {"max_length": 64, "max_train_pairs": args.dpo_pairs, "max_eval_pairs": 32},
            "dpo": {"beta": args.beta},
            "train": {
                "epochs": 1,
                "batch_size": 4,
                "learning_rate": args.dpo_lr,
                "max_steps": args.dpo_steps,
                "warmup_ratio": 0.0,
                "progress": False,
                "device": "cpu",
            },
            "output_dir": str(args.work / "dpo"),
        }
    )
    metrics = dpo_run(cfg)
    from deltatune.checkpoint import load_adapter
    from deltatune.lm.load import load_causal_lm

    model, tokenizer = load_causal_lm("embedded-smollm2")
    load_adapter(model, args.work / "dpo")
    prompts = ["What is AI?", "Do you like sports?", "Tell me a joke."]
    samples = compare_generate(model.eval(), tokenizer, prompts, max_new_tokens=32)
    _write(
        "dpo" + args.suffix,
        {
            "setup": {
                "model": "embedded SmolLM2-135M-Instruct, LoRA all-linear r=8; reference = the "
                "same model with the adapter disabled",
                "data": "toy pairs (chatterbot), split by prompt, max_length 64",
                "train": f"{args.dpo_pairs} pairs, {args.dpo_steps} steps, batch 4, lr "
                f"{args.dpo_lr}, beta {args.beta}",
            },
            **metrics,
            "samples_greedy": samples,
        },
    )


def _load(name: str) -> dict[str, Any] | None:
    path = RESULTS / f"beyond_labels_{name}.json"
    return json.loads(path.read_text()) if path.is_file() else None


def merge_dapt() -> None:
    """Fold ``beyond_labels_dapt_<suffix>.json`` files (variants run as separate processes,
    same setup and seeds) into ``beyond_labels_dapt.json``."""
    base = _load("dapt") or {"setup": {}, "dapt_runs": {}, "accuracy": {}}
    for path in sorted(RESULTS.glob("beyond_labels_dapt_*.json")):
        part = json.loads(path.read_text())
        base["setup"] = {**part["setup"], **base["setup"]}
        base["dapt_runs"].update(part["dapt_runs"])
        base["accuracy"].update(part["accuracy"])
    _write("dapt", base)


def tables() -> str:
    """Markdown tables of whatever results exist (the README / docs tables)."""
    out: list[str] = []
    dapt = _load("dapt")
    if dapt:
        out += [
            f"Test accuracy, {dapt['setup']['labels_per_class']} labels per class, seeds "
            f"{dapt['setup']['seeds']}:",
            "",
            "| encoder | mean | std | per seed |",
            "|---|---:|---:|---|",
        ]
        names = {"none": "MiniLM as shipped", "mlm": "after MLM DAPT", "simcse": "after SimCSE"}
        for key, row in dapt["accuracy"].items():
            seeds = ", ".join(f"{a:.3f}" for a in row["per_seed"])
            out.append(
                f"| {names.get(key, key)} | {row['mean']:.3f} | {row['std']:.3f} | {seeds} |"
            )
        for key, run in dapt["dapt_runs"].items():
            b, a = run["val_before"], run["val_after"]
            out.append(
                f"\n{key} step: {run['steps']} steps on {run['train_texts']} texts; held-out "
                f"loss {b['loss']:.2f} -> {a['loss']:.2f}"
            )
        out.append("")
    semi = _load("semisup")
    if semi:
        out += [
            "| labels per class | labelled only | self-training | consistency | pseudo-labels (acc.) |",
            "|---:|---:|---:|---:|---|",
        ]
        for budget, row in semi["budgets"].items():
            runs = row["runs"]
            pl = "; ".join(
                f"{r['pseudo_labels']} ({r['pseudo_label_accuracy']:.2f})"
                if r["pseudo_label_accuracy"] is not None
                else "0"
                for r in runs
            )
            out.append(
                f"| {budget} | {row['labelled_only']['mean']:.3f} | "
                f"{row['self_training']['mean']:.3f} | {row['consistency']['mean']:.3f} | {pl} |"
            )
        out.append(f"\n(seeds {semi['setup']['seeds']}; mean over seeds)\n")
    reward = _load("reward")
    if reward:
        b, a = reward["before"], reward["after"]
        out += [
            "| reward model | pairwise accuracy | mean margin | loss |",
            "|---|---:|---:|---:|",
            f"| before (new head) | {b['accuracy']:.3f} | {b['margin']:.3f} | {b['loss']:.3f} |",
            f"| after {reward['steps']} steps | {a['accuracy']:.3f} | {a['margin']:.3f} | "
            f"{a['loss']:.3f} |",
            f"\n({reward['eval_pairs']} held-out pairs, {reward['train_pairs']} training pairs)\n",
        ]
    dpo = _load("dpo")
    if dpo:
        b, a = dpo["before"], dpo["after"]
        out += [
            "| DPO, held-out pairs | reward margin | chosen beats rejected | log-prob margin | "
            "log-prob prefers chosen | loss |",
            "|---|---:|---:|---:|---:|---:|",
            f"| before | {b['margin']:.3f} | {b['accuracy']:.3f} | {b['logp_margin']:.2f} | "
            f"{b['logp_accuracy']:.3f} | {b['loss']:.3f} |",
            f"| after {dpo['steps']} steps | {a['margin']:.3f} | {a['accuracy']:.3f} | "
            f"{a['logp_margin']:.2f} | {a['logp_accuracy']:.3f} | {a['loss']:.3f} |",
            f"\n({dpo['eval_pairs']} held-out pairs, {dpo['train_pairs']} training pairs, "
            f"beta {dpo['beta']})\n",
        ]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--part", choices=["dapt", "semisup", "reward", "dpo"])
    p.add_argument("--table", action="store_true", help="print the tables of saved results")
    p.add_argument("--merge-dapt", action="store_true", help="fold dapt_<suffix> files in")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--per-class", type=int, default=8)
    p.add_argument("--budgets", type=int, nargs="+", default=[4, 8, 16])
    p.add_argument("--objectives", nargs="+", default=["mlm", "simcse"])
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--steps", type=int, default=45)
    p.add_argument("--dapt-steps", type=int, default=110)
    p.add_argument("--max-texts", type=int, default=None)
    p.add_argument("--max-unlabelled", type=int, default=600)
    p.add_argument("--threshold", type=float, default=0.8)
    p.add_argument("--work", type=Path, default=Path("runs/beyond_labels"))
    p.add_argument(
        "--reuse-dapt", action="store_true", help="use finished adapt runs found under --work"
    )
    p.add_argument("--variants", nargs="+", help="dapt: only these (none, mlm, simcse)")
    p.add_argument("--reward-pairs", type=int, default=320)
    p.add_argument("--dpo-pairs", type=int, default=40)
    p.add_argument("--dpo-steps", type=int, default=10)
    p.add_argument("--dpo-lr", type=float, default=5e-4)
    p.add_argument("--beta", type=float, default=0.1)
    p.add_argument("--suffix", default="")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    if args.merge_dapt:
        merge_dapt()
    if args.table:
        print(tables())
        return 0
    if args.merge_dapt:
        return 0
    if args.part is None:
        p.error("give --part or --table")
    torch.set_num_threads(args.threads)
    RESULTS.mkdir(parents=True, exist_ok=True)
    parts = {"dapt": part_dapt, "semisup": part_semisup, "reward": part_reward, "dpo": part_dpo}
    parts[args.part](args)
    return 0


if __name__ == "__main__":
    sys.exit(main())

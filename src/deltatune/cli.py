"""``deltatune`` command line: train, eval, predict, merge, methods.

Every user error (bad config key, missing file, corrupt adapter, ...) prints one line,
``error: <what, which value, how to fix>``, and exits with status 2; no traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from deltatune.errors import DeltatuneError


def _cmd_train(args: argparse.Namespace) -> int:
    from deltatune.run import PLOT_NAME, load_run_config, train_run

    config_path = args.config
    overrides = list(args.overrides)
    if config_path is not None and "=" in config_path and not Path(config_path).exists():
        overrides.insert(0, config_path)  # `deltatune train key=value` with no config file
        config_path = None
    if args.output_dir:
        overrides.append(f"output_dir={args.output_dir}")
    cfg = load_run_config(config_path, overrides)
    if args.print_config:
        print(cfg.to_yaml(), end="")
        return 0
    result = train_run(cfg, resume=args.resume)
    m = result.metrics
    out = result.output_dir
    print()
    print(
        f"test accuracy      {m['test']['accuracy']:.4f}   (macro-F1 {m['test'].get('macro_f1', float('nan')):.4f}, "
        f"{m['train_examples']} training examples)"
    )
    print(f"validation acc.    {m['val']['accuracy']:.4f}")
    print(
        f"trainable params   {m['trainable_params']:,} of {m['total_params']:,} ({m['trainable_percent']:.3f}%)"
    )
    print(f"wall time          {m['wall_time_s']:.1f} s")
    print(f"adapter            {out / 'adapter_model.safetensors'} (+ adapter_config.json)")
    print(f"metrics            {out / 'metrics.json'}   per-step log {out / 'log.jsonl'}")
    if (out / PLOT_NAME).exists():
        print(f"plot               {out / PLOT_NAME}")
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from deltatune.run import evaluate_run

    metrics = evaluate_run(args.run_dir, args.overrides, split=args.split)
    print(json.dumps({"split": args.split, **metrics}, indent=2))
    return 0


def _cmd_predict(args: argparse.Namespace) -> int:
    from deltatune.run import predict_images, predict_texts

    if args.image:
        if args.text or args.file:
            raise DeltatuneError("give either --image files or --text/--file texts, not both")
        for image in args.image:
            if not Path(image).is_file():
                raise DeltatuneError(f"--image '{image}' does not exist")
        for row in predict_images(args.run_dir, list(args.image)):
            if args.json:
                print(json.dumps(row))
            else:
                print(f"{row['label']}\t{row['score']:.3f}\t{row['image']}")
        return 0
    texts: list[str] = list(args.text or [])
    if args.file:
        path = Path(args.file)
        if not path.is_file():
            raise DeltatuneError(f"--file '{path}' does not exist")
        texts += [
            line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()
        ]
    if not texts:
        raise DeltatuneError(
            'give texts to label with --text "..." (repeatable) or --file FILE (one per line), '
            "or images with --image FILE (repeatable)"
        )
    rows = predict_texts(args.run_dir, texts)
    for row in rows:
        if args.json:
            print(json.dumps(row))
        else:
            snippet = row["text"] if len(row["text"]) <= 60 else row["text"][:57] + "..."
            print(f"{row['label']}\t{row['score']:.3f}\t{snippet}")
    return 0


def _cmd_merge(args: argparse.Namespace) -> int:
    from deltatune.run import merge_run

    out = merge_run(args.run_dir, args.out_dir)
    if (out / "model.safetensors").is_file() and (out / "config.yaml").is_file():
        print(f"merged CNN written to {out} (model.safetensors: the ImageClassifier state dict)")
    else:
        print(
            f"merged model written to {out} (load it with transformers.AutoModelForSequenceClassification.from_pretrained)"
        )
    return 0


def methods_table() -> list[dict[str, Any]]:
    from deltatune.registry import methods

    rows = []
    for spec in methods().values():
        c = spec.capabilities
        rows.append(
            {
                "method": spec.name,
                "family": spec.family,
                "train": c.train,
                "merge": c.merge,
                "save": c.save,
                "peft_compatible": c.peft_compatible,
                "qlora": c.qlora,
                "multi_adapter": c.multi_adapter,
                "default_lr": spec.default_lr,
                "summary": spec.summary,
            }
        )
    return rows


def _cmd_methods(args: argparse.Namespace) -> int:
    rows = methods_table()
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    yes = {True: "yes", False: "-"}
    width = max(len(r["method"]) for r in rows) + 2
    header = (
        f"{'method':<{width}}{'family':<11}{'train':<7}{'merge':<7}{'save':<6}{'PEFT':<6}"
        f"{'QLoRA':<7}{'multi':<7}{'lr':<9}summary"
    )
    print(header)
    print("-" * len(header))
    for r in rows:
        print(
            f"{r['method']:<{width}}{r['family']:<11}{yes[r['train']]:<7}{yes[r['merge']]:<7}"
            f"{yes[r['save']]:<6}{yes[r['peft_compatible']]:<6}{yes[r['qlora']]:<7}"
            f"{yes[r['multi_adapter']]:<7}{r['default_lr']:<9g}{r['summary']}"
        )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="deltatune", description="Fine-tune pretrained models (full to parameter-efficient)."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="fine-tune (no config: LoRA on MiniLM + BBC News)")
    p.add_argument("config", nargs="?", help="YAML config (see configs/reference.yaml)")
    p.add_argument(
        "overrides", nargs="*", help="dotted key=value overrides, e.g. train.epochs=1 method.r=16"
    )
    p.add_argument("--resume", action="store_true", help="continue from output_dir/checkpoint")
    p.add_argument("--output-dir", help="shorthand for output_dir=...")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("eval", help="evaluate a trained run on a split of its data")
    p.add_argument("run_dir")
    p.add_argument("overrides", nargs="*", help="data.* overrides, e.g. data.source=other.csv")
    p.add_argument("--split", choices=["train", "val", "test"], default="test")
    p.set_defaults(func=_cmd_eval)

    p = sub.add_parser("predict", help="label texts (or images) with a trained run")
    p.add_argument("run_dir")
    p.add_argument("--text", action="append", help="a text to label (repeatable)")
    p.add_argument("--file", help="a file with one text per line")
    p.add_argument("--image", action="append", help="an image file to label (repeatable)")
    p.add_argument("--json", action="store_true", help="print JSON lines")
    p.set_defaults(func=_cmd_predict)

    p = sub.add_parser("merge", help="write a full model with the adapter merged in")
    p.add_argument("run_dir")
    p.add_argument("out_dir")
    p.set_defaults(func=_cmd_merge)

    p = sub.add_parser("methods", help="list the registered methods and what each supports")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_methods)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except DeltatuneError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except FileNotFoundError as exc:
        print(f"error: file not found: {exc.filename or exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(
            "interrupted; `deltatune train ... --resume` continues from the last checkpoint",
            file=sys.stderr,
        )
        return 130


if __name__ == "__main__":
    sys.exit(main())

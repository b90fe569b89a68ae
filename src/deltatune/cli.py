"""``deltatune`` command line: train, eval, predict, generate, merge, methods.

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
    from deltatune.train import distributed

    main_process = distributed.is_main()
    distributed.shutdown()  # under torchrun: every process is done; rank 0 reports
    if not main_process:
        return 0
    m = result.metrics
    out = result.output_dir
    if m.get("task") == "causal-lm":
        return _print_lm_summary(m, out)
    print()
    print(
        f"test accuracy      {m['test']['accuracy']:.4f}   (macro-F1 {m['test'].get('macro_f1', float('nan')):.4f}, "
        f"{m['train_examples']} training examples)"
    )
    print(f"validation acc.    {m['val']['accuracy']:.4f}")
    if m.get("forgetting"):
        f = m["forgetting"]
        print(
            f"forgetting         reference accuracy {f['accuracy_before']:.4f} -> "
            f"{f['accuracy_after']:.4f} (drop {f['accuracy_drop']:+.4f}), loss "
            f"{f['loss_before']:.4f} -> {f['loss_after']:.4f} ({m['reference_examples']} examples)"
        )
        if m.get("forgetting_isolated"):
            iso = m["forgetting_isolated"]
            print(
                f"  adapter off      reference accuracy {iso['accuracy_after']:.4f} "
                f"(drop {iso['accuracy_drop']:+.4f}): parameter isolation"
            )
    print(
        f"trainable params   {m['trainable_params']:,} of {m['total_params']:,} ({m['trainable_percent']:.3f}%)"
    )
    print(f"wall time          {m['wall_time_s']:.1f} s")
    print(f"adapter            {out / 'adapter_model.safetensors'} (+ adapter_config.json)")
    print(f"metrics            {out / 'metrics.json'}   per-step log {out / 'log.jsonl'}")
    if (out / PLOT_NAME).exists():
        print(f"plot               {out / PLOT_NAME}")
    return 0


def _cmd_multitask(args: argparse.Namespace) -> int:
    from deltatune.train.multitask import load_multitask_config, train_multitask

    overrides = list(args.overrides)
    if args.config is not None and "=" in args.config and not Path(args.config).exists():
        overrides.insert(0, args.config)
        args.config = None
    if args.output_dir:
        overrides.append(f"output_dir={args.output_dir}")
    cfg = load_multitask_config(args.config, overrides)
    if args.print_config:
        print(cfg.to_yaml(), end="")
        return 0
    m = train_multitask(cfg)
    print()
    for name in m["tasks"]:
        print(
            f"{name:<12} test accuracy {m['test'][f'{name}_accuracy']:.4f}   "
            f"(macro-F1 {m['test'][f'{name}_macro_f1']:.4f}, {m['tasks'][name]['train_examples']} "
            f"training examples) -> {Path(cfg.output_dir) / name}/"
        )
    print(f"mean test accuracy {m['test']['accuracy']:.4f}   wall time {m['wall_time_s']:.1f} s")
    print(f"combined folder    {cfg.output_dir}/ (multitask.json; load with load_multitask)")
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


def _print_lm_summary(m: dict[str, Any], out: Path) -> int:
    """The end of `deltatune train` for a causal-LM run: held-out loss before and after."""
    print()
    print(f"{'held-out':<18}{'loss':>8}{'perplexity':>12}{'token acc.':>12}")
    for name, r in (("test before", m["before"]["test"]), ("test after", m["test"])):
        print(f"{name:<18}{r['loss']:>8.4f}{r['perplexity']:>12.2f}{r['token_accuracy']:>12.4f}")
    print(
        f"validation         {m['before']['val']['loss']:.4f} -> {m['val']['loss']:.4f} "
        f"({m['train_examples']} training pairs, {m['steps']} steps)"
    )
    print(
        f"trainable params   {m['trainable_params']:,} of {m['total_params']:,} ({m['trainable_percent']:.3f}%)"
    )
    print(f"wall time          {m['wall_time_s']:.1f} s")
    print(f"adapter            {out / 'adapter_model.safetensors'} (+ adapter_config.json)")
    print(f'generate           deltatune generate {out} --prompt "..."')
    return 0


def _cmd_generate(args: argparse.Namespace) -> int:
    from deltatune.lm.generate import check_sampling, generate
    from deltatune.lm.sft import load_for_generation

    prompts: list[str] = list(args.prompt or [])
    if args.file:
        path = Path(args.file)
        if not path.is_file():
            raise DeltatuneError(f"--file '{path}' does not exist")
        prompts += [
            line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()
        ]
    if not prompts:
        raise DeltatuneError('give prompts with --prompt "..." (repeatable) or --file FILE')
    check_sampling(args.temperature, args.top_p, args.max_new_tokens)
    model, tokenizer, fmt = load_for_generation(
        args.run_dir, model=args.model, adapter=args.adapter, merged=args.merged
    )
    kwargs: dict[str, Any] = {
        "max_new_tokens": args.max_new_tokens,
        "temperature": args.temperature,
        "top_p": args.top_p,
        "seed": args.seed,
        "chat_template": fmt.chat_template and not args.no_chat_template,
        "system_prompt": args.system if args.system is not None else fmt.system_prompt,
    }
    if args.compare_base:  # before/after an adapter (e.g. DPO), one model in memory
        from deltatune.strategies.commands import compare_generate, print_comparison

        print_comparison(compare_generate(model, tokenizer, prompts, **kwargs), args.json)
        return 0
    many = len(prompts) > 1
    if args.no_stream or args.json:
        texts = generate(model, tokenizer, prompts, batch_size=args.batch_size, **kwargs)
        for prompt, text in zip(prompts, texts):
            if args.json:
                print(json.dumps({"prompt": prompt, "text": text}))
            else:
                print(f">>> {prompt}\n{text}\n" if many else text)
        return 0
    for prompt in prompts:  # one at a time, so that each answer streams in order
        if many:
            print(f">>> {prompt}")

        def show(_: int, text: str) -> None:
            sys.stdout.write(text)
            sys.stdout.flush()

        generate(model, tokenizer, [prompt], batch_size=1, stream=show, **kwargs)
        print("\n" if many else "")
    return 0


def _cmd_merge(args: argparse.Namespace) -> int:
    from deltatune.run import merge_run

    mode = "dequantize" if args.dequantize else "requantize" if args.requantize else None
    if mode is None and _run_is_quantized(args.run_dir):
        raise DeltatuneError(
            f"run '{args.run_dir}' has a quantised base, which cannot absorb the adapter exactly; "
            "pass --dequantize (merge into a float copy) or --requantize (merge, then "
            "re-quantise); both print the output change they introduce"
        )
    if mode is not None:
        from deltatune.run import merge_quantized_run

        qout, report = merge_quantized_run(args.run_dir, args.out_dir, mode, args.dtype)
        print(report)
        print(f"merged model written to {qout} (merge_report.json holds the numbers)")
        return 0
    out = merge_run(args.run_dir, args.out_dir)
    if (out / "model.safetensors").is_file() and (out / "config.yaml").is_file():
        print(f"merged CNN written to {out} (model.safetensors: the ImageClassifier state dict)")
    elif (out / "generation_config.json").is_file():
        print(
            f"merged model written to {out} (load it with transformers.AutoModelForCausalLM.from_pretrained)"
        )
    else:
        print(
            f"merged model written to {out} (load it with transformers.AutoModelForSequenceClassification.from_pretrained)"
        )
    return 0


def _run_is_quantized(run_dir: str) -> bool:
    """Whether a run's base is 4/8-bit (``method: qlora`` or ``model.quantize``)."""
    import yaml

    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        return False
    raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    model, method = raw.get("model") or {}, raw.get("method") or {}
    return bool(model.get("quantize")) or method.get("name") == "qlora"


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


def _config_and_overrides(args: argparse.Namespace) -> tuple[str | None, list[str]]:
    """``CONFIG key=value ...`` where CONFIG may be left out (then the first item is an override)."""
    config_path = args.config
    overrides = list(args.overrides)
    if config_path is not None and "=" in config_path and not Path(config_path).exists():
        overrides.insert(0, config_path)
        config_path = None
    if getattr(args, "output_dir", None):
        overrides.append(f"output_dir={args.output_dir}")
    return config_path, overrides


def _cmd_cv(args: argparse.Namespace) -> int:
    from deltatune.run import load_run_config
    from deltatune.train.cv import CV_FILE, cross_validate

    config_path, overrides = _config_and_overrides(args)
    if args.folds is not None:
        overrides.append(f"cv.folds={args.folds}")
    result = cross_validate(load_run_config(config_path, overrides))
    print(f"per-fold metrics   {result.output_dir / CV_FILE} (and cv.jsonl, fold_*/log.jsonl)")
    return 0


def _cmd_distill(args: argparse.Namespace) -> int:
    from deltatune.run import load_run_config
    from deltatune.train.distill import distill_run

    config_path, overrides = _config_and_overrides(args)
    if args.teacher:
        overrides.append(f"distill.teacher={args.teacher}")
    result = distill_run(load_run_config(config_path, overrides))
    d = result.metrics["distill"]
    print()
    print(f"{'':<9}{'test acc':>9}{'val acc':>9}{'params':>13}{'MiB':>8}{'ms/batch':>10}")
    for who in ("teacher", "student"):
        r = d[who]
        print(
            f"{who:<9}{r['test_accuracy']:>9.4f}{r['val_accuracy']:>9.4f}{r['params']:>13,}"
            f"{r['size_mb']:>8.1f}{r['latency_ms']:>10.1f}"
        )
    print(f"student run        {result.output_dir} (deltatune eval/predict/merge work on it)")
    return 0


def _cmd_prune(args: argparse.Namespace) -> int:
    from deltatune.prune import prune_run
    from deltatune.run import RUN_CONFIG_NAME, load_run_config

    source = Path(args.source)
    overrides = list(args.overrides)
    for flag in ("layers", "heads", "neurons", "magnitude", "recovery_steps"):
        value = getattr(args, flag)
        if value is not None:
            overrides.append(f"prune.{flag}={value}")
    if source.is_dir():
        if not (source / RUN_CONFIG_NAME).is_file():
            raise DeltatuneError(
                f"'{source}' is not a deltatune run folder (no {RUN_CONFIG_NAME}); give a "
                "`deltatune train` output_dir or a YAML config"
            )
        cfg = load_run_config(source / RUN_CONFIG_NAME, [f"prune.source={source}", *overrides])
        out = args.output_dir or f"{str(source).rstrip('/')}-pruned"
    else:
        cfg = load_run_config(source, overrides)
        out = args.output_dir or cfg.output_dir
    m = prune_run(cfg, out)
    print()
    print(f"{'':<11}{'params':>13}{'non-zero':>13}{'ms/batch':>10}{'val acc':>9}{'test acc':>9}")
    for stage in ("before", "pruned", "recovered"):
        r = m[stage]
        if r is None:
            continue
        print(
            f"{stage:<11}{r['params']:>13,}{r['nonzero_params']:>13,}{r['latency_ms']:>10.1f}"
            f"{r['val_accuracy']:>9.4f}{r['test_accuracy']:>9.4f}"
        )
    print(f"pruned model       {out} (model.safetensors + prune.json; deltatune.load_pruned)")
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
    quant = p.add_mutually_exclusive_group()
    quant.add_argument(
        "--dequantize",
        action="store_true",
        help="quantised base (QLoRA): merge into a float copy of the dequantised base",
    )
    quant.add_argument(
        "--requantize",
        action="store_true",
        help="quantised base (QLoRA): merge, then re-quantise with the base's scheme",
    )
    p.add_argument(
        "--dtype",
        default="float32",
        choices=["float32", "bfloat16", "float16"],
        help="--dequantize: dtype of the float copy (default float32)",
    )
    p.set_defaults(func=_cmd_merge)

    p = sub.add_parser(
        "generate", help="generate text with a causal-LM run or a decoder (+ adapter), streamed"
    )
    p.add_argument("run_dir", nargs="?", help="a causal-LM run folder (or use --model)")
    p.add_argument("--model", help="a decoder instead of a run: embedded-smollm2, folder, hub id")
    p.add_argument("--adapter", help="with --model: an adapter folder of any method")
    p.add_argument("--prompt", action="append", help="a prompt (repeatable)")
    p.add_argument("--file", help="a file with one prompt per line")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default 1)")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--seed", type=int, default=None, help="seed for sampling")
    p.add_argument("--batch-size", type=int, default=8, help="prompts per batch (--no-stream)")
    p.add_argument("--system", default=None, help="system prompt (default: the run's)")
    p.add_argument("--no-chat-template", action="store_true", help="plain 'User:/Assistant:'")
    p.add_argument("--merged", action="store_true", help="merge the adapter before generating")
    p.add_argument("--no-stream", action="store_true", help="batched; print when done")
    p.add_argument("--json", action="store_true", help="print JSON lines (implies --no-stream)")
    p.add_argument(
        "--compare-base",
        action="store_true",
        help="print each answer with the adapter off (base) and on, side by side",
    )
    p.set_defaults(func=_cmd_generate)

    p = sub.add_parser("cv", help="stratified k-fold cross-validation of a train config")
    p.add_argument("config", nargs="?", help="YAML config (its cv: section sets the folds)")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. cv.folds=3")
    p.add_argument("--folds", type=int, help="shorthand for cv.folds=...")
    p.add_argument("--output-dir", help="shorthand for output_dir=...")
    p.set_defaults(func=_cmd_cv)

    p = sub.add_parser("distill", help="train a student against a teacher's logits")
    p.add_argument("config", nargs="?", help="YAML config with a distill: section")
    p.add_argument("overrides", nargs="*", help="e.g. distill.student_layers=3 distill.alpha=0.7")
    p.add_argument("--teacher", help="shorthand for distill.teacher=... (a run folder)")
    p.add_argument("--output-dir", help="shorthand for output_dir=...")
    p.set_defaults(func=_cmd_distill)

    p = sub.add_parser("prune", help="prune a trained run (or a config's base), then recover")
    p.add_argument("source", help="a run folder (its adapter is merged) or a YAML config")
    p.add_argument("overrides", nargs="*", help="e.g. prune.heads=0.25 train.learning_rate=2e-5")
    p.add_argument("--layers", type=int, help="drop this many top blocks")
    p.add_argument("--heads", type=float, help="fraction of attention heads to remove")
    p.add_argument("--neurons", type=float, help="fraction of feed-forward neurons to remove")
    p.add_argument("--magnitude", type=float, help="fraction of block weights to zero")
    p.add_argument("--recovery-steps", type=int, help="steps of the recovery fine-tune")
    p.add_argument("--output-dir", help="where to write (default RUN_DIR-pruned)")
    p.set_defaults(func=_cmd_prune)

    from deltatune.strategies.commands import add_parsers as add_strategy_parsers

    add_strategy_parsers(sub)  # adapt, semisup, reward, dpo
    from deltatune.estimate import add_parser as add_estimate_parser

    add_estimate_parser(sub)  # estimate: memory / FLOPs / time of a training step

    from deltatune.advise import add_parser as add_advise_parser

    add_advise_parser(sub)

    from deltatune.compare import add_parser as add_compare_parser

    add_compare_parser(sub)

    p = sub.add_parser(
        "multitask", help="several tasks on one base, an adapter and a head per task"
    )
    p.add_argument("config", nargs="?", help="YAML config (see configs/multitask.yaml)")
    p.add_argument(
        "overrides", nargs="*", help="key=value overrides; data.<field>=v applies to every task"
    )
    p.add_argument("--output-dir", help="shorthand for output_dir=...")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.set_defaults(func=_cmd_multitask)

    p = sub.add_parser("methods", help="list the registered methods and what each supports")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_methods)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        # argparse gives a positional `overrides` list only the words before the first option, so
        # `train CONFIG --output-dir D key=value` would refuse `key=value`: take such words too.
        if hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
            args.overrides = [*(args.overrides or []), *extra]
        else:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
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

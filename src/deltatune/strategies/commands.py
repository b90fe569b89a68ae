"""The strategy subcommands of ``deltatune``: ``adapt``, ``semisup``, ``reward``, ``dpo``.

Each reads a strict YAML config (``configs/adapt-*.yaml``, ``semisup.yaml``, ``reward.yaml``,
``dpo.yaml``) plus dotted ``key=value`` overrides, like ``deltatune train``; ``--print-config``
shows the resolved config. :func:`compare_generate` backs ``deltatune generate
--compare-base`` (answers with the adapter disabled and enabled, side by side).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from torch import nn


def _split(args: argparse.Namespace) -> tuple[str | None, list[str]]:
    config, overrides = args.config, list(args.overrides)
    if config is not None and "=" in config and not Path(config).exists():
        overrides.insert(0, config)  # `deltatune adapt key=value` with no config file
        config = None
    if args.output_dir:
        overrides.append(f"output_dir={args.output_dir}")
    return config, overrides


def _run(
    loader: Callable[..., Any], runner: Callable[..., dict[str, Any]], args: argparse.Namespace
) -> int:
    config, overrides = _split(args)
    cfg = loader(config, overrides)
    if args.print_config:
        print(cfg.to_yaml(), end="")
        return 0
    metrics = runner(cfg)
    print(json.dumps(metrics, indent=2))
    print(f"written to {cfg.output_dir} (metrics.json)")
    return 0


def cmd_adapt(args: argparse.Namespace) -> int:
    from deltatune.strategies.adapt import adapt_run, load_adapt_config

    return _run(load_adapt_config, adapt_run, args)


def cmd_semisup(args: argparse.Namespace) -> int:
    from deltatune.strategies.semisup import load_semisup_config, semisup_run

    return _run(load_semisup_config, semisup_run, args)


def cmd_reward(args: argparse.Namespace) -> int:
    from deltatune.strategies.reward import load_reward_config, reward_run

    return _run(load_reward_config, reward_run, args)


def cmd_dpo(args: argparse.Namespace) -> int:
    from deltatune.strategies.dpo import dpo_run, load_dpo_config

    return _run(load_dpo_config, dpo_run, args)


_COMMANDS = {
    "adapt": (
        cmd_adapt,
        "domain-adaptive training on unlabelled text (mlm, simcse, causal-lm)",
        "configs/adapt-mlm.yaml",
    ),
    "semisup": (
        cmd_semisup,
        "few labels + unlabelled data: self-training or consistency",
        "configs/semisup.yaml",
    ),
    "reward": (
        cmd_reward,
        "train a reward model on preference pairs (Bradley-Terry)",
        "configs/reward.yaml",
    ),
    "dpo": (
        cmd_dpo,
        "direct preference optimisation of a decoder with an adapter",
        "configs/dpo.yaml",
    ),
}


def add_parsers(sub: Any) -> None:
    """Add the strategy subcommands to ``deltatune``'s subparsers."""
    for name, (func, help_text, example) in _COMMANDS.items():
        p = sub.add_parser(name, help=help_text)
        p.add_argument("config", nargs="?", help=f"YAML config (e.g. {example})")
        p.add_argument(
            "overrides", nargs="*", help="dotted key=value overrides, e.g. train.max_steps=20"
        )
        p.add_argument("--output-dir", help="shorthand for output_dir=...")
        p.add_argument(
            "--print-config", action="store_true", help="print the resolved config and exit"
        )
        p.set_defaults(func=func)


def compare_generate(
    model: nn.Module, tokenizer: Any, prompts: Sequence[str], **kwargs: Any
) -> list[dict[str, str]]:
    """Each prompt's answer from the base (adapters disabled) and with the adapters on.

    One model in memory: the base answers come from the same model inside
    :func:`deltatune.disabled`. Greedy decoding (the default) makes the two comparable.
    """
    from deltatune.errors import DeltatuneError
    from deltatune.lm.generate import generate
    from deltatune.model import adapter_names, disabled

    if not adapter_names(model):
        raise DeltatuneError(
            "--compare-base needs an adapter to switch off: give --adapter ADAPTER_DIR (or a run "
            "folder) and leave out --merged"
        )
    with disabled(model):
        before = generate(model, tokenizer, list(prompts), **kwargs)
    after = generate(model, tokenizer, list(prompts), **kwargs)
    return [{"prompt": p, "base": b, "adapter": a} for p, b, a in zip(prompts, before, after)]


def print_comparison(rows: list[dict[str, str]], as_json: bool) -> None:
    for row in rows:
        if as_json:
            print(json.dumps(row))
            continue
        print(f">>> {row['prompt']}")
        print(f"  [base]    {row['base']}")
        print(f"  [adapter] {row['adapter']}")
        print()

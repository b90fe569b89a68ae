r"""Incremental fine-tuning: start a run from a saved adapter or an earlier run (``init_from``).

Two cases, chosen by comparing the saved adapter's method with this run's::

    same adapter method (lora -> lora)      continue: the saved adapter is loaded trainable
                                            and trains further on the new data
    anything else (full -> freeze,          merge: the saved adapter is loaded and folded into
    lora -> bitfit, full -> lora, ...)      the base weights, then this run's method is
                                            injected fresh on top ("fine-tune, then freeze")

Methods that train the base in place (``full``, ``freeze``) always take the merge path: their
saved weights become the new base. A run's saved adapter is relative to *its* base, so
rebuilding a run (``deltatune eval``/``predict``/``merge``) first replays the chain of
``init_from`` runs it started from (:func:`restore_base`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from torch import nn

from deltatune.checkpoint import CONFIG_NAME, load_adapter, read_adapter_config
from deltatune.errors import CheckpointError, ConfigError, DeltatuneError
from deltatune.model import inject, unload
from deltatune.registry import MethodConfig, get_method

#: The methods that train the base weights in place (their saved "adapter" is the weights).
IN_PLACE_METHODS = ("full", "freeze", "features")


def _adapter_folder(init_from: str | Path) -> Path:
    folder = Path(init_from).expanduser()
    if not (folder / CONFIG_NAME).is_file():
        raise ConfigError(
            f"init_from: '{init_from}' holds no {CONFIG_NAME}; give a `deltatune train` output "
            "folder or a saved adapter folder"
        )
    return folder


def continues(init_from: str | Path, method_name: str) -> bool:
    """Whether a run with ``method_name`` continues the adapter at ``init_from`` (same adapter
    method) rather than merging it into the base first."""
    saved = read_adapter_config(_adapter_folder(init_from)).method_name
    return saved == method_name and method_name not in IN_PLACE_METHODS


def _run_config(folder: Path) -> Any:
    from deltatune.run import RUN_CONFIG_NAME, RunConfig

    path = folder / RUN_CONFIG_NAME
    return RunConfig.from_file(path) if path.is_file() else None


def check_labels(init_from: str | Path, label_names: list[str]) -> None:
    """An earlier run's labels must be this run's (the head is carried over)."""
    labels_path = Path(init_from) / "labels.json"
    if labels_path.is_file():
        saved = json.loads(labels_path.read_text(encoding="utf-8"))
        if saved != label_names:
            raise ConfigError(
                f"init_from: run '{init_from}' was trained on labels {saved}, this data has "
                f"{label_names}; use data with the same labels (continual.train_labels keeps "
                "every label in the head while training on some)"
            )


def merge_into_base(model: nn.Module, init_from: str | Path) -> None:
    """Load the adapter at ``init_from`` and fold it into the base weights (plain model after)."""
    folder = _adapter_folder(init_from)
    load_adapter(model, folder)
    try:
        unload(model, merge=True)
    except DeltatuneError as exc:
        raise ConfigError(
            f"init_from: the adapter at '{folder}' cannot be merged into the base ({exc}); "
            "continue it with the same method instead (method.name = its method)"
        ) from None


def restore_base(model: nn.Module, init_from: str | Path | None, method_name: str) -> None:
    """Bring a fresh base model to the weights a run with this ``init_from`` started from.

    Replays the earlier runs' chain (their own ``init_from``) and merges the adapter at
    ``init_from`` unless this run continues it.
    """
    if init_from is None:
        return
    folder = _adapter_folder(init_from)
    earlier = _run_config(folder)
    if earlier is not None and earlier.init_from is not None:
        restore_base(model, earlier.init_from, earlier.method_config().method_name)
    if not continues(folder, method_name):
        merge_into_base(model, folder)


def start_from(model: nn.Module, init_from: str | Path, method_cfg: MethodConfig) -> str:
    """Prepare ``model`` (a fresh base) for a run with ``init_from``; returns what it did.

    ``"continue"``: the saved adapter is loaded trainable (its own config wins over the run's
    method settings other than the name). ``"merge"``: the saved weights are folded into the
    base and ``method_cfg`` is injected.
    """
    method_name = method_cfg.method_name
    get_method(method_name)
    restore_base(model, init_from, method_name)
    if continues(init_from, method_name):
        try:
            load_adapter(model, _adapter_folder(init_from), is_trainable=True)
        except CheckpointError as exc:
            raise ConfigError(f"init_from: {exc}") from None
        return "continue"
    inject(model, method_cfg)
    return "merge"

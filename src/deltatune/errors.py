"""Errors that the CLI prints as one line (no traceback) and exits non-zero on.

Every message names the field, the value and the fix, e.g.
``unknown config key 'lora_alpah' in method; did you mean 'lora_alpha'?``.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class DeltatuneError(ValueError):
    """A user-facing error: bad config, bad file, bad target, missing asset."""


class ConfigError(DeltatuneError):
    """A config field has an unknown name or an invalid value."""


class CheckpointError(DeltatuneError):
    """An adapter or checkpoint file is missing, corrupt, or does not fit the model."""


class AssetError(DeltatuneError):
    """An embedded asset (model or dataset package) is not installed."""


def did_you_mean(name: str, choices: Iterable[str]) -> str:
    """Return ``"; did you mean 'x'?"`` for the closest choice, or ``""``."""
    close = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.6)
    return f"; did you mean '{close[0]}'?" if close else ""

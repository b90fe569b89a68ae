"""Plot a training log: loss per step (raw and smoothed) and validation metrics per evaluation.

Uses matplotlib's object API with the Agg canvas, so it never needs a display and never
changes the global pyplot backend of the caller.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from deltatune.io import write_with


def smooth(values: Sequence[float]) -> list[float]:
    """Bias-corrected exponential moving average, stronger for longer series.

    The weight grows with the series length (0 for 10 points or fewer, 0.9 at 100, capped at
    0.98) so short runs are shown as they are and long noisy runs get a readable trend.
    """
    n = len(values)
    beta = min(0.98, max(0.0, 1.0 - 10.0 / n)) if n else 0.0
    out: list[float] = []
    avg = 0.0
    for i, v in enumerate(values, start=1):
        avg = beta * avg + (1.0 - beta) * v
        out.append(avg / (1.0 - beta**i) if beta else v)
    return out


def _finite(rows: Sequence[Mapping[str, Any]], key: str) -> tuple[list[float], list[float]]:
    """(steps, values) of the rows that carry a finite ``key``."""
    xs: list[float] = []
    ys: list[float] = []
    for row in rows:
        value = row.get(key)
        if isinstance(value, int | float) and math.isfinite(value) and "step" in row:
            xs.append(float(row["step"]))
            ys.append(float(value))
    return xs, ys


def plot_history(
    log_rows: Sequence[Mapping[str, Any]], path: str | Path, *, title: str | None = None
) -> Path:
    """Write a PNG with training loss (left) and validation accuracy + loss (right).

    ``log_rows`` are the rows of ``log.jsonl`` (or ``TrainResult.history``): ``step``,
    ``loss`` and, on evaluation steps, ``val_accuracy``/``val_loss``. The file is written
    atomically. Returns the path written.
    """
    out = Path(path)
    fig = Figure(figsize=(11, 4.2), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    ax_loss, ax_val = fig.subplots(1, 2)

    steps, losses = _finite(log_rows, "loss")
    if steps:
        ax_loss.plot(steps, losses, color="tab:blue", alpha=0.3, linewidth=1, label="loss")
        ax_loss.plot(steps, smooth(losses), color="tab:blue", linewidth=2, label="smoothed")
        ax_loss.legend(loc="upper right")
    else:
        ax_loss.text(0.5, 0.5, "no training steps logged", ha="center", transform=ax_loss.transAxes)
    ax_loss.set_title("training loss")
    ax_loss.set_xlabel("optimizer step")
    ax_loss.set_ylabel("loss")
    ax_loss.grid(alpha=0.3)

    acc_steps, accs = _finite(log_rows, "val_accuracy")
    vloss_steps, vlosses = _finite(log_rows, "val_loss")
    ax_val.set_title("validation")
    ax_val.set_xlabel("optimizer step")
    ax_val.grid(alpha=0.3)
    handles = []
    if acc_steps:
        best = max(range(len(accs)), key=accs.__getitem__)
        label = f"accuracy (best {accs[best]:.3f} at step {acc_steps[best]:.0f})"
        handles += ax_val.plot(acc_steps, accs, "o-", color="tab:green", label=label)
        ax_val.plot(
            [acc_steps[best]], [accs[best]], "*", color="gold", markersize=16, markeredgecolor="k"
        )
        ax_val.set_ylabel("accuracy")
    if vloss_steps:
        ax_vloss = ax_val.twinx() if acc_steps else ax_val
        handles += ax_vloss.plot(vloss_steps, vlosses, "s--", color="tab:red", label="loss")
        ax_vloss.set_ylabel("loss")
    if handles:
        ax_val.legend(handles=handles, loc="center right")
    else:
        ax_val.text(0.5, 0.5, "no evaluations logged", ha="center", transform=ax_val.transAxes)
    if title:
        fig.suptitle(title)
    write_with(out, lambda tmp: fig.savefig(tmp, format="png"))
    return out

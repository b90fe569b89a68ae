"""One explicit, model-agnostic training loop with exact resume.

:func:`fit` trains any ``nn.Module`` on any map-style dataset through a :class:`Task` (which
turns a batch into a loss and a loader into metrics). It handles gradient accumulation,
clipping, mixed precision, a warmup schedule, periodic evaluation, early stopping that restores
the best weights, a JSON-lines log, and atomic checkpoints from which a crashed run resumes to
bit-identical weights: the data order is a function of (seed, epoch), and the checkpoint holds
the optimizer, scheduler, RNG and early-stopping state next to the trainable weights (and the
model's buffers, such as BatchNorm running statistics, which training also changes).

Checkpoints are safetensors + JSON only (nothing is pickled, so loading one runs no code).
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
import time
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence, Sized
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any, Literal, Protocol, TextIO

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file
from sklearn.metrics import f1_score
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from deltatune.config import BaseConfig
from deltatune.data.loader import SeededSampler, make_loader
from deltatune.errors import CheckpointError, ConfigError, DeltatuneError, did_you_mean
from deltatune.io import save_safetensors, write_text
from deltatune.train import distributed
from deltatune.train.optim import build_optimizer
from deltatune.train.schedule import build_scheduler, warmup_steps_for

#: File names inside ``output_dir``.
LOG_FILE = "log.jsonl"
CHECKPOINT_DIR = "checkpoint"
STATE_FILE = "trainer_state.json"
CHECKPOINT_FORMAT = "deltatune-trainer-checkpoint"
CHECKPOINT_VERSION = 1

#: Config fields that fix the batch order; resuming with other values cannot continue the run.
_RESUME_MUST_MATCH = ("batch_size", "grad_accum_steps", "seed")
#: Config fields free to differ on resume (they change neither the weights nor the order).
_RESUME_FREE = ("progress", "device", "checkpoint_every_steps", "eval_batch_size")

Precision = Literal["fp32", "bf16", "fp16"]


@dataclasses.dataclass
class TrainerConfig(BaseConfig):
    """How :func:`fit` trains.

    Fields:
        epochs: passes over the training set. Default ``3``.
        batch_size: examples per micro-batch (per forward/backward). Default ``16``.
        eval_batch_size: examples per evaluation batch. Default ``64``.
        learning_rate: peak learning rate; ``None`` means "the method's default", which the
            caller must fill in before :func:`fit` (which refuses ``None``). Default ``None``.
        weight_decay: AdamW decoupled weight decay (never applied to biases, norms or other
            1-D parameters). Default ``0.01``.
        warmup_ratio: fraction of the optimizer steps spent warming up linearly.
            Default ``0.06``.
        scheduler: decay after warmup: ``"linear"``, ``"cosine"`` or ``"constant"``.
            Default ``"linear"``.
        grad_accum_steps: micro-batches summed into one optimizer step (effective batch =
            ``batch_size * grad_accum_steps``). Default ``1``.
        max_grad_norm: clip the global gradient norm to this; ``None`` disables clipping.
            Default ``1.0``.
        precision: ``"fp32"``; ``"bf16"`` (autocast on CPU or CUDA); ``"fp16"`` (autocast
            with a GradScaler, CUDA only); ``"auto"`` (bf16 on a CUDA device that supports
            it, else fp32). Default ``"fp32"``.
        eval_every_steps: evaluate every N optimizer steps; ``None`` evaluates at the end of
            each epoch. The last step is always evaluated. Default ``None``.
        early_stopping_patience: stop after this many evaluations without improvement of
            ``metric_for_best`` and restore the best trainable weights; ``None`` trains to the
            end and keeps the final weights. Default ``None``.
        early_stopping_min_delta: an evaluation counts as an improvement only when it beats
            the best by more than this. Default ``0.0``.
        metric_for_best: the evaluation metric that picks the best step (with or without a
            ``val_`` prefix), e.g. ``"accuracy"``, ``"macro_f1"``, ``"loss"``.
            Default ``"accuracy"``.
        greater_is_better: whether a larger ``metric_for_best`` is better (set ``false`` for
            ``"loss"``). Default ``true``.
        checkpoint_every_steps: write a resumable checkpoint to ``output_dir/checkpoint/``
            every N optimizer steps, at each epoch end and at the end; ``None`` writes none.
            Default ``None``.
        layerwise_lr_decay: e.g. ``0.9``: block ``i`` of ``L`` trains at
            ``lr * decay ** (L - i)``, embeddings at ``lr * decay ** (L + 1)``, the head at
            ``lr``; ``None`` uses one rate. Default ``None``.
        head_lr_multiplier: the task head (a top-level ``classifier``/``score``/``fc``/``head``
            module) trains at ``learning_rate * head_lr_multiplier``; e.g. ``10`` for a new head
            on a pretrained network whose layers train at ``learning_rate``. Default ``1.0``.
        seed: seeds torch, numpy and ``random``, and fixes the data order. Default ``0``.
        max_steps: stop after this many optimizer steps (the schedule is fitted to it);
            ``None`` runs all epochs. Default ``None``.
        progress: show a progress bar with the loss and learning rate. Default ``true``.
        device: ``"auto"`` (CUDA when available, else CPU), or a torch device such as
            ``"cpu"``, ``"cuda"``, ``"cuda:1"``. Default ``"auto"``.
        distributed: more than one process (launch with ``torchrun``): ``"auto"`` (DDP when
            a process group with more than one process runs, else one process), ``"ddp"``,
            ``"fsdp"`` (CUDA only) or ``"none"``. ``batch_size`` is per process: the global
            batch is ``batch_size * world_size`` (see :mod:`deltatune.train.distributed`).
            Default ``"auto"``.
        optimizer: ``"adamw"`` (torch), or on CUDA bitsandbytes' ``"paged_adamw"`` /
            ``"paged_adamw_8bit"`` (optimiser states in unified memory that pages to CPU RAM
            under memory pressure, QLoRA's paged optimiser; see docs/qlora.md).
            Default ``"adamw"``.
        gradient_checkpointing: recompute each transformer block in backward instead of
            keeping its activations (transformers models). Default ``false``.
    """

    epochs: int = 3
    batch_size: int = 16
    eval_batch_size: int = 64
    learning_rate: float | None = None
    weight_decay: float = 0.01
    warmup_ratio: float = 0.06
    scheduler: Literal["cosine", "linear", "constant"] = "linear"
    grad_accum_steps: int = 1
    max_grad_norm: float | None = 1.0
    precision: Literal["fp32", "bf16", "fp16", "auto"] = "fp32"
    eval_every_steps: int | None = None
    early_stopping_patience: int | None = None
    early_stopping_min_delta: float = 0.0
    metric_for_best: str = "accuracy"
    greater_is_better: bool = True
    checkpoint_every_steps: int | None = None
    layerwise_lr_decay: float | None = None
    head_lr_multiplier: float = 1.0
    seed: int = 0
    max_steps: int | None = None
    progress: bool = True
    device: str = "auto"
    distributed: Literal["auto", "none", "ddp", "fsdp"] = "auto"
    optimizer: Literal["adamw", "paged_adamw", "paged_adamw_8bit"] = "adamw"
    gradient_checkpointing: bool = False

    def validate(self) -> None:
        """Raise :class:`ConfigError` naming the field, the value and the allowed range."""
        for name in ("epochs", "batch_size", "eval_batch_size", "grad_accum_steps"):
            if getattr(self, name) < 1:
                raise ConfigError(f"train.{name}: value {getattr(self, name)!r} must be >= 1")
        for name in (
            "eval_every_steps",
            "early_stopping_patience",
            "checkpoint_every_steps",
            "max_steps",
        ):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"train.{name}: value {value!r} must be >= 1 or null")
        lr = self.learning_rate
        if lr is not None and not (math.isfinite(lr) and lr > 0):
            raise ConfigError(f"train.learning_rate: value {lr!r} must be > 0 (e.g. 2e-5)")
        if not self.weight_decay >= 0:
            raise ConfigError(f"train.weight_decay: value {self.weight_decay!r} must be >= 0")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ConfigError(f"train.warmup_ratio: value {self.warmup_ratio!r} must be in [0, 1)")
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            raise ConfigError(
                f"train.max_grad_norm: value {self.max_grad_norm!r} must be > 0 or null (no clip)"
            )
        if not self.early_stopping_min_delta >= 0:
            raise ConfigError(
                f"train.early_stopping_min_delta: value {self.early_stopping_min_delta!r} "
                "must be >= 0"
            )
        decay = self.layerwise_lr_decay
        if decay is not None and not 0.0 < decay <= 1.0:
            raise ConfigError(
                f"train.layerwise_lr_decay: value {decay!r} must be in (0, 1] or null"
            )
        if not (math.isfinite(self.head_lr_multiplier) and self.head_lr_multiplier > 0):
            raise ConfigError(
                f"train.head_lr_multiplier: value {self.head_lr_multiplier!r} must be > 0 "
                "(1 = the same rate as the rest; e.g. 10)"
            )
        if self.scheduler not in ("cosine", "linear", "constant"):
            raise ConfigError(
                f"train.scheduler: value {self.scheduler!r} is not one of "
                "'cosine', 'linear', 'constant'"
            )
        if self.precision not in ("fp32", "bf16", "fp16", "auto"):
            raise ConfigError(
                f"train.precision: value {self.precision!r} is not one of "
                "'fp32', 'bf16', 'fp16', 'auto'"
            )
        if not self.metric_for_best:
            raise ConfigError("train.metric_for_best: must name a metric, e.g. 'accuracy'")
        if self.distributed not in ("auto", "none", "ddp", "fsdp"):
            raise ConfigError(
                f"train.distributed: value {self.distributed!r} is not one of "
                "'auto', 'none', 'ddp', 'fsdp'"
            )
        if not self.device:
            raise ConfigError("train.device: must be 'auto' or a torch device such as 'cpu'")


# --------------------------------------------------------------------------- tasks


class Task(Protocol):
    """What :func:`fit` needs to know about the problem: a loss and an evaluation.

    A task may also carry a ``metric_names`` tuple (the keys ``evaluate`` returns) so that
    :func:`fit` rejects a misspelt ``metric_for_best`` before training instead of after the
    first evaluation.
    """

    def loss(self, model: nn.Module, batch: Mapping[str, Any]) -> torch.Tensor:
        """The scalar training loss of ``model`` on one batch (already on the model's device)."""
        ...

    def evaluate(self, model: nn.Module, loader: Iterable[Any]) -> dict[str, float]:
        """Metrics of ``model`` over every batch of ``loader`` (must include ``loss``)."""
        ...


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter (CPU for a parameterless model)."""
    for param in model.parameters():
        return param.device
    return torch.device("cpu")


def move_to_device(batch: Any, device: torch.device) -> Any:
    """Move every tensor in a (nested) dict/list/tuple batch to ``device``."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, Mapping):
        return {k: move_to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, list | tuple):
        return type(batch)(move_to_device(v, device) for v in batch)
    return batch


def output_logits(output: Any) -> torch.Tensor:
    """Logits from a model output: a tensor, an object with ``.logits``, or a tuple's first."""
    if isinstance(output, torch.Tensor):
        return output
    logits = getattr(output, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    if isinstance(output, tuple | list) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise DeltatuneError(
        f"the model returned {type(output).__name__}; a classification model must return a "
        "logits tensor or an object with a .logits tensor"
    )


class ClassificationTask:
    """Single-label classification: cross-entropy on ``labels``; accuracy and macro-F1.

    The model is called with every batch entry except ``labels`` and may return logits
    ``(batch, num_labels)`` or an object with ``.logits`` (as transformers models do). Give
    ``num_labels`` so macro-F1 averages over every label, including ones absent from a small
    evaluation set.
    """

    #: The keys :meth:`evaluate` returns; :func:`fit` checks ``metric_for_best`` against them
    #: before training rather than at the first evaluation.
    metric_names = ("loss", "accuracy", "macro_f1")

    def __init__(self, num_labels: int | None = None, label_smoothing: float = 0.0) -> None:
        self.num_labels = num_labels
        self.label_smoothing = label_smoothing

    def _logits(self, model: nn.Module, batch: Mapping[str, Any]) -> torch.Tensor:
        if "labels" not in batch:
            raise DeltatuneError(
                f"the batch has no 'labels' (keys: {', '.join(batch)}); ClassificationTask "
                "needs integer labels"
            )
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        return output_logits(model(**inputs)).float()

    def loss(self, model: nn.Module, batch: Mapping[str, Any]) -> torch.Tensor:
        """Mean cross-entropy of the batch (computed in fp32 even under autocast)."""
        logits = self._logits(model, batch)
        return F.cross_entropy(logits, batch["labels"], label_smoothing=self.label_smoothing)

    def evaluate(self, model: nn.Module, loader: Iterable[Any]) -> dict[str, float]:
        """``loss`` (mean cross-entropy), ``accuracy`` and ``macro_f1`` over the loader."""
        device = model_device(model)
        was_training = model.training
        model.eval()
        total_loss = 0.0
        preds: list[torch.Tensor] = []
        golds: list[torch.Tensor] = []
        try:
            with torch.no_grad():
                for raw in loader:
                    batch = move_to_device(raw, device)
                    logits = self._logits(model, batch)
                    labels = batch["labels"]
                    total_loss += float(F.cross_entropy(logits, labels, reduction="sum"))
                    preds.append(logits.argmax(dim=-1).cpu())
                    golds.append(labels.cpu())
        finally:
            model.train(was_training)
        if not golds:
            raise DeltatuneError("the evaluation set is empty; give it at least one example")
        y_pred = torch.cat(preds).numpy()
        y_true = torch.cat(golds).numpy()
        labels_arg = list(range(self.num_labels)) if self.num_labels else None
        macro_f1 = f1_score(y_true, y_pred, labels=labels_arg, average="macro", zero_division=0)
        return {
            "loss": total_loss / len(y_true),
            "accuracy": float((y_pred == y_true).mean()),
            "macro_f1": float(macro_f1),
        }


# --------------------------------------------------------------------------- environment


def seed_everything(seed: int) -> None:
    """Seed python ``random``, numpy's global RNG and torch (CPU and every CUDA device)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def resolve_device(spec: str) -> torch.device:
    """``"auto"`` -> CUDA when available, else CPU; otherwise the named, available device."""
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except RuntimeError:
        raise ConfigError(
            f"train.device: value {spec!r} is not a torch device; use 'auto', 'cpu' or 'cuda'"
        ) from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            f"train.device: value {spec!r} but no CUDA device is available; use 'cpu'"
        )
    return device


def resolve_precision(precision: str, device: torch.device) -> Precision:
    """The concrete precision for ``device``; refuses combinations that cannot work."""
    cuda = device.type == "cuda"
    if precision == "auto":
        return "bf16" if cuda and torch.cuda.is_bf16_supported() else "fp32"
    if precision == "fp16":
        if not cuda:
            raise ConfigError(
                f"train.precision: 'fp16' needs a CUDA device (autocast with a GradScaler), "
                f"this run is on {device.type}; use 'bf16' or 'fp32'"
            )
        return "fp16"
    if precision == "bf16":
        if device.type not in ("cpu", "cuda"):
            raise ConfigError(f"train.precision: 'bf16' autocast is not supported on {device.type}")
        if cuda and not torch.cuda.is_bf16_supported():
            raise ConfigError(
                "train.precision: this CUDA device has no bf16 support; use 'fp16' or 'fp32'"
            )
        return "bf16"
    if precision == "fp32":
        return "fp32"
    raise ConfigError(f"train.precision: value {precision!r} is not fp32, bf16, fp16 or auto")


def autocast_context(device: torch.device, precision: Precision) -> AbstractContextManager[Any]:
    """Autocast for bf16/fp16, a no-op context for fp32."""
    if precision == "fp32":
        return nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


# --------------------------------------------------------------------------- results & state


@dataclasses.dataclass
class TrainResult:
    """What a finished :func:`fit` reports; ``history`` holds one row per optimizer step."""

    steps: int
    epochs: float
    best_metric: float | None
    best_step: int | None
    metric_for_best: str
    best_metrics: dict[str, float]
    last_metrics: dict[str, float]
    history: list[dict[str, float]]
    wall_time_s: float
    stopped_early: bool
    restored_best: bool


@dataclasses.dataclass
class _Progress:
    """Everything about the run's position that a checkpoint must carry (JSON-serialisable)."""

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    best_metric: float | None = None
    best_step: int | None = None
    best_metrics: dict[str, float] = dataclasses.field(default_factory=dict)
    last_metrics: dict[str, float] = dataclasses.field(default_factory=dict)
    evals_since_best: int = 0
    stopped_early: bool = False
    finished: bool = False
    elapsed_s: float = 0.0
    history: list[dict[str, float]] = dataclasses.field(default_factory=list)


Callback = Callable[[dict[str, float]], None]

# --------------------------------------------------------------------------- method hooks

#: Where :func:`add_training_hook` keeps a model's hooks (a plain dict in ``model.__dict__``,
#: so the hooks are neither submodules nor parameters and copy along with the model).
TRAINING_HOOKS_ATTR = "_deltatune_training_hooks"


def add_training_hook(model: nn.Module, key: str, hook: Any) -> None:
    """Attach a hook that :func:`fit` calls while training ``model`` (one per ``key``).

    A hook may define either or both of:

    - ``extra_loss(model) -> Tensor``: added to every micro-batch's loss (a regulariser, e.g.
      AdaLoRA's orthogonality term);
    - ``after_optimizer_step(model, step, total_steps)``: called after each optimizer step and
      before the gradients are cleared (``step`` counts from 1), e.g. AdaLoRA's rank allocator.

    Methods attach theirs in ``inject``; a hook whose adapter is gone should do nothing.
    """
    model.__dict__.setdefault(TRAINING_HOOKS_ATTR, {})[key] = hook


def training_hooks(model: nn.Module) -> list[Any]:
    """The hooks attached to ``model`` by :func:`add_training_hook`, in attach order."""
    return list(model.__dict__.get(TRAINING_HOOKS_ATTR, {}).values())


def read_log(path: str | Path) -> list[dict[str, float]]:
    """Read a ``log.jsonl`` written by :func:`fit` (one JSON object per line)."""
    rows = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        if line.strip():
            rows.append(json.loads(line))
    return rows


# --------------------------------------------------------------------------- checkpoints


def _flatten_optimizer(
    state: Mapping[str, Any],
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split an optimizer ``state_dict`` into named tensors and a JSON structure."""
    tensors: dict[str, torch.Tensor] = {}
    per_param: dict[str, Any] = {}
    for index, entry in state["state"].items():
        names: list[str] = []
        values: dict[str, Any] = {}
        for key, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optimizer.{index}.{key}"] = value
                names.append(key)
            else:
                values[key] = value
        per_param[str(index)] = {"tensors": names, "values": values}
    groups = [
        {k: list(v) if isinstance(v, tuple) else v for k, v in group.items()}
        for group in state["param_groups"]
    ]
    return tensors, {"state": per_param, "param_groups": groups}


def _unflatten_optimizer(
    structure: Mapping[str, Any], tensors: Mapping[str, torch.Tensor]
) -> dict[str, Any]:
    """Inverse of :func:`_flatten_optimizer`."""
    state: dict[int, dict[str, Any]] = {}
    for index, entry in structure["state"].items():
        values = dict(entry["values"])
        for key in entry["tensors"]:
            name = f"optimizer.{index}.{key}"
            if name not in tensors:
                raise CheckpointError(f"checkpoint optimizer state lacks tensor '{name}'")
            values[key] = tensors[name]
        state[int(index)] = values
    groups = [
        {k: tuple(v) if isinstance(v, list) and k != "params" else v for k, v in group.items()}
        for group in structure["param_groups"]
    ]
    return {"state": state, "param_groups": groups}


def _rng_state() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Every RNG the loop touches: torch CPU (+ CUDA devices), python ``random``, numpy."""
    tensors = {"rng.torch_cpu": torch.get_rng_state()}
    cuda_states = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []
    for i, s in enumerate(cuda_states):
        tensors[f"rng.cuda.{i}"] = s
    py_version, py_state, py_gauss = random.getstate()
    np_kind, np_keys, np_pos, np_has_gauss, np_cached = np.random.get_state(legacy=True)
    meta = {
        "python": [py_version, list(py_state), py_gauss],
        "numpy": {
            "kind": np_kind,
            "keys": [int(k) for k in np_keys],
            "pos": int(np_pos),
            "has_gauss": int(np_has_gauss),
            "cached_gaussian": float(np_cached),
        },
        "cuda_devices": len(cuda_states),
    }
    return tensors, meta


def _restore_rng(meta: Mapping[str, Any], tensors: Mapping[str, torch.Tensor]) -> None:
    """Put back the RNG states saved by :func:`_rng_state`."""
    torch.set_rng_state(tensors["rng.torch_cpu"])
    n_cuda = int(meta.get("cuda_devices", 0))
    if n_cuda and torch.cuda.is_available():
        if torch.cuda.device_count() != n_cuda:
            warnings.warn(
                f"checkpoint has CUDA RNG states for {n_cuda} devices, this machine has "
                f"{torch.cuda.device_count()}; dropout masks will differ from the original run",
                stacklevel=3,
            )
        else:
            torch.cuda.set_rng_state_all([tensors[f"rng.cuda.{i}"] for i in range(n_cuda)])
    py_version, py_state, py_gauss = meta["python"]
    random.setstate((py_version, tuple(py_state), py_gauss))
    np_meta = meta["numpy"]
    np.random.set_state(
        (
            np_meta["kind"],
            np.asarray(np_meta["keys"], dtype=np.uint32),
            np_meta["pos"],
            np_meta["has_gauss"],
            np_meta["cached_gaussian"],
        )
    )


def _write_checkpoint(
    ckpt_dir: Path,
    trainable: Sequence[tuple[str, nn.Parameter]],
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    scaler: torch.amp.GradScaler | None,
    progress: _Progress,
    best_weights: Mapping[str, torch.Tensor],
    cfg: TrainerConfig,
    num_train_examples: int,
    buffers: Sequence[tuple[str, torch.Tensor]] = (),
) -> None:
    """Write a checkpoint atomically: tensor files first, ``trainer_state.json`` last.

    The tensor files carry the step in their names and the state file names them, so a crash
    at any point leaves the previous state file pointing at its own complete files. Files no
    longer referenced are deleted only after the new state file is in place.
    """
    tag = f"{progress.step:08d}"
    model_file = f"model-{tag}.safetensors"
    trainer_file = f"trainer-{tag}.safetensors"
    meta = {"format": "pt", "step": str(progress.step)}
    save_safetensors(ckpt_dir / model_file, {n: p for n, p in trainable}, metadata=meta)
    opt_tensors, opt_structure = _flatten_optimizer(optimizer.state_dict())
    rng_tensors, rng_meta = _rng_state()
    tensors = {**opt_tensors, **rng_tensors}
    tensors.update({f"best.{n}": t for n, t in best_weights.items()})
    tensors.update({f"buffer.{n}": t for n, t in buffers})
    save_safetensors(ckpt_dir / trainer_file, tensors, metadata=meta)
    state = {
        "format": CHECKPOINT_FORMAT,
        "version": CHECKPOINT_VERSION,
        "files": {"model": model_file, "trainer": trainer_file},
        "progress": dataclasses.asdict(progress),
        "optimizer": opt_structure,
        "scheduler": {k: v for k, v in scheduler.state_dict().items() if k != "lr_lambdas"},
        "scaler": scaler.state_dict() if scaler is not None else None,
        "rng": rng_meta,
        "best_weights": sorted(best_weights),
        "buffers": [n for n, _ in buffers],
        "config": cfg.to_dict(),
        "num_train_examples": num_train_examples,
    }
    try:
        text = json.dumps(state, indent=1)
    except TypeError as exc:
        raise CheckpointError(f"training state holds a value JSON cannot store: {exc}") from None
    write_text(ckpt_dir / STATE_FILE, text + "\n")
    for stale in [*ckpt_dir.glob("*.safetensors"), *ckpt_dir.glob(".*.tmp")]:
        # Older steps' files, and temporaries left by a process killed mid-write.
        if stale.name not in (model_file, trainer_file):
            stale.unlink(missing_ok=True)


def _load_tensors(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise CheckpointError(f"checkpoint file '{path}' is missing; the checkpoint is incomplete")
    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"checkpoint file '{path}' is unreadable: {exc}") from None


def _check_resume_config(
    saved: Mapping[str, Any], cfg: TrainerConfig, n_train: int, n: int
) -> None:
    """Refuse a resume that cannot continue the run; warn about settings that changed."""
    now = cfg.to_dict()
    for key in _RESUME_MUST_MATCH:
        if key in saved and saved[key] != now[key]:
            raise CheckpointError(
                f"cannot resume: train.{key} was {saved[key]!r} in the checkpoint and is "
                f"{now[key]!r} now; resume with the same value or start a fresh run"
            )
    if n_train != n:
        raise CheckpointError(
            f"cannot resume: the checkpoint was trained on {n_train} examples, this training "
            f"set has {n}; resume with the same data or start a fresh run"
        )
    changed = [k for k in now if k not in _RESUME_FREE and k in saved and saved[k] != now[k]]
    if changed:
        warnings.warn(
            "resuming with changed settings ("
            + ", ".join(f"{k}: {saved[k]!r} -> {now[k]!r}" for k in changed)
            + "); the result will differ from an uninterrupted run",
            stacklevel=3,
        )


def _load_checkpoint(
    ckpt_dir: Path,
    trainable: Sequence[tuple[str, nn.Parameter]],
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    scaler: torch.amp.GradScaler | None,
    cfg: TrainerConfig,
    num_train_examples: int,
    buffers: Sequence[tuple[str, torch.Tensor]] = (),
) -> tuple[_Progress, dict[str, torch.Tensor], dict[str, Any], dict[str, torch.Tensor]]:
    """Load a checkpoint into the model, optimizer, scheduler and scaler.

    Returns (progress, best weights, RNG metadata, trainer tensors); the RNG is restored by the
    caller as the very last thing before training continues.
    """
    state_path = ckpt_dir / STATE_FILE
    if not state_path.is_file():
        raise DeltatuneError(
            f"cannot resume: no checkpoint in '{ckpt_dir}' ({STATE_FILE} is missing); run "
            "without resume, or set train.checkpoint_every_steps so that runs write checkpoints"
        )
    try:
        state = json.loads(state_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"checkpoint state '{state_path}' is not valid JSON: {exc}") from None
    if state.get("format") != CHECKPOINT_FORMAT or state.get("version") != CHECKPOINT_VERSION:
        raise CheckpointError(
            f"'{state_path}' is not a deltatune trainer checkpoint (version {CHECKPOINT_VERSION})"
        )
    _check_resume_config(state["config"], cfg, state["num_train_examples"], num_train_examples)

    weights = _load_tensors(ckpt_dir / state["files"]["model"])
    names = [n for n, _ in trainable]
    missing = [n for n in names if n not in weights]
    unexpected = [n for n in weights if n not in set(names)]
    if missing or unexpected:
        raise CheckpointError(
            "cannot resume: the checkpoint's trainable parameters do not match the model's "
            f"(missing {missing[:3]}{'...' if len(missing) > 3 else ''}, unexpected "
            f"{unexpected[:3]}{'...' if len(unexpected) > 3 else ''}); build the model and "
            "apply the same method as in the interrupted run"
        )
    for name, param in trainable:
        if weights[name].shape != param.shape:
            raise CheckpointError(
                f"cannot resume: parameter '{name}' has shape {tuple(weights[name].shape)} in "
                f"the checkpoint and {tuple(param.shape)} in the model"
            )
    with torch.no_grad():
        for name, param in trainable:
            param.copy_(weights[name])

    tensors = _load_tensors(ckpt_dir / state["files"]["trainer"])
    try:
        optimizer.load_state_dict(_unflatten_optimizer(state["optimizer"], tensors))
    except (ValueError, KeyError) as exc:
        raise CheckpointError(
            f"cannot resume: the checkpoint's optimizer state does not fit this model ({exc})"
        ) from None
    scheduler.load_state_dict(
        {**state["scheduler"], "lr_lambdas": [None] * len(scheduler.base_lrs)}
    )
    if scaler is not None and state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
    saved_buffers = set(state.get("buffers", []))  # absent in checkpoints of older versions
    with torch.no_grad():
        for name, buffer in buffers:
            if name in saved_buffers:
                buffer.copy_(tensors[f"buffer.{name}"])
    best = {n: tensors[f"best.{n}"] for n in state["best_weights"]}
    return _Progress(**state["progress"]), best, state["rng"], tensors


def _clear_stale_checkpoint(ckpt_dir: Path) -> None:
    """A fresh run in a folder with an old checkpoint: make the old one un-resumable first."""
    state_path = ckpt_dir / STATE_FILE
    if state_path.exists():
        warnings.warn(
            f"starting a fresh run: removing the previous checkpoint in '{ckpt_dir}' "
            "(pass resume=True to continue it instead)",
            stacklevel=3,
        )
        state_path.unlink()
    for stale in ckpt_dir.glob("*.safetensors") if ckpt_dir.is_dir() else []:
        stale.unlink()


# --------------------------------------------------------------------------- the loop


def _is_better(value: float, best: float | None, cfg: TrainerConfig) -> bool:
    if math.isnan(value):
        return False
    if best is None:
        return True
    delta = cfg.early_stopping_min_delta
    return value > best + delta if cfg.greater_is_better else value < best - delta


def _metric_key(cfg: TrainerConfig, metrics: Mapping[str, float]) -> str:
    key = cfg.metric_for_best.removeprefix("val_")
    if key not in metrics:
        raise ConfigError(
            f"train.metric_for_best: value {cfg.metric_for_best!r} is not a metric the task "
            f"reports ({', '.join(metrics)})" + did_you_mean(key, metrics)
        )
    return key


def _evaluate(
    model: nn.Module,
    task: Task,
    loader: Iterable[Any],
    device: torch.device,
    precision: Precision,
) -> dict[str, float]:
    """Run ``task.evaluate`` in eval mode, without gradients, under the run's autocast."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), autocast_context(device, precision):
            return task.evaluate(model, loader)
    finally:
        model.train(was_training)


def evaluate_dataset(
    model: nn.Module,
    task: Task,
    dataset: Dataset[Any],
    *,
    batch_size: int = 64,
    collate_fn: Callable[[list[Any]], Any] | None = None,
    precision: Precision = "fp32",
) -> dict[str, float]:
    """Evaluate ``model`` on a dataset (e.g. the test split) in eval mode, without gradients."""
    loader = make_loader(dataset, batch_size, False, 0, collate_fn)
    return _evaluate(model, task, loader, model_device(model), precision)


def fit(
    model: nn.Module,
    task: Task,
    train_dataset: Dataset[Any],
    val_dataset: Dataset[Any] | None,
    cfg: TrainerConfig,
    output_dir: Path | None = None,
    collate_fn: Callable[[list[Any]], Any] | None = None,
    resume: bool = False,
    *,
    callbacks: Sequence[Callback] = (),
) -> TrainResult:
    """Train the model's ``requires_grad`` parameters on ``train_dataset``.

    Evaluates on ``val_dataset`` (every epoch or every ``cfg.eval_every_steps``), tracks the
    best ``cfg.metric_for_best``, stops early and restores the best weights when
    ``cfg.early_stopping_patience`` is set, appends a row per optimizer step to
    ``output_dir/log.jsonl`` and writes checkpoints to ``output_dir/checkpoint/``. With
    ``resume=True`` it continues from that checkpoint and ends with exactly the weights an
    uninterrupted run would have. Each callback gets every step's log row after the step
    (and any evaluation and checkpoint) is done; an exception from it aborts the run.
    Never changes ``requires_grad``; moves the model to ``cfg.device``. Hooks a method attached
    with :func:`add_training_hook` add loss terms and run after each optimizer step.
    """
    cfg.validate()
    if cfg.learning_rate is None:
        raise ConfigError(
            "train.learning_rate: is null; set it (e.g. train.learning_rate=2e-5) or let the "
            "method supply its default before training"
        )
    device = resolve_device(cfg.device)
    # More than one process (torchrun): join the group, one device per process, DDP/FSDP.
    distributed.init_from_env(device)
    device = distributed.local_device(device)
    dist_mode = distributed.resolve_mode(cfg.distributed, device)
    if dist_mode == "fsdp" and (
        cfg.checkpoint_every_steps is not None or cfg.early_stopping_patience is not None
    ):
        raise ConfigError(
            "train.distributed: 'fsdp' keeps sharded weights, which the resumable checkpoints "
            "and early stopping's best-weight copy do not handle; set "
            "train.checkpoint_every_steps and train.early_stopping_patience to null, or use ddp"
        )
    writer = distributed.is_main()  # files are written once, by rank 0
    precision = resolve_precision(cfg.precision, device)
    if output_dir is None and (resume or cfg.checkpoint_every_steps is not None):
        what = "resume" if resume else "train.checkpoint_every_steps"
        raise ConfigError(f"{what} needs an output directory to keep checkpoints in")
    if val_dataset is None and cfg.early_stopping_patience is not None:
        raise ConfigError(
            "train.early_stopping_patience: early stopping needs a validation set; give one "
            "or set it to null"
        )
    if not isinstance(train_dataset, Sized) or len(train_dataset) == 0:
        raise DeltatuneError("the training set is empty (or has no length); give it examples")
    n_train = len(train_dataset)
    known_metrics = getattr(task, "metric_names", None)
    if val_dataset is not None and known_metrics is not None:
        _metric_key(cfg, dict.fromkeys(known_metrics, 0.0))

    seed_everything(cfg.seed)
    model.to(device)
    if dist_mode == "none":
        train_loader = make_loader(train_dataset, cfg.batch_size, True, cfg.seed, collate_fn)
    else:
        train_loader = distributed.sharded_loader(
            train_dataset, cfg.batch_size, cfg.seed, collate_fn
        )
    sampler = train_loader.sampler
    assert isinstance(sampler, SeededSampler)
    val_loader: DataLoader[Any] | None = None
    if val_dataset is not None:
        val_loader = make_loader(val_dataset, cfg.eval_batch_size, False, cfg.seed, collate_fn)

    accum = cfg.grad_accum_steps
    batches_per_epoch = math.ceil(n_train / (cfg.batch_size * distributed.world_size()))
    steps_per_epoch = math.ceil(batches_per_epoch / accum)
    total_steps = cfg.epochs * steps_per_epoch
    if cfg.max_steps is not None:
        total_steps = min(total_steps, cfg.max_steps)

    hooks = training_hooks(model)
    extra_losses = [h.extra_loss for h in hooks if callable(getattr(h, "extra_loss", None))]
    step_hooks = [h.after_optimizer_step for h in hooks if hasattr(h, "after_optimizer_step")]
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    params = [p for _, p in trainable]
    # Persistent buffers (BatchNorm running statistics) change in training too: checkpointed.
    param_names = {n for n, _ in model.named_parameters(remove_duplicate=False)}
    buffers = [(n, t) for n, t in model.state_dict(keep_vars=True).items() if n not in param_names]
    # Quantised base weights (QLoRA's NF4/int8 codes) are buffers that training never changes:
    # not copied for early stopping nor written into every checkpoint.
    constant = {
        f"{m_name}.{b_name}" if m_name else b_name
        for m_name, module in model.named_modules()
        if getattr(module, "constant_buffers", False)
        for b_name, _ in module.named_buffers(recurse=False)
    }
    buffers = [(n, t) for n, t in buffers if n not in constant]
    optimizer: torch.optim.Optimizer = build_optimizer(
        model, cfg.learning_rate, cfg.weight_decay, cfg.layerwise_lr_decay, cfg.head_lr_multiplier
    )
    if cfg.optimizer != "adamw":  # paged bitsandbytes AdamW (CUDA), same param groups
        from deltatune.quant.paged import build_named_optimizer

        optimizer = build_named_optimizer(cfg.optimizer, optimizer.param_groups, cfg.learning_rate)
    if cfg.gradient_checkpointing:
        from deltatune.quant.paged import enable_gradient_checkpointing

        enable_gradient_checkpointing(model)
    # Wrapped after the optimizer's groups are built: FSDP flattens the shards, which would
    # hide each weight's shape from the "no decay on 1-D parameters" rule; with
    # use_orig_params it keeps the same parameter objects, so the optimizer still holds them.
    wrapped = distributed.wrap(model, dist_mode, device)
    warmup = warmup_steps_for(total_steps, cfg.warmup_ratio)
    scheduler = build_scheduler(optimizer, cfg.scheduler, total_steps, warmup)
    scaler = torch.amp.GradScaler("cuda") if precision == "fp16" else None

    ckpt_dir = output_dir / CHECKPOINT_DIR if output_dir is not None else None
    log_path = output_dir / LOG_FILE if output_dir is not None else None
    progress = _Progress()
    best_weights: dict[str, torch.Tensor] = {}
    if resume:
        assert ckpt_dir is not None and log_path is not None
        progress, best_weights, rng_meta, rng_tensors = _load_checkpoint(
            ckpt_dir, trainable, optimizer, scheduler, scaler, cfg, n_train, buffers
        )
        # The log may hold rows written after the checkpoint; the checkpoint's history wins.
        if writer:
            write_text(log_path, "".join(json.dumps(row) + "\n" for row in progress.history))
        _restore_rng(rng_meta, rng_tensors)
    elif output_dir is not None:
        assert ckpt_dir is not None and log_path is not None
        output_dir.mkdir(parents=True, exist_ok=True)
        if writer:
            _clear_stale_checkpoint(ckpt_dir)
            write_text(log_path, "")

    if not writer:
        log_path = None
    log_fh: TextIO | None = open(log_path, "a", encoding="utf-8") if log_path else None  # noqa: SIM115
    bar = tqdm(
        total=total_steps,
        initial=progress.step,
        disable=not (cfg.progress and writer),
        desc="train",
        unit="step",
        dynamic_ncols=True,
    )
    was_training = model.training
    started = time.perf_counter() - progress.elapsed_s
    # A finished checkpoint resumes to "nothing left to do" unless epochs/max_steps grew.
    done = progress.stopped_early or progress.step >= total_steps
    model.train()
    try:
        while not done and progress.epoch < cfg.epochs:
            epoch = progress.epoch
            first = progress.batch_in_epoch
            sampler.set_epoch(epoch, start=first * cfg.batch_size)
            set_data_epoch = getattr(train_dataset, "set_epoch", None)
            if callable(set_data_epoch):  # datasets whose content varies by epoch (multi-task)
                set_data_epoch(epoch)
            window_losses: list[float] = []
            for b, raw in enumerate(train_loader, start=first):
                window_start = (b // accum) * accum
                window = min(accum, batches_per_epoch - window_start)
                batch = move_to_device(raw, device)
                # DDP/FSDP: gradients are averaged over the processes once per window.
                with distributed.no_sync(wrapped, b + 1 - window_start < window):
                    with autocast_context(device, precision):
                        loss = task.loss(wrapped, batch)
                        for extra_loss in extra_losses:
                            loss = loss + extra_loss(model)
                    loss_value = float(loss.detach())
                    if not math.isfinite(loss_value):
                        raise DeltatuneError(
                            f"the training loss became {loss_value} at step {progress.step + 1}; "
                            "lower train.learning_rate or use train.precision=fp32"
                        )
                    scaled = loss / window
                    (scaler.scale(scaled) if scaler is not None else scaled).backward()
                window_losses.append(loss_value)
                if b + 1 - window_start < window:
                    continue

                # ---- one optimizer step
                if scaler is not None:
                    scaler.unscale_(optimizer)
                grad_norm = None
                if cfg.max_grad_norm is not None and dist_mode == "fsdp":
                    # The norm over every process's shard, not just this one's.
                    clip = getattr(wrapped, "clip_grad_norm_")  # noqa: B009
                    grad_norm = float(clip(cfg.max_grad_norm))
                elif cfg.max_grad_norm is not None:
                    grad_norm = float(torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm))
                lr = max(float(g["lr"]) for g in optimizer.param_groups)
                if scaler is not None:
                    scaler.step(optimizer)
                    scaler.update()
                else:
                    optimizer.step()
                scheduler.step()
                for after_step in step_hooks:  # gradients are still there
                    after_step(model, progress.step + 1, total_steps)
                optimizer.zero_grad(set_to_none=True)

                progress.step += 1
                epoch_end = b + 1 == batches_per_epoch
                progress.epoch, progress.batch_in_epoch = (
                    (epoch + 1, 0) if epoch_end else (epoch, b + 1)
                )
                row: dict[str, float] = {
                    "step": progress.step,
                    "epoch": round(epoch + (b + 1) / batches_per_epoch, 4),
                    "loss": distributed.mean_over_processes(
                        sum(window_losses) / len(window_losses), device
                    ),
                    "lr": lr,
                }
                if grad_norm is not None:
                    row["grad_norm"] = grad_norm
                window_losses = []
                last_step = progress.step >= total_steps

                due = (
                    progress.step % cfg.eval_every_steps == 0
                    if cfg.eval_every_steps is not None
                    else epoch_end
                )
                if val_loader is not None and (due or last_step):
                    # FSDP's forward must go through the wrapper (it gathers the shards).
                    eval_model = wrapped if dist_mode == "fsdp" else model
                    metrics = _evaluate(eval_model, task, val_loader, device, precision)
                    row.update({f"val_{k}": v for k, v in metrics.items()})
                    progress.last_metrics = metrics
                    key = _metric_key(cfg, metrics)
                    if _is_better(metrics[key], progress.best_metric, cfg):
                        progress.best_metric = metrics[key]
                        progress.best_step = progress.step
                        progress.best_metrics = dict(metrics)
                        progress.evals_since_best = 0
                        if cfg.early_stopping_patience is not None:
                            # On CPU: the copy must not cost accelerator memory.
                            # Buffers too: BatchNorm statistics must match the best weights.
                            best_weights = {
                                n: p.detach().to("cpu", copy=True)
                                for n, p in [*trainable, *buffers]
                            }
                    else:
                        progress.evals_since_best += 1
                        patience = cfg.early_stopping_patience
                        if patience is not None and progress.evals_since_best >= patience:
                            progress.stopped_early = True

                progress.elapsed_s = time.perf_counter() - started
                row["elapsed_s"] = round(progress.elapsed_s, 3)
                progress.history.append(row)
                if log_fh is not None:
                    log_fh.write(json.dumps(row) + "\n")
                    log_fh.flush()
                done = last_step or progress.stopped_early
                progress.finished = done
                every = cfg.checkpoint_every_steps
                if (
                    writer
                    and ckpt_dir is not None
                    and every is not None
                    and (progress.step % every == 0 or epoch_end or done)
                ):
                    _write_checkpoint(
                        ckpt_dir,
                        trainable,
                        optimizer,
                        scheduler,
                        scaler,
                        progress,
                        best_weights,
                        cfg,
                        n_train,
                        buffers,
                    )
                postfix = {"loss": f"{row['loss']:.4f}", "lr": f"{lr:.2e}"}
                if progress.best_metric is not None:
                    postfix["best"] = f"{progress.best_metric:.4f}"
                bar.set_postfix(postfix, refresh=False)
                bar.update(1)
                for callback in callbacks:
                    callback(dict(row))
                if done:
                    break
    finally:
        bar.close()
        if log_fh is not None:
            log_fh.close()
        model.train(was_training)

    if dist_mode == "fsdp":
        distributed.unwrap_fsdp(wrapped, model)
    distributed.barrier()  # rank 0's files are complete before any process goes on
    restored = False
    if cfg.early_stopping_patience is not None and best_weights:
        with torch.no_grad():
            for name, tensor in [*trainable, *buffers]:
                if name in best_weights:  # checkpoints of older versions hold parameters only
                    tensor.copy_(best_weights[name])
        restored = True
    return TrainResult(
        steps=progress.step,
        epochs=progress.epoch + progress.batch_in_epoch / batches_per_epoch,
        best_metric=progress.best_metric,
        best_step=progress.best_step,
        metric_for_best=cfg.metric_for_best,
        best_metrics=progress.best_metrics,
        last_metrics=progress.last_metrics,
        history=progress.history,
        wall_time_s=time.perf_counter() - started,
        stopped_early=progress.stopped_early,
        restored_best=restored,
    )

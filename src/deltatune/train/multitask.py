r"""Multi-task fine-tuning: several tasks on one frozen base, each with its own adapter and head.

::

                          ┌─ adapter "topic" + head "topic" (5 labels) ─► topic logits
    frozen base model ────┤
                          └─ adapter "kind"  + head "kind"  (2 labels) ─► kind logits

Every task gets a named adapter (``dt.inject(model, cfg, adapter_name=task)``) whose
``modules_to_save`` copy of the classification head is resized to the task's labels. Each
training batch comes from one task, drawn with probability

    p_i = n_i^(1/T) / sum_j n_j^(1/T)

(``n_i`` the task's training examples; ``T = 1`` is proportional sampling, larger ``T``
flattens toward uniform, which up-samples small tasks). Before a batch the task's adapter is
made active, so only that task's adapter and head receive gradients from it.

An epoch has ``K = sum_i ceil(n_i / batch_size)`` batches (as many as the tasks would take one
after the other); task ``i`` gets ``round(K * p_i)`` of them (largest remainders, summing to
``K``), filled from a fresh seeded permutation of its examples each epoch, cycled when the task
is up-sampled. The trainer shuffles the order of the batches with its (seed, epoch) order, so
runs resume exactly.

Saved output (``save_multitask``): one folder per task, ``<out>/<task>/`` (a PEFT-format adapter
with its head, loadable on its own into a base whose head has that task's labels, by
``dt.load_adapter`` or ``peft``), and the combined folder ``<out>/`` itself with
``multitask.json`` (tasks, label names), which :func:`load_multitask` loads whole.
Methods that train the base in place (``full``, ``freeze``) cannot hold one copy per task and
are refused; use an adapter method (LoRA, IA3, BitFit, bottleneck adapters, ...).
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from sklearn.metrics import f1_score
from torch import nn
from torch.utils.data import Dataset

from deltatune.config import BaseConfig, apply_overrides, read_config_mapping
from deltatune.data import DataConfig, TextExamples, load_text_splits
from deltatune.errors import ConfigError, DeltatuneError
from deltatune.io import write_json, write_text
from deltatune.layers import ModulesToSave
from deltatune.model import adapter_layers, inject, set_active, state_of
from deltatune.models import ModelConfig
from deltatune.registry import MethodConfig, config_from_dict, get_method
from deltatune.train.trainer import (
    TrainerConfig,
    fit,
    model_device,
    move_to_device,
    output_logits,
)

MULTITASK_FILE = "multitask.json"
_NAME = re.compile(r"^[A-Za-z0-9_-]+$")


# --------------------------------------------------------------------------- config


def _default_task_data() -> DataConfig:
    return DataConfig(max_length=64)


@dataclasses.dataclass
class TaskConfig(BaseConfig):
    """One task: a name, its data, and optionally a relabelling of the data's labels.

    ``label_map`` maps the data's label names to this task's (several may map to one); examples
    whose label is not a key are dropped. ``None`` keeps the data's labels.
    """

    name: str = "task"
    data: DataConfig = dataclasses.field(default_factory=_default_task_data)
    label_map: dict[str, str] | None = None

    def validate(self) -> None:
        if not _NAME.match(self.name) or self.name == "default":
            raise ConfigError(
                f"tasks[].name: value {self.name!r} must be letters, digits, '_' or '-' (and not "
                "'default'); it names the task's adapter and folder"
            )
        if self.label_map is not None and len(set(self.label_map.values())) < 2:
            raise ConfigError(
                f"tasks[{self.name}].label_map: maps to {sorted(set(self.label_map.values()))}; "
                "a task needs at least 2 labels"
            )


def _default_tasks() -> list[TaskConfig]:
    # The embedded demo: BBC News twice, as its 5 topics and as "hard" vs "soft" news.
    return [
        TaskConfig(name="topic", data=DataConfig(max_length=64)),
        TaskConfig(
            name="kind",
            data=DataConfig(max_length=64),
            label_map={
                "business": "hard",
                "politics": "hard",
                "tech": "hard",
                "entertainment": "soft",
                "sports": "soft",
            },
        ),
    ]


def _default_method() -> dict[str, Any]:
    return {"name": "lora", "r": 8, "lora_alpha": 16, "target_modules": ["query", "value"]}


@dataclasses.dataclass
class MultiTaskRunConfig(BaseConfig):
    """A ``deltatune multitask`` run: one base model, several tasks, one adapter method.

    ``train.batch_size`` is the examples per (single-task) batch; ``temperature`` the sampling
    temperature ``T`` (1 = proportional to the tasks' sizes).
    """

    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    tasks: list[TaskConfig] = dataclasses.field(default_factory=_default_tasks)
    method: dict[str, Any] = dataclasses.field(default_factory=_default_method)
    train: TrainerConfig = dataclasses.field(
        default_factory=lambda: TrainerConfig(epochs=2, eval_every_steps=None)
    )
    temperature: float = 1.0
    output_dir: str = "runs/multitask"

    def validate(self) -> None:
        if len(self.tasks) < 2:
            raise ConfigError(f"tasks: {len(self.tasks)} task(s) given; multi-task needs >= 2")
        names = [t.name for t in self.tasks]
        if len(set(names)) != len(names):
            raise ConfigError(f"tasks: names must differ, got {names}")
        if not (math.isfinite(self.temperature) and self.temperature > 0):
            raise ConfigError(
                f"temperature: value {self.temperature!r} must be > 0 (1 = proportional)"
            )
        check_method(self.method_config())

    def method_config(self) -> MethodConfig:
        return config_from_dict(self.method, where="method")

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        out["tasks"] = [t.to_dict() for t in self.tasks]
        return out


def check_method(config: MethodConfig) -> None:
    spec = get_method(config.method_name)
    if not spec.capabilities.multi_adapter or spec.fit is not None:
        raise ConfigError(
            f"method.name: '{spec.name}' trains one shared set of weights (no named adapters), "
            "so tasks cannot each have their own; use an adapter method such as lora, ia3, "
            "bitfit, houlsby, pfeiffer or parallel_adapter"
        )
    if config.method_name == "fusion":
        raise ConfigError(
            "method.name: 'fusion' combines adapters already trained; train the tasks' adapters "
            "with multi-task first, then fuse them"
        )


def load_multitask_config(path: str | Path | None, overrides: list[str]) -> MultiTaskRunConfig:
    """Read a YAML config (or the embedded demo) and apply ``key=value`` overrides.

    ``data.<field>=value`` overrides apply to every task's data (e.g. ``data.max_train_examples``).
    """

    data: dict[str, Any] = MultiTaskRunConfig().to_dict()
    if path is not None:
        user = read_config_mapping(path, "a mapping (model, tasks, method, train)")
        for key, value in user.items():
            if isinstance(value, dict) and isinstance(data.get(key), dict) and key != "method":
                data[key] = {**data[key], **value}
            else:
                data[key] = value
    for text in overrides:
        key, _, value = text.partition("=")
        if key.strip() == "method.name" and value.strip() != str(data["method"].get("name")):
            data["method"] = {}  # switching method drops the previous method's settings
    per_task = [o for o in overrides if o.startswith("data.")]
    rest = [o for o in overrides if not o.startswith("data.")]
    data = apply_overrides(data, rest)
    for task in data.get("tasks") or []:
        if isinstance(task, dict):
            task["data"] = apply_overrides(dict(task.get("data") or {}), [o[5:] for o in per_task])
    return MultiTaskRunConfig.from_dict(data, where=Path(path).name if path else "config")


# --------------------------------------------------------------------------- data


def task_probabilities(sizes: Mapping[str, int], temperature: float = 1.0) -> dict[str, float]:
    """``p_i = n_i^(1/T) / sum_j n_j^(1/T)``."""
    if not temperature > 0:
        raise ConfigError(f"temperature: value {temperature!r} must be > 0")
    weights = {k: float(n) ** (1.0 / temperature) for k, n in sizes.items()}
    total = sum(weights.values())
    return {k: w / total for k, w in weights.items()}


def batch_counts(
    sizes: Mapping[str, int], batch_size: int, temperature: float = 1.0
) -> dict[str, int]:
    """Batches per epoch for each task: ``round(K * p_i)`` by largest remainders, summing to
    ``K = sum_i ceil(n_i / batch_size)``."""
    total = sum(math.ceil(n / batch_size) for n in sizes.values())
    probs = task_probabilities(sizes, temperature)
    raw = {k: total * p for k, p in probs.items()}
    counts = {k: math.floor(v) for k, v in raw.items()}
    by_remainder = sorted(raw, key=lambda k: raw[k] - counts[k], reverse=True)
    for k in by_remainder[: total - sum(counts.values())]:
        counts[k] += 1
    return counts


class TaskBatches(Dataset[tuple[str, list[Any]]]):
    """A dataset whose items are whole single-task batches: ``(task name, [examples])``.

    Training (``shuffle=True``): each epoch (:meth:`set_epoch`, which :func:`fit` calls) holds
    :func:`batch_counts` batches per task, from a seeded permutation of the task's examples.
    Evaluation (``shuffle=False``): every example once, task after task, in order.
    """

    def __init__(
        self,
        datasets: Mapping[str, Dataset[Any]],
        batch_size: int,
        *,
        temperature: float = 1.0,
        shuffle: bool = True,
        seed: int = 0,
    ) -> None:
        if batch_size < 1:
            raise ConfigError(f"train.batch_size: value {batch_size!r} must be >= 1")
        self.datasets = dict(datasets)
        self.sizes = {k: len(d) for k, d in self.datasets.items()}  # type: ignore[arg-type]
        empty = [k for k, n in self.sizes.items() if n == 0]
        if empty:
            raise DeltatuneError(f"task(s) {empty} have no examples")
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.temperature = temperature
        self.counts = (
            batch_counts(self.sizes, batch_size, temperature)
            if shuffle
            else {k: math.ceil(n / batch_size) for k, n in self.sizes.items()}
        )
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        """Draw this epoch's batches (a function of the seed and the epoch only)."""
        self.epoch = epoch
        plan: list[tuple[str, list[int]]] = []
        for t, (name, n) in enumerate(self.sizes.items()):
            k = self.counts[name]
            if not self.shuffle:
                order = list(range(n))
                plan += [
                    (name, order[i : i + self.batch_size]) for i in range(0, n, self.batch_size)
                ]
                continue
            gen = torch.Generator().manual_seed((self.seed * 1_000_003 + epoch) * 101 + t)
            need = k * self.batch_size
            rounds = -(-need // n)
            order = torch.cat([torch.randperm(n, generator=gen) for _ in range(rounds)]).tolist()
            # Proportional sampling uses each example once (the last batch may be short).
            used = order[: min(need, n)] if k == math.ceil(n / self.batch_size) else order[:need]
            plan += [
                (name, used[i : i + self.batch_size]) for i in range(0, len(used), self.batch_size)
            ]
        self.plan = plan

    def __len__(self) -> int:
        return sum(self.counts.values())

    def __getitem__(self, index: int) -> tuple[str, list[Any]]:
        name, idx = self.plan[index]
        data = self.datasets[name]
        return name, [data[i] for i in idx]


class TaskCollator:
    """Collate one :class:`TaskBatches` item (the trainer's batch size is 1) into
    ``{"task": name, **collate(examples)}``."""

    def __init__(self, collate: Callable[[list[Any]], dict[str, Any]]) -> None:
        self.collate = collate

    def __call__(self, items: list[tuple[str, list[Any]]]) -> dict[str, Any]:
        if len(items) != 1:
            raise DeltatuneError(
                "TaskBatches items are whole batches: use a loader batch size of 1"
            )
        name, examples = items[0]
        return {"task": name, **self.collate(examples)}


# --------------------------------------------------------------------------- model


def _head_path(model: nn.Module) -> str:
    from deltatune.model import SEQ_CLS_HEADS

    for name, module in model.named_modules():
        leaf = name.split(".")[-1]
        if leaf in SEQ_CLS_HEADS and isinstance(module, nn.Linear | ModulesToSave):
            return name
    raise ConfigError(
        f"{type(model).__name__} has no 'classifier' or 'score' head; multi-task needs a "
        "sequence-classification model"
    )


@contextmanager
def _base_head_sized(model: nn.Module, num_labels: int) -> Iterator[None]:
    """Temporarily make the base head output ``num_labels``, so that an adapter injected or
    loaded meanwhile copies a head of that size (``ModulesToSave`` copies the base head)."""
    from deltatune.targeting import set_submodule

    path = _head_path(model)
    holder = model.get_submodule(path)
    wrapped = isinstance(holder, ModulesToSave)
    old = holder.base_layer if wrapped else holder
    assert isinstance(old, nn.Linear)
    new = nn.Linear(old.in_features, num_labels, bias=old.bias is not None)
    new = new.to(device=old.weight.device, dtype=old.weight.dtype).requires_grad_(False)
    if wrapped:
        holder.base_layer = new
    else:
        set_submodule(model, path, new)
    try:
        yield
    finally:
        holder = model.get_submodule(path)
        if isinstance(holder, ModulesToSave):
            holder.base_layer = old
        else:
            set_submodule(model, path, old)


def _task_config(config: MethodConfig) -> MethodConfig:
    # Each task's head is the adapter's modules_to_save copy of the classifier.
    return config.replace(task_type="SEQ_CLS") if config.task_type is None else config


def add_task(model: nn.Module, config: MethodConfig, name: str, num_labels: int) -> None:
    """Inject a task's adapter and a new head with ``num_labels`` outputs (``name`` = both)."""
    check_method(config)
    with _base_head_sized(model, num_labels):
        inject(model, _task_config(config), adapter_name=name)


def task_parameters(model: nn.Module, name: str) -> list[nn.Parameter]:
    """The parameters of one task (its adapter and head), whatever is active."""
    out: list[nn.Parameter] = []
    for _, layer in adapter_layers(model):
        for attr in layer.adapter_attributes:
            holder = getattr(layer, attr)
            if name in holder:
                entry = holder[name]
                out += [entry] if isinstance(entry, nn.Parameter) else list(entry.parameters())
    return out


def make_all_trainable(model: nn.Module, names: Iterable[str]) -> None:
    """Mark every task's parameters trainable (``set_active`` freezes the inactive ones), so
    the optimizer holds them all; during training only the active task's get gradients."""
    for name in names:
        for p in task_parameters(model, name):
            p.requires_grad_(True)


class MultiTaskObjective:
    """The trainer's task for :class:`TaskBatches`: activate the batch's task, then
    cross-entropy; evaluation reports each task's metrics and their means."""

    metric_names = ("loss", "accuracy", "macro_f1")

    def __init__(self, num_labels: Mapping[str, int]) -> None:
        self.num_labels = dict(num_labels)

    @staticmethod
    def _activate(model: nn.Module, name: str) -> None:
        inner = getattr(model, "module", model)  # a DDP wrapper holds the model in .module
        if state_of(inner).active != [name]:
            set_active(inner, name)

    def _logits(self, model: nn.Module, batch: Mapping[str, Any]) -> torch.Tensor:
        name = batch["task"]
        if name not in self.num_labels:
            raise DeltatuneError(f"batch of unknown task {name!r} (tasks: {list(self.num_labels)})")
        self._activate(model, name)
        inputs = {k: v for k, v in batch.items() if k not in ("labels", "task")}
        return output_logits(model(**inputs)).float()

    def loss(self, model: nn.Module, batch: Mapping[str, Any]) -> torch.Tensor:
        return F.cross_entropy(self._logits(model, batch), batch["labels"])

    def evaluate(self, model: nn.Module, loader: Iterable[Any]) -> dict[str, float]:
        device = model_device(model)
        was_training = model.training
        model.eval()
        losses: dict[str, float] = {}
        preds: dict[str, list[torch.Tensor]] = {}
        golds: dict[str, list[torch.Tensor]] = {}
        try:
            with torch.no_grad():
                for raw in loader:
                    batch = move_to_device(raw, device)
                    name = batch["task"]
                    logits = self._logits(model, batch)
                    losses[name] = losses.get(name, 0.0) + float(
                        F.cross_entropy(logits, batch["labels"], reduction="sum")
                    )
                    preds.setdefault(name, []).append(logits.argmax(-1).cpu())
                    golds.setdefault(name, []).append(batch["labels"].cpu())
        finally:
            model.train(was_training)
        if not golds:
            raise DeltatuneError("the evaluation set is empty")
        out: dict[str, float] = {}
        for name in golds:
            y_true = torch.cat(golds[name]).numpy()
            y_pred = torch.cat(preds[name]).numpy()
            out[f"{name}_loss"] = losses[name] / len(y_true)
            out[f"{name}_accuracy"] = float((y_true == y_pred).mean())
            out[f"{name}_macro_f1"] = float(
                f1_score(
                    y_true,
                    y_pred,
                    labels=list(range(self.num_labels[name])),
                    average="macro",
                    zero_division=0,
                )
            )
        for key in ("loss", "accuracy", "macro_f1"):
            out[key] = sum(out[f"{n}_{key}"] for n in golds) / len(golds)
        return out


# --------------------------------------------------------------------------- save / load


def save_multitask(
    model: nn.Module, save_dir: str | Path, label_names: Mapping[str, list[str]]
) -> Path:
    """One folder per task (``<dir>/<task>/``, PEFT format, head included) and the combined
    folder ``<dir>`` with ``multitask.json``."""
    from deltatune.checkpoint import save_adapter

    out = Path(save_dir)
    for name, labels in label_names.items():
        save_adapter(model, out / name, name)
        write_json(out / name / "labels.json", labels)
    write_json(
        out / MULTITASK_FILE,
        {
            "format": "deltatune-multitask",
            "tasks": [{"name": n, "labels": names} for n, names in label_names.items()],
        },
    )
    return out


def read_multitask(folder: str | Path) -> dict[str, list[str]]:
    """Task name -> label names of a :func:`save_multitask` folder."""
    path = Path(folder) / MULTITASK_FILE
    if not path.is_file():
        raise DeltatuneError(
            f"'{folder}' holds no {MULTITASK_FILE}; give a multi-task output folder"
        )
    data = json.loads(path.read_text(encoding="utf-8"))
    return {t["name"]: list(t["labels"]) for t in data["tasks"]}


def load_multitask(model: nn.Module, folder: str | Path) -> dict[str, list[str]]:
    """Load every task's adapter and head of a :func:`save_multitask` folder into ``model``
    (a base classifier with any number of labels); returns task -> label names."""
    from deltatune.checkpoint import load_adapter

    tasks = read_multitask(folder)
    for name, labels in tasks.items():
        with _base_head_sized(model, len(labels)):
            load_adapter(model, Path(folder) / name, name)
    set_active(model, next(iter(tasks)))
    return tasks


# --------------------------------------------------------------------------- a whole run


def relabel(
    examples: TextExamples, names: list[str], mapping: Mapping[str, str] | None
) -> tuple[TextExamples, list[str]]:
    """Apply a task's ``label_map`` (drop unmapped examples); return examples and label names."""
    if mapping is None:
        return examples, names
    unknown = [k for k in mapping if k not in names]
    if unknown:
        raise ConfigError(
            f"tasks[].label_map: label(s) {unknown} are not in the data (labels: {', '.join(names)})"
        )
    new_names = sorted(set(mapping.values()))
    texts, labels = [], []
    for text, y in zip(examples.texts, examples.labels):
        if names[y] in mapping:
            texts.append(text)
            labels.append(new_names.index(mapping[names[y]]))
    return TextExamples(texts, labels), new_names


def train_multitask(cfg: MultiTaskRunConfig, *, echo: Any = print) -> dict[str, Any]:
    """Train every task of ``cfg`` on one base; write the folders; return the metrics."""
    from deltatune.data import PadCollator, TokenizedDataset, make_loader
    from deltatune.models import load_classifier, load_tokenizer
    from deltatune.train.distributed import env_world_size

    if env_world_size() > 1:
        raise ConfigError(
            "multitask: runs in one process (each batch trains one task's adapter, which DDP's "
            "gradient averaging across processes would mix); launch it without torchrun"
        )
    start = time.perf_counter()
    out = Path(cfg.output_dir)
    tokenizer = load_tokenizer(cfg.model)
    splits: dict[str, dict[str, Dataset[Any]]] = {}
    labels: dict[str, list[str]] = {}
    for task in cfg.tasks:
        s = load_text_splits(task.data)
        parts: dict[str, Dataset[Any]] = {}
        for split in ("train", "val", "test"):
            examples, names = relabel(getattr(s, split), s.label_names, task.label_map)
            parts[split] = TokenizedDataset(examples, tokenizer, task.data.max_length)
        splits[task.name] = parts
        labels[task.name] = names
    method_cfg = cfg.method_config()
    if method_cfg.base_model_name_or_path is None:
        method_cfg = method_cfg.replace(base_model_name_or_path=cfg.model.name_or_path)
    model = load_classifier(cfg.model, labels[cfg.tasks[0].name])
    for task in cfg.tasks:
        add_task(model, method_cfg, task.name, len(labels[task.name]))
    make_all_trainable(model, labels)
    spec = get_method(method_cfg.method_name)
    train_cfg = cfg.train
    if train_cfg.learning_rate is None:
        train_cfg = train_cfg.replace(learning_rate=spec.default_lr)
    objective = MultiTaskObjective({k: len(v) for k, v in labels.items()})
    collate = TaskCollator(PadCollator(tokenizer))

    def batches(split: str, batch_size: int, shuffle: bool) -> TaskBatches:
        return TaskBatches(
            {k: v[split] for k, v in splits.items()},
            batch_size,
            temperature=cfg.temperature,
            shuffle=shuffle,
            seed=cfg.train.seed,
        )

    train = batches("train", cfg.train.batch_size, True)
    echo(
        "multi-task: "
        + ", ".join(
            f"{k} ({len(labels[k])} labels, {train.sizes[k]} examples, {train.counts[k]} batches/epoch)"
            for k in labels
        )
    )
    out.mkdir(parents=True, exist_ok=True)
    write_text(out / "config.yaml", cfg.to_yaml())
    result = fit(
        model,
        objective,
        train,
        batches("val", cfg.train.eval_batch_size, False),
        train_cfg.replace(batch_size=1, eval_batch_size=1),
        out,
        collate_fn=collate,
    )
    test_loader = make_loader(
        batches("test", cfg.train.eval_batch_size, False), 1, shuffle=False, seed=0, collate=collate
    )
    test = objective.evaluate(model, test_loader)
    save_multitask(model, out, labels)
    metrics = {
        "method": spec.name,
        "tasks": {k: {"labels": v, "train_examples": train.sizes[k]} for k, v in labels.items()},
        "temperature": cfg.temperature,
        "val": result.last_metrics,
        "test": test,
        "steps": result.steps,
        "wall_time_s": time.perf_counter() - start,
    }
    write_json(out / "metrics.json", metrics)
    return metrics

r"""``deltatune compare``: several methods on the same model, data, budget and seed, side by side.

Every method is an ordinary ``deltatune train`` run (:func:`deltatune.run.train_run`) built
from one shared config (model, data, training budget, seed) plus that method's section; each
trains at its own default learning rate unless the config sets one. After each run the
comparison measures, on the run folder it wrote:

====================  ========================================================================
column                how it is measured
====================  ========================================================================
accuracy              test accuracy (classification runs), from the run's ``metrics.json``;
                      causal-LM runs report the test perplexity ``exp(loss per answer token)``
trained params / %    ``trainable_report`` at training time; a closed-form method
                      (``features``) has no gradient-trained parameter, so the count is the
                      parameters its fit wrote (the elements of its saved adapter file)
train time            optimizer steps only: the sum of the step durations in the trainer's log
                      (``log.jsonl`` ``elapsed_s``), validation passes excluded (an evaluation
                      step counts as the median plain step); closed-form methods: the feature
                      pass and the fit
peak memory           one training step, counted by :mod:`deltatune.memory`: unique weight
                      storages + gradients of the trained parameters + AdamW's two moments
                      (2 x the trained bytes) + the activations autograd saves for the backward
                      pass of one training batch; closed-form methods keep no gradient, so it
                      is the weights. On CUDA the allocator's own peak during the run is kept
                      too (``cuda_peak_bytes``)
adapter size          bytes of the run's ``adapter_model.safetensors`` on disk
latency               ms per example: the median of ``latency.repeats`` timed forward passes
                      of one batch of ``latency.batch_size`` test examples (after one warm-up
                      pass), adapter as saved (not merged), no gradient; measured at the end
                      for every method side by side, round-robin, so that load from other
                      processes falls on all alike (wall clock; CPU time in compare.json)
forgetting            the change of the base model's own loss on *reference text* (see below):
                      :func:`deltatune.train.forgetting.forgetting` of the metrics before
                      (the base model) and after (the trained run): ``loss_increase`` > 0 means
                      the model got worse at what it was pretrained to do
====================  ========================================================================

Reference text (``reference:`` section). What a model is pretrained on is mostly not shipped
with it, so the comparison scores the base model's *own pretraining objective* on text of the
kind it was trained on:

- encoders (sequence classification; the embedded MiniLM is all-MiniLM-L6-v2, trained
  contrastively on ~1B question/answer, title/body and similar pairs): the in-batch contrastive
  loss of its sentence embeddings (mean-pooled last hidden states) on question -> answer pairs,
  by default the embedded chatterbot corpus' conversational pairs::

      s_ij = 20 * cos(q_i, a_j)                                   (scale 20, as in training)
      L    = 1/2 * [CE(s, diag) + CE(s^T, diag)]                  (averaged over batches)

  and ``accuracy``: the share of pairs whose own partner is the nearest among the batch's;
- decoders (``model.task: causal-lm``): the next-token loss on packed blocks of plain text,
  by default the BBC News training-split articles (news prose, the genre of web text a
  pretrained LM has read), and its ``token_accuracy``.

Outputs in ``output_dir``: ``compare.json``, ``compare.md`` (the table), ``compare.csv``, PNG
plots and ``report.html`` (one self-contained file: CSS inline, plots as base64 data URIs, no
external URL, opens offline). Every file is written atomically. Each method's run is in
``runs/<name>/`` with its measured row in ``runs/<name>/compare_row.json``; a method whose row
exists and was measured with the same settings is skipped (``--force`` reruns it), so an
interrupted comparison continues where it stopped.
"""

from __future__ import annotations

import argparse
import base64
import csv
import dataclasses
import hashlib
import html
import io
import json
import math
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from deltatune.config import BaseConfig, apply_overrides, read_config_mapping
from deltatune.data import DataConfig
from deltatune.data.augment import AugmentConfig
from deltatune.errors import ConfigError, DeltatuneError, did_you_mean
from deltatune.io import write_json, write_text, write_with
from deltatune.lm.instructions import CHATTERBOT, InstructionConfig
from deltatune.model import trainable_report
from deltatune.models import ModelConfig
from deltatune.registry import get_method, methods
from deltatune.train import TrainerConfig, resolve_device

ROW_NAME = "compare_row.json"
REFERENCE_NAME = "reference_before.json"
RUNS_DIR = "runs"
COMPARE_JSON = "compare.json"
COMPARE_MD = "compare.md"
COMPARE_CSV = "compare.csv"
REPORT_HTML = "report.html"
PLOT_PARAMS = "compare_params.png"
PLOT_COSTS = "compare_costs.png"
PLOT_FORGETTING = "compare_forgetting.png"
#: all-MiniLM-L6-v2's contrastive training used cosine similarities scaled by 20.
CONTRASTIVE_SCALE = 20.0
BBC_NEWS = "bbc_news"
MIB = 1024**2


# --------------------------------------------------------------------------- config


@dataclasses.dataclass
class ReferenceConfig(BaseConfig):
    """The reference text of the forgetting column (see the module docstring).

    Fields:
        source: ``null`` = automatic (``chatterbot`` pairs for encoders, ``bbc_news`` text for
            decoders); encoders take ``chatterbot`` or a ``.jsonl``/``.csv`` of pairs
            (``prompt_column``/``response_column``); decoders take ``bbc_news``, a ``.txt``
            file, a folder of ``.txt`` or a ``.csv``/``.jsonl`` with a ``text`` column.
        max_examples: pairs (encoders) or token blocks (decoders) scored. Default 256.
        batch_size: pairs per batch: each pair's in-batch negatives are the batch's other
            answers, so the loss depends on it (kept the same before and after). Default 32.
        max_length: tokens per text (encoders) or per block (decoders). Default 64.
        seed: which pairs are drawn. Default 0.
    """

    source: str | None = None
    max_examples: int = 256
    batch_size: int = 32
    max_length: int = 64
    seed: int = 0
    prompt_column: str = "prompt"
    response_column: str = "response"

    def validate(self) -> None:
        for name in ("max_examples", "max_length"):
            if getattr(self, name) < 2:
                raise ConfigError(f"reference.{name}: value {getattr(self, name)!r} must be >= 2")
        if self.batch_size < 2:
            raise ConfigError(
                f"reference.batch_size: value {self.batch_size!r} must be >= 2 (a pair needs "
                "other pairs in its batch as negatives)"
            )


@dataclasses.dataclass
class LatencyConfig(BaseConfig):
    """Inference latency: ``repeats`` timed passes of one batch of ``batch_size`` test examples."""

    batch_size: int = 32
    repeats: int = 5

    def validate(self) -> None:
        if self.batch_size < 1:
            raise ConfigError(f"latency.batch_size: value {self.batch_size!r} must be >= 1")
        if self.repeats < 1:
            raise ConfigError(f"latency.repeats: value {self.repeats!r} must be >= 1")


# The default experiment (configs/compare/default.yaml holds the same values): the classic
# transfer-learning comparison on MiniLM + BBC News, on 100 training articles (stratified, ~20 per topic) so that
# the methods' differences show (on all 1,780, `deltatune train`'s default LoRA run reaches 98%).
def default_compare_data() -> DataConfig:
    return DataConfig(max_length=64, max_train_examples=100)


def default_compare_train() -> TrainerConfig:
    # One validation pass, at the end: the table reads the test split, and per-epoch
    # validation would cost as much as the training of these small runs.
    return TrainerConfig(epochs=8, batch_size=16, eval_every_steps=1000, progress=False)


def default_compare_methods() -> dict[str, dict[str, Any]]:
    return {
        "features": {"name": "features"},
        "last2": {"name": "freeze", "train_last_n": 2},
        "full": {"name": "full"},
        "lora": {"name": "lora", "r": 8, "lora_alpha": 16, "target_modules": "all-linear"},
        "ia3": {"name": "ia3"},
        "bitfit": {"name": "bitfit"},
        "pfeiffer": {"name": "pfeiffer"},
        "prompt": {"name": "prompt_tuning", "num_virtual_tokens": 20},
    }


#: Keys of a method entry that are not the method's config: per-method training changes.
ENTRY_TRAIN_KEY = "train"


@dataclasses.dataclass
class CompareConfig(BaseConfig):
    """A ``deltatune compare`` config: the shared run sections plus ``methods``.

    ``model``, ``data``, ``train``, ``sft`` and ``augment`` are the ``deltatune train``
    sections every method shares. ``methods`` maps a row name to a method config (as a train
    config's ``method:`` section); an entry may hold a ``train:`` mapping of per-method
    trainer changes (e.g. ``{learning_rate: 3e-4}``). ``reference`` and ``latency`` set the
    forgetting and latency measurements; ``output_dir`` is where everything goes.
    """

    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    data: DataConfig = dataclasses.field(default_factory=default_compare_data)
    train: TrainerConfig = dataclasses.field(default_factory=default_compare_train)
    sft: InstructionConfig = dataclasses.field(default_factory=InstructionConfig)
    augment: AugmentConfig = dataclasses.field(default_factory=AugmentConfig)
    methods: dict[str, dict[str, Any]] = dataclasses.field(default_factory=default_compare_methods)
    reference: ReferenceConfig = dataclasses.field(default_factory=ReferenceConfig)
    latency: LatencyConfig = dataclasses.field(default_factory=LatencyConfig)
    output_dir: str = "runs/compare"

    def validate(self) -> None:
        if not self.methods:
            raise ConfigError(
                "methods: is empty; name at least one method, e.g. {lora: {name: lora}}"
            )
        from deltatune.run import is_image_run

        probe = self.run_config(next(iter(self.methods)))
        if is_image_run(probe):
            raise ConfigError(
                f"model.name_or_path: '{self.model.name_or_path}' is a CNN; deltatune compare "
                "measures text runs (for CNNs see bench/cnn_compare.py)"
            )
        for name in self.methods:
            self.run_config(name)  # every entry's method config is checked at load time

    @property
    def causal(self) -> bool:
        return self.model.task == "causal-lm"

    def run_config(self, name: str) -> Any:
        """The ``deltatune train`` config (:class:`~deltatune.run.RunConfig`) of one entry."""
        from deltatune.run import RunConfig

        if name not in self.methods:
            raise ConfigError(
                f"methods: no entry '{name}'" + did_you_mean(name, list(self.methods))
            )
        entry = self.methods[name]
        if not isinstance(entry, Mapping) or "name" not in entry:
            raise ConfigError(
                f"methods.{name}: must be a method section with a 'name', e.g. "
                f"{{name: lora, r: 8}}; got {entry!r}"
            )
        method = {k: v for k, v in entry.items() if k != ENTRY_TRAIN_KEY}
        changes = entry.get(ENTRY_TRAIN_KEY) or {}
        if not isinstance(changes, Mapping):
            raise ConfigError(
                f"methods.{name}.train: must be a mapping of trainer fields, got {changes!r}"
            )
        data = {
            "model": self.model.to_dict(),
            "data": self.data.to_dict(),
            "train": {**self.train.to_dict(), **changes},
            "sft": self.sft.to_dict(),
            "augment": self.augment.to_dict(),
            "method": method,
            "output_dir": str(Path(self.output_dir) / RUNS_DIR / name),
        }
        return RunConfig.from_dict(data, where=f"methods.{name}")


def load_compare_config(
    path: str | Path | None,
    overrides: Sequence[str] = (),
    *,
    only: Sequence[str] | None = None,
    full_data: bool = False,
) -> CompareConfig:
    """Read a compare config (or the embedded default), apply overrides and the flags.

    ``only`` keeps those entries (in that order); a name with no entry that is a registered
    method gets that method's default config. ``full_data`` drops the data caps
    (``data.max_train_examples`` and ``data.max_eval_examples``).
    """
    data: dict[str, Any] = CompareConfig().to_dict()
    if path is not None:
        user = read_config_mapping(path, "a mapping (model, data, methods, ...)")
        if "methods" in user:
            data["methods"] = {}  # a config's methods replace the default list whole
        for key, value in user.items():
            if isinstance(value, dict) and isinstance(data.get(key), dict) and key != "methods":
                data[key] = {**data[key], **value}
            else:
                data[key] = value
    data = apply_overrides(data, list(overrides))
    if full_data:
        data["data"] = {**data["data"], "max_train_examples": None, "max_eval_examples": None}
    if only:
        entries = data.get("methods") or {}
        chosen: dict[str, Any] = {}
        for name in only:
            if name in entries:
                chosen[name] = entries[name]
            elif name in methods():
                chosen[name] = {"name": name}
            else:
                known = sorted({*entries, *methods()})
                raise ConfigError(
                    f"--methods: '{name}' is neither an entry of the config's methods "
                    f"({', '.join(entries)}) nor a registered method" + did_you_mean(name, known)
                )
        data["methods"] = chosen
    return CompareConfig.from_dict(data, where=Path(path).name if path else "compare")


# --------------------------------------------------------------------------- measurements


def train_time_from_log(rows: Sequence[Mapping[str, Any]]) -> float:
    """Seconds spent in optimizer steps, from the trainer's log rows (``elapsed_s`` per step).

    A row's duration is its ``elapsed_s`` minus the previous row's. Rows that ran a validation
    pass (they carry ``val_*`` keys) count as the median duration of the plain rows instead,
    so the figure is training alone.
    """
    durations: list[float] = []
    evals = 0
    previous = 0.0
    for row in rows:
        elapsed = float(row["elapsed_s"])
        if any(str(k).startswith("val_") for k in row):
            evals += 1
        else:
            durations.append(elapsed - previous)
        previous = elapsed
    if not durations:  # every step evaluated: nothing better than the whole clock
        return previous
    return sum(durations) + evals * statistics.median(durations)


def step_memory(
    model: nn.Module, task: Any, batch: Mapping[str, Any], trains: bool
) -> dict[str, int]:
    """Bytes of one training step (see the module docstring); ``trains=False``: weights only.

    Gradients and AdamW's two moments are counted per trained parameter at its dtype; the
    activations are the unique storages autograd saves while ``task.loss`` runs forward.
    """
    from deltatune.memory import count_saved, model_storages, unique_bytes

    params = list(model.parameters())
    trained = [p for p in params if p.requires_grad] if trains else []
    grads = sum(p.numel() * p.element_size() for p in trained)
    out = {
        "weights": unique_bytes([*params, *model.buffers()]),
        "grads": grads,
        "optimizer": 2 * grads,
        "activations": 0,
    }
    if trained:
        was_training = model.training
        model.train()
        try:
            with count_saved(model_storages(model)) as seen:
                loss = task.loss(model, batch)
            out["activations"] = sum(seen.values())
            loss.backward()
        finally:
            model.zero_grad(set_to_none=True)
            model.train(was_training)
    out["peak"] = sum(out.values())
    return out


def _model_inputs(batch: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in batch.items() if k != "labels"}


@torch.no_grad()
def interleaved_latency(
    models: Sequence[nn.Module], batches: Sequence[Mapping[str, Any]], repeats: int
) -> list[dict[str, float]]:
    """Per model, ms per example of a forward pass of its batch: ``wall`` and ``cpu`` medians.

    Each model gets one warm-up pass, then the timed passes go round-robin (model 1, 2, ...,
    1, 2, ...), so that load from other processes falls on every model alike and the ratios
    stay fair on a busy machine. ``wall`` is ``time.perf_counter`` (CUDA synchronised),
    ``cpu`` this process's CPU time (``time.process_time``, all threads).
    """
    inputs = [_model_inputs(b) for b in batches]
    sizes = [int(next(iter(x.values())).shape[0]) for x in inputs]
    modes = [m.training for m in models]
    cuda = torch.cuda.is_available() and any(
        t.is_cuda for x in inputs for t in x.values() if isinstance(t, torch.Tensor)
    )
    wall: list[list[float]] = [[] for _ in models]
    cpu: list[list[float]] = [[] for _ in models]
    try:
        for model, x in zip(models, inputs):
            model.eval()
            model(**x)  # warm-up: lazy initialisation, caches
        for _ in range(repeats):
            for i, (model, x) in enumerate(zip(models, inputs)):
                if cuda:
                    torch.cuda.synchronize()
                w0, c0 = time.perf_counter(), time.process_time()
                model(**x)
                if cuda:
                    torch.cuda.synchronize()
                wall[i].append(time.perf_counter() - w0)
                cpu[i].append(time.process_time() - c0)
    finally:
        for model, mode in zip(models, modes):
            model.train(mode)
    return [
        {
            "wall": 1000.0 * statistics.median(w) / n,
            "cpu": 1000.0 * statistics.median(c) / n,
            "batch": float(n),
        }
        for w, c, n in zip(wall, cpu, sizes)
    ]


def contrastive_pair_metrics(
    model: nn.Module, batches: Sequence[tuple[Mapping[str, Any], Mapping[str, Any]]]
) -> dict[str, float]:
    """The encoder's contrastive loss and top-1 pair accuracy over ``(questions, answers)`` batches.

    Embeddings are the attention-masked mean of the last hidden states, taken from the whole
    model's forward (``output_hidden_states=True``) so every injected method acts on them;
    prompt positions a method prepends are left out of the mean. Per batch of ``N`` pairs::

        s_ij = 20 * cos(q_i, a_j);   L = (CE(s, diag) + CE(s^T, diag)) / 2

    ``loss`` is the mean of the batches' ``L`` weighted by their sizes; ``accuracy`` the share
    of pairs (both directions) whose own partner scores highest.
    """
    import torch.nn.functional as F

    from deltatune.train.trainer import model_device, move_to_device

    device = model_device(model)
    was_training = model.training
    model.eval()
    total_loss = 0.0
    correct = 0
    count = 0
    try:
        with torch.no_grad():
            for questions, answers in batches:
                q = _sentence_embedding(model, move_to_device(dict(questions), device))
                a = _sentence_embedding(model, move_to_device(dict(answers), device))
                scores = CONTRASTIVE_SCALE * F.cosine_similarity(
                    q.unsqueeze(1), a.unsqueeze(0), dim=-1
                )
                target = torch.arange(len(q), device=scores.device)
                loss = 0.5 * (F.cross_entropy(scores, target) + F.cross_entropy(scores.T, target))
                total_loss += float(loss) * len(q)
                correct += int(
                    (scores.argmax(1) == target).sum() + (scores.argmax(0) == target).sum()
                )
                count += len(q)
    finally:
        model.train(was_training)
    if count == 0:
        raise DeltatuneError("reference: no pair to score")
    return {"loss": total_loss / count, "accuracy": correct / (2 * count)}


def _sentence_embedding(model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    mask = inputs["attention_mask"]
    out = model(**inputs, output_hidden_states=True)
    states = getattr(out, "hidden_states", None)
    if not states:
        raise DeltatuneError(
            f"{type(model).__name__} returns no hidden_states; the reference loss needs a "
            "transformers encoder"
        )
    hidden = states[-1][:, -mask.shape[1] :]  # prompt positions, if any, come first
    weights = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * weights).sum(1) / weights.sum(1).clamp(min=1.0)


# --------------------------------------------------------------------------- reference data


class Reference:
    """The reference batches and how to score a model on them (encoder pairs or decoder text)."""

    def __init__(self, cfg: CompareConfig, tokenizer: Any) -> None:
        self.cfg = cfg.reference
        self.causal = cfg.causal
        self.source = self.cfg.source or (BBC_NEWS if self.causal else CHATTERBOT)
        self.tokenizer = tokenizer
        self._batches: list[Any] | None = None

    def describe(self) -> str:
        r = self.cfg
        if self.causal:
            return (
                f"next-token loss on {r.max_examples} blocks of {r.max_length} tokens of "
                f"'{self.source}' text"
            )
        return (
            f"contrastive loss (scale {CONTRASTIVE_SCALE:g}, {r.batch_size} pairs per batch) on "
            f"{r.max_examples} question -> answer pairs of '{self.source}', {r.max_length} "
            "tokens each"
        )

    def batches(self) -> list[Any]:
        if self._batches is None:
            self._batches = self._encoder_batches() if not self.causal else self._decoder_batches()
        return self._batches

    def _encoder_batches(self) -> list[Any]:
        import random

        from deltatune.lm.instructions import load_instruction_pairs

        r = self.cfg
        pairs = load_instruction_pairs(self.source, r.prompt_column, r.response_column)
        seen: set[str] = set()
        unique = []
        for pair in pairs:  # a repeated question would be its own negative
            key = pair.prompt.strip().lower()
            if key not in seen:
                seen.add(key)
                unique.append(pair)
        if len(unique) < 2:
            raise ConfigError(
                f"reference.source: '{self.source}' holds {len(unique)} distinct question(s); "
                "the contrastive reference loss needs at least 2"
            )
        rng = random.Random(r.seed)
        picked = rng.sample(unique, min(r.max_examples, len(unique)))
        out = []
        for i in range(0, len(picked), r.batch_size):
            chunk = picked[i : i + r.batch_size]
            if len(chunk) < 2:
                break
            encode = lambda texts: dict(  # noqa: E731
                self.tokenizer(
                    texts,
                    truncation=True,
                    max_length=r.max_length,
                    padding=True,
                    return_tensors="pt",
                )
            )
            out.append((encode([p.prompt for p in chunk]), encode([p.response for p in chunk])))
        return out

    def _decoder_batches(self) -> list[Any]:
        from deltatune.data import make_loader
        from deltatune.strategies.causal_text import PackedCollator, PackedDataset, pack_texts
        from deltatune.strategies.corpus import CorpusConfig, load_corpus

        r = self.cfg
        texts = load_corpus(CorpusConfig(source=self.source, seed=r.seed, val_fraction=0.0))
        blocks: list[list[int]] = []
        for start in range(0, len(texts), 64):  # tokenise only as much text as is needed
            blocks += pack_texts(
                texts[start : start + 64], self.tokenizer, r.max_length, drop_last=True
            )
            if len(blocks) >= r.max_examples:
                break
        if not blocks:
            raise ConfigError(
                f"reference.source: '{self.source}' gives no block of {r.max_length} tokens"
            )
        pad = self.tokenizer.pad_token_id
        pad = self.tokenizer.eos_token_id if pad is None else pad
        loader = make_loader(
            PackedDataset(blocks[: r.max_examples]),
            r.batch_size,
            shuffle=False,
            seed=0,
            collate=PackedCollator(pad),
        )
        return list(loader)

    def score(self, model: nn.Module) -> dict[str, float]:
        """``{"loss", "accuracy", ...}`` of ``model`` on the reference batches."""
        if not self.causal:
            return contrastive_pair_metrics(model, self.batches())
        from deltatune.lm.task import CausalLMTask

        m = CausalLMTask().evaluate(model, self.batches())
        return {"loss": m["loss"], "accuracy": m["token_accuracy"], "perplexity": m["perplexity"]}


# --------------------------------------------------------------------------- one method


def settings_fingerprint(cfg: CompareConfig, name: str) -> str:
    """A hash of everything that decides a method's row (its run config and the measurements)."""
    run = cfg.run_config(name).to_dict()
    run["train"].pop("progress", None)
    run.pop("output_dir", None)
    payload = {
        "run": run,
        "reference": cfg.reference.to_dict(),
        "latency": cfg.latency.to_dict(),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[
        :16
    ]


@dataclasses.dataclass
class _Probe:
    """What a run's eval data gives the measurements: one training batch and one test batch."""

    task: Any
    train_batch: dict[str, Any]
    test_batch: dict[str, Any]


def _probe(run_cfg: Any, tokenizer: Any, latency_batch: int) -> _Probe:
    from deltatune.data import PadCollator, TokenizedDataset, load_text_splits, make_loader

    train_ds: Any
    test_ds: Any
    if run_cfg.model.task == "causal-lm":
        from deltatune.lm.instructions import CausalLMCollator
        from deltatune.lm.sft import datasets, load_splits
        from deltatune.lm.task import CausalLMTask

        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        train_ds, _, test_ds = datasets(run_cfg, load_splits(run_cfg), tokenizer)
        collate: Any = CausalLMCollator(tokenizer.pad_token_id)
        task: Any = CausalLMTask()
    else:
        from deltatune.train import ClassificationTask

        splits = load_text_splits(run_cfg.data)
        n = run_cfg.data.max_length
        train_ds = TokenizedDataset(splits.train, tokenizer, n)
        test_ds = TokenizedDataset(splits.test, tokenizer, n)
        collate = PadCollator(tokenizer)
        task = ClassificationTask(num_labels=len(splits.label_names))
    first = lambda ds, size: next(  # noqa: E731
        iter(make_loader(ds, size, shuffle=False, seed=0, collate=collate))
    )
    return _Probe(task, first(train_ds, run_cfg.train.batch_size), first(test_ds, latency_batch))


def _training_model(run_cfg: Any) -> nn.Module:
    """The model as training starts: the base with the method injected (seeded as in training).

    A loaded run keeps its parameters frozen for inference; the memory of a training step
    depends on which parameters train, so it is counted on this model.
    """
    from deltatune.run import build_model, seed_everything

    seed_everything(run_cfg.train.seed)
    if run_cfg.model.task == "causal-lm":
        from deltatune.lm.sft import build_causal_model

        return build_causal_model(run_cfg)[0]
    labels = json.loads((Path(run_cfg.output_dir) / "labels.json").read_text())
    return build_model(run_cfg, labels)


def _closed_form_seconds(events: list[tuple[float, str]]) -> float | None:
    """Time between train_run's "method ..." line and its "fitted in closed form" line."""
    start = next((t for t, msg in events if msg.startswith("method ")), None)
    end = next((t for t, msg in events if msg.startswith("fitted in closed form")), None)
    return None if start is None or end is None else end - start


def saved_tensor_elements(path: Path) -> int:
    """Number of elements of every tensor in a safetensors file (read lazily)."""
    from safetensors import safe_open

    total = 0
    with safe_open(str(path), framework="pt") as fh:
        for key in fh.keys():  # noqa: SIM118 (safe_open is not a Mapping)
            total += math.prod(fh.get_slice(key).get_shape())
    return total


def measure_method(
    cfg: CompareConfig,
    name: str,
    reference: Reference,
    reference_before: Mapping[str, float],
    *,
    echo: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Train one entry with ``train_run``, measure its run folder, return (and save) its row."""
    from deltatune.lm.sft import load_causal_run
    from deltatune.run import load_run, train_run
    from deltatune.train.forgetting import forgetting
    from deltatune.train.trainer import move_to_device, read_log

    run_cfg = cfg.run_config(name)
    spec = get_method(run_cfg.method_config().method_name)
    out = Path(run_cfg.output_dir)
    device = resolve_device(run_cfg.train.device)
    events: list[tuple[float, str]] = []

    def note(message: str) -> None:
        events.append((time.perf_counter(), str(message)))

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    started, cpu_started = time.perf_counter(), time.process_time()
    result = train_run(run_cfg, echo=note)
    run_seconds = time.perf_counter() - started
    run_cpu_seconds = time.process_time() - cpu_started
    cuda_peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    metrics = result.metrics

    if spec.fit is not None:
        train_seconds = _closed_form_seconds(events)
        if train_seconds is None:
            train_seconds = float(metrics["wall_time_s"])
    else:
        train_seconds = train_time_from_log(read_log(out / "log.jsonl"))

    if cfg.causal:
        _, model, tokenizer = load_causal_run(out)
    else:
        _, model, tokenizer, _ = load_run(out)
    probe = _probe(run_cfg, tokenizer, cfg.latency.batch_size)
    reference.tokenizer = tokenizer
    after = reference.score(model)
    del model  # the loaded run serves inference; training memory needs the training-time model
    fresh = _training_model(run_cfg)
    fresh.to(device)
    if spec.fit is None and trainable_report(fresh).trainable != int(metrics["trainable_params"]):
        raise DeltatuneError(
            f"methods.{name}: the rebuilt model trains {trainable_report(fresh).trainable:,} "
            f"parameters but the run reported {int(metrics['trainable_params']):,}"
        )
    memory = step_memory(
        fresh, probe.task, move_to_device(probe.train_batch, device), trains=spec.fit is None
    )
    del fresh

    adapter_file = out / "adapter_model.safetensors"
    trained = int(metrics["trainable_params"])
    if spec.fit is not None and trained == 0:
        trained = saved_tensor_elements(adapter_file)
    total = int(metrics["total_params"])
    row: dict[str, Any] = {
        "name": name,
        "method": spec.name,
        "method_config": dict(run_cfg.method),
        "learning_rate": None
        if spec.fit is not None
        else (
            run_cfg.train.learning_rate
            if run_cfg.train.learning_rate is not None
            else spec.default_lr
        ),
        "trainable_params": trained,
        "total_params": total,
        "trainable_percent": 100.0 * trained / max(total, 1),
        "train_time_s": train_seconds,
        "run_time_s": run_seconds,
        "run_cpu_s": run_cpu_seconds,
        "steps": metrics.get("steps", 0),
        "train_examples": metrics["train_examples"],
        "memory_bytes": memory,
        "peak_memory_bytes": memory["peak"],
        "cuda_peak_bytes": cuda_peak,
        "adapter_bytes": adapter_file.stat().st_size,
        # measure_latencies fills these in, every method side by side
        "latency_ms_per_example": None,
        "latency_cpu_ms_per_example": None,
        "latency_batch": None,
        "forgetting": forgetting(reference_before, after),
        "run_dir": str(out),
        "settings": settings_fingerprint(cfg, name),
    }
    if cfg.causal:
        row.update(
            metric="perplexity",
            score=metrics["test"]["perplexity"],
            test_loss=metrics["test"]["loss"],
            test_perplexity=metrics["test"]["perplexity"],
            test_token_accuracy=metrics["test"]["token_accuracy"],
            base_test_perplexity=metrics["before"]["test"]["perplexity"],
        )
    else:
        row.update(
            metric="accuracy",
            score=metrics["test"]["accuracy"],
            test_accuracy=metrics["test"]["accuracy"],
            test_macro_f1=metrics["test"].get("macro_f1"),
            test_loss=metrics["test"].get("loss"),
            val_accuracy=metrics["val"]["accuracy"],
        )
    write_json(out / ROW_NAME, row)
    return row


# --------------------------------------------------------------------------- the comparison


def _base_reference(cfg: CompareConfig, reference: Reference, out: Path) -> dict[str, float]:
    """The base model's reference metrics (cached in ``reference_before.json``)."""
    from deltatune.models import load_tokenizer
    from deltatune.run import load_base_model, seed_everything

    path = out / REFERENCE_NAME
    key = hashlib.sha256(
        json.dumps(
            {"model": cfg.model.to_dict(), "reference": cfg.reference.to_dict()}, sort_keys=True
        ).encode()
    ).hexdigest()[:16]
    if path.is_file():
        cached = json.loads(path.read_text())
        if cached.get("settings") == key:
            return dict(cached["metrics"])
    run_cfg = cfg.run_config(next(iter(cfg.methods)))
    seed_everything(run_cfg.train.seed)
    if cfg.causal:
        from deltatune.lm.load import load_causal_lm

        model, tokenizer = load_causal_lm(cfg.model)
    else:
        from deltatune.data import load_text_splits

        tokenizer = load_tokenizer(cfg.model)
        # The head is new and random, but the reference loss reads the encoder's hidden states.
        model = load_base_model(run_cfg, load_text_splits(cfg.data).label_names)
    model.to(resolve_device(run_cfg.train.device))
    reference.tokenizer = tokenizer
    metrics = reference.score(model)
    write_json(path, {"settings": key, "description": reference.describe(), "metrics": metrics})
    return metrics


def compare(
    cfg: CompareConfig, *, force: bool = False, echo: Callable[[str], None] = print
) -> dict[str, Any]:
    """Run (or resume) the comparison; write every output file; return ``compare.json``'s content."""
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_text(out / "compare_config.yaml", cfg.to_yaml())
    reference = Reference(cfg, tokenizer=None)
    before = _base_reference(cfg, reference, out)
    echo(f"reference: {reference.describe()}; base model loss {before['loss']:.4f}")
    rows = []
    for i, name in enumerate(cfg.methods, 1):
        row_path = out / RUNS_DIR / name / ROW_NAME
        fingerprint = settings_fingerprint(cfg, name)
        if row_path.is_file() and not force:
            saved = json.loads(row_path.read_text())
            if saved.get("settings") == fingerprint:
                echo(f"[{i}/{len(cfg.methods)}] {name}: done before, skipped (--force reruns it)")
                rows.append(saved)
                continue
            echo(f"[{i}/{len(cfg.methods)}] {name}: settings changed since its last run; rerunning")
        echo(f"[{i}/{len(cfg.methods)}] {name}: training ({cfg.methods[name]['name']})")
        row = measure_method(cfg, name, reference, before, echo=echo)
        echo(f"    {_row_summary(row)}")
        rows.append(row)
        # The tables so far (cheap); plots and the report once every method is done.
        write_outputs(cfg, rows, before, reference.describe(), report=False)
    echo(f"latency: {len(rows)} method(s) side by side, {cfg.latency.repeats} rounds")
    measure_latencies(cfg, rows)
    return write_outputs(cfg, rows, before, reference.describe())


def measure_latencies(cfg: CompareConfig, rows: list[dict[str, Any]]) -> None:
    """Fill every row's latency, all runs loaded at once and timed round-robin.

    Re-measured on every call (also for rows done before), so the figures of one comparison
    always come from one sitting. The rows' files are rewritten with them.
    """
    from deltatune.lm.sft import load_causal_run
    from deltatune.run import load_run
    from deltatune.train.trainer import model_device, move_to_device

    models, batches = [], []
    for row in rows:
        if cfg.causal:
            run_cfg, model, tokenizer = load_causal_run(row["run_dir"])
        else:
            run_cfg, model, tokenizer, _ = load_run(row["run_dir"])
        batch = _probe(run_cfg, tokenizer, cfg.latency.batch_size).test_batch
        models.append(model)
        batches.append(move_to_device(batch, model_device(model)))
    timings = interleaved_latency(models, batches, cfg.latency.repeats)
    for row, t in zip(rows, timings):
        row["latency_ms_per_example"] = t["wall"]
        row["latency_cpu_ms_per_example"] = t["cpu"]
        row["latency_batch"] = int(t["batch"])
        write_json(Path(row["run_dir"]) / ROW_NAME, row)


def _row_summary(row: Mapping[str, Any]) -> str:
    f = row["forgetting"]
    return (
        f"{row['metric']} {_fmt_score(row)}, {row['trainable_params']:,} params "
        f"({row['trainable_percent']:.3f}%), {row['train_time_s']:.1f} s, "
        f"{row['peak_memory_bytes'] / MIB:.0f} MiB, adapter {_fmt_bytes(row['adapter_bytes'])}, "
        f"reference loss {f['loss_increase']:+.4f}"
    )


# --------------------------------------------------------------------------- outputs


def _fmt_score(row: Mapping[str, Any]) -> str:
    return f"{row['score']:.2f}" if row["metric"] == "perplexity" else f"{row['score']:.4f}"


def _fmt_bytes(n: float) -> str:
    for unit, size in (("GiB", 1024**3), ("MiB", MIB), ("KiB", 1024)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{int(n)} B"


COLUMNS = (
    "method",
    "score",
    "trained params",
    "trained %",
    "train time (s)",
    "peak memory (MiB)",
    "adapter size",
    "latency wall (ms/example)",
    "latency CPU (ms/example)",
    "reference loss change",
)


def _fmt_ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"  # latency is measured after the last run


def table_rows(rows: Sequence[Mapping[str, Any]]) -> list[list[str]]:
    """The table's cells, one list per method, in :data:`COLUMNS` order."""
    cells = []
    for r in rows:
        f = r["forgetting"]
        cells.append(
            [
                f"{r['name']} ({r['method']})" if r["name"] != r["method"] else r["name"],
                _fmt_score(r),
                f"{r['trainable_params']:,}",
                f"{r['trainable_percent']:.3f}",
                f"{r['train_time_s']:.1f}",
                f"{r['peak_memory_bytes'] / MIB:.0f}",
                _fmt_bytes(r["adapter_bytes"]),
                _fmt_ms(r.get("latency_ms_per_example")),
                _fmt_ms(r.get("latency_cpu_ms_per_example")),
                f"{f['loss_increase']:+.4f}",
            ]
        )
    return cells


def markdown_table(rows: Sequence[Mapping[str, Any]]) -> str:
    metric = rows[0]["metric"] if rows else "accuracy"
    header = [f"test {metric}" if c == "score" else c for c in COLUMNS]
    lines = [
        "| " + " | ".join(header) + " |",
        "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|",
    ]
    lines += ["| " + " | ".join(cells) + " |" for cells in table_rows(rows)]
    return "\n".join(lines) + "\n"


#: compare.csv: these row fields, then the forgetting figure's (prefixed ``reference_``).
CSV_ROW_FIELDS = (
    "name",
    "method",
    "metric",
    "score",
    "trainable_params",
    "total_params",
    "trainable_percent",
    "train_time_s",
    "run_time_s",
    "run_cpu_s",
    "steps",
    "learning_rate",
    "peak_memory_bytes",
    "adapter_bytes",
    "latency_ms_per_example",
    "latency_cpu_ms_per_example",
)
CSV_FORGETTING_FIELDS = ("loss_before", "loss_after", "loss_increase", "accuracy_drop")


def _csv_text(rows: Sequence[Mapping[str, Any]]) -> str:
    buf = io.StringIO()
    fields = [*CSV_ROW_FIELDS, *(f"reference_{k}" for k in CSV_FORGETTING_FIELDS)]
    writer = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    for r in rows:
        f = r["forgetting"]
        writer.writerow(
            {
                **{k: r.get(k) for k in CSV_ROW_FIELDS},
                **{f"reference_{k}": f.get(k) for k in CSV_FORGETTING_FIELDS},
            }
        )
    return buf.getvalue()


def _experiment(cfg: CompareConfig, rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    t = cfg.train
    return {
        "model": cfg.model.name_or_path,
        "task": cfg.model.task,
        "data": cfg.data.source,
        "train_examples": rows[0]["train_examples"] if rows else None,
        "max_length": cfg.data.max_length,
        "epochs": t.epochs,
        "batch_size": t.batch_size,
        "seed": t.seed,
        "device": str(resolve_device(t.device)),
        "torch_threads": torch.get_num_threads(),
    }


def write_outputs(
    cfg: CompareConfig,
    rows: Sequence[Mapping[str, Any]],
    reference_before: Mapping[str, float],
    reference_description: str,
    *,
    report: bool = True,
) -> dict[str, Any]:
    """Write compare.json/.md/.csv and (``report``) the plots and report.html; return the JSON."""
    out = Path(cfg.output_dir)
    summary = {
        "experiment": _experiment(cfg, rows),
        "reference": {"description": reference_description, "base": dict(reference_before)},
        "rows": list(rows),
    }
    write_json(out / COMPARE_JSON, summary)
    write_text(out / COMPARE_MD, markdown_table(rows))
    write_text(out / COMPARE_CSV, _csv_text(rows))
    if not report:
        return summary
    plots = {
        PLOT_PARAMS: plot_params(rows),
        PLOT_COSTS: plot_costs(rows),
        PLOT_FORGETTING: plot_forgetting(rows, reference_description),
    }
    for file_name, png in plots.items():

        def write_png(tmp: Path, data: bytes = png) -> None:
            tmp.write_bytes(data)

        write_with(out / file_name, write_png)
    write_text(out / REPORT_HTML, report_html(summary, plots))
    return summary


# --------------------------------------------------------------------------- plots


def _figure(width: float, height: float) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _png(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def _score_axis(ax: Any, rows: Sequence[Mapping[str, Any]]) -> None:
    perplexity = bool(rows) and rows[0]["metric"] == "perplexity"
    ax.set_ylabel("test perplexity (lower is better)" if perplexity else "test accuracy")
    ax.grid(True, alpha=0.3)


def _scatter(
    ax: Any, rows: Sequence[Mapping[str, Any]], key: Callable[[Mapping[str, Any]], float]
) -> None:
    for r in rows:
        x = key(r)
        ax.scatter([x], [r["score"]], s=40, zorder=3)
        ax.annotate(
            r["name"], (x, r["score"]), textcoords="offset points", xytext=(5, 4), fontsize=8
        )
    ax.margins(x=0.15, y=0.12)  # room for the labels of the outermost points


def plot_params(rows: Sequence[Mapping[str, Any]]) -> bytes:
    """Test score against trained parameters (log scale)."""
    fig = _figure(7.5, 4.5)
    ax = fig.add_subplot(1, 1, 1)
    _scatter(ax, rows, lambda r: max(r["trainable_params"], 1))
    ax.set_xscale("log")
    ax.set_xlabel("trained parameters (log scale)")
    _score_axis(ax, rows)
    ax.set_title("Quality against trained parameters")
    return _png(fig)


def plot_costs(rows: Sequence[Mapping[str, Any]]) -> bytes:
    """Test score against train time, peak memory, adapter size and latency (2 x 2)."""
    fig = _figure(11, 7.5)
    axes = fig.subplots(2, 2)
    panels = [
        (lambda r: r["train_time_s"], "training time (s)", False),
        (lambda r: r["peak_memory_bytes"] / MIB, "peak training memory (MiB)", False),
        (lambda r: max(r["adapter_bytes"], 1) / 1024, "adapter file (KiB, log scale)", True),
        (
            lambda r: r["latency_cpu_ms_per_example"],
            "inference latency, CPU time (ms / example)",
            False,
        ),
    ]
    for ax, (key, label, log) in zip(axes.flat, panels):
        _scatter(ax, rows, key)
        ax.set_xlabel(label)
        if log:
            ax.set_xscale("log")
        _score_axis(ax, rows)
    fig.suptitle("Quality against cost")
    return _png(fig)


def plot_forgetting(rows: Sequence[Mapping[str, Any]], description: str) -> bytes:
    """Horizontal bars: each method's change of the reference loss."""
    fig = _figure(7.5, 0.5 * max(len(rows), 2) + 1.6)
    ax = fig.add_subplot(1, 1, 1)
    names = [r["name"] for r in rows]
    values = [r["forgetting"]["loss_increase"] for r in rows]
    colors = ["#c0392b" if v > 0 else "#2e86c1" for v in values]
    bars = ax.barh(range(len(rows)), values, color=colors)
    ax.bar_label(bars, labels=[f"{v:+.3f}" for v in values], padding=3, fontsize=8)
    ax.margins(x=0.15)
    ax.set_yticks(range(len(rows)), names)
    ax.invert_yaxis()
    ax.axvline(0.0, color="black", linewidth=0.8)
    ax.set_xlabel("reference loss after - before (> 0: forgot)")
    ax.grid(True, axis="x", alpha=0.3)
    ax.set_title("Forgetting of the base model's pretraining objective", fontsize=10)
    return _png(fig)


# --------------------------------------------------------------------------- HTML report

_CSS = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; margin: 2em auto;
       max-width: 1150px; color: #222; line-height: 1.45; padding: 0 1em; }
h1 { font-size: 1.6em; margin-bottom: 0.2em; }
h2 { font-size: 1.2em; margin-top: 1.6em; border-bottom: 1px solid #ddd; padding-bottom: 0.2em; }
.sub { color: #555; margin-top: 0; }
table { border-collapse: collapse; margin: 0.8em 0; font-size: 0.92em; }
th, td { border: 1px solid #ccc; padding: 0.35em 0.6em; }
th { background: #f1f3f5; text-align: center; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
td.best { background: #e3f4e1; font-weight: bold; }
dl.setup { display: grid; grid-template-columns: max-content auto; gap: 0.15em 1em; }
dl.setup dt { font-weight: bold; } dl.setup dd { margin: 0; }
img { max-width: 100%; border: 1px solid #eee; margin: 0.5em 0; }
.notes li { margin-bottom: 0.35em; }
code { background: #f4f4f4; padding: 0 0.25em; }
"""


#: Timings within this fraction of the best count as tied for best (machine noise).
TIMING_TIE = 0.05


def _best_cells(rows: Sequence[Mapping[str, Any]]) -> set[tuple[int, int]]:
    """``(row, column)`` of the cells to highlight: each column's best value (the highest
    score, the lowest cost), and for the timing columns every value within
    :data:`TIMING_TIE` of it, since differences that small are noise on a shared machine."""
    if len(rows) < 2:
        return set()
    higher = rows[0]["metric"] != "perplexity"
    keys: dict[int, Callable[[Mapping[str, Any]], Any]] = {
        1: (lambda r: -r["score"]) if higher else (lambda r: r["score"]),
        2: lambda r: r["trainable_params"],
        4: lambda r: r["train_time_s"],
        5: lambda r: r["peak_memory_bytes"],
        6: lambda r: r["adapter_bytes"],
        7: lambda r: r.get("latency_ms_per_example"),
        8: lambda r: r.get("latency_cpu_ms_per_example"),
        9: lambda r: r["forgetting"]["loss_increase"],
    }
    timing = {4, 7, 8}
    cells: set[tuple[int, int]] = set()
    for col, key in keys.items():
        values = [key(r) for r in rows]
        if any(v is None for v in values):
            continue
        best = min(values)
        if col in timing:
            cells |= {(i, col) for i, v in enumerate(values) if v <= best * (1 + TIMING_TIE)}
        else:
            cells.add((values.index(best), col))
    return cells


def report_html(summary: Mapping[str, Any], plots: Mapping[str, bytes]) -> str:
    """One self-contained HTML page: inline CSS, the plots as data URIs, no external resource."""
    rows = summary["rows"]
    e = summary["experiment"]
    esc = html.escape
    metric = rows[0]["metric"] if rows else "accuracy"
    best = _best_cells(rows)
    header = "".join(f"<th>{esc(f'test {metric}' if c == 'score' else c)}</th>" for c in COLUMNS)
    body_rows = []
    for i, cells in enumerate(table_rows(rows)):
        tds = []
        for col, cell in enumerate(cells):
            cls = "num" if col else ""
            if (i, col) in best:
                cls += " best"
            tds.append(f'<td class="{cls.strip()}">{esc(cell)}</td>')
        body_rows.append("<tr>" + "".join(tds) + "</tr>")
    lrs = ", ".join(
        f"{r['name']} {r['learning_rate']:g}" for r in rows if r.get("learning_rate") is not None
    )
    setup = {
        "model": e["model"],
        "task": e["task"],
        "data": f"{e['data']} ({e['train_examples']} training examples, {e['max_length']} tokens)",
        "budget": f"{e['epochs']} epochs, batch {e['batch_size']}, seed {e['seed']}",
        "learning rates": lrs or "-",
        "machine": f"device {e['device']}, {e['torch_threads']} torch thread(s)",
        "reference text": summary["reference"]["description"],
        "base reference loss": f"{summary['reference']['base']['loss']:.4f}",
    }
    setup_html = "".join(f"<dt>{esc(k)}</dt><dd>{esc(str(v))}</dd>" for k, v in setup.items())

    def image(name: str, alt: str) -> str:
        data = base64.b64encode(plots[name]).decode("ascii")
        return f'<img alt="{esc(alt)}" src="data:image/png;base64,{data}">'

    score_note = (
        "test perplexity, exp(mean loss per answer token); lower is better"
        if metric == "perplexity"
        else "accuracy on the held-out test split"
    )
    notes = [
        f"<b>test {metric}</b>: {score_note}.",
        "<b>trained params</b>: parameters that training changes; for the feature-based "
        "method, the logistic-regression head fitted in closed form. % is of all the model's "
        "parameters (base + method).",
        "<b>train time</b>: wall time of the optimizer steps (validation excluded); for the "
        "feature-based method, the feature pass plus the fit. Same machine, one method after "
        "the other; other load on the machine adds noise.",
        "<b>peak memory</b>: one training step counted tensor by tensor: weights + gradients "
        "+ AdamW moments of the trained parameters + activations saved for backward (not the "
        "allocator's peak, which on CPU is not observable).",
        "<b>adapter size</b>: the saved <code>adapter_model.safetensors</code>; full "
        "fine-tuning and layer freezing save the weights they changed.",
        "<b>latency</b>: median of timed forward passes of one batch of test examples, "
        "adapter not merged, divided by the batch size; every method timed in the same "
        "rounds, one after the other, so machine load affects all alike. <b>wall</b> is "
        "the clock a user waits; <b>CPU</b> is this process's CPU time (all its threads), "
        "which other processes' load does not inflate: with one torch thread it is the "
        "fairer comparison on a busy machine.",
        "<b>reference loss change</b>: the base model's own pretraining objective on "
        "reference text, after minus before fine-tuning (&gt; 0: the model forgot some of "
        "what it was pretrained to do). "
        + esc(summary["reference"]["description"])
        + ". Adapter methods leave the base weights untouched: switching the adapter off "
        "gives back the base model (zero forgetting); the figure is with the adapter on.",
    ]
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>deltatune compare: {esc(e["model"])} on {esc(e["data"])}</title>
<style>{_CSS}</style></head>
<body>
<h1>Fine-tuning methods compared</h1>
<p class="sub">{esc(e["model"])} on {esc(e["data"])}: the same data, budget and seed for every
method; each at its own learning rate. Best value of each column in green (timings: every
value within {TIMING_TIE:.0%} of the best, as smaller differences are machine noise).</p>
<h2>Results</h2>
<table><thead><tr>{header}</tr></thead><tbody>
{chr(10).join(body_rows)}
</tbody></table>
<h2>Set-up</h2>
<dl class="setup">{setup_html}</dl>
<h2>Quality against trained parameters</h2>
{image(PLOT_PARAMS, "test score against trained parameters")}
<h2>Quality against cost</h2>
{image(PLOT_COSTS, "test score against training time, memory, adapter size, latency")}
<h2>Forgetting</h2>
{image(PLOT_FORGETTING, "change of the reference loss per method")}
<h2>What the columns mean</h2>
<ul class="notes">{"".join(f"<li>{n}</li>" for n in notes)}</ul>
<p class="sub">Written by <code>deltatune compare</code>; the numbers are in compare.json.</p>
</body></html>
"""


# --------------------------------------------------------------------------- CLI


def _cmd_compare(args: argparse.Namespace) -> int:
    config_path = args.config
    overrides = list(args.overrides)
    if config_path is not None and "=" in config_path and not Path(config_path).exists():
        overrides.insert(0, config_path)
        config_path = None
    only = [m.strip() for m in args.methods.split(",") if m.strip()] if args.methods else None
    if args.output_dir:
        overrides.append(f"output_dir={args.output_dir}")
    elif args.full_data and not any(o.startswith("output_dir=") for o in overrides):
        overrides.append("output_dir=runs/compare-full")
    cfg = load_compare_config(config_path, overrides, only=only, full_data=args.full_data)
    if args.print_config:
        print(cfg.to_yaml(), end="")
        return 0
    summary = compare(cfg, force=args.force)
    out = Path(cfg.output_dir)
    print()
    print(markdown_table(summary["rows"]), end="")
    print()
    print(f"report     {out / REPORT_HTML} (self-contained; opens offline)")
    print(f"table      {out / COMPARE_MD}, {out / COMPARE_CSV}, {out / COMPARE_JSON}")
    print(f"runs       {out / RUNS_DIR}/<method>/ (each a deltatune train run folder)")
    return 0


def add_parser(sub: Any) -> None:
    """Register ``deltatune compare`` on the CLI's sub-parsers."""
    p = sub.add_parser(
        "compare",
        help="several methods on the same model, data, budget and seed: table, plots, HTML report",
    )
    p.add_argument(
        "config", nargs="?", help="compare config (default: configs/compare/default.yaml's values)"
    )
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. train.epochs=3")
    p.add_argument("--methods", help="comma-separated entries or method names, e.g. lora,ia3,full")
    p.add_argument(
        "--full-data",
        action="store_true",
        help="train on all the data (drops data.max_train_examples/max_eval_examples)",
    )
    p.add_argument("--output-dir", help="shorthand for output_dir=... (default runs/compare)")
    p.add_argument("--force", action="store_true", help="rerun methods that already have a result")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.set_defaults(func=_cmd_compare)

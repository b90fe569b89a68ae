r"""``deltatune advise``: recommend a fine-tuning method and its settings, with the reasons.

Inputs: the model, the number of training examples (and of classes), a memory budget, the
number of tasks, and how close the data is to the model's pretraining data (``high``,
``medium``, ``low``: given, or measured on a sample of the data, see
:func:`measure_similarity`). The advice is made in two steps::

    1. quality:  (data size, similarity, model kind, tasks) ──► method, in order of preference
    2. memory:   the estimator's peak of that method at the planned batch / sequence length
                 ──► fits the budget?  no: LoRA ──► QLoRA (NF4) ──► + gradient checkpointing
                                           ──► the largest batch that fits (+ accumulation)

Step 1 is the classic transfer-learning guidance (Yosinski et al., 2014, "How transferable
are features in deep neural networks?"; the CS231n transfer-learning notes; Howard & Ruder,
2018, ULMFiT): early layers hold general features and later ones task-specific features, so
the less data there is, the fewer layers should train, and the further the data is from the
pretraining data, the deeper the adaptation must reach. Data size is measured per class for
classification (a 5-class task with 200 examples has 40 examples per class):

============  ===============================  ======================  ==========================
data size     similar (high)                   medium                  different (low)
============  ===============================  ======================  ==========================
little        frozen features + head           head + last block       LoRA r=4, all linear,
              (``features``)                   (``freeze``)            dropout + weight decay
medium        freeze the first half, train     LoRA r=8, all linear    LoRA r=16, all linear
              the rest (``freeze``)
lots          full fine-tuning, layer-wise     full fine-tuning        full fine-tuning
              lr decay 0.9
============  ===============================  ======================  ==========================

Decoders (``causal-lm``) use LoRA ranks 4 / 8 / 16 by the same logic and full fine-tuning only
for lots of data far from the pretraining data (Biderman et al., 2024, "LoRA Learns Less and
Forgets Less": LoRA matches full fine-tuning on instruction data, full fine-tuning learns more
on new domains). CNNs on images follow the CNN recipe (``features`` / the last 1, 2 or 3
blocks / all blocks, the new head at 10x the learning rate; ``bench/cnn_compare.py``). Two or
more tasks get one adapter per task on a shared frozen base (``deltatune multitask``): N small
adapters instead of N model copies, and no task can overwrite another's weights.

Step 2 calls the memory estimator (:func:`deltatune.estimate.estimate` and
:func:`~deltatune.estimate.max_batch_size`) through one object, ``estimator``, that tests
replace by a fake.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from deltatune.errors import ConfigError, DeltatuneError

GIB = 1024**3
LEVELS = ("high", "medium", "low")
TASKS = ("classification", "causal-lm", "image")
ModelKind = Literal["encoder", "decoder", "cnn"]
Regime = Literal["little", "medium", "lots"]
REGIME_WORDS = {
    "little": "little data",
    "medium": "a medium amount of data",
    "lots": "lots of data",
}

#: Data-size thresholds (classification and images), in examples per class: below
#: ``LITTLE_PER_CLASS`` is little data (a linear head on fixed features is about all that can
#: be fitted without overfitting), from ``LOTS_PER_CLASS`` on is lots (every weight can move).
LITTLE_PER_CLASS = 100
LOTS_PER_CLASS = 1000
#: The same when the number of classes is not given: total examples (as if 10 classes).
LITTLE_TOTAL = 1000
LOTS_TOTAL = 10_000
#: Causal-LM examples (prompt/response pairs or documents): ~1,000 curated pairs teach a format
#: (Zhou et al., 2023, LIMA); tens of thousands start to carry new knowledge.
LITTLE_LM = 1000
LOTS_LM = 20_000

#: Similarity from a measured gap (sample minus reference). Loss gaps are in nats per token:
#: 0.5 nats is a perplexity 1.65x the reference's, 1.5 nats 4.5x. Checked on SmolLM2-135M
#: (reference 3.60): BBC News -0.19, Python source +0.12, biomedical sentences +0.22 (all
#: "high": it predicts them about as well as everyday English), German +1.59 and random
#: letter strings +2.93 ("low"); docs/advise.md has the table and the command.
LOSS_GAP_THRESHOLDS = (0.5, 1.5)
#: Word pieces per word, for encoders without a pretrained masked-LM head (see
#: :func:`measure_similarity`). MiniLM: the reference 1.00, BBC News 1.08 (+0.08, high),
#: Python source 1.22 (+0.22, medium), biomedical 1.57 (+0.57, low), German 1.88 (low).
PIECES_GAP_THRESHOLDS = (0.15, 0.40)

#: Plain everyday English written for this module (not copied from any corpus): the text a
#: general-purpose model was pretrained on looks like this, so the model's loss here is the
#: yardstick a sample's loss is compared with.
REFERENCE_TEXT: tuple[str, ...] = (
    "The weather was mild for most of the week, and many people spent the afternoon in the park.",
    "She opened the letter, read it twice, and then called her brother to tell him the news.",
    "The city council voted on Tuesday to build a new library near the river.",
    "Children learn to read at different speeds, and teachers try to help each one of them.",
    "After dinner we walked along the beach and watched the sun go down behind the hills.",
    "The company said its sales grew last year, although its costs rose even faster.",
    "He bought a second-hand bicycle and rode it to work every morning, even in the rain.",
    "Scientists hope the new telescope will show how the first galaxies formed.",
    "The train was late again, so she used the time to finish the book she had started.",
    "Most of the village turned out to watch the football match on Saturday afternoon.",
    "If you keep the bread in a cool, dry place, it will stay fresh for a few days.",
    "The museum is free on Sundays, and it is usually busy with families and tourists.",
)

_CAUSAL_SUFFIXES = ("ForCausalLM", "LMHeadModel")


# --------------------------------------------------------------------------- results


@dataclasses.dataclass(frozen=True)
class ModelInfo:
    """What the rules need to know about the model: its kind and its number of blocks."""

    name: str
    kind: ModelKind
    blocks: int
    architecture: str
    #: CNNs: LoRA targets for their convolutions (``None`` for transformers).
    conv_targets: str | list[str] | None = None
    #: Whether ``name`` loads by name (a module passed in Python does not).
    loadable: bool = True


@dataclasses.dataclass
class SimilarityMeasurement:
    """A measured closeness of a data sample to the model's pretraining data.

    ``gap = sample_value - reference_value``; ``level`` is ``high`` for ``gap <=
    thresholds[0]``, ``medium`` for ``gap <= thresholds[1]``, else ``low``.
    """

    level: str
    measure: str
    sample_value: float
    reference_value: float
    gap: float
    thresholds: tuple[float, float]
    texts: int

    def describe(self) -> str:
        return (
            f"{self.measure} {self.sample_value:.3f} on {self.texts} sample texts vs "
            f"{self.reference_value:.3f} on the reference text (gap {self.gap:+.3f}; high <= "
            f"{self.thresholds[0]}, medium <= {self.thresholds[1]}, low above)"
        )


@dataclasses.dataclass
class Option:
    """One candidate: a ``method:`` section, ``train:`` hints, and its memory estimate."""

    method: dict[str, Any]
    train: dict[str, Any]
    why: str
    rule: str
    peak_bytes: int | None = None
    fits: bool | None = None
    estimate: Any = None

    @property
    def label(self) -> str:
        return method_label(self.method, self.train)

    def to_dict(self) -> dict[str, Any]:
        return {
            "label": self.label,
            "method": self.method,
            "train": self.train,
            "why": self.why,
            "rule": self.rule,
            "peak_bytes": self.peak_bytes,
            "fits": self.fits,
        }


@dataclasses.dataclass
class Advice:
    """The recommendation: ``method`` (a ready ``method:`` section), ``train`` hints, the
    reasons (one per rule that fired), the memory estimate against the budget, and the
    runner-up alternatives."""

    model: ModelInfo
    task: str
    method: dict[str, Any]
    train: dict[str, Any]
    reasons: list[str]
    rules: list[str]
    estimate: Any
    peak_bytes: int | None
    budget_bytes: int | None
    fits: bool | None
    alternatives: list[Option]
    examples: int
    num_classes: int | None
    tasks: int
    regime: str
    similarity: str
    similarity_source: str
    measurement: SimilarityMeasurement | None = None
    batch_size: int = 16
    seq_len: int = 128
    data: list[str] = dataclasses.field(default_factory=list)

    @property
    def command(self) -> str:
        """The command that runs the written config (:meth:`config`)."""
        if self.tasks > 1 and self.task == "classification":
            return "deltatune multitask CONFIG.yaml"
        if self.tasks > 1:
            return "deltatune train CONFIG.yaml output_dir=runs/<task>   # once per task"
        return "deltatune train CONFIG.yaml"

    def config(self, output_dir: str = "runs/advised") -> dict[str, Any]:
        """A runnable ``deltatune train`` config (``deltatune multitask`` for several
        classification tasks) with this advice's model, method and train settings.

        ``data.source`` is the given data (``data=``), else the embedded default of the task
        (BBC News, the chatterbot pairs, scikit-learn's digits) so that the file runs as is.
        """
        if not self.model.loadable:
            raise DeltatuneError(
                f"a runnable config needs a model name or folder, but the advice is for a "
                f"{self.model.name} module; call advise() with the model's name or folder "
                "(save_pretrained) to get one"
            )
        model: dict[str, Any] = {"name_or_path": self.model.name}
        if self.task == "causal-lm":
            model["task"] = "causal-lm"
        train = {k: v for k, v in self.train.items() if k != "note"}
        cfg: dict[str, Any] = {"model": model}
        if self.tasks > 1 and self.task == "classification":
            if self.data:
                cfg["tasks"] = [
                    {"name": _task_name(src, i), "data": _data_section(self, src)}
                    for i, src in enumerate(self.data)
                ]
            cfg.update({"method": self.method, "train": train, "output_dir": output_dir})
            return cfg
        source = self.data[0] if self.data else None
        cfg.update(
            {
                "data": _data_section(self, source),
                "method": self.method,
                "train": train,
                "output_dir": output_dir,
            }
        )
        return cfg

    def to_yaml(self, output_dir: str = "runs/advised") -> str:
        import yaml

        return str(yaml.safe_dump(self.config(output_dir), sort_keys=False))

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": dataclasses.asdict(self.model),
            "task": self.task,
            "examples": self.examples,
            "num_classes": self.num_classes,
            "tasks": self.tasks,
            "regime": self.regime,
            "similarity": self.similarity,
            "similarity_source": self.similarity_source,
            "measurement": dataclasses.asdict(self.measurement) if self.measurement else None,
            "method": self.method,
            "train": self.train,
            "reasons": self.reasons,
            "rules": self.rules,
            "memory": {
                "peak_bytes": self.peak_bytes,
                "budget_bytes": self.budget_bytes,
                "fits": self.fits,
                "components": estimate_components(self.estimate),
            },
            "alternatives": [a.to_dict() for a in self.alternatives],
            "command": self.command,
            "config": self.config() if self.model.loadable else None,
        }

    def format(self) -> str:
        """The advice as text: recommendation, memory, reasons, alternatives."""
        import yaml

        lines = [
            f"model         {self.model.name} ({self.model.architecture}, {self.model.kind}, "
            f"{self.model.blocks} blocks)",
            f"data          {self.examples:,} examples"
            + (f", {self.num_classes} classes" if self.num_classes else "")
            + (f", {self.tasks} tasks" if self.tasks > 1 else "")
            + f" -> {REGIME_WORDS[self.regime]}; similarity {self.similarity} ({self.similarity_source})",
            f"budget        {_gib(self.budget_bytes)}"
            + f"   (planned batch {self.batch_size} x {self.seq_len})",
            "",
            f"recommended   {method_label(self.method, self.train)}",
            _indent(yaml.safe_dump({"method": self.method}, sort_keys=False)),
            _indent(yaml.safe_dump({"train": self.train}, sort_keys=False)),
            f"memory        {_memory_line(self.peak_bytes, self.budget_bytes, self.fits)}",
        ]
        parts = estimate_components(self.estimate)
        if parts:
            lines.append("              " + components_line(parts))
        lines += ["", "why"]
        lines += [f"  - {r}" for r in self.reasons]
        if self.alternatives:
            lines += ["", "alternatives"]
            width = max(len(a.label) for a in self.alternatives) + 2
            for a in self.alternatives:
                memory = _memory_line(a.peak_bytes, self.budget_bytes, a.fits)
                lines.append(f"  {a.label:<{width}}{memory}, batch {a.train['batch_size']}")
                lines.append(f"  {'':<{width}}{a.why}")
        lines += ["", f"run           {self.command}  (--write-config FILE writes CONFIG.yaml)"]
        return "\n".join(lines)


def _indent(text: str) -> str:
    return "\n".join("  " + line for line in text.rstrip().splitlines())


def _gib(n: int | None) -> str:
    return "none given" if n is None else f"{n / GIB:.2f} GiB"


def _memory_line(peak: int | None, budget: int | None, fits: bool | None) -> str:
    if peak is None:
        return "peak unknown (the estimator has no figure for this option)"
    verdict = {True: "fits", False: "does NOT fit", None: "no budget given"}[fits]
    of = f" of {budget / GIB:.2f} GiB" if budget is not None else ""
    return f"peak {peak / GIB:.3f} GiB{of} ({verdict})"


def _task_name(source: str, index: int) -> str:
    stem = re.sub(r"[^A-Za-z0-9_-]", "_", Path(source).stem) or "task"
    return f"{stem}_{index}" if stem == "default" else stem


def _data_section(advice: Advice, source: str | None) -> dict[str, Any]:
    """The ``data:`` section: the given file, or the task's embedded data standing in for the
    user's, capped at the advised number of training examples."""
    section: dict[str, Any] = {"source": source}
    if source is None:
        section["source"] = {"image": "digits", "causal-lm": "chatterbot"}.get(
            advice.task, "bbc_news"
        )
        section["max_train_examples"] = advice.examples
    if advice.task != "image":
        section["max_length"] = advice.seq_len
    return section


def method_label(method: dict[str, Any], train: dict[str, Any] | None = None) -> str:
    """A short name for an option, e.g. ``qlora nf4 r=8 + checkpointing``."""
    name = method["name"]
    bits = [name]
    if name in ("lora", "qlora"):
        if name == "qlora":
            bits.append(str(method.get("quantize", "nf4")))
        bits.append(f"r={method.get('r', 8)}")
        targets = method.get("target_modules")
        if targets != "all-linear":
            bits.append("convs" if isinstance(targets, list) or "conv" in str(targets) else "")
    elif name == "freeze":
        if method.get("train_last_n") is not None:
            bits.append(f"last {method['train_last_n']}")
        elif method.get("freeze_first_n") is not None:
            bits.append(f"first {method['freeze_first_n']} frozen")
    elif name == "pfeiffer":
        bits.append(f"m=hidden/{method.get('reduction_factor', 16):g}")
    label = " ".join(b for b in bits if b)
    if train and train.get("gradient_checkpointing"):
        label += " + checkpointing"
    if train and train.get("grad_accum_steps", 1) > 1:
        label += f" (batch {train['batch_size']} x {train['grad_accum_steps']} accum)"
    return label


def estimate_components(est: Any) -> dict[str, int]:
    """The estimator result's byte counts (weights, gradients, ...) as a dict."""
    if est is None:
        return {}
    out = {}
    # deltatune.estimate.Estimate's byte fields (its ``optimizer`` is the optimizer's name).
    fields = {"optimizer": "optimizer_state"}
    for key in ("weights", "adapter", "gradients", "optimizer", "activations", "transient", "peak"):
        value = getattr(est, fields.get(key, key), None)
        if isinstance(value, int | float) and not isinstance(value, bool):
            out[key] = int(value)
    return out


def components_line(parts: dict[str, int]) -> str:
    """The peak's parts in words, e.g. ``weights 0.157, ..., activations 0.382 GiB; + 0.597 GiB
    transient buffers at the peak``. ``transient`` (``peak - sum of the parts``) is signed: a
    negative one means the parts are not all alive at the moment of the peak."""
    counted = [k for k in parts if k not in ("transient", "peak")]
    line = ", ".join(f"{k} {parts[k] / GIB:.3f}" for k in counted) + " GiB"
    extra = parts.get("transient")
    if extra is None or extra == 0:
        return line
    if extra > 0:
        return line + f"; + {extra / GIB:.3f} GiB transient buffers at the peak"
    return (
        line + f"; peak {-extra / GIB:.3f} GiB below their sum (not all of them are alive at once)"
    )


# --------------------------------------------------------------------------- model info


def describe_model(model: str | nn.Module) -> ModelInfo:
    """Kind (encoder / decoder / CNN) and number of blocks of a model name, folder or module.

    Transformers models are read from their ``config.json`` only (no weights are loaded); CNNs
    are built with random weights to count their blocks.
    """
    from deltatune.methods.freeze import find_blocks
    from deltatune.vision.cnn import is_image_model

    if isinstance(model, nn.Module):
        name = type(model).__name__
        config = getattr(model, "config", None)
        if config is None:
            _, blocks = find_blocks(model)
            return ModelInfo(name, "cnn", len(blocks), name, _conv_names(model), loadable=False)
        kind: ModelKind = "decoder" if name.endswith(_CAUSAL_SUFFIXES) else "encoder"
        return ModelInfo(name, kind, _config_blocks(config, name), name, loadable=False)
    if not isinstance(model, str) or not model.strip():
        raise ConfigError(
            f"model: value {model!r} is not a model name; give 'embedded-minilm', "
            "'embedded-smollm2', 'embedded-vgg16bn', a transformers folder or a hub id"
        )
    if is_image_model(model):
        return _describe_cnn(model)
    return _describe_transformer(model)


def _describe_cnn(name: str) -> ModelInfo:
    from deltatune.methods.freeze import find_blocks
    from deltatune.vision.cnn import build_image_classifier
    from deltatune.vision.vgg import EMBEDDED_VGG

    net = build_image_classifier(name, 2, pretrained=False)
    _, blocks = find_blocks(net)
    if name == EMBEDDED_VGG:
        from deltatune.run import CNN_CONV_TARGETS

        targets: str | list[str] = CNN_CONV_TARGETS
        arch = "VGG16-BN (CRAFT)"
    else:
        targets = _conv_names(net)
        arch = type(net.backbone).__name__
    return ModelInfo(name, "cnn", len(blocks), arch, targets)


def _conv_names(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]


def _describe_transformer(name: str) -> ModelInfo:
    from transformers import AutoConfig

    from deltatune.models import resolve_model_path

    path, local_only = resolve_model_path(name)
    try:
        config = AutoConfig.from_pretrained(path, local_files_only=local_only)
    except (OSError, ValueError) as exc:
        raise ConfigError(
            f"model: cannot read the config of '{name}' ({str(exc).splitlines()[0][:160]}); "
            "give 'embedded-minilm', 'embedded-smollm2', 'embedded-vgg16bn', a transformers "
            "model folder, or a hub id that can be downloaded"
        ) from None
    archs = list(getattr(config, "architectures", None) or [])
    arch = archs[0] if archs else type(config).__name__
    decoder = any(a.endswith(_CAUSAL_SUFFIXES) for a in archs) and not getattr(
        config, "is_encoder_decoder", False
    )
    return ModelInfo(name, "decoder" if decoder else "encoder", _config_blocks(config, arch), arch)


def _config_blocks(config: Any, name: str) -> int:
    for key in ("num_hidden_layers", "n_layer", "num_layers"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    raise ConfigError(f"model: cannot find the number of layers of {name} in its config")


# --------------------------------------------------------------------------- similarity


def measure_similarity(
    model: str | nn.Module,
    texts: Sequence[str],
    *,
    tokenizer: Any = None,
    reference: Sequence[str] | None = None,
    max_texts: int = 32,
    max_length: int = 128,
) -> SimilarityMeasurement:
    """How close ``texts`` are to the model's pretraining data, as ``high``/``medium``/``low``.

    The measure depends on the model:

    - a decoder: the mean next-token loss per token,
      ``L = -(1/N) sum_t log p(x_{t+1} | x_<=t)``;
    - an encoder with a pretrained masked-LM head (BERT, RoBERTa checkpoints that ship one):
      the masked-LM loss at a fixed, seeded 15% of the tokens (all replaced by the mask token),
      ``L = -(1/|M|) sum_{i in M} log p(x_i | x without M)``;
    - an encoder without one (sentence-embedding checkpoints such as the embedded MiniLM):
      word pieces per word. A new, untrained head gives chance-level masked-LM loss on any text
      (measured on MiniLM: 10.3-11.1 nats on everyday English, news, code, German and random
      tokens alike, ``ln 30522 = 10.33``), so the loss carries no signal there; the tokenizer's
      vocabulary, built from the pretraining corpus, does: text from that distribution splits
      into few pieces per word, other domains and languages into many.

    Each is computed on ``texts`` (at most ``max_texts``, truncated to ``max_length`` tokens)
    and on ``reference`` (default :data:`REFERENCE_TEXT`, everyday English), and the level
    comes from the gap ``sample - reference`` (:data:`LOSS_GAP_THRESHOLDS`,
    :data:`PIECES_GAP_THRESHOLDS`). A level relative to the reference rather than an absolute
    loss makes the thresholds carry over between models of different vocabulary sizes.
    """
    texts = [t for t in texts if isinstance(t, str) and t.strip()][:max_texts]
    if not texts:
        raise DeltatuneError("--sample: the sample holds no text; give a file with some texts")
    ref = list(reference) if reference is not None else list(REFERENCE_TEXT)
    scorer, tokenizer, measure, thresholds = _similarity_scorer(model, tokenizer)
    sample_value = scorer(texts, tokenizer, max_length)
    reference_value = scorer(ref, tokenizer, max_length)
    gap = sample_value - reference_value
    return SimilarityMeasurement(
        level=level_from_gap(gap, thresholds),
        measure=measure,
        sample_value=sample_value,
        reference_value=reference_value,
        gap=gap,
        thresholds=thresholds,
        texts=len(texts),
    )


def level_from_gap(gap: float, thresholds: tuple[float, float]) -> str:
    """``high`` for ``gap <= thresholds[0]``, ``medium`` up to ``thresholds[1]``, else ``low``."""
    if gap <= thresholds[0]:
        return "high"
    return "medium" if gap <= thresholds[1] else "low"


def _similarity_scorer(model: str | nn.Module, tokenizer: Any) -> tuple[Any, Any, str, Any]:
    """``(scorer(texts, tokenizer, max_length) -> float, tokenizer, measure name, thresholds)``."""
    from deltatune.vision.cnn import is_image_model

    if isinstance(model, str):
        if is_image_model(model):
            raise ConfigError(
                f"--sample: '{model}' is a CNN; the sample measurement reads text. For images give "
                "--similarity high|medium|low (how much your images look like the pretraining ones)"
            )
        info = describe_model(model)
        if info.kind == "decoder":
            from deltatune.lm.load import load_causal_lm

            lm, tok = load_causal_lm(model)
            return (
                _causal_scorer(lm),
                tokenizer or tok,
                "causal-LM loss (nats/token)",
                LOSS_GAP_THRESHOLDS,
            )
        mlm, tok = _load_masked_lm(model)
        tokenizer = tokenizer or tok
        if mlm is not None:
            return (
                _masked_scorer(mlm),
                tokenizer,
                "masked-LM loss (nats/token)",
                LOSS_GAP_THRESHOLDS,
            )
        return _pieces_per_word, tokenizer, "word pieces per word", PIECES_GAP_THRESHOLDS
    if tokenizer is None:
        raise ConfigError("measure_similarity: a model module needs tokenizer=<its tokenizer>")
    name = type(model).__name__
    if name.endswith(_CAUSAL_SUFFIXES):
        return _causal_scorer(model), tokenizer, "causal-LM loss (nats/token)", LOSS_GAP_THRESHOLDS
    if name.endswith("ForMaskedLM"):
        return _masked_scorer(model), tokenizer, "masked-LM loss (nats/token)", LOSS_GAP_THRESHOLDS
    return _pieces_per_word, tokenizer, "word pieces per word", PIECES_GAP_THRESHOLDS


def _load_masked_lm(name: str) -> tuple[nn.Module | None, Any]:
    """The checkpoint's masked-LM model if it ships a trained head (else ``None``), and the
    tokenizer."""
    from transformers import AutoModelForMaskedLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    from deltatune.models import resolve_model_path

    path, local_only = resolve_model_path(name)
    tok = AutoTokenizer.from_pretrained(path, local_files_only=local_only)
    verbosity = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()  # the "newly initialised head" notice is expected here
    hf_logging.disable_progress_bar()
    try:
        mlm, info = AutoModelForMaskedLM.from_pretrained(
            path, local_files_only=local_only, output_loading_info=True
        )
    except (OSError, ValueError):
        return None, tok  # no masked-LM class for this model type
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
    # The decoder weight is tied to the embeddings and may be reported missing; any other
    # missing head weight means the head would be random.
    missing = [k for k in info.get("missing_keys", []) if not k.endswith("decoder.weight")]
    if missing:
        return None, tok
    return mlm.eval(), tok


def _batches(texts: list[str], size: int = 8) -> list[list[str]]:
    return [texts[i : i + size] for i in range(0, len(texts), size)]


def _causal_scorer(model: nn.Module) -> Any:
    def score(texts: list[str], tokenizer: Any, max_length: int) -> float:
        total, count = 0.0, 0
        model.eval()
        if getattr(tokenizer, "pad_token_id", None) is None:
            tokenizer.pad_token = tokenizer.eos_token
        for chunk in _batches(texts):
            enc = tokenizer(
                chunk, truncation=True, max_length=max_length, padding=True, return_tensors="pt"
            )
            ids, mask = enc["input_ids"], enc["attention_mask"]
            with torch.no_grad():
                logits = model(input_ids=ids, attention_mask=mask).logits.float()
            targets = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
            total += float(
                torch.nn.functional.cross_entropy(
                    logits[:, :-1].reshape(-1, logits.shape[-1]),
                    targets.reshape(-1),
                    ignore_index=-100,
                    reduction="sum",
                )
            )
            count += int((targets != -100).sum())
        if count == 0:
            raise DeltatuneError("--sample: the texts are too short to score (one token each)")
        return total / count

    return score


def _masked_scorer(model: nn.Module, probability: float = 0.15) -> Any:
    def score(texts: list[str], tokenizer: Any, max_length: int) -> float:
        generator = torch.Generator().manual_seed(0)  # the same positions on every call
        special = set(tokenizer.all_special_ids)
        total, count = 0.0, 0
        model.eval()
        for chunk in _batches(texts):
            enc = tokenizer(
                chunk, truncation=True, max_length=max_length, padding=True, return_tensors="pt"
            )
            ids = enc["input_ids"]
            ordinary = (enc["attention_mask"] == 1) & torch.tensor(
                [[t not in special for t in row] for row in ids.tolist()]
            )
            picked = (torch.rand(ids.shape, generator=generator) < probability) & ordinary
            for row in range(ids.shape[0]):  # at least one masked token per text
                if not picked[row].any() and ordinary[row].any():
                    picked[row, int(ordinary[row].nonzero()[0])] = True
            masked = ids.masked_fill(picked, tokenizer.mask_token_id)
            with torch.no_grad():
                logits = model(input_ids=masked, attention_mask=enc["attention_mask"]).logits
            total += float(
                torch.nn.functional.cross_entropy(
                    logits[picked].float(), ids[picked], reduction="sum"
                )
            )
            count += int(picked.sum())
        if count == 0:
            raise DeltatuneError("--sample: the texts hold no ordinary token to mask")
        return total / count

    return score


_WORD = re.compile(r"\w+|[^\w\s]")


def _pieces_per_word(texts: list[str], tokenizer: Any, max_length: int) -> float:
    """Tokenizer pieces per word (``\\w+`` runs and punctuation marks), over all texts."""
    words = pieces = 0
    for text in texts:
        tokens = _WORD.findall(text)[: max_length * 4]
        words += len(tokens)
        pieces += len(tokenizer.tokenize(" ".join(tokens)))
    if words == 0:
        raise DeltatuneError("--sample: the texts hold no word")
    return pieces / words


# --------------------------------------------------------------------------- rules


def data_regime(task: str, examples: int, num_classes: int | None) -> tuple[Regime, str]:
    """``little`` / ``medium`` / ``lots`` and the sentence that explains it."""
    if task == "causal-lm":
        lo, hi, count, unit = LITTLE_LM, LOTS_LM, float(examples), "examples"
    elif num_classes:
        lo, hi, count = LITTLE_PER_CLASS, LOTS_PER_CLASS, examples / num_classes
        unit = "examples per class"
    else:
        lo, hi, count, unit = (
            LITTLE_TOTAL,
            LOTS_TOTAL,
            float(examples),
            "examples (classes not given)",
        )
    regime: Regime = "little" if count < lo else "lots" if count >= hi else "medium"
    text = f"{count:,.0f} {unit}: {REGIME_WORDS[regime]} (little below {lo:,}, lots from {hi:,})"
    return regime, text


def _rank(regime: str, level: str) -> int:
    if regime == "little":
        return 4 if level != "medium" else 8
    return 16 if (regime == "lots" or level == "low") else 8


def _lora(r: int, targets: Any = "all-linear", dropout: float = 0.05) -> dict[str, Any]:
    return {
        "name": "lora",
        "r": r,
        "lora_alpha": 2 * r,
        "lora_dropout": dropout,
        "target_modules": targets,
    }


def _train_hints(regime: str, task: str, batch_size: int) -> dict[str, Any]:
    """Epochs and early stopping by data size: little data needs more passes and early stopping
    (it overfits quickly), lots needs one or two passes."""
    hints: dict[str, Any] = {"batch_size": batch_size}
    hints["epochs"] = {"little": 10, "medium": 3, "lots": 1}[regime]
    if regime == "little":
        hints["early_stopping_patience"] = 3
        hints["eval_every_steps"] = None  # evaluate once per epoch
    if task == "causal-lm":
        hints["metric_for_best"] = "loss"
        hints["greater_is_better"] = False
    return hints


def _lr(method: dict[str, Any]) -> float:
    from deltatune.registry import get_method

    return get_method(method["name"]).default_lr


def quality_options(
    info: ModelInfo, task: str, regime: str, level: str, tasks: int, batch_size: int
) -> list[Option]:
    """The methods in order of preference for quality (memory not considered yet)."""
    base = _train_hints(regime, task, batch_size)
    if tasks > 1:
        return _multi_task_options(info, task, regime, level, tasks, base)
    if info.kind == "cnn" or task == "image":
        return _cnn_options(info, regime, level, base)
    if task == "causal-lm":
        return _decoder_options(info, regime, level, base)
    return _encoder_options(info, regime, level, base)


def _with(base: dict[str, Any], method: dict[str, Any], **extra: Any) -> dict[str, Any]:
    out = dict(base)
    if method["name"] == "features":
        # Closed form: no gradient steps, so no epochs, learning rate or early stopping.
        return {"batch_size": base["batch_size"]}
    out["learning_rate"] = _lr(method)
    out.update(extra)
    return out


def _encoder_options(
    info: ModelInfo, regime: str, level: str, base: dict[str, Any]
) -> list[Option]:
    half = max(1, info.blocks // 2)
    features = {"name": "features", "C": 1.0}
    last1 = {"name": "freeze", "train_last_n": 1}
    last2 = {"name": "freeze", "train_last_n": min(2, info.blocks)}
    first_half = {"name": "freeze", "freeze_first_n": half}
    full = {"name": "full"}
    r = _rank(regime, level)
    strong = _lora(r, dropout=0.1)
    why_features = (
        "little data similar to the pretraining data: the pretrained features already separate "
        "such classes, so fit only the head (logistic regression, closed form): nothing in the "
        "network can overfit and no gradient is needed"
    )
    why_last1 = (
        "little data, somewhat different from the pretraining data: retrain the last block (the "
        "most task-specific features) with the head; the frozen lower blocks keep the general "
        "features and limit overfitting"
    )
    why_small_low = (
        f"little data far from the pretraining data: every layer needs some adaptation (the "
        f"features differ from low down), but little data supports little capacity: LoRA rank "
        f"{r} on every linear layer, with dropout 0.1 and weight decay 0.1 as regularisation"
    )
    why_first_half = (
        f"a medium amount of data similar to the pretraining data: freeze the early (general) "
        f"blocks, the first {half} of {info.blocks}, and train the later ones with the head"
    )
    why_lora = (
        f"a medium amount of data, {level} similarity: LoRA rank {r} on every linear layer adapts "
        "all blocks, the early ones included, with ~1% of the weights trainable"
    )
    why_full = (
        "lots of data: enough to fine-tune every weight without overfitting; the gain over "
        "adapters is largest when the data differs from the pretraining data"
    )
    lora_alt = Option(
        _lora(r), _with(base, _lora(r)), f"LoRA rank {r} on every linear layer", "alt-lora"
    )
    if regime == "little":
        if level == "high":
            return [
                Option(features, _with(base, features), why_features, "little-similar"),
                Option(
                    last1,
                    _with(base, last1),
                    "head + last block: a little more capacity",
                    "alt-freeze",
                ),
                Option(
                    _lora(4), _with(base, _lora(4)), "LoRA rank 4 on every linear layer", "alt-lora"
                ),
            ]
        if level == "medium":
            return [
                Option(last1, _with(base, last1), why_last1, "little-medium"),
                Option(
                    features,
                    _with(base, features),
                    "frozen features + head: the safest with this little data",
                    "alt-features",
                ),
                lora_alt,
            ]
        return [
            Option(
                strong, _with(base, strong, weight_decay=0.1), why_small_low, "little-different"
            ),
            Option(
                last2,
                _with(base, last2),
                "head + last blocks: the classic alternative",
                "alt-freeze",
            ),
            Option(
                features,
                _with(base, features),
                "frozen features + head: a baseline that cannot overfit",
                "alt-features",
            ),
        ]
    if regime == "medium":
        if level == "high":
            return [
                Option(first_half, _with(base, first_half), why_first_half, "medium-similar"),
                lora_alt,
                Option(
                    full,
                    _with(base, full),
                    "full fine-tuning: more capacity than needed here",
                    "alt-full",
                ),
            ]
        return [
            Option(_lora(r), _with(base, _lora(r)), why_lora, "medium-different"),
            Option(
                first_half,
                _with(base, first_half),
                f"freeze the first {half} blocks, train the rest",
                "alt-freeze",
            ),
            Option(full, _with(base, full), "full fine-tuning: the most capacity", "alt-full"),
        ]
    extra = {"layerwise_lr_decay": 0.9} if level == "high" else {}
    why = why_full + (
        "; with data this close to the pretraining data, lower blocks train at smaller rates "
        "(layer-wise decay 0.9, ULMFiT's discriminative fine-tuning) to keep their general features"
        if level == "high"
        else ""
    )
    return [
        Option(full, _with(base, full, **extra), why, "lots"),
        Option(
            _lora(16),
            _with(base, _lora(16)),
            "LoRA rank 16 on every linear layer: close to full fine-tuning at a fraction of the memory",
            "alt-lora",
        ),
        Option(
            first_half, _with(base, first_half), f"freeze the first {half} blocks", "alt-freeze"
        ),
    ]


def _decoder_options(
    info: ModelInfo, regime: str, level: str, base: dict[str, Any]
) -> list[Option]:
    r = _rank(regime, level)
    full = {"name": "full"}
    if regime == "lots" and level == "low":
        return [
            Option(
                full,
                _with(base, full),
                (
                    "lots of text far from the pretraining data: full fine-tuning learns new domains "
                    "markedly better than LoRA (Biderman et al., 2024: code and math continued "
                    "pretraining), and this much data does not overfit it"
                ),
                "decoder-lots-different",
            ),
            Option(
                _lora(16),
                _with(base, _lora(16)),
                "LoRA rank 16 on every linear layer: learns less, forgets less",
                "alt-lora",
            ),
        ]
    lora = _lora(r, dropout=0.1 if regime == "little" else 0.05)
    extra = {"weight_decay": 0.1} if regime == "little" and level == "low" else {}
    if regime == "lots":
        why = (
            f"lots of text, {level} similarity to the pretraining data: LoRA rank {r} on every "
            "linear layer matches full fine-tuning on data of this kind (Biderman et al., 2024) "
            "and forgets less of what the model knew"
        )
    elif regime == "little":
        why = (
            f"little text ({level} similarity): the model mostly has to learn the format; LoRA "
            f"rank {r} on every linear layer with dropout 0.1 is enough capacity and limits "
            "overfitting"
            + ("; weight decay 0.1 because the domain is new" if level == "low" else "")
        )
    else:
        why = (
            f"a medium amount of text, {level} similarity: LoRA rank {r} on every linear layer "
            "(QLoRA's finding: adapting all linear layers, not only attention, matches full "
            "fine-tuning)"
        )
    options = [Option(lora, _with(base, lora, **extra), why, f"decoder-{regime}")]
    if regime == "little":
        prompt = {"name": "prompt_tuning", "num_virtual_tokens": 20}
        options.append(
            Option(
                prompt,
                _with(base, prompt),
                "prompt tuning: 20 virtual tokens, the fewest trainable weights",
                "alt-prompt",
            )
        )
    options.append(
        Option(
            full,
            _with(base, full),
            "full fine-tuning: the most capacity, the most memory and forgetting",
            "alt-full",
        )
    )
    return options


def _cnn_options(info: ModelInfo, regime: str, level: str, base: dict[str, Any]) -> list[Option]:
    # The CNN recipe (configs/cnn-freeze.yaml, bench/cnn_compare.py): a new head at 10x the
    # learning rate of the pretrained layers, lr 3e-4; the less data and the closer the
    # pretraining images, the fewer blocks train.
    n = info.blocks
    cnn = {"learning_rate": 3e-4, "head_lr_multiplier": 10}

    def last(k: int) -> dict[str, Any]:
        return {"name": "freeze", "train_last_n": min(k, n)}

    features = {"name": "features", "C": 1.0}
    full = {"name": "full"}
    table = {
        ("little", "high"): (features, "frozen CNN features + a logistic-regression head"),
        ("little", "medium"): (last(1), "the last block + head"),
        ("little", "low"): (last(2), "the last 2 blocks + head"),
        ("medium", "high"): (last(2), "the last 2 blocks + head"),
        ("medium", "medium"): (last(3), "the last 3 blocks + head"),
        ("medium", "low"): (full, "every block, the head at 10x the backbone's learning rate"),
    }
    method, what = table.get(
        (regime, level), (full, "every block, the head at 10x the backbone's learning rate")
    )
    why = (
        f"CNN transfer recipe, {regime} data with {level} similarity: train {what}. Early "
        "convolutions hold general features (edges, textures) and later ones task-specific "
        "parts, so the less data and the closer the images, the fewer blocks train"
    )
    primary = Option(
        method,
        _with(base, method, **cnn) if method["name"] != "features" else _with(base, method),
        why,
        f"cnn-{regime}-{level}",
    )
    lora = _lora(8, targets=info.conv_targets) if info.conv_targets else None
    options = [primary]
    for alt, alt_why in (
        (last(2), "the last 2 blocks + head"),
        (full, "every block, head lr x10"),
        (features, "frozen features + head: the cheapest"),
    ):
        if alt != method:
            options.append(
                Option(
                    alt,
                    _with(base, alt, **cnn) if alt["name"] != "features" else _with(base, alt),
                    alt_why,
                    "alt-cnn",
                )
            )
    if lora is not None:
        options.insert(
            2,
            Option(
                lora,
                _with(base, lora),
                "LoRA rank 8 on every convolution + head: within 2 points of full fine-tuning in bench/cnn_compare.py",
                "alt-lora",
            ),
        )
    return options[:4]


def _multi_task_options(
    info: ModelInfo, task: str, regime: str, level: str, tasks: int, base: dict[str, Any]
) -> list[Option]:
    r = _rank(regime, level)
    targets = info.conv_targets if info.kind == "cnn" else "all-linear"
    lora = _lora(r, targets=targets)
    how = (
        "`deltatune multitask` trains them together, batches drawn per task"
        if task == "classification"
        else "one `deltatune train` run per task, then `dt.set_active`/`dt.route` to switch"
    )
    why = (
        f"{tasks} tasks: one LoRA adapter (rank {r}) per task on one shared frozen base: {tasks} "
        "small adapters instead of as many model copies, no task can overwrite another's "
        f"weights, and a new task is added later without retraining the others; {how}"
    )
    options = [Option(lora, _with(base, lora), why, "many-tasks")]
    if info.kind != "cnn":
        pf = {"name": "pfeiffer", "reduction_factor": 16}
        options.append(
            Option(
                pf,
                _with(base, pf),
                (
                    "a Pfeiffer adapter per task: the same isolation, and AdapterFusion can later "
                    "combine the tasks' adapters"
                ),
                "alt-pfeiffer",
            )
        )
    bitfit = {"name": "bitfit"}
    options.append(
        Option(
            bitfit,
            _with(base, bitfit),
            "BitFit per task: the smallest per-task delta (biases)",
            "alt-bitfit",
        )
    )
    return options


# --------------------------------------------------------------------------- memory


def _default_estimator() -> Any:
    import deltatune.estimate as estimator

    return estimator


def _task_type(task: str) -> str | None:
    return {"classification": "sequence-classification", "causal-lm": "causal-lm"}.get(task)


class _Memory:
    """Calls the estimator for options, at the planned batch and sequence length.

    ``features`` (frozen features + a closed-form head) is sized as training the head alone
    (``freeze`` with ``train_last_n: 0``): the frozen network then keeps no activation for
    backward, so that is the forward pass plus the head, an upper bound of the feature
    extraction. CNNs are not sized: the estimator traces transformers models (token inputs).
    """

    def __init__(
        self,
        estimator: Any,
        model: Any,
        task: str,
        seq_len: int,
        dtype: str,
        budget: int | None,
        enabled: bool = True,
    ) -> None:
        self.estimator = estimator
        self.model = model
        self.task_type = _task_type(task)
        self.seq_len = seq_len
        self.dtype = dtype
        self.budget = budget
        self.enabled = enabled
        self.failures: list[str] = []

    def _sized_method(self, method: dict[str, Any]) -> dict[str, Any]:
        if method["name"] == "features":
            return {"name": "freeze", "train_last_n": 0}
        return method

    def kwargs(self, train: dict[str, Any]) -> dict[str, Any]:
        return {
            "seq_len": self.seq_len,
            "dtype": self.dtype,
            "gradient_checkpointing": bool(train.get("gradient_checkpointing", False)),
            "task_type": self.task_type,
        }

    def check(self, option: Option) -> Option:
        option.peak_bytes, option.fits, option.estimate = None, None, None
        if not self.enabled:
            return option
        try:
            est = self.estimator.estimate(
                self.model,
                self._sized_method(option.method),
                batch_size=option.train["batch_size"],
                **self.kwargs(option.train),
            )
        except DeltatuneError as exc:
            self.failures.append(f"{option.label}: {exc}")
            return option
        option.estimate = est
        option.peak_bytes = int(est.peak)
        option.fits = None if self.budget is None else option.peak_bytes <= self.budget
        return option

    def largest_batch(self, option: Option) -> int:
        if self.budget is None or not self.enabled:
            return 0
        try:
            return int(
                self.estimator.max_batch_size(
                    self.model,
                    self._sized_method(option.method),
                    self.budget,
                    **self.kwargs(option.train),
                )
            )
        except DeltatuneError as exc:
            self.failures.append(f"{option.label}: {exc}")
            return 0


def _qlora_of(adapter: Option, regime: str, level: str) -> dict[str, Any]:
    r = int(adapter.method.get("r", _rank(regime, level)))
    return {
        "name": "qlora",
        "quantize": "nf4",
        "r": r,
        "lora_alpha": 2 * r,
        "lora_dropout": adapter.method.get("lora_dropout", 0.05),
        "target_modules": "all-linear",
    }


def _lighter_options(adapter: Option, regime: str, level: str) -> list[tuple[str, Option]]:
    """After ``adapter`` (a method on the frozen float base) does not fit: cut the larger term
    of its peak first. Frozen weights at least half the peak: QLoRA (NF4 weights, ~0.52 bytes
    instead of 4) first; activations larger: gradient checkpointing on the float base first
    (no quantisation error; QLoRA cost SmolLM2 11% perplexity, docs/qlora.md). Then both."""
    qlora = _qlora_of(adapter, regime, level)
    qtrain = {**adapter.train, "learning_rate": _lr(qlora)}
    parts = estimate_components(adapter.estimate)
    weights, peak = parts.get("weights"), parts.get("peak")
    share = (
        f" (frozen weights {weights / GIB:.3f} of its {peak / GIB:.3f} GiB peak)"
        if weights is not None and peak
        else ""
    )
    quantize = Option(
        qlora,
        qtrain,
        f"{adapter.label} does not fit and its frozen weights are the larger part{share}: "
        "QLoRA stores the frozen linear weights in 4-bit NF4 (~0.52 bytes per weight instead of 4)",
        "memory-qlora",
    )
    checkpoint = Option(
        dict(adapter.method),
        {**adapter.train, "gradient_checkpointing": True},
        f"{adapter.label} does not fit and activations are the larger part{share}: gradient "
        "checkpointing keeps one block's activations at a time and recomputes the rest in "
        "backward (~1/3 more compute), on the float base (no quantisation error)",
        "memory-checkpointing",
    )
    both = Option(
        dict(qlora),
        {**qtrain, "gradient_checkpointing": True},
        "neither QLoRA nor gradient checkpointing alone fits: both (NF4 weights, one block's "
        "activations at a time)",
        "memory-qlora-checkpointing",
    )
    weights_first = weights is None or peak is None or weights >= peak - weights
    first = quantize if weights_first else checkpoint
    return [(first.rule, first), (both.rule, both)]


def fit_memory(
    primary: Option,
    memory: _Memory,
    info: ModelInfo,
    regime: str,
    level: str,
) -> tuple[Option, list[tuple[str, str]]]:
    """The first option of the fallback chain that fits the budget, and the reasons.

    Chain: the primary option; LoRA on the float base (if the primary trains the base's
    weights); then, for text models, the cut of the larger part of that adapter's peak first
    (QLoRA NF4 when the frozen weights are at least half of it, else gradient checkpointing),
    then both; the last option at the largest batch that fits
    (:func:`deltatune.estimate.max_batch_size`), with gradient accumulation keeping the planned
    batch. Options the estimator cannot size are skipped.
    """
    reasons: list[tuple[str, str]] = []
    budget = memory.budget
    memory.check(primary)
    if primary.peak_bytes is None:
        if not memory.enabled:
            reasons.append(
                (
                    "memory-unknown",
                    f"memory not estimated: the estimator sizes transformers models, not a "
                    f"{info.architecture} CNN; check the peak with a short run "
                    "(bench/cnn_compare.py reports peak MiB per variant)",
                )
            )
        return primary, reasons
    if budget is None:
        reasons.append(
            (
                "memory-unknown",
                f"no memory budget given: the estimated peak is {primary.peak_bytes / GIB:.3f} "
                "GiB at the planned batch; pass --memory-gib to check it",
            )
        )
        return primary, reasons
    if primary.fits:
        reasons.append(
            (
                "memory-fits",
                f"memory: the estimated peak {primary.peak_bytes / GIB:.3f} GiB fits the "
                f"{budget / GIB:.2f} GiB budget at batch {primary.train['batch_size']} x "
                f"{memory.seq_len}",
            )
        )
        return primary, reasons

    tried = [primary]

    def needs() -> str:
        return "; ".join(f"{o.label} needs {o.peak_bytes / GIB:.3f} GiB" for o in tried)  # type: ignore[operator]

    def attempt(option: Option) -> bool:
        """Size ``option``; True when it fits (and is recorded as the answer)."""
        memory.check(option)
        if option.peak_bytes is None:
            return False  # the estimator has no figure for it: skip it
        if option.fits:
            reasons.append(
                (
                    option.rule,
                    f"{option.why}; estimated peak {option.peak_bytes / GIB:.3f} GiB fits "
                    f"{budget / GIB:.2f} GiB ({needs()})",
                )
            )
            return True
        tried.append(option)
        return False

    if primary.method["name"] != "features":  # trains nothing: only a smaller batch helps
        # Layer-wise decay applies to the base weights, which the adapters keep frozen.
        train = {k: v for k, v in primary.train.items() if k != "layerwise_lr_decay"}
        adapter = Option(primary.method, train, primary.why, primary.rule, primary.peak_bytes)
        adapter.estimate = primary.estimate
        if primary.method["name"] in ("full", "freeze"):
            targets = info.conv_targets if info.kind == "cnn" else "all-linear"
            lora = _lora(_rank(regime, level), targets=targets)
            adapter = Option(
                lora,
                {**train, "learning_rate": _lr(lora)},
                f"{primary.label} does not fit: LoRA keeps the base frozen, so there are no "
                "gradients or optimizer state for its weights",
                "memory-lora",
            )
            if attempt(adapter):
                return adapter, reasons
        if info.kind != "cnn":  # QLoRA quantises linear layers, not a CNN's convolutions
            for _, option in _lighter_options(adapter, regime, level):
                if attempt(option):
                    return option, reasons
    # Last resort: the smallest option at the largest batch that fits, accumulating gradients
    # up to the planned batch (as few steps as possible, then the smallest batch that keeps
    # batch x steps at or just above the planned one).
    last = tried[-1]
    planned = int(last.train["batch_size"])
    closed_form = last.method["name"] == "features"
    largest = memory.largest_batch(last) if planned > 1 else 0
    if largest >= 1:
        accum = math.ceil(planned / min(largest, planned))
        batch = math.ceil(planned / accum)
        train = {**last.train, "batch_size": batch}
        if not closed_form:
            train["grad_accum_steps"] = accum
        why = f"even {last.label} at batch {planned} does not fit: batch {batch}" + (
            ""
            if closed_form
            else f" with {accum} accumulation steps keeps the effective batch at {batch * accum}"
        )
        smaller = Option(dict(last.method), train, why, "memory-batch")
        if attempt(smaller):
            return smaller, reasons
    floor = min(tried, key=lambda o: o.peak_bytes or 0)
    weights = estimate_components(floor.estimate).get("weights")
    reasons.append(
        (
            "memory-none",
            f"nothing fits {budget / GIB:.2f} GiB, not even {last.label} at batch 1 ({needs()})"
            + (f"; the frozen weights alone take {weights / GIB:.3f} GiB" if weights else "")
            + ": use a machine with more memory or a smaller model; the smallest option tried "
            "is shown as the recommendation",
        )
    )
    return floor, reasons


# --------------------------------------------------------------------------- advise


def _check_inputs(
    examples: Any,
    num_classes: Any,
    memory_gib: Any,
    tasks: Any,
    similarity: Any,
    sample: Any,
    batch_size: Any,
    seq_len: Any,
    task: Any,
) -> None:
    def whole(value: Any) -> bool:
        return isinstance(value, int) and not isinstance(value, bool)

    if not whole(examples) or examples < 1:
        raise ConfigError(
            f"--examples: value {examples!r} must be a whole number of training examples >= 1, "
            "e.g. --examples 200"
        )
    if num_classes is not None and (not whole(num_classes) or num_classes < 2):
        raise ConfigError(
            f"--classes: value {num_classes!r} must be a whole number >= 2 (or leave it out)"
        )
    if num_classes is not None and examples < num_classes:
        raise ConfigError(
            f"--examples: {examples} examples cannot cover --classes {num_classes}; give at least "
            "one example per class"
        )
    if memory_gib is not None and (
        isinstance(memory_gib, bool)
        or not isinstance(memory_gib, int | float)
        or not memory_gib > 0
        or math.isinf(memory_gib)
    ):
        raise ConfigError(
            f"--memory-gib: value {memory_gib!r} must be a positive number of GiB, e.g. "
            "--memory-gib 8 (or leave it out: no budget)"
        )
    if not whole(tasks) or tasks < 1:
        raise ConfigError(f"--tasks: value {tasks!r} must be a whole number >= 1")
    if similarity is not None and similarity not in LEVELS:
        raise ConfigError(
            f"--similarity: value {similarity!r} is not one of {', '.join(LEVELS)}; or measure it "
            "with --sample FILE"
        )
    if similarity is not None and sample is not None:
        raise ConfigError(
            "--similarity and --sample both given; give one (--sample measures the similarity)"
        )
    for name, value in (("--batch-size", batch_size), ("--seq-len", seq_len)):
        if not whole(value) or value < 1:
            raise ConfigError(f"{name}: value {value!r} must be a whole number >= 1")
    if task is not None and task not in TASKS:
        raise ConfigError(f"--task: value {task!r} is not one of {', '.join(TASKS)}")


def _resolve_task(task: str | None, info: ModelInfo) -> str:
    natural = {"decoder": "causal-lm", "cnn": "image", "encoder": "classification"}[info.kind]
    if task is None:
        return natural
    if task == "image" and info.kind != "cnn":
        raise ConfigError(
            f"--task: image needs a CNN, but '{info.name}' is a {info.architecture}; use "
            "--model embedded-vgg16bn (or your CNN) or --task classification"
        )
    if info.kind == "cnn" and task != "image":
        raise ConfigError(f"--task: '{info.name}' is a CNN; use --task image")
    if task == "causal-lm" and info.kind != "decoder":
        raise ConfigError(
            f"--task: causal-lm needs a decoder, but '{info.name}' is a {info.architecture}; use "
            "--model embedded-smollm2 or --task classification"
        )
    return task


def read_sample(path: str | Path, text_column: str = "text", max_texts: int = 32) -> list[str]:
    """Texts of a sample file: ``.txt`` (one per line), ``.csv``/``.tsv``/``.jsonl`` (a column)."""
    from deltatune.strategies.corpus import CorpusConfig, load_corpus

    p = Path(path).expanduser()
    if not p.is_file():
        raise ConfigError(
            f"--sample: '{p}' does not exist; give a .txt (one text per line), .csv, .tsv or "
            ".jsonl file with a sample of your data"
        )
    return load_corpus(
        CorpusConfig(source=str(p), text_column=text_column, max_texts=max_texts, unit="auto")
    )


def advise(
    model: str | nn.Module,
    *,
    examples: int,
    task: str | None = None,
    num_classes: int | None = None,
    memory_gib: float | None = None,
    tasks: int = 1,
    similarity: str | None = None,
    sample: str | Path | Sequence[str] | None = None,
    sample_column: str = "text",
    batch_size: int = 16,
    seq_len: int = 128,
    dtype: str = "float32",
    data: Sequence[str] = (),
    estimator: Any = None,
    measurer: Any = None,
) -> Advice:
    """Recommend a method and its settings for fine-tuning ``model``; see the module docstring.

    Args:
        model: ``"embedded-minilm"``, ``"embedded-smollm2"``, ``"embedded-vgg16bn"``, a
            transformers folder, a hub id, a CNN class path, or an ``nn.Module``.
        examples: training examples (>= 1). ``num_classes``: classes (>= 2), when known.
        task: ``classification``, ``causal-lm`` or ``image``; ``None`` follows the model.
        memory_gib: the memory budget in GiB (``None``: no budget; the estimate is reported).
        tasks: how many tasks will share the model.
        similarity: ``high``/``medium``/``low``; or ``sample`` (a file, or a list of texts)
            from which :func:`measure_similarity` measures it. Neither: assumed ``medium``.
        batch_size, seq_len, dtype: the planned training shape, for the memory estimate.
        data: data files for the written config (one per task with several tasks).
        estimator: an object with ``estimate`` and ``max_batch_size`` (default
            :mod:`deltatune.estimate`). ``measurer``: replaces :func:`measure_similarity`.
    """
    _check_inputs(
        examples, num_classes, memory_gib, tasks, similarity, sample, batch_size, seq_len, task
    )
    info = describe_model(model)
    task = _resolve_task(task, info)
    reasons: list[tuple[str, str]] = []
    measurement = None
    if similarity is not None:
        level, source = similarity, "given"
        reasons.append(("similarity", f"similarity {level}, as given"))
    elif sample is not None:
        if info.kind == "cnn":
            raise ConfigError(
                "--sample: the similarity measurement reads text and this model is a CNN; give "
                "--similarity high|medium|low for images"
            )
        texts = (
            read_sample(sample, sample_column) if isinstance(sample, str | Path) else list(sample)
        )
        measurement = (measurer or measure_similarity)(model, texts)
        level, source = measurement.level, "measured"
        reasons.append(("similarity", f"similarity {level}, measured: {measurement.describe()}"))
    else:
        level, source = "medium", "assumed"
        reasons.append(
            (
                "similarity",
                "similarity not given: assumed medium; give --similarity high|medium|low or measure it "
                "with --sample FILE",
            )
        )
    regime, regime_text = data_regime(task, examples, num_classes)
    reasons.insert(0, ("data-size", regime_text))
    options = quality_options(info, task, regime, level, tasks, batch_size)
    primary, alternatives = options[0], options[1:]
    reasons.append((primary.rule, primary.why))
    budget = None if memory_gib is None else int(memory_gib * GIB)
    est_model = model if isinstance(model, nn.Module) else info.name
    memory = _Memory(
        estimator or _default_estimator(),
        est_model,
        task,
        seq_len,
        dtype,
        budget,
        enabled=info.kind != "cnn",
    )
    chosen, memory_reasons = fit_memory(primary, memory, info, regime, level)
    reasons += memory_reasons
    if chosen is not primary:
        alternatives = [primary, *alternatives]
    alternatives = [a for a in alternatives if (a.method, a.train) != (chosen.method, chosen.train)]
    for alt in alternatives:
        if alt.peak_bytes is None and alt.estimate is None:
            memory.check(alt)
    for failure in memory.failures:
        reasons.append(("memory-estimator", f"the estimator could not size {failure}"))
    return Advice(
        model=info,
        task=task,
        method=chosen.method,
        train=chosen.train,
        reasons=[text for _, text in reasons],
        rules=[rule for rule, _ in reasons],
        estimate=chosen.estimate,
        peak_bytes=chosen.peak_bytes,
        budget_bytes=budget,
        fits=chosen.fits,
        alternatives=alternatives,
        examples=examples,
        num_classes=num_classes,
        tasks=tasks,
        regime=regime,
        similarity=level,
        similarity_source=source,
        measurement=measurement,
        batch_size=batch_size,
        seq_len=seq_len,
        data=list(data),
    )


# --------------------------------------------------------------------------- CLI


def add_parser(sub: Any) -> None:
    """Add ``deltatune advise`` to the CLI's subparsers."""
    p = sub.add_parser(
        "advise", help="recommend a method and its settings (data size, similarity, memory)"
    )
    p.add_argument(
        "--model",
        default="embedded-minilm",
        help="name, folder or hub id (default embedded-minilm)",
    )
    p.add_argument("--examples", type=int, required=True, help="number of training examples")
    p.add_argument("--classes", type=int, default=None, help="number of classes (classification)")
    p.add_argument(
        "--task", default=None, help="classification | causal-lm | image (default: by model)"
    )
    p.add_argument("--memory-gib", type=float, default=None, help="memory budget in GiB")
    p.add_argument("--tasks", type=int, default=1, help="how many tasks share the model")
    p.add_argument(
        "--similarity", default=None, help="high | medium | low: data vs pretraining data"
    )
    p.add_argument(
        "--sample",
        default=None,
        help="a sample of the data (.txt/.csv/.jsonl) to measure the similarity",
    )
    p.add_argument(
        "--sample-column", default="text", help="the text column of a .csv/.jsonl sample"
    )
    p.add_argument("--batch-size", type=int, default=16, help="planned batch size (default 16)")
    p.add_argument(
        "--seq-len", type=int, default=128, help="planned tokens per example (default 128)"
    )
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument(
        "--data",
        action="append",
        default=[],
        help="data file for the written config (repeat per task)",
    )
    p.add_argument("--write-config", default=None, help="write a runnable config YAML here")
    p.add_argument("--output-dir", default="runs/advised", help="output_dir of the written config")
    p.add_argument("--json", action="store_true", help="print the advice as JSON")
    p.set_defaults(func=cmd_advise)


def cmd_advise(args: Any) -> int:
    advice = advise(
        args.model,
        examples=args.examples,
        task=args.task,
        num_classes=args.classes,
        memory_gib=args.memory_gib,
        tasks=args.tasks,
        similarity=args.similarity,
        sample=args.sample,
        sample_column=args.sample_column,
        batch_size=args.batch_size,
        seq_len=args.seq_len,
        dtype=args.dtype,
        data=args.data,
    )
    if args.write_config:
        from deltatune.io import write_text

        path = Path(args.write_config)
        write_text(path, advice.to_yaml(args.output_dir))
    if args.json:
        print(json.dumps(advice.to_dict(), indent=2))
    else:
        print(advice.format())
        if args.write_config:
            print(
                f"config        {args.write_config} -> {advice.command.replace('CONFIG.yaml', args.write_config)}"
            )
    return 0

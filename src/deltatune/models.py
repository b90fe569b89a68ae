"""Load the base model: the embedded MiniLM, a local transformers folder, or a hub id by name.

The hub is reached only when the user names a hub id (``model.name_or_path: org/name``);
the embedded default and local folders load with ``local_files_only=True``. Remote code stays
off unless ``trust_remote_code: true``. CNNs for image data (``embedded-vgg16bn``, a class
path, ``torchvision:``/``timm:`` names) are built by :mod:`deltatune.vision`; the fields
``pretrained``, ``weights``, ``head`` and ``model_kwargs`` apply to them only.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Literal

from torch import nn

from deltatune.config import BaseConfig
from deltatune.errors import ConfigError, DeltatuneError
from deltatune.targeting import HEAD_NAMES, output_layer_names, set_submodule

EMBEDDED_ENCODER = "embedded-minilm"
#: SmolLM2-135M-Instruct (a LlamaForCausalLM), converted once from the embedded GGUF and cached.
EMBEDDED_DECODER = "embedded-smollm2"


@dataclasses.dataclass
class ModelConfig(BaseConfig):
    """Which pretrained model to fine-tune.

    Fields:
        name_or_path: ``"embedded-minilm"`` (all-MiniLM-L6-v2, installed by ``make setup``), a
            local transformers model folder, or a Hugging Face hub id (downloads; only when
            named). Default ``"embedded-minilm"``.
        task: ``"sequence-classification"`` (a new head sized to the labels) or ``"causal-lm"``
            (supervised fine-tuning of a decoder on prompt/response pairs, see
            :mod:`deltatune.lm`; ``name_or_path: embedded-smollm2`` is the embedded decoder).
            Default ``"sequence-classification"``.
        trust_remote_code: allow a hub model's own Python code. Default ``false``.
        dtype: ``"float32"``, ``"bfloat16"`` or ``"float16"`` weights. Default ``"float32"``.
        pretrained: CNNs only: ``false`` builds the network with random weights (the
            from-scratch baseline; a user CNN's ``weights`` are then not read). Default ``true``.
        weights: CNNs only: a state-dict file (``.pt``/``.pth``/``.bin``, read with
            ``torch.load(weights_only=True)``, or ``.safetensors``) for a CNN named by a class
            path. Default ``None``.
        head: CNNs only: the name of the network's output ``nn.Linear`` to replace by the new
            head; ``None`` finds it (or uses the network as a feature extractor). Default ``None``.
        model_kwargs: CNNs only: keyword arguments for the CNN's class. Default ``{}``.
        quantize: ``"nf4"`` (4-bit NormalFloat, double-quantised, via torchao) or ``"int8"``
            quantises every linear layer except the output layer at load time into a frozen
            :class:`~deltatune.quant.QuantLinear` (QLoRA's base; see docs/qlora.md).
            ``None`` keeps float weights. Default ``None``.
        quantize_compute_dtype: the quantised layers' matmul dtype: ``"auto"`` (bfloat16 where
            the device has it, else float32), ``"bfloat16"`` or ``"float32"``. Default ``"auto"``.
    """

    name_or_path: str = EMBEDDED_ENCODER
    task: Literal["sequence-classification", "causal-lm"] = "sequence-classification"
    trust_remote_code: bool = False
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    pretrained: bool = True
    weights: str | None = None
    head: str | None = None
    model_kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)
    quantize: Literal["nf4", "int8"] | None = None
    quantize_compute_dtype: Literal["auto", "bfloat16", "float32"] = "auto"


def resolve_model_path(name_or_path: str) -> tuple[str, bool]:
    """Return ``(path or hub id, local_only)``; errors name the value and the fix."""
    if name_or_path == EMBEDDED_ENCODER:
        from deltatune.data.assets import embedded_encoder_path

        return str(embedded_encoder_path()), True
    if name_or_path == EMBEDDED_DECODER:
        from deltatune.lm.smollm2 import smollm2_path

        return str(smollm2_path()), True
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ConfigError(
                f"model.name_or_path: folder '{path}' has no config.json; give a transformers model "
                "folder (save_pretrained output), a hub id, or 'embedded-minilm'"
            )
        return str(path), True
    # Hub ids are "name" or "org/name"; anything else that does not exist is a wrong path.
    if name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1:
        raise ConfigError(
            f"model.name_or_path: '{name_or_path}' is not a folder; give an existing model folder, "
            f"a hub id like 'bert-base-uncased', or '{EMBEDDED_ENCODER}'"
        )
    return name_or_path, False


def load_tokenizer(cfg: ModelConfig) -> Any:
    from transformers import AutoTokenizer

    path, local_only = resolve_model_path(cfg.name_or_path)
    try:
        return AutoTokenizer.from_pretrained(
            path, local_files_only=local_only, trust_remote_code=cfg.trust_remote_code
        )
    except OSError as exc:
        raise DeltatuneError(f"cannot load the tokenizer of '{cfg.name_or_path}': {exc}") from None


def load_classifier(cfg: ModelConfig, label_names: list[str]) -> nn.Module:
    """A sequence classifier whose head is new and sized to ``label_names``."""
    import torch
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    path, local_only = resolve_model_path(cfg.name_or_path)
    verbosity = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    # The "newly initialised head" notice is expected here, and the per-tensor loading bar
    # would bury deltatune's own output and one-line errors.
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        model = AutoModelForSequenceClassification.from_pretrained(
            path,
            num_labels=len(label_names),
            id2label=dict(enumerate(label_names)),
            label2id={n: i for i, n in enumerate(label_names)},
            ignore_mismatched_sizes=True,
            local_files_only=local_only,
            trust_remote_code=cfg.trust_remote_code,
            dtype=getattr(torch, cfg.dtype),
        )
    except OSError as exc:
        raise DeltatuneError(f"cannot load model '{cfg.name_or_path}': {exc}") from None
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = getattr(model.config, "eos_token_id", None)
    quantize_base(model, cfg)
    return model


def quantize_base(model: nn.Module, cfg: ModelConfig) -> nn.Module:
    """Apply ``cfg.quantize`` (nf4 / int8 / None) to a loaded base: every linear layer but the
    output layer becomes a frozen quantised one (:func:`deltatune.quant.quantize_model`)."""
    if cfg.quantize is not None:
        from deltatune.quant import quantize_model

        quantize_model(model, cfg.quantize, compute_dtype=cfg.quantize_compute_dtype)
    return model


def replace_head(model: nn.Module, num_outputs: int, head: str | None = None) -> str:
    """Swap the model's output Linear for a new one with ``num_outputs`` outputs.

    ``head`` names the module; by default the model's ``classifier``/``score``/``fc``/``head``
    Linear (or its output embeddings). Returns the head's name. The new layer is initialised
    like ``nn.Linear`` and trainable.
    """
    if head is None:
        names = [
            n
            for n, m in model.named_modules()
            if n.split(".")[-1] in HEAD_NAMES and isinstance(m, nn.Linear)
        ]
        names = names or sorted(output_layer_names(model))
        if not names:
            raise ConfigError(
                f"cannot find the output layer of {type(model).__name__}; pass head=<module name>"
            )
        head = names[-1]
    try:
        old = model.get_submodule(head)
    except AttributeError:
        raise ConfigError(f"head '{head}' is not a submodule of {type(model).__name__}") from None
    if not isinstance(old, nn.Linear):
        raise ConfigError(f"head '{head}' is a {type(old).__name__}, not a Linear layer")
    new = nn.Linear(old.in_features, num_outputs, bias=old.bias is not None)
    set_submodule(model, head, new.to(device=old.weight.device, dtype=old.weight.dtype))
    return head

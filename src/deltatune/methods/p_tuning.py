r"""P-Tuning v1 (Liu et al., 2021, "GPT Understands, Too"): virtual tokens produced by a small
trainable prompt encoder from a table ``U ∈ R^{n x d}``, prepended to the embedded input.

::

    U (n x d) ──► [BiLSTM] ──► MLP ──► P (n x d)
                                        └─► [p_1 .. p_n, e_1 .. e_L] ──► frozen model ──► y
    input_ids ──► E ──► [e_1 .. e_L] ───┘

    MLP:  P = W_3 relu(W_2 relu(W_1 U + b_1) + b_2) + b_3           (h = encoder_hidden_size)
    LSTM: P = W_2 relu(W_1 [→LSTM(U) ; ←LSTM(U)] + b_1) + b_2      (hidden 2h)

``U`` starts from N(0, 1) and the Linear/LSTM layers from PyTorch's defaults (as in PEFT);
masks, positions and labels are handled as for prompt tuning (:mod:`deltatune.virtual_tokens`).

Saved format (Hugging Face PEFT's, ``peft_type`` ``P_TUNING``): ``prompt_embeddings`` holds
the encoder's output ``P`` (n, d), which is all PEFT reads (it loads it into its inference-mode
table), so a deltatune P-Tuning adapter loads in PEFT with the same outputs. deltatune also
writes the encoder's own weights (``prompt_encoder.embedding.weight``,
``prompt_encoder.mlp_head.0.weight``, ...) so that training resumes exactly; PEFT ignores
them. A folder written by PEFT itself holds only ``P`` (no encoder to train); load it with
:func:`load_peft_p_tuning`, which gives the same outputs through a prompt-tuning table. Not
mergeable; several named adapters, ``disable``/``enable`` and ``unload`` work.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import ClassVar, Literal

from torch import nn

from deltatune.errors import CheckpointError, ConfigError
from deltatune.registry import Capabilities, MethodConfig, MethodSpec, register
from deltatune.virtual_tokens import (
    PromptEncoder,
    check_model,
    layer_for,
    param_dtype_device,
    prepare_modules_to_save,
)


@dataclasses.dataclass
class PromptEncoderConfig(MethodConfig):
    """P-Tuning settings; field names and meanings are Hugging Face PEFT's.

    - ``num_virtual_tokens`` (20): ``n``.
    - ``encoder_reparameterization_type`` (``MLP``): ``MLP`` or ``LSTM``.
    - ``encoder_hidden_size`` (None = the model's hidden size ``d``): ``h``.
    - ``encoder_num_layers`` (2): LSTM layers (the MLP always has 3 Linear layers).
    - ``encoder_dropout`` (0.0): dropout between LSTM layers.
    - ``token_dim``, ``num_transformer_submodules``, ``num_attention_heads``, ``num_layers``
      (None): PEFT's model facts; ``token_dim`` is checked when set.
    - ``modules_to_save`` (None), ``task_type``, ``base_model_name_or_path``: as in every
      method (``task_type: SEQ_CLS`` also trains and saves ``classifier``/``score``).
    """

    method_name: ClassVar[str] = "p_tuning"
    peft_type: ClassVar[str] = "P_TUNING"

    num_virtual_tokens: int = 20
    encoder_reparameterization_type: Literal["MLP", "LSTM"] = "MLP"
    encoder_hidden_size: int | None = None
    encoder_num_layers: int = 2
    encoder_dropout: float = 0.0
    token_dim: int | None = None
    num_transformer_submodules: int | None = None
    num_attention_heads: int | None = None
    num_layers: int | None = None
    modules_to_save: list[str] | None = None

    def validate(self) -> None:
        if self.num_virtual_tokens < 1:
            raise ConfigError(
                f"num_virtual_tokens={self.num_virtual_tokens} must be a positive integer (try 20)"
            )
        if self.encoder_hidden_size is not None and self.encoder_hidden_size < 1:
            raise ConfigError(
                f"encoder_hidden_size={self.encoder_hidden_size} must be a positive integer "
                "(or unset for the model's hidden size)"
            )
        if self.encoder_num_layers < 1:
            raise ConfigError(f"encoder_num_layers={self.encoder_num_layers} must be >= 1 (try 2)")
        if not 0.0 <= self.encoder_dropout < 1.0:
            raise ConfigError(f"encoder_dropout={self.encoder_dropout} must be in [0, 1)")
        if self.num_transformer_submodules not in (None, 1):
            raise ConfigError(
                f"num_transformer_submodules={self.num_transformer_submodules}: only 1 (encoder-"
                "only or decoder-only models) is supported; remove the field"
            )


def inject_p_tuning(model: nn.Module, config: PromptEncoderConfig, adapter_name: str) -> None:
    path, emb, dim = check_model(model, config.token_dim, "p_tuning")
    dtype, device = param_dtype_device(emb)
    encoder = PromptEncoder(
        config.num_virtual_tokens,
        dim,
        config.encoder_hidden_size or dim,
        config.encoder_reparameterization_type,
        config.encoder_num_layers,
        config.encoder_dropout,
    ).to(device=device, dtype=dtype)
    prepare_modules_to_save(model, config, adapter_name)
    layer_for(model, path, emb).add_encoder(adapter_name, encoder)


def load_peft_p_tuning(
    model: nn.Module,
    path: str | os.PathLike[str],
    adapter_name: str = "default",
    *,
    is_trainable: bool = False,
) -> nn.Module:
    """Load a P-Tuning folder written by Hugging Face PEFT (only ``prompt_embeddings``, the
    encoder's output) as a prompt-tuning adapter with that table: the same outputs as in PEFT.

    Training such an adapter further trains the table directly (the encoder is not in the file).
    """
    from deltatune.checkpoint import CONFIG_NAME, WEIGHTS_NAME, load_adapter
    from deltatune.io import write_json

    folder = Path(path)
    cfg_path = folder / CONFIG_NAME
    if not cfg_path.is_file():
        raise CheckpointError(f"'{folder}' holds no {CONFIG_NAME}")
    raw = json.loads(cfg_path.read_text(encoding="utf-8"))
    if raw.get("peft_type") != "P_TUNING":
        raise CheckpointError(
            f"{cfg_path}: peft_type is {raw.get('peft_type')!r}, not 'P_TUNING'; use load_adapter"
        )
    keep = ("num_virtual_tokens", "task_type", "modules_to_save", "base_model_name_or_path")
    converted = {k: raw[k] for k in keep if raw.get(k) is not None}
    converted["peft_type"] = "PROMPT_TUNING"
    with tempfile.TemporaryDirectory() as tmp:
        write_json(Path(tmp) / CONFIG_NAME, converted)
        shutil.copyfile(folder / WEIGHTS_NAME, Path(tmp) / WEIGHTS_NAME)
        return load_adapter(model, tmp, adapter_name, is_trainable=is_trainable)


register(
    MethodSpec(
        name="p_tuning",
        config_cls=PromptEncoderConfig,
        inject=inject_p_tuning,
        capabilities=Capabilities(peft_compatible=True, multi_adapter=True, disable=True),
        default_lr=1e-3,
        summary="P-Tuning (v1): virtual tokens from a trainable MLP/LSTM prompt encoder",
        family="prompt",
    )
)

__all__ = ["PromptEncoderConfig", "inject_p_tuning", "load_peft_p_tuning"]

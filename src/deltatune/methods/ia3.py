r"""(IA)³ (Liu et al., 2022, "Few-Shot Parameter-Efficient Fine-Tuning is Better and Cheaper
than In-Context Learning"): learned vectors that rescale activations.

::

    attention k, v (and other non-feed-forward targets): scale the output
        x ──► W x + b ──► ⊙ l ──► y                 y = l ⊙ (W x + b),   l ∈ R^out

    feed-forward targets (the FFN output projection): scale the input
        x ──► ⊙ l ──► W (·) + b ──► y               y = W (l ⊙ x) + b,   l ∈ R^in

Every vector starts at ones, so an injected model starts equal to its base. Semantics, shapes
and saved names follow Hugging Face PEFT exactly, so adapters move both ways:

- ``target_modules`` / ``exclude_modules``: PEFT's matching (list: a name equals an entry or
  ends with ``"." + entry``; a string: full-match regex; ``"all-linear"``). Without
  ``target_modules`` the model type's PEFT default is used (BERT ``key``, ``value``,
  ``output.dense``; LLaMA ``k_proj``, ``v_proj``, ``down_proj``; GPT-2 ``c_attn``,
  ``mlp.c_proj``).
- ``feedforward_modules``: which targets scale their input; a string is a full-match regex, a
  list matches a module whose name *ends with* an entry (PEFT's plain ``endswith``: for BERT's
  default ``output.dense`` this includes ``attention.output.dense``).
- the vector ``ia3_l`` has shape ``(out, 1)`` (output scaling) or ``(1, in)`` (input scaling)
  for Linear and GPT-2 Conv1D, ``(1, C, 1, 1)`` for Conv2d; saved as
  ``base_model.model.<module>.ia3_l``; ``peft_type`` ``IA3``.

Merging folds ``l`` into the weight: output scaling multiplies the rows of ``W`` (and the
bias), input scaling the columns (the bias stays); ``unmerge`` divides again (and restores a
saved copy where ``l`` has exact zeros, which PEFT cannot undo). Several active adapters
multiply.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from torch import nn

from deltatune.errors import ConfigError, DeltatuneError
from deltatune.layers import AdapterLayer, refuse_wrapped_target
from deltatune.registry import Capabilities, MethodConfig, MethodSpec, register
from deltatune.targeting import is_conv1d, select_modules, set_submodule

#: PEFT 0.21's ``TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING``.
DEFAULT_TARGETS: dict[str, list[str]] = {
    "t5": ["k", "v", "wo"],
    "mt5": ["k", "v", "wi_1"],
    "gpt2": ["c_attn", "mlp.c_proj"],
    "bloom": ["query_key_value", "mlp.dense_4h_to_h"],
    "roberta": ["key", "value", "output.dense"],
    "opt": ["q_proj", "k_proj", "fc2"],
    "gptj": ["q_proj", "v_proj", "fc_out"],
    "gpt_neox": ["query_key_value", "dense_4h_to_h"],
    "gpt_neo": ["q_proj", "v_proj", "c_proj"],
    "bart": ["q_proj", "v_proj", "fc2"],
    "gpt_bigcode": ["c_attn", "mlp.c_proj"],
    "llama": ["k_proj", "v_proj", "down_proj"],
    "llama4": ["q_proj", "v_proj", "down_proj"],
    "mistral": ["k_proj", "v_proj", "down_proj"],
    "mixtral": ["k_proj", "v_proj", "w2"],
    "bert": ["key", "value", "output.dense"],
    "deberta-v2": ["key_proj", "value_proj", "output.dense"],
    "deberta": ["in_proj", "output.dense"],
    "falcon": ["query_key_value", "dense_4h_to_h"],
    "phi": ["q_proj", "v_proj", "fc2"],
    "gemma": ["q_proj", "v_proj", "down_proj"],
    "gemma2": ["q_proj", "v_proj", "down_proj"],
    "gemma3_text": ["q_proj", "v_proj", "down_proj"],
    "qwen2": ["q_proj", "v_proj", "down_proj"],
    "qwen3": ["q_proj", "v_proj", "down_proj"],
}

#: PEFT 0.21's ``TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING``.
DEFAULT_FEEDFORWARD: dict[str, list[str]] = {
    "t5": ["wo"],
    "mt5": [],
    "gpt2": ["mlp.c_proj"],
    "bloom": ["mlp.dense_4h_to_h"],
    "roberta": ["output.dense"],
    "opt": ["fc2"],
    "gptj": ["fc_out"],
    "gpt_neox": ["dense_4h_to_h"],
    "gpt_neo": ["c_proj"],
    "bart": ["fc2"],
    "gpt_bigcode": ["mlp.c_proj"],
    "llama": ["down_proj"],
    "llama4": ["down_proj"],
    "mistral": ["down_proj"],
    "mixtral": ["w2"],
    "bert": ["output.dense"],
    "deberta-v2": ["output.dense"],
    "deberta": ["output.dense"],
    "falcon": ["dense_4h_to_h"],
    "phi": ["fc2"],
    "gemma": ["down_proj"],
    "gemma2": ["down_proj"],
    "gemma3_text": ["down_proj"],
    "qwen2": ["down_proj"],
    "qwen3": ["down_proj"],
}


@dataclasses.dataclass
class IA3Config(MethodConfig):
    """(IA)³ settings; field names and meanings are Hugging Face PEFT's (every field, default).

    - ``target_modules`` (None = the model type's PEFT default): list of name suffixes, a
      full-match regex, or ``"all-linear"``.
    - ``exclude_modules`` (None): same forms; removes modules from the targets.
    - ``feedforward_modules`` (None = the model type's PEFT default): targets that scale their
      input instead of their output; a regex, or a list matched by ``endswith``. Every list
      entry must match a target. ``[]`` for none.
    - ``fan_in_fan_out`` (False): PEFT's flag for transposed (Conv1D) weights; deltatune
      detects GPT-2 Conv1D by its type, so the flag is only carried along.
    - ``modules_to_save`` (None): modules trained whole and saved too (a new head).
    - ``init_ia3_weights`` (True): vectors start at ones (the base model); ``False`` draws them
      from N(0, 1) (for tests only).
    - ``task_type``, ``base_model_name_or_path`` (None): as in every method config
      (``task_type: SEQ_CLS`` also trains and saves ``classifier``/``score``).
    """

    method_name: ClassVar[str] = "ia3"
    peft_type: ClassVar[str] = "IA3"

    target_modules: str | list[str] | None = None
    exclude_modules: str | list[str] | None = None
    feedforward_modules: str | list[str] | None = None
    fan_in_fan_out: bool = False
    modules_to_save: list[str] | None = None
    init_ia3_weights: bool = True


def is_feedforward(name: str, feedforward_modules: str | Sequence[str]) -> bool:
    """PEFT's ``_check_target_module_feedforward``: regex full match, or plain ``endswith``."""
    if isinstance(feedforward_modules, str):
        return re.fullmatch(feedforward_modules, name) is not None
    return any(name.endswith(key) for key in feedforward_modules)


class IA3Layer(AdapterLayer):
    """(IA)³ vectors on a Linear, GPT-2 Conv1D, Conv2d or Conv3d."""

    adapter_attributes = ("ia3_l",)

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        weight = getattr(base_layer, "weight", None)
        if isinstance(base_layer, nn.Linear):
            self.kind = "linear"
            self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
        elif is_conv1d(base_layer) and isinstance(weight, torch.Tensor):
            self.kind = "conv1d"
            self.in_features, self.out_features = weight.shape[0], weight.shape[1]
        elif isinstance(base_layer, nn.Conv2d | nn.Conv3d):
            self.kind = "conv"
            self.in_features, self.out_features = base_layer.in_channels, base_layer.out_channels
        else:
            raise ConfigError(
                f"(IA)³ wraps Linear, GPT-2 Conv1D, Conv2d and Conv3d, not "
                f"{type(base_layer).__name__}; adjust target_modules or add it to exclude_modules"
            )
        self.ia3_l = nn.ParameterDict()
        self.is_feedforward: dict[str, bool] = {}
        #: adapter -> (weight, bias) copies, kept while an adapter with zero entries is merged.
        self._saved: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}

    def add_adapter(self, adapter_name: str, config: IA3Config, feedforward: bool = False) -> None:
        if self.kind == "conv":
            base: nn.Conv2d = self.base_layer  # type: ignore[assignment]
            if feedforward and base.groups != 1:
                raise ConfigError(
                    f"(IA)³ input scaling of a grouped Conv (groups={base.groups}) is not supported;"
                    " leave it out of feedforward_modules"
                )
            n = self.in_features if feedforward else self.out_features
            shape: tuple[int, ...] = (1, n) + (1,) * (base.weight.dim() - 2)
        else:
            shape = (1, self.in_features) if feedforward else (self.out_features, 1)
        value = torch.ones(shape) if config.init_ia3_weights else torch.randn(shape)
        weight = self.base_weight_param
        dtype = weight.dtype if weight.is_floating_point() else torch.float32
        self.ia3_l[adapter_name] = nn.Parameter(value.to(device=weight.device, dtype=dtype))
        self.is_feedforward[adapter_name] = feedforward

    def delete_adapter(self, adapter_name: str) -> None:
        super().delete_adapter(adapter_name)
        self.is_feedforward.pop(adapter_name, None)

    def adapter_tensors(self, adapter_name: str) -> dict[str, torch.Tensor]:
        return {"ia3_l": self.ia3_l[adapter_name]}

    # --- merging ------------------------------------------------------------------------------
    def _weight_scale(self, adapter_name: str) -> torch.Tensor:
        """``ia3_l`` shaped to multiply ``base_layer.weight`` (rows: output, columns: input)."""
        vec = self.ia3_l[adapter_name].data
        if self.kind == "conv1d":  # weight is (in, out): PEFT's transpose(l, fan_in_fan_out)
            return vec.t()
        if self.kind == "conv" and not self.is_feedforward[adapter_name]:
            return vec.transpose(0, 1)
        return vec

    def _bias(self) -> torch.Tensor | None:
        bias = getattr(self.base_layer, "bias", None)
        return bias if isinstance(bias, torch.Tensor) else None

    def _merge_one(self, adapter_name: str, safe_merge: bool) -> None:
        weight, bias = self.base_weight_param, self._bias()
        vec = self.ia3_l[adapter_name].data
        scale_bias = bias is not None and not self.is_feedforward[adapter_name]
        new_weight = (weight.data * self._weight_scale(adapter_name)).to(weight.dtype)
        new_bias = None
        if scale_bias and bias is not None:
            new_bias = (bias.data * vec.reshape(bias.shape)).to(bias.dtype)
        if safe_merge and not (
            torch.isfinite(new_weight).all()
            and (new_bias is None or torch.isfinite(new_bias).all())
        ):
            raise DeltatuneError(
                f"merging (IA)³ adapter '{adapter_name}' would put NaN/Inf into the weights; the "
                "adapter is probably broken (check its training loss)"
            )
        if (vec == 0).any():
            # Dividing cannot undo a zero; keep the originals to restore on unmerge.
            self._saved[adapter_name] = (
                weight.data.clone(),
                bias.data.clone() if bias is not None else None,
            )
        weight.data.copy_(new_weight)
        if new_bias is not None and bias is not None:
            bias.data.copy_(new_bias)

    def _unmerge_one(self, adapter_name: str) -> None:
        weight, bias = self.base_weight_param, self._bias()
        saved = self._saved.pop(adapter_name, None)
        if saved is not None:
            weight.data.copy_(saved[0])
            if bias is not None and saved[1] is not None:
                bias.data.copy_(saved[1])
            return
        vec = self.ia3_l[adapter_name].data
        weight.data.copy_((weight.data / self._weight_scale(adapter_name)).to(weight.dtype))
        if bias is not None and not self.is_feedforward[adapter_name]:
            bias.data.copy_((bias.data / vec.reshape(bias.shape)).to(bias.dtype))

    # --- forward ------------------------------------------------------------------------------
    def _product(self, names: list[str]) -> torch.Tensor | None:
        out: torch.Tensor | None = None
        for name in names:
            vec = self.ia3_l[name]
            if self.kind != "conv":
                vec = vec.flatten()
            out = vec if out is None else out * vec
        return out

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        names = self.adapters_to_run()
        if not names:
            return self.base_layer(x, *args, **kwargs)  # type: ignore[no-any-return]
        in_scale = self._product([n for n in names if self.is_feedforward[n]])
        out_scale = self._product([n for n in names if not self.is_feedforward[n]])
        if in_scale is not None:
            x = (x.to(in_scale.dtype) * in_scale).to(x.dtype)
        result: torch.Tensor = self.base_layer(x, *args, **kwargs)
        if out_scale is not None:
            result = (result * out_scale).to(result.dtype)
        return result


def _defaults(model: nn.Module, config: IA3Config) -> tuple[Any, Any]:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    targets = config.target_modules
    if targets is None:
        if model_type not in DEFAULT_TARGETS:
            raise ConfigError(
                f"target_modules is not set and (IA)³ has no default for model type {model_type!r};"
                " set target_modules and feedforward_modules (e.g. target_modules: [k_proj, "
                "v_proj, down_proj], feedforward_modules: [down_proj])"
            )
        targets = DEFAULT_TARGETS[model_type]
    feedforward = config.feedforward_modules
    if feedforward is None:
        if model_type not in DEFAULT_FEEDFORWARD:
            raise ConfigError(
                f"feedforward_modules is not set and (IA)³ has no default for model type "
                f"{model_type!r}; set it to the targets that scale their input (the feed-forward "
                "output projections, e.g. [down_proj]), or [] for none"
            )
        feedforward = DEFAULT_FEEDFORWARD[model_type]
    return targets, feedforward


def inject_ia3(model: nn.Module, config: IA3Config, adapter_name: str) -> None:
    from deltatune.model import modules_to_save_of

    targets, feedforward = _defaults(model, config)
    heads = modules_to_save_of(config)
    skip = {
        n
        for n, _ in model.named_modules()
        if n and any(n == h or n.endswith("." + h) for h in heads)
    }
    names = [
        n
        for n in select_modules(model, targets, exclude_modules=config.exclude_modules, skip=skip)
        if not refuse_wrapped_target(model, n, "ia3")
    ]
    if not isinstance(feedforward, str):
        unmatched = [f for f in feedforward if not any(n.endswith(f) for n in names)]
        if unmatched:
            raise ConfigError(
                f"feedforward_modules entries {unmatched} match none of the target modules; "
                f"feedforward_modules must be a subset of target_modules={targets!r}"
            )
    for name in names:
        module = model.get_submodule(name)
        if isinstance(module, AdapterLayer) and not isinstance(module, IA3Layer):
            raise ConfigError(f"module '{name}' already carries a {type(module).__name__} adapter")
        layer = module if isinstance(module, IA3Layer) else IA3Layer(module)
        layer.add_adapter(adapter_name, config, feedforward=is_feedforward(name, feedforward))
        if layer is not module:
            set_submodule(model, name, layer)


register(
    MethodSpec(
        name="ia3",
        config_cls=IA3Config,
        inject=inject_ia3,
        capabilities=Capabilities(
            merge=True, peft_compatible=True, multi_adapter=True, disable=True
        ),
        default_lr=3e-3,
        summary="(IA)³: learned vectors rescaling keys, values and feed-forward activations",
        family="adapter",
    )
)

__all__ = ["DEFAULT_FEEDFORWARD", "DEFAULT_TARGETS", "IA3Config", "IA3Layer", "inject_ia3"]

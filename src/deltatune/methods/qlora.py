r"""QLoRA (Dettmers et al., 2023): LoRA on every linear layer of a frozen 4-bit NF4 base.

::

            ┌───────────────────────────────┐
    x ──┬──►│ Ŵ = NF4⁻¹(codes, ĉ)  (frozen) │──── in bf16 (fp32 without bf16) ───┐
        │   └───────────────────────────────┘                                    ▼
        └──► dropout ──► A (r × in, fp32) ──► B (out × r, fp32) ──► × s ───────► (+) ──► y

    y = Ŵ x + s · B A dropout(x),     s = alpha / r

``Ŵ`` is the dequantised NF4 weight (block 64 absmax, double-quantised constants, see
:mod:`deltatune.quant.linear`); gradients flow through it to the input but never into it, so
only A and B train and the base costs ~0.52 bytes per weight. ``quantize: int8`` uses 8-bit
per-row absmax bases instead (~1 byte per weight).

Injecting ``qlora`` quantises every ``nn.Linear`` / ``Conv1D`` of the model in place except the
output layer and ``modules_to_save`` (already quantised layers are kept, e.g. a base loaded
with ``model.quantize: nf4``), then adds LoRA exactly as ``method: lora`` does, on
``all-linear`` by default (the paper's setting).

The saved adapter is a plain PEFT LoRA adapter (``peft_type: LORA``; PEFT's QLoRA adapters are
LoRA adapters), loadable by PEFT onto a float or a 4-bit base. Its ``adapter_config.json`` also
carries ``quantize``, ``compute_dtype`` and ``deltatune_method: qlora`` (PEFT ignores them), so
that ``deltatune.load_adapter`` re-quantises a float base the way the adapter was trained.

Merging: ``deltatune.merge`` refuses (``Ŵ + s·B·A`` is not on the 4-bit grid);
:func:`deltatune.quant.merge_quantized` merges into a float copy of ``Ŵ`` or re-quantises, and
reports the output change each introduces.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar, Literal

from torch import nn

from deltatune.errors import ConfigError
from deltatune.methods.lora import LoraConfig, _modules_to_save_names, inject_lora
from deltatune.quant.linear import COMPUTE_DTYPES, SCHEMES, QuantLinear
from deltatune.quant.loftq import SCHEME_BITS, apply_loftq, float_weights
from deltatune.quant.model import quantize_model
from deltatune.registry import Capabilities, MethodSpec, register
from deltatune.targeting import select_modules


@dataclasses.dataclass
class QLoraConfig(LoraConfig):
    """LoRA's fields (PEFT's names) plus the base's quantisation.

    - ``quantize`` (``"nf4"``): ``"nf4"`` 4-bit NormalFloat with double quantisation
      (torchao), or ``"int8"`` 8-bit per-row absmax.
    - ``compute_dtype`` (``"auto"``): dtype of the base matmul; ``auto`` is bfloat16 where the
      device computes it natively (CUDA sm80+, CPUs with AVX512-BF16/AMX), else float32.
    - ``target_modules`` defaults to ``"all-linear"`` (QLoRA adapts every linear layer).
    - ``init_lora_weights: "loftq"`` with ``loftq_config`` (``{"loftq_bits": 4, "loftq_iter":
      1}``, PEFT's names; bits must match ``quantize``): LoftQ initialisation, the base and A, B
      chosen together so that ``Ŵ + s·B A ≈ W`` (:mod:`deltatune.quant.loftq`).
    """

    method_name: ClassVar[str] = "qlora"
    peft_type: ClassVar[str] = "LORA"

    target_modules: str | list[str] | None = "all-linear"
    quantize: Literal["nf4", "int8"] = "nf4"
    compute_dtype: Literal["auto", "bfloat16", "float32"] = "auto"
    init_lora_weights: bool | Literal["gaussian", "loftq"] = True  # type: ignore[assignment]
    loftq_config: dict[str, int] = dataclasses.field(default_factory=dict)

    def validate(self) -> None:
        super().validate()
        self._validate_loftq()
        if self.quantize not in SCHEMES:
            raise ConfigError(f"quantize={self.quantize!r} must be one of {', '.join(SCHEMES)}")
        if self.compute_dtype not in COMPUTE_DTYPES:
            raise ConfigError(
                f"compute_dtype={self.compute_dtype!r} must be one of {', '.join(COMPUTE_DTYPES)}"
            )

    def _validate_loftq(self) -> None:
        if self.init_lora_weights != "loftq":
            if self.loftq_config:
                raise ConfigError(
                    f"loftq_config={self.loftq_config!r} is set but init_lora_weights="
                    f"{self.init_lora_weights!r}; set init_lora_weights: loftq (or drop loftq_config)"
                )
            return
        unknown = set(self.loftq_config) - {"loftq_bits", "loftq_iter"}
        if unknown:
            raise ConfigError(
                f"loftq_config has unknown keys {sorted(unknown)}; valid: loftq_bits, loftq_iter"
            )
        bits = SCHEME_BITS.get(self.quantize)
        if self.loftq_config.get("loftq_bits", bits) != bits:
            raise ConfigError(
                f"loftq_config.loftq_bits={self.loftq_config['loftq_bits']} does not match "
                f"quantize={self.quantize!r} ({bits} bits); set loftq_bits: {bits} or change quantize"
            )
        iters = self.loftq_config.get("loftq_iter", 1)
        if not isinstance(iters, int) or isinstance(iters, bool) or iters < 1:
            raise ConfigError(
                f"loftq_config.loftq_iter={iters!r} must be a positive integer (try 1)"
            )
        if self.use_dora:
            raise ConfigError(
                "init_lora_weights='loftq' with use_dora=true is not supported; "
                "set use_dora: false (or init_lora_weights: true)"
            )
        # Both keys written out, as PEFT writes them (its loader reads both).
        self.loftq_config = {"loftq_bits": bits, "loftq_iter": iters}  # type: ignore[dict-item]


def inject_qlora(model: nn.Module, config: QLoraConfig, adapter_name: str) -> None:
    skip = _modules_to_save_names(model, config)
    if config.target_modules is None:
        raise ConfigError("target_modules is null; qlora needs targets (default 'all-linear')")
    # Check the targets before touching the base, so a bad config leaves the model float.
    targets = select_modules(
        model,
        config.target_modules,
        exclude_modules=config.exclude_modules,
        layers_to_transform=config.layers_to_transform,
        layers_pattern=config.layers_pattern,
        skip=skip,
    )
    schemes = {m.scheme for m in model.modules() if isinstance(m, QuantLinear)}
    if schemes - {config.quantize}:
        raise ConfigError(
            f"quantize={config.quantize!r} but the base is already "
            f"{'/'.join(sorted(schemes))}-quantised (model.quantize); set the two equal"
        )
    loftq = config.init_lora_weights == "loftq"
    # LoftQ needs W itself: read before quantize_model drops the float layers.
    weights = float_weights(model, list(targets)) if loftq else {}
    quantize_model(model, config.quantize, compute_dtype=config.compute_dtype, skip=skip)
    inject_lora(model, config, adapter_name)
    if loftq:
        apply_loftq(model, adapter_name, weights, config.loftq_config["loftq_iter"])


register(
    MethodSpec(
        name="qlora",
        config_cls=QLoraConfig,
        inject=inject_qlora,
        capabilities=Capabilities(
            merge=False, peft_compatible=True, qlora=True, multi_adapter=True, disable=True
        ),
        default_lr=1e-3,  # LoRA's: the same adapter, only the base's storage differs
        summary="LoRA on all linear layers of a frozen 4-bit NF4 (or int8) base; "
        "merge via quant.merge_quantized",
        family="low-rank",
    )
)

__all__ = ["QLoraConfig", "inject_qlora"]

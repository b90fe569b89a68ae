r"""Parallel adapter (He et al., 2022, "Towards a Unified View of Parameter-Efficient Transfer
Learning"): a bottleneck beside the feed-forward network, its output scaled and added.

::

                 ┌──────────────────────────────┐
    x ──┬───────►│ feed-forward (frozen)        │─────────────┐
        │        └──────────────────────────────┘             ▼
        └──► down (d → m) ──► act ──► up (m → d) ──► × s ──► (+) ──► y ──► (+x, norm)

    y = FFN(x) + s · (W_up · act(W_down · LN(x) + b_down) + b_up)   (LN only with ln_before)

The wrapped module is the architecture map's ``ffn`` (GPT-2 / LLaMA ``mlp``). BERT-like
encoders split the FFN in ``intermediate`` and ``output(hidden, x)``, which adds the residual
``x`` itself; there the adapter's output joins that residual argument, giving the same
``LayerNorm(FFN(x) + s·A(x) + x)``. The hidden size comes from ``ffn_out``. He et al. use
``s = 4``; ``up`` starts at zero. Several active adapters are summed. Not mergeable;
``peft_type`` ``DELTATUNE_PARALLEL_ADAPTER``.
"""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar, Literal

from torch import nn

from deltatune.arch import ArchConfig
from deltatune.errors import ConfigError
from deltatune.methods._bottleneck import check_settings, inject_bottleneck
from deltatune.registry import Capabilities, MethodConfig, MethodSpec, register


@dataclasses.dataclass
class ParallelAdapterConfig(MethodConfig):
    """Parallel adapter settings (every field, with its default).

    - ``reduction_factor`` (None = 2, the adapters library's default for this placement):
      bottleneck size ``m = hidden // reduction_factor``.
    - ``bottleneck_size`` (None): give ``m`` directly instead (not with ``reduction_factor``).
    - ``scaling`` (4.0): ``s`` in ``y = FFN(x) + s · A(x)``.
    - ``non_linearity`` ("relu"): ``relu``, ``gelu``, ``silu`` or ``tanh``.
    - ``ln_before`` (False): a trainable LayerNorm on the adapter's input (inside the branch).
    - ``dropout`` (0.0): dropout on the adapter's output.
    - ``init_weights`` ("zero"): ``zero`` = ``up`` starts at zero (an exact identity);
      ``bert`` = both projections ~ N(0, 0.01²), zero biases (a near-identity).
    - ``layers_to_transform`` (None = all): block indices that get adapters.
    - ``modules_to_save`` (None): modules trained whole and saved too (a new head).
    - ``arch`` (empty = the model type's entry): module names, see :mod:`deltatune.arch`
      (given fields override the entry's);
      the parallel adapter needs ``layers``, ``ffn`` and ``ffn_out`` (and ``ffn_residual``
      for a BERT-style ``output(hidden, x)`` module).
    - ``task_type``, ``base_model_name_or_path`` (None): as in every method config.
    """

    method_name: ClassVar[str] = "parallel_adapter"
    peft_type: ClassVar[str] = "DELTATUNE_PARALLEL_ADAPTER"
    default_reduction: ClassVar[float] = 2.0

    reduction_factor: float | None = None
    bottleneck_size: int | None = None
    scaling: float = 4.0
    non_linearity: Literal["relu", "gelu", "silu", "tanh"] = "relu"
    ln_before: bool = False
    dropout: float = 0.0
    init_weights: Literal["zero", "bert"] = "zero"
    layers_to_transform: int | list[int] | None = None
    modules_to_save: list[str] | None = None
    arch: ArchConfig = dataclasses.field(default_factory=ArchConfig)

    def validate(self) -> None:
        check_settings(self)
        if not math.isfinite(self.scaling):
            raise ConfigError(f"scaling={self.scaling} must be a finite number (try 4.0)")


def inject_parallel_adapter(
    model: nn.Module, config: ParallelAdapterConfig, adapter_name: str
) -> None:
    inject_bottleneck(
        model, config, adapter_name, method="parallel_adapter", places=("ffn",), parallel=True
    )


register(
    MethodSpec(
        name="parallel_adapter",
        config_cls=ParallelAdapterConfig,
        inject=inject_parallel_adapter,
        capabilities=Capabilities(multi_adapter=True, disable=True),
        default_lr=1e-3,
        summary="Scaled bottleneck adapter beside each feed-forward block (He et al.)",
        family="adapter",
    )
)

__all__ = ["ParallelAdapterConfig", "inject_parallel_adapter"]

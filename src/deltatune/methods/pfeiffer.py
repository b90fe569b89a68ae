r"""Pfeiffer adapters (Pfeiffer et al., 2021): one serial bottleneck adapter per block.

::

    x ─► attention ─► (+x, norm) ─► feed-forward ─► ffn_out ─► [A] ─► (+, norm) ─► next block

    one adapter A:   h ──┬──► down (d → m) ──► act ──► up (m → d) ──┐
                         └─────────────────────────────────────────(+)──► h'

    h' = h + W_up · act(W_down · LN(h) + b_down) + b_up        (LN only with ln_before=true)

The adapter sits after the feed-forward sublayer only (half of Houlsby's adapters, about the
same quality in Pfeiffer et al.'s AdapterFusion study), on the output of the feed-forward
output projection named by the architecture map's ``ffn_out`` (BERT ``output.dense``, GPT-2
``mlp.c_proj``, LLaMA ``mlp.down_proj``), before the block's residual connection and
normalisation. deltatune's version is this placement of the shared bottleneck; the adapters
library's extra ``original_ln_before`` re-use of the block's LayerNorm is not reproduced.
``up`` starts at zero. Not mergeable; ``peft_type`` ``DELTATUNE_PFEIFFER``.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar, Literal

from torch import nn

from deltatune.arch import ArchConfig
from deltatune.methods._bottleneck import check_settings, inject_bottleneck
from deltatune.registry import Capabilities, MethodConfig, MethodSpec, register


@dataclasses.dataclass
class PfeifferConfig(MethodConfig):
    """Pfeiffer adapter settings (every field, with its default).

    - ``reduction_factor`` (None = 16): bottleneck size ``m = hidden // reduction_factor``.
    - ``bottleneck_size`` (None): give ``m`` directly instead (not with ``reduction_factor``).
    - ``non_linearity`` ("relu"): ``relu``, ``gelu``, ``silu`` or ``tanh``.
    - ``ln_before`` (False): a trainable LayerNorm on the adapter's input (inside the branch).
    - ``ln_after`` (False): a trainable LayerNorm after the adapter's residual sum,
      ``h' = LN(h + Δ(h))``; the model then no longer starts exactly at its base.
    - ``dropout`` (0.0): dropout on the adapter's output.
    - ``init_weights`` ("zero"): ``zero`` = ``up`` starts at zero (an exact identity);
      ``bert`` = both projections ~ N(0, 0.01²), zero biases (a near-identity).
    - ``layers_to_transform`` (None = all): block indices that get adapters.
    - ``modules_to_save`` (None): modules trained whole and saved too (a new head).
    - ``arch`` (empty = the model type's entry): module names, see :mod:`deltatune.arch`
      (given fields override the entry's);
      Pfeiffer needs ``layers`` and ``ffn_out``.
    - ``task_type``, ``base_model_name_or_path`` (None): as in every method config.
    """

    method_name: ClassVar[str] = "pfeiffer"
    peft_type: ClassVar[str] = "DELTATUNE_PFEIFFER"
    default_reduction: ClassVar[float] = 16.0

    reduction_factor: float | None = None
    bottleneck_size: int | None = None
    non_linearity: Literal["relu", "gelu", "silu", "tanh"] = "relu"
    ln_before: bool = False
    ln_after: bool = False
    dropout: float = 0.0
    init_weights: Literal["zero", "bert"] = "zero"
    layers_to_transform: int | list[int] | None = None
    modules_to_save: list[str] | None = None
    arch: ArchConfig = dataclasses.field(default_factory=ArchConfig)

    def validate(self) -> None:
        check_settings(self)


def inject_pfeiffer(model: nn.Module, config: PfeifferConfig, adapter_name: str) -> None:
    inject_bottleneck(model, config, adapter_name, method="pfeiffer", places=("ffn_out",))


register(
    MethodSpec(
        name="pfeiffer",
        config_cls=PfeifferConfig,
        inject=inject_pfeiffer,
        capabilities=Capabilities(multi_adapter=True, disable=True),
        default_lr=1e-3,
        summary="One serial bottleneck adapter after each feed-forward sublayer",
        family="adapter",
    )
)

__all__ = ["PfeifferConfig", "inject_pfeiffer"]

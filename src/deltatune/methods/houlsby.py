r"""Houlsby adapters (Houlsby et al., 2019): two serial bottleneck adapters per block.

::

    x ─► attention ─► attn_out ─► [A₁] ─► (+x, norm) ─► feed-forward ─► ffn_out ─► [A₂] ─► (+, norm)

    one adapter A:   h ──┬──► down (d → m) ──► act ──► up (m → d) ──┐
                         └─────────────────────────────────────────(+)──► h'

    h' = h + W_up · act(W_down · LN(h) + b_down) + b_up        (LN only with ln_before=true)

Each block gets one adapter on the attention sublayer's output and one on the feed-forward
sublayer's output, both *before* the block's own residual connection and normalisation: the
wrapped modules are the output projections named by the architecture map (``attn_out`` and
``ffn_out``: BERT ``attention.output.dense`` / ``output.dense``, GPT-2 ``attn.c_proj`` /
``mlp.c_proj``, LLaMA ``self_attn.o_proj`` / ``mlp.down_proj``; see :mod:`deltatune.arch`).
The bottleneck size is ``m = d // reduction_factor`` (or ``bottleneck_size``). ``up`` starts at
zero, so the adapted model starts equal to its base. Not mergeable (the adapter is
non-linear); disable, several named adapters (stacked in the active order) and save/load
(``peft_type`` ``DELTATUNE_HOULSBY``) work as for every adapter.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar, Literal

from torch import nn

from deltatune.arch import ArchConfig
from deltatune.methods._bottleneck import check_settings, inject_bottleneck
from deltatune.registry import Capabilities, MethodConfig, MethodSpec, register


@dataclasses.dataclass
class HoulsbyConfig(MethodConfig):
    """Houlsby adapter settings (every field, with its default).

    - ``reduction_factor`` (None = 16): bottleneck size ``m = hidden // reduction_factor``.
    - ``bottleneck_size`` (None): give ``m`` directly instead (not with ``reduction_factor``).
    - ``non_linearity`` ("silu"): ``relu``, ``gelu``, ``silu`` (swish) or ``tanh``.
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
      Houlsby needs ``layers``, ``attn_out`` and ``ffn_out``.
    - ``task_type``, ``base_model_name_or_path`` (None): as in every method config.
    """

    method_name: ClassVar[str] = "houlsby"
    peft_type: ClassVar[str] = "DELTATUNE_HOULSBY"
    default_reduction: ClassVar[float] = 16.0

    reduction_factor: float | None = None
    bottleneck_size: int | None = None
    non_linearity: Literal["relu", "gelu", "silu", "tanh"] = "silu"
    ln_before: bool = False
    ln_after: bool = False
    dropout: float = 0.0
    init_weights: Literal["zero", "bert"] = "zero"
    layers_to_transform: int | list[int] | None = None
    modules_to_save: list[str] | None = None
    arch: ArchConfig = dataclasses.field(default_factory=ArchConfig)

    def validate(self) -> None:
        check_settings(self)


def inject_houlsby(model: nn.Module, config: HoulsbyConfig, adapter_name: str) -> None:
    inject_bottleneck(model, config, adapter_name, method="houlsby", places=("attn_out", "ffn_out"))


register(
    MethodSpec(
        name="houlsby",
        config_cls=HoulsbyConfig,
        inject=inject_houlsby,
        capabilities=Capabilities(multi_adapter=True, disable=True),
        default_lr=1e-3,
        summary="Serial bottleneck adapters after the attention and feed-forward sublayers",
        family="adapter",
    )
)

__all__ = ["HoulsbyConfig", "inject_houlsby"]

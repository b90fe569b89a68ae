r"""P-Tuning v2 (Liu et al., 2022, "P-Tuning v2: Prompt Tuning Can Be Comparable to
Fine-tuning Universally Across Scales and Tasks"): deep prompts, i.e. trained key/value
prefixes in every layer, trained directly (no reparameterisation), with a plain
classification head on the encoder, also for sequence labelling (token classification).

::

    layer l:  softmax( q [P_k^(l) ; K]^T / sqrt(d) ) [P_v^(l) ; V]      P trained directly
                         └─ n trained vectors per layer and key/value head

    sentence classification:  [CLS] ──► head          token classification: every token ──► head

The mechanics (one ``(n, layers*2*token_dim)`` tensor ``P``, positions, masks, the key/value
cache) are :mod:`deltatune.kv_prefix`'s, the same as prefix tuning without the MLP. The head is
a new module trained whole: ``task_type: SEQ_CLS`` adds ``classifier``/``score``, and for
token classification give ``modules_to_save: [classifier]``
(:class:`~deltatune.train.token_classification.TokenClassificationTask` trains it).

PEFT computes P-Tuning v2 as ``PREFIX_TUNING`` with ``prefix_projection: false``, so adapters
are saved in exactly that format (``prompt_embeddings``, ``peft_type: PREFIX_TUNING``, plus
``deltatune_method: p_tuning_v2`` so that deltatune reads them back as this method) and load in
PEFT with the same outputs. Not mergeable.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar, Literal

from torch import nn

from deltatune.arch import ArchConfig
from deltatune.kv_prefix import add_prefix_adapter
from deltatune.methods.prefix_tuning import check_prefix_fields
from deltatune.registry import Capabilities, MethodConfig, MethodSpec, register


@dataclasses.dataclass
class PTuningV2Config(MethodConfig):
    """P-Tuning v2 settings (every field, default).

    - ``num_virtual_tokens`` (20): prompt length ``n`` per layer (the paper uses 4-128 for
      sequence labelling and classification).
    - ``init_weights`` (None): None draws ``P`` from N(0, 1); ``"zero"`` starts at zero.
    - ``num_layers``, ``token_dim``, ``num_attention_heads`` (None = from the model): as in
      prefix tuning; given values must match the model.
    - ``modules_to_save`` (None): modules trained whole and saved too (the new head, e.g.
      ``[classifier]`` for token classification).
    - ``arch`` (empty = the model type's entry): module names, see :mod:`deltatune.arch`;
      needs ``layers`` and ``attention``.
    - ``task_type``, ``base_model_name_or_path`` (None): as in every method config
      (``task_type: SEQ_CLS`` also trains and saves ``classifier``/``score``).
    """

    method_name: ClassVar[str] = "p_tuning_v2"
    peft_type: ClassVar[str] = "PREFIX_TUNING"

    num_virtual_tokens: int = 20
    init_weights: Literal["zero"] | None = None
    num_layers: int | None = None
    token_dim: int | None = None
    num_attention_heads: int | None = None
    modules_to_save: list[str] | None = None
    arch: ArchConfig = dataclasses.field(default_factory=ArchConfig)

    def validate(self) -> None:
        check_prefix_fields(self)


def inject_p_tuning_v2(model: nn.Module, config: PTuningV2Config, adapter_name: str) -> None:
    add_prefix_adapter(model, config, adapter_name, method="p_tuning_v2", mlp_hidden=None)


register(
    MethodSpec(
        name="p_tuning_v2",
        config_cls=PTuningV2Config,
        inject=inject_p_tuning_v2,
        capabilities=Capabilities(peft_compatible=True, multi_adapter=True, disable=True),
        default_lr=1e-2,
        summary="Deep prompts: trained key/value prefixes in every layer, no reparameterisation",
        family="prompt",
    )
)

__all__ = ["PTuningV2Config", "inject_p_tuning_v2"]

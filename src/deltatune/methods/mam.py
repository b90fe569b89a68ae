r"""MAM Adapter ("mix and match", He et al., 2022, "Towards a Unified View of
Parameter-Efficient Transfer Learning"): prefix tuning on the attention plus a scaled
parallel adapter on the feed-forward block, trained together as one adapter.

::

    block l:
              ┌─ P_k^(l), P_v^(l)  (n trained key/value vectors per key/value head)
              ▼
    x ──► attention( q, [P_k ; K], [P_v ; V] ) ──► (+x, norm) ──► h
    h ──┬──► feed-forward (frozen) ────────────────────────────┐
        │                                                       ▼
        └──► [LN] ──► down (d → m) ──► f ──► up (m → d) ──► × s ──► (+) ──► (+h, norm)

    head(x) = softmax( q [P_k ; K]^T / sqrt(d_head) ) [P_v ; V]      (prefix attention)
    y       = FFN(h) + s · ( f(LN(h) W_down + b_down) W_up + b_up )  (scaled parallel adapter)

(``LN`` only with ``ln_before``; ``f`` the non-linearity; ``up`` starts at zero.)

The paper's MAM default (its 1024-hidden models): prefix length ``l = 30`` on every attention
layer and a parallel adapter with bottleneck ``r = 512`` and scaling ``s = 4`` on every FFN,
the budget split the paper found best (a small prefix, most parameters in the FFN adapter).
Here ``num_virtual_tokens = 30``, ``scaling = 4`` and the bottleneck scales with the model as
``m = hidden // 2`` (``reduction_factor = 2``, 512 of 1024); ``bottleneck_size`` fixes ``m``
instead. As in Li & Liang's prefix tuning (which the paper builds on) the prefix trains
through the MLP ``P = W_2 tanh(W_1 E + b_1) + b_2`` (``prefix_projection``); saving stores only
its output ``P``.

Both halves reuse the existing machinery under the same adapter name: the prefix is a
:class:`~deltatune.kv_prefix.PrefixLayer` entry (see :mod:`deltatune.kv_prefix` for masks,
positions, padding and generation), the FFN adapter a
:class:`~deltatune.methods._bottleneck.ParallelAdapterLayer` entry (see
:mod:`deltatune.methods.parallel_adapter` for BERT's ``output(hidden, x)`` form). Activating,
disabling, deleting or saving the adapter acts on both halves. Saved in deltatune's own format,
``peft_type: DELTATUNE_MAM`` (``prompt_embeddings`` + ``base_model.model.<ffn>.adapter.*``).
The prefix changes the output from the start (a random prefix is attended to); prefixes
change the attention non-linearly, so the adapter cannot be merged.
"""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar, Literal

from torch import nn

from deltatune.arch import ArchConfig, resolve_arch, transformer_blocks
from deltatune.errors import ConfigError
from deltatune.kv_prefix import add_prefix_adapter, kv_shape
from deltatune.methods._bottleneck import check_settings, inject_bottleneck
from deltatune.methods.prefix_tuning import PrefixTuningConfig, check_prefix_fields
from deltatune.registry import Capabilities, MethodConfig, MethodSpec, register


@dataclasses.dataclass
class MAMConfig(MethodConfig):
    """MAM Adapter settings (every field, with its default).

    Prefix half (attention):

    - ``num_virtual_tokens`` (30): prefix length ``n`` per layer (the paper's ``l = 30``).
    - ``prefix_projection`` (True): train the prefix through the MLP
      ``P = W_2 tanh(W_1 E + b_1) + b_2`` (folded into ``P`` on saving); False trains ``P``.
    - ``encoder_hidden_size`` (None = token_dim): the MLP's hidden width.
    - ``prefix_init`` ("random"): ``random`` draws ``P`` (or ``E`` and the MLP) from N(0, 1);
      ``zero`` starts ``P`` (or the MLP's last layer) at zero, an exact start at the base.
    - ``num_layers``, ``token_dim``, ``num_attention_heads`` (None = from the model): as in
      prefix tuning; given values must match the model.
    - ``inference_mode`` (False): true builds a direct ``P`` (no MLP). Saved adapters say true:
      what is saved is the folded ``P``.

    Parallel adapter half (feed-forward):

    - ``reduction_factor`` (None = 2, the paper's 512 of 1024): ``m = hidden // reduction_factor``.
    - ``bottleneck_size`` (None): give ``m`` directly instead (not with ``reduction_factor``).
    - ``scaling`` (4.0): ``s`` in ``y = FFN(h) + s · A(h)`` (the paper's ``s = 4``).
    - ``non_linearity`` ("relu"): ``relu``, ``gelu``, ``silu`` or ``tanh``.
    - ``ln_before`` (False): a trainable LayerNorm on the adapter's input.
    - ``dropout`` (0.0): dropout on the adapter's output.
    - ``init_weights`` ("zero"): ``zero`` = ``up`` starts at zero; ``bert`` = both projections
      ~ N(0, 0.01²).
    - ``layers_to_transform`` (None = all): blocks that get the FFN adapter (the prefix is
      always in every layer, as the key/value cache has every layer).

    Both: ``modules_to_save`` (None; a new head), ``arch`` (empty = the model type's entry;
    MAM needs ``layers``, ``attention``, ``ffn`` and ``ffn_out``), ``task_type``,
    ``base_model_name_or_path``.
    """

    method_name: ClassVar[str] = "mam"
    peft_type: ClassVar[str] = "DELTATUNE_MAM"
    default_reduction: ClassVar[float] = 2.0

    num_virtual_tokens: int = 30
    prefix_projection: bool = True
    encoder_hidden_size: int | None = None
    prefix_init: Literal["random", "zero"] = "random"
    num_layers: int | None = None
    token_dim: int | None = None
    num_attention_heads: int | None = None
    inference_mode: bool = False
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
        check_prefix_fields(self)
        check_settings(self)
        if not math.isfinite(self.scaling):
            raise ConfigError(f"scaling={self.scaling} must be a finite number (try 4.0)")

    def prefix_config(self) -> PrefixTuningConfig:
        """The prefix half as a prefix tuning config (what the shared prefix code reads)."""
        return PrefixTuningConfig(
            num_virtual_tokens=self.num_virtual_tokens,
            prefix_projection=self.prefix_projection,
            encoder_hidden_size=self.encoder_hidden_size,
            init_weights="zero" if self.prefix_init == "zero" else None,
            num_layers=self.num_layers,
            token_dim=self.token_dim,
            num_attention_heads=self.num_attention_heads,
            inference_mode=self.inference_mode,
            modules_to_save=self.modules_to_save,
            arch=self.arch,
            task_type=self.task_type,
        )


def inject_mam(model: nn.Module, config: MAMConfig, adapter_name: str) -> None:
    # Resolve everything both halves need before touching the model, so a model that lacks an
    # FFN (or an attention) entry fails with nothing injected.
    resolve_arch(model, config.arch, ("layers", "attention", "ffn", "ffn_out"), "mam")
    reparam = config.prefix_projection and not config.inference_mode
    hidden = config.encoder_hidden_size
    if reparam and hidden is None:
        arch = resolve_arch(model, config.arch, ("layers", "attention"), "mam")
        hidden = kv_shape(model, len(transformer_blocks(model, arch)), method="mam").token_dim
    add_prefix_adapter(
        model,
        config.prefix_config(),
        adapter_name,
        method="mam",
        mlp_hidden=hidden if reparam else None,
    )
    inject_bottleneck(model, config, adapter_name, method="mam", places=("ffn",), parallel=True)


register(
    MethodSpec(
        name="mam",
        config_cls=MAMConfig,
        inject=inject_mam,
        capabilities=Capabilities(multi_adapter=True, disable=True),
        default_lr=1e-3,
        summary="MAM Adapter: prefix tuning on attention + scaled parallel FFN adapter (He et al.)",
        family="adapter",
    )
)

__all__ = ["MAMConfig", "inject_mam"]

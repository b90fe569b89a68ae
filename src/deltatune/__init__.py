"""deltatune: fine-tune pretrained PyTorch models, from full fine-tuning to <1% of the weights.

Quick tour::

    import deltatune as dt
    model = dt.inject(model, dt.LoraConfig(r=8, target_modules=["query", "value"]))
    print(dt.trainable_report(model))
    ...train...
    dt.save_adapter(model, "out/adapter")
    dt.load_adapter(fresh_base, "out/adapter")
"""

from deltatune import (
    _quiet,  # noqa: F401  (first: silences import-time log noise)
    estimate,  # a callable module: deltatune.estimate(model, method, ...)
    strategies,  # adapt (MLM/SimCSE/causal LM), semisup, reward, DPO
)
from deltatune.advise import advise
from deltatune.arch import ArchConfig
from deltatune.checkpoint import (
    adapter_state_dict,
    export_merged,
    load_adapter,
    load_adapters,
    read_adapter_config,
    save_adapter,
    save_adapters,
)
from deltatune.compose import Fuse, Parallel, Stack, split_parallel
from deltatune.data.augment import AugmentConfig
from deltatune.drop import adapter_drop, dropped_layers
from deltatune.errors import AssetError, CheckpointError, ConfigError, DeltatuneError
from deltatune.layers import AdapterLayer, ModulesToSave
from deltatune.lm import CausalLMTask, generate, load_causal_lm, load_instruction_pairs
from deltatune.methods.adalora import AdaLoraConfig
from deltatune.methods.bitfit import BitFitConfig
from deltatune.methods.combine import CombineConfig, export_parts
from deltatune.methods.features import FeaturesConfig
from deltatune.methods.freeze import FreezeConfig
from deltatune.methods.full import FullConfig
from deltatune.methods.fusion import FusionConfig, fusion_regularization, fusion_weights
from deltatune.methods.houlsby import HoulsbyConfig
from deltatune.methods.ia3 import IA3Config
from deltatune.methods.llama_adapter import LlamaAdapterConfig
from deltatune.methods.lora import LoraConfig
from deltatune.methods.mam import MAMConfig
from deltatune.methods.p_tuning import PromptEncoderConfig
from deltatune.methods.p_tuning_v2 import PTuningV2Config
from deltatune.methods.parallel_adapter import ParallelAdapterConfig
from deltatune.methods.pfeiffer import PfeifferConfig
from deltatune.methods.prefix_tuning import PrefixTuningConfig, fold_prefix
from deltatune.methods.prompt_tuning import PromptTuningConfig
from deltatune.methods.qlora import QLoraConfig
from deltatune.methods.unipelt import UniPELTConfig
from deltatune.model import (
    active_adapters,
    adapter_layers,
    adapter_names,
    delete,
    disable,
    disabled,
    enable,
    inject,
    merge,
    set_active,
    trainable_parameters,
    trainable_report,
    unload,
    unmerge,
)
from deltatune.prune import PruneConfig, load_pruned, prune, prune_run
from deltatune.quant import merge_quantized, quantize_model
from deltatune.registry import MethodConfig, config_from_dict, get_method, methods
from deltatune.routing import route
from deltatune.train.cv import CVConfig, cross_validate
from deltatune.train.distill import (
    DistillationTask,
    DistillConfig,
    distill_run,
    distillation_loss,
)
from deltatune.train.forgetting import forgetting
from deltatune.train.multitask import add_task, load_multitask, save_multitask

__version__ = "0.1.0"

__all__ = [
    "AdaLoraConfig",
    "AdapterLayer",
    "ArchConfig",
    "AssetError",
    "AugmentConfig",
    "BitFitConfig",
    "CVConfig",
    "CausalLMTask",
    "CheckpointError",
    "CombineConfig",
    "ConfigError",
    "DeltatuneError",
    "DistillConfig",
    "DistillationTask",
    "FeaturesConfig",
    "FreezeConfig",
    "FullConfig",
    "Fuse",
    "FusionConfig",
    "HoulsbyConfig",
    "IA3Config",
    "LlamaAdapterConfig",
    "LoraConfig",
    "MAMConfig",
    "MethodConfig",
    "ModulesToSave",
    "PTuningV2Config",
    "Parallel",
    "ParallelAdapterConfig",
    "PfeifferConfig",
    "PrefixTuningConfig",
    "PromptEncoderConfig",
    "PromptTuningConfig",
    "PruneConfig",
    "QLoraConfig",
    "Stack",
    "UniPELTConfig",
    "active_adapters",
    "adapter_drop",
    "adapter_layers",
    "adapter_names",
    "adapter_state_dict",
    "add_task",
    "advise",
    "config_from_dict",
    "cross_validate",
    "delete",
    "disable",
    "disabled",
    "distill_run",
    "distillation_loss",
    "dropped_layers",
    "enable",
    "estimate",
    "export_merged",
    "export_parts",
    "fold_prefix",
    "forgetting",
    "fusion_regularization",
    "fusion_weights",
    "generate",
    "get_method",
    "inject",
    "load_adapter",
    "load_adapters",
    "load_causal_lm",
    "load_instruction_pairs",
    "load_multitask",
    "load_pruned",
    "merge",
    "merge_quantized",
    "methods",
    "prune",
    "prune_run",
    "quantize_model",
    "read_adapter_config",
    "route",
    "save_adapter",
    "save_adapters",
    "save_multitask",
    "set_active",
    "split_parallel",
    "strategies",
    "trainable_parameters",
    "trainable_report",
    "unload",
    "unmerge",
]

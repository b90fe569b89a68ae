"""deltatune: fine-tune pretrained PyTorch models, from full fine-tuning to <1% of the weights.

Quick tour::

    import deltatune as dt
    model = dt.inject(model, dt.LoraConfig(r=8, target_modules=["query", "value"]))
    print(dt.trainable_report(model))
    ...train...
    dt.save_adapter(model, "out/adapter")
    dt.load_adapter(fresh_base, "out/adapter")
"""

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
from deltatune.drop import adapter_drop, dropped_layers
from deltatune.errors import AssetError, CheckpointError, ConfigError, DeltatuneError
from deltatune.layers import AdapterLayer, ModulesToSave
from deltatune.methods.bitfit import BitFitConfig
from deltatune.methods.features import FeaturesConfig
from deltatune.methods.freeze import FreezeConfig
from deltatune.methods.full import FullConfig
from deltatune.methods.fusion import FusionConfig, fusion_regularization, fusion_weights
from deltatune.methods.houlsby import HoulsbyConfig
from deltatune.methods.ia3 import IA3Config
from deltatune.methods.lora import LoraConfig
from deltatune.methods.parallel_adapter import ParallelAdapterConfig
from deltatune.methods.pfeiffer import PfeifferConfig
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
from deltatune.registry import MethodConfig, config_from_dict, get_method, methods
from deltatune.routing import route

__version__ = "0.1.0"

__all__ = [
    "AdapterLayer",
    "ArchConfig",
    "AssetError",
    "BitFitConfig",
    "CheckpointError",
    "ConfigError",
    "DeltatuneError",
    "FeaturesConfig",
    "FreezeConfig",
    "FullConfig",
    "Fuse",
    "FusionConfig",
    "HoulsbyConfig",
    "IA3Config",
    "LoraConfig",
    "MethodConfig",
    "ModulesToSave",
    "Parallel",
    "ParallelAdapterConfig",
    "PfeifferConfig",
    "Stack",
    "active_adapters",
    "adapter_drop",
    "adapter_layers",
    "adapter_names",
    "adapter_state_dict",
    "config_from_dict",
    "delete",
    "disable",
    "disabled",
    "dropped_layers",
    "enable",
    "export_merged",
    "fusion_regularization",
    "fusion_weights",
    "get_method",
    "inject",
    "load_adapter",
    "load_adapters",
    "merge",
    "methods",
    "read_adapter_config",
    "route",
    "save_adapter",
    "save_adapters",
    "set_active",
    "split_parallel",
    "trainable_parameters",
    "trainable_report",
    "unload",
    "unmerge",
]

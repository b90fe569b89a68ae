"""Built-in methods. Importing a module registers its method; one import line per method."""

from deltatune.methods import (
    bitfit,
    features,
    freeze,
    full,
    fusion,
    houlsby,
    ia3,
    lora,
    parallel_adapter,
    pfeiffer,
)

__all__ = [
    "bitfit",
    "features",
    "freeze",
    "full",
    "fusion",
    "houlsby",
    "ia3",
    "lora",
    "parallel_adapter",
    "pfeiffer",
]

"""Built-in methods. Importing a module registers its method; one import line per method."""

from deltatune.methods import bitfit, features, freeze, full, lora

__all__ = ["bitfit", "features", "freeze", "full", "lora"]

"""Keep import-time log noise of optional dependencies off the user's terminal.

transformers imports torchao whenever it is installed; on a CPU machine torchao then logs that
its CUDA extensions failed to load, and torch logs pytree deprecation notices for torchao's
enums, on every run. Neither is actionable for a user, so only errors from these loggers pass.
"""

import logging

for _name in ("torchao", "torch.utils._pytree"):
    logging.getLogger(_name).setLevel(logging.ERROR)

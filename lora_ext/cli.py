"""Deprecated: the ``lora-ext`` command moved to :mod:`lora_ext.apps.cli`.

``python -m lora_ext.cli ...`` still runs it, with a ``FutureWarning``; use
``lora-ext ...`` or ``python -m lora_ext.apps.cli ...`` instead.
"""

import sys
import warnings

warnings.warn(
    "lora_ext.cli is deprecated and will be removed; the lora-ext command is lora_ext.apps.cli "
    "(run `lora-ext` or `python -m lora_ext.apps.cli`)",
    FutureWarning,
    stacklevel=2,
)

from .apps.cli import main  # noqa: E402

__all__ = ["main"]

if __name__ == "__main__":
    sys.exit(main())

"""lora_ext: fused LoRA kernels for PyTorch (CPU and CUDA)."""

import torch  # noqa: F401  (loads libtorch before _C, which has no RPATH to it)

from . import _C  # noqa: F401  (registers torch.ops.lora_ext.*)
from .ops import lora_linear, merge_, multi_lora, unmerge_

__all__ = ["lora_linear", "multi_lora", "merge_", "unmerge_"]
__version__ = "0.1.0"

"""lora_ext: fused LoRA kernels for PyTorch (CPU and CUDA)."""

import torch  # noqa: F401  (loads libtorch before _C, which has no RPATH to it)

from ._torch_check import check_installed_torch as _check_installed_torch

_check_installed_torch()  # before _C: a _C built for another torch must not load
from . import _C  # noqa: E402, F401  (registers torch.ops.lora_ext.*)
from .ops import lora_linear, merge_, multi_lora, unmerge_
from .storage import AdapterLayer, AdapterSpec
from .layers import LoRALinear
from .quantized import QuantizedLoRALinear, dequantize_linear
from .dora import DoRALinear
from .moe import ExpertsProjection, LoRAExperts
from .model import (
    active_adapters,
    delete_adapter,
    inject_lora,
    list_adapters,
    lora_layers,
    merge_adapter,
    merge_and_unload,
    print_trainable_parameters,
    reserve_adapters,
    set_adapter,
    trainable_parameters,
    unmerge_adapter,
    use_adapter,
)
from .io import load_adapter, plan_adapter, save_adapter
from .pool import AdapterPool

__all__ = [
    "lora_linear",
    "multi_lora",
    "merge_",
    "unmerge_",
    "AdapterLayer",
    "AdapterSpec",
    "LoRALinear",
    "QuantizedLoRALinear",
    "dequantize_linear",
    "DoRALinear",
    "LoRAExperts",
    "ExpertsProjection",
    "inject_lora",
    "set_adapter",
    "use_adapter",
    "active_adapters",
    "list_adapters",
    "lora_layers",
    "delete_adapter",
    "reserve_adapters",
    "merge_adapter",
    "unmerge_adapter",
    "merge_and_unload",
    "trainable_parameters",
    "print_trainable_parameters",
    "save_adapter",
    "load_adapter",
    "plan_adapter",
    "AdapterPool",
]
__version__ = "0.1.0"

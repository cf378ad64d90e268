"""Tensor-parallel styles and FSDP2 for LoRA layers (``from lora_ext.parallel import ...``).

The implementation is the torch.distributed integration,
:mod:`lora_ext.integrations.distributed`; this is its public import path.
"""

from .integrations.distributed import ColwiseParallel, RowwiseParallel, fully_shard

__all__ = ["ColwiseParallel", "RowwiseParallel", "fully_shard"]

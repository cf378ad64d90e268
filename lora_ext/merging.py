"""Merging an adapter into a base weight ``[out, in]``, and the record that undoes it exactly.

:func:`merge_exact` keeps an int8 residual per weight element (plus a rare overflow
list) in a :class:`MergeRecord`, so that :func:`unmerge_exact` restores the weight bit
for bit. The record also notes where the merge was made (device, dtype, kernel
variant: each changes the rounding) and the weight's identity and version, so an
unmerge the residual no longer matches is refused with the weight untouched.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from . import ops

# Elements of the temporary row block used to check a merge for finiteness.
_SAFE_BLOCK_ELEMENTS = 1 << 22


@dataclass
class MergeRecord:
    """What :func:`unmerge_exact` needs, and what it checks before writing."""

    name: str
    residual: Tensor  # int8 [out, in]
    overflow_index: Tensor
    overflow_values: Tensor
    lora_a: Tensor  # the factors as merged (a changed adapter cannot be unmerged exactly)
    lora_b: Tensor
    made_by: str
    weight_state: tuple

    def refresh_weight_state(self, weight: Tensor) -> None:
        """After a copy (deepcopy, unpickling): the copied weight holds the merged bits."""
        self.weight_state = weight_state(weight)


def merge_maker(weight: Tensor) -> str:
    """Where a weight is merged: device, dtype and kernel variant (all change the rounding)."""
    return f"{weight.device} {str(weight.dtype).removeprefix('torch.')} ({ops.merge_variant(weight)})"


def weight_state(weight: Tensor) -> tuple:
    """Changes when the weight tensor is replaced or written in place through autograd's view."""
    return weight.data_ptr(), weight._version


def merge_is_finite(weight: Tensor, a: Tensor, b: Tensor, scale: float) -> bool:
    """Whether merging would leave every weight finite; writes nothing.

    Merges copies of blocks of rows, so the extra memory is one small block.
    """
    w = weight.detach()
    out, cols = w.shape
    rows = max(1, _SAFE_BLOCK_ELEMENTS // max(cols, 1))
    with torch.no_grad():
        for r0 in range(0, out, rows):
            block = w[r0 : r0 + rows].clone()
            ops.merge_(block, a, b[r0 : r0 + rows].contiguous(), scale)
            if not bool(torch.isfinite(block).all()):
                return False
    return True


def merge_exact(weight: Tensor, name: str, a: Tensor, b: Tensor, scale: float) -> MergeRecord:
    """``weight += scale * b @ a`` in place, recording what restores it bit for bit."""
    with torch.no_grad():
        residual = torch.empty(weight.shape, dtype=torch.int8, device=weight.device)
        over_index, over_values = ops.merge_exact_(weight, a, b, scale, residual)
    return MergeRecord(
        name, residual, over_index, over_values, a.clone(), b.clone(), merge_maker(weight), weight_state(weight)
    )


def check_unmerge(record: MergeRecord, weight: Tensor, a: Tensor, b: Tensor) -> None:
    """Raise, changing nothing, if ``record`` can no longer undo the merge exactly.

    Refused: the adapter's factors changed; the weight was replaced or written in place
    (optimizer step, ``load_state_dict``, ``copy_``); the weight is now on another
    device, dtype or kernel variant than the one that merged it. ``unmerge_exact_``
    then also checks every element before writing.
    """
    what = f"adapter {record.name!r} is merged into this layer's weight"
    now = merge_maker(weight)
    if now != record.made_by:
        raise RuntimeError(
            f"{what} by {record.made_by}, but the weight is now on {now}: it can only be "
            "unmerged exactly where it was merged; move it back first (or forget_merge)"
        )
    if weight_state(weight) != record.weight_state:
        raise RuntimeError(
            f"{what}, and the weight was replaced or written in place since the merge; "
            "it cannot be unmerged exactly (weight unchanged; forget_merge keeps it as the base)"
        )
    if not (torch.equal(a, record.lora_a) and torch.equal(b, record.lora_b)):
        raise RuntimeError(f"{what}, and the adapter was modified while merged; it cannot be unmerged exactly")


def unmerge_exact(record: MergeRecord, weight: Tensor, a: Tensor, b: Tensor, scale: float) -> None:
    """Restore the weight bit for bit (after :func:`check_unmerge`)."""
    check_unmerge(record, weight, a, b)
    with torch.no_grad():
        ops.unmerge_exact_(weight, a, b, scale, record.residual, record.overflow_index, record.overflow_values)

"""vLLM plugin: vLLM's multi-LoRA linear layers run on lora_ext's kernels.

vLLM loads :func:`register` (the ``vllm.general_plugins`` entry point in
pyproject.toml) in each of its processes. It points the platform's punica
wrapper at :class:`LoRAExtPunicaWrapper`: the platform's own wrapper (CPU or
GPU) with ``add_lora_linear`` (every LoRA linear layer: q/k/v, o, gate/up,
down, packed slices included) done by :func:`lora_ext.ops.multi_lora_add_`,
one in-place call per output slice, straight from vLLM's slot tensors.
The rest stays vLLM's: metadata, embeddings and logits (not on the hot path
for adapters of attention/MLP projections), and the separate
``add_shrink``/``add_expand`` that only fully sharded LoRA under tensor
parallelism uses.

``LORA_EXT_VLLM=0`` in the environment leaves vLLM's own wrapper in place. On CUDA
the plugin stays off unless ``LORA_EXT_VLLM=1``: lora_ext's CUDA kernels have not run
on a GPU yet (``CUDA_KERNELS_CHECKED``; the log says so). On the CPU it is on.
vLLM logs the wrapper it uses ("Using LoRAExtPunicaWrapper.").
"""

from __future__ import annotations

import logging
import os
from typing import Any, Optional

import torch

from lora_ext import ops as _ops

_logger = logging.getLogger("vllm.lora_ext")

ENV_SWITCH = "LORA_EXT_VLLM"
# Whether scripts/gpu_check.sh has passed on a GPU with this code. Until it has, the CUDA
# kernels are compile-checked only, and vLLM on CUDA keeps its own (tested) kernels
# unless LORA_EXT_VLLM=1 asks for ours.
CUDA_KERNELS_CHECKED = False
_WRAPPER_NAME = "LoRAExtPunicaWrapper"
_WRAPPER_QUALNAME = f"{__name__}.{_WRAPPER_NAME}"
# The qualname the platform named before register() replaced it (per process).
_base_wrapper_qualname: Optional[str] = None


def enabled() -> bool:
    """False only when ``LORA_EXT_VLLM=0``."""
    return os.environ.get(ENV_SWITCH, "1").strip() != "0"


def opted_in() -> bool:
    """True only when ``LORA_EXT_VLLM=1``: the plugin is wanted even on CUDA."""
    return os.environ.get(ENV_SWITCH, "").strip() == "1"


def register() -> None:
    """vLLM general-plugin entry point; safe to call more than once per process."""
    global _base_wrapper_qualname
    if not enabled():
        _logger.info("lora_ext: %s=0, vLLM's own punica wrapper stays in use", ENV_SWITCH)
        return
    from vllm.platforms import current_platform

    platform = type(current_platform)
    current = platform.get_punica_wrapper()
    if current == _WRAPPER_QUALNAME:
        return
    if not (current_platform.is_cpu() or current_platform.is_cuda()):
        _logger.info("lora_ext: no kernels for platform %s; vLLM's punica wrapper stays", platform.__name__)
        return
    if current_platform.is_cuda() and not (CUDA_KERNELS_CHECKED or opted_in()):
        _logger.warning(
            "lora_ext: vLLM's own punica wrapper stays in use on CUDA: lora_ext's CUDA kernels "
            "have only been compile-checked, not run on a GPU (scripts/gpu_check.sh has not "
            "passed yet); set %s=1 to use them anyway",
            ENV_SWITCH,
        )
        return
    _base_wrapper_qualname = current
    platform.get_punica_wrapper = classmethod(lambda cls: _WRAPPER_QUALNAME)
    _logger.info("lora_ext: vLLM's LoRA linear layers will run on lora_ext kernels (over %s)", current)


class _LoRAExtLinear:
    """The override, mixed in front of the platform's own punica wrapper."""

    def add_lora_linear(
        self,
        y: torch.Tensor,
        x: torch.Tensor,
        lora_a_stacked: tuple[torch.Tensor, ...],
        lora_b_stacked: tuple[torch.Tensor, ...],
        scale: float,
        output_slices: tuple[int, ...],
        *,
        buffer: Optional[tuple[torch.Tensor, ...]] = None,
        **kwargs: Any,
    ) -> None:
        """``y[:, slice s] += scale * B_s[i_t] @ (A_s[i_t] @ x_t)`` for rows with an adapter.

        y: ``[T, sum(output_slices)]``; x: ``[T, in]``; lora_a_stacked[s]:
        ``[max_loras, 1, rank, in]``; lora_b_stacked[s]: ``[max_loras, 1, out_s, rank]``
        (vLLM's slot layout, adapter scaling already in B); ``i_t`` is the row's slot
        from the metadata (-1: none, row untouched). ``buffer`` is not needed.
        """
        assert len(lora_a_stacked) == len(lora_b_stacked) == len(output_slices)
        x2 = x.reshape(-1, x.shape[-1])
        y2 = y.view(-1, y.shape[-1])
        if not _kernels_take(x2, y2, lora_a_stacked[0]):
            # A dtype or device our kernels do not take (e.g. lora_dtype != model dtype).
            return super().add_lora_linear(  # type: ignore[misc]
                y, x, lora_a_stacked, lora_b_stacked, scale, output_slices, buffer=buffer, **kwargs
            )
        if not kwargs.get("add_inputs", True):
            y2.zero_()
        indices = self.token_lora_indices  # type: ignore[attr-defined]
        if indices.size(0) != x2.size(0):
            # Rows past the mapping (padding) get no adapter.
            rows = min(indices.size(0), x2.size(0))
            indices, x2, y2 = indices[:rows], x2[:rows], y2[:rows]
        scales = self._scales(lora_a_stacked[0].size(0), scale, x2.device)
        offset = 0
        for a, b, width in zip(lora_a_stacked, lora_b_stacked, output_slices):
            # [max_loras, 1, r, in] -> [max_loras, r, in], a view; likewise B.
            b3 = b[:, 0]
            if b3.size(1) != width:
                b3 = b3[:, :width]
            _ops.multi_lora_add_(y2[:, offset : offset + width], x2, a[:, 0], b3, indices, scales)
            offset += width

    def _scales(self, num_slots: int, scale: float, device: torch.device) -> torch.Tensor:
        # One per-slot scale tensor per (slots, scale, device), made once (vLLM passes 1.0).
        cache = self.__dict__.setdefault("_lora_ext_scales", {})
        key = (num_slots, float(scale), str(device))
        if key not in cache:
            cache[key] = torch.full((num_slots,), float(scale), dtype=torch.float32, device=device)
        return cache[key]


def _kernels_take(x: torch.Tensor, y: torch.Tensor, a: torch.Tensor) -> bool:
    return (
        x.dtype == y.dtype == a.dtype
        and x.dtype in (torch.float32, torch.float16, torch.bfloat16)
        and x.device == y.device == a.device
        and x.device.type in ("cpu", "cuda")
    )


def _make_wrapper_class() -> type:
    from vllm.platforms import current_platform
    from vllm.utils.import_utils import resolve_obj_by_qualname

    base_qualname = _base_wrapper_qualname
    if base_qualname is None:  # resolved without register() in this process
        base_qualname = type(current_platform).get_punica_wrapper()
        if base_qualname == _WRAPPER_QUALNAME:
            raise RuntimeError("lora_ext: the platform names LoRAExtPunicaWrapper but register() did not run")
    base = resolve_obj_by_qualname(base_qualname)
    return type(_WRAPPER_NAME, (_LoRAExtLinear, base), {"__module__": __name__, "__qualname__": _WRAPPER_NAME})


def __getattr__(name: str):
    # vLLM resolves the wrapper by qualname; the class is built on first use, over the
    # platform's own wrapper (PunicaWrapperCPU or PunicaWrapperGPU).
    if name == _WRAPPER_NAME:
        cls = _make_wrapper_class()
        globals()[name] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

""":class:`QuantizedLoRALinear`: LoRA adapters over a quantized (or otherwise opaque) linear base.

A base layer whose weight is not a plain float matrix (bitsandbytes' ``Linear4bit`` /
``Linear8bitLt``, an ``nn.Linear`` whose weight is a torchao quantized tensor, or any
``nn.Linear`` subclass with a forward of its own) cannot go through the fused
``lora_linear`` op, which reads the weight as a dense matrix. This kind calls the base
layer's own forward and adds the adapters' update to its output: in place for
inference (``multi_lora_add_``), through ``multi_lora`` (which takes a separately
computed base output) with autograd. No dequantized copy of the base is kept: QLoRA's
memory stays QLoRA's.

Merging into low-bit weights would round most of an update away, so merging refuses,
naming the quantization; :func:`dequantize_linear` turns a base into a float
``nn.Linear`` first (what ``merge_and_unload(..., dequantize=True)`` does).

Other quantized linear modules (GPTQ, AWQ, HQQ, ...) with ``in_features``,
``out_features``, ``weight`` and a forward computing ``x @ W.T + bias`` join with
``register_layer_kind(TheirLinear, QuantizedLoRALinear)``.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from .layers import LoRALinear
from .lifecycle import register_layer_kind


def is_quantized_linear(module: nn.Module) -> bool:
    """Whether ``module``'s weight cannot be used as a float ``[out, in]`` matrix: its
    dtype is not floating (packed integers), it is a tensor subclass that dequantizes
    (torchao's convention), or the module computes its output its own way."""
    if type(module).forward is not nn.Linear.forward:
        return True
    weight = getattr(module, "weight", None)
    return weight is not None and (not weight.dtype.is_floating_point or dequantizes(weight))


def dequantizes(weight: Tensor) -> bool:
    """Whether ``weight`` is a tensor subclass with a ``dequantize()`` of its own (torchao's
    quantized tensors; not a plain tensor, whose method is for ``torch.quantize_*``'s)."""
    return getattr(type(weight), "dequantize", None) is not Tensor.dequantize


def describe_quantization(module: nn.Module) -> str:
    """A short name for how ``module`` is quantized, for messages."""
    weight = getattr(module, "weight", None)
    quant_state = getattr(weight, "quant_state", None)
    if quant_state is not None:  # bitsandbytes 4-bit
        return f"bitsandbytes {type(module).__name__}, {getattr(quant_state, 'quant_type', '4-bit')}"
    if weight is not None and dequantizes(weight):
        return f"{type(weight).__module__.split('.')[0]} {type(weight).__name__}"
    return f"{type(module).__module__.split('.')[0]} {type(module).__name__}"


def adapter_dtype(module: nn.Module) -> torch.dtype:
    """The float dtype adapters on ``module`` are kept in: its weight's dtype when that is
    a float (torchao reports the original one), else its compute dtype, else float32."""
    weight = getattr(module, "weight", None)
    if weight is not None and weight.dtype.is_floating_point:
        return weight.dtype
    compute = getattr(module, "compute_dtype", None)
    return compute if isinstance(compute, torch.dtype) and compute.is_floating_point else torch.float32


def dequantize_linear(module: nn.Module, dtype: Optional[torch.dtype] = None) -> nn.Linear:
    """A float ``nn.Linear`` (frozen) computing what the quantized ``module`` computes.

    Reads the weight through the quantization's own dequantization (bitsandbytes 4-bit
    and 8-bit, torchao's ``dequantize()``); any other layer is probed as the affine map
    it computes (``module(I) - module(0)`` is ``W.T``, ``module(0)`` the bias).
    ``dtype``: of the result (default: :func:`adapter_dtype`).
    """
    weight = module.weight
    bias = getattr(module, "bias", None)
    dtype = dtype or adapter_dtype(module)
    with torch.no_grad():
        if getattr(weight, "quant_state", None) is not None:  # bitsandbytes 4-bit
            import bitsandbytes.functional as bnb_functional

            dense = bnb_functional.dequantize_4bit(weight.data, weight.quant_state)
        elif weight.dtype == torch.int8 and hasattr(weight, "SCB"):  # bitsandbytes 8-bit (LLM.int8)
            # Row scales: on the weight until the first forward moves them to the layer's state.
            scales = weight.SCB if weight.SCB is not None else module.state.SCB
            dense = weight.data.float() * (scales.float()[:, None] / 127.0)
        elif dequantizes(weight):  # torchao's tensor subclasses
            dense = weight.dequantize()
        else:  # an affine layer: f(x) = x @ W.T + f(0)
            eye = torch.eye(module.in_features, dtype=dtype, device=weight.device)
            offset = module(torch.zeros(1, module.in_features, dtype=dtype, device=weight.device))[0]
            dense = (module(eye) - offset).T
            bias = offset if bias is not None or offset.any() else None
        linear = nn.Linear(
            module.in_features, module.out_features, bias=bias is not None, device=weight.device, dtype=dtype
        )
        linear.weight.copy_(dense.reshape(module.out_features, module.in_features))
        if bias is not None:
            linear.bias.copy_(bias)
    return linear.requires_grad_(False)


def forget_quantization_config(model: nn.Module) -> None:
    """Drop transformers' record that ``model`` is quantized (its weights are floats now),
    so that ``save_pretrained`` writes a plain model."""
    config = getattr(model, "config", None)
    if config is not None and getattr(config, "quantization_config", None) is not None:
        config.quantization_config = None
        del config.quantization_config
    for attribute, value in (("hf_quantizer", None), ("is_quantized", False), ("quantization_method", None)):
        if hasattr(model, attribute):
            setattr(model, attribute, value)


class QuantizedLoRALinear(LoRALinear):
    """LoRA adapters on a quantized linear base: the base layer's own forward plus the
    update. Storage, selection, mixed batches and the pool are :class:`~lora_ext.LoRALinear`'s;
    the routes that would read the weight as a matrix are replaced."""

    @classmethod
    def check_base(cls, base_layer: nn.Module) -> None:
        # Any linear-like module: its forward is called, its weight never read as a matrix.
        for attribute in ("in_features", "out_features", "weight"):
            if not hasattr(base_layer, attribute):
                raise TypeError(f"{type(base_layer).__name__} has no {attribute}: not a linear layer")

    @property
    def quantization(self) -> str:
        return describe_quantization(self.base_layer)

    def adapter_options(self) -> dict:
        return dict(device=self.base_layer.weight.device, dtype=adapter_dtype(self.base_layer))

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, base={self.quantization}"

    def forward_base(self, x: Tensor) -> Tensor:
        return self._modules["base_layer"](x)

    def forward_one(self, x: Tensor, slot: int) -> Tensor:
        return self.forward_one_unfused(x, *self.one_adapter(x, slot))

    # A base made float by merge_and_unload(..., dequantize=True) merges as LoRALinear's does.
    def merge_refusal(self) -> Optional[str]:
        if not is_quantized_linear(self.base_layer):
            return None
        return (
            f"the base is quantized ({self.quantization}): merging would round most of the update "
            "away; merge_and_unload(model, name, dequantize=True) gives a full-precision merged model"
        )

    def merge_is_finite(self, name: str) -> bool:
        return self.merge_refusal() is not None or super().merge_is_finite(name)

    def merge(self, name: str, exact: bool = True) -> None:
        reason = self.merge_refusal()
        if reason is not None:
            raise ValueError(f"cannot merge adapter {name!r}: {reason}")
        super().merge(name, exact)


register_layer_kind(nn.Linear, QuantizedLoRALinear, accepts=is_quantized_linear)

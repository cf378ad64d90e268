"""Tensor parallelism for LoRA layers: parallel styles for ``parallelize_module``.

:class:`ColwiseParallel` and :class:`RowwiseParallel` are PyTorch ``ParallelStyle`` s
(drop-in for ``torch.distributed.tensor.parallel``'s): a plain ``nn.Linear`` is
handed to PyTorch's own style, a :class:`~lora_ext.LoRALinear` is sharded together
with every adapter in it::

    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import parallelize_module
    from lora_ext.parallel import ColwiseParallel, RowwiseParallel

    mesh = init_device_mesh("cuda", (world_size,))
    for layer in model.model.layers:
        parallelize_module(layer, mesh, {
            "self_attn.q_proj": ColwiseParallel(), "self_attn.k_proj": ColwiseParallel(),
            "self_attn.v_proj": ColwiseParallel(), "self_attn.o_proj": RowwiseParallel(),
            "mlp.gate_proj": ColwiseParallel(), "mlp.up_proj": ColwiseParallel(),
            "mlp.down_proj": RowwiseParallel(),
        })

Column-wise, a rank keeps its block of the base weight's (and bias's) output rows and
of every ``B``'s; ``A`` stays whole. Row-wise, it keeps its block of the base weight's
and every ``A``'s input columns; ``B`` stays whole, and the base and LoRA partial
outputs are summed with one all-reduce, the bias added once after it. The fused
kernels do not take DTensors, so a sharded layer holds *local* shards as plain
tensors: its parameters, its slot stacks, ``in_features``/``out_features`` are the
rank's own. Inputs and outputs follow PyTorch's defaults (column-wise: replicated in,
sharded on the last dimension out; row-wise: sharded in, replicated out; local
tensors, or DTensors in with ``use_local_output=False`` out).

Gradients: the input's gradient is all-reduced column-wise (as PyTorch's style does),
and the whole factor's (``A`` column-wise, ``B`` row-wise; each rank computes a partial
sum of it) is all-reduced during the backward, so every rank's copy stays equal. The
sum is taken where a forward reads the factor (:meth:`adapter_factors`), so frozen
adapters (loaded for serving) shard too, and one unfrozen later trains correctly.
Create the optimizer after sharding. Load or add adapters *before* sharding: a sharded
layer refuses new ones (:func:`lora_ext.load_adapter` raises).
:func:`lora_ext.save_adapter`, called on every rank, gathers the shards and writes the
full adapter. With LoRA dropout, row-wise shards draw their masks per shard.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor
from torch.distributed.tensor.parallel import style as _style

from ..layers import LoRALinear

__all__ = ["ColwiseParallel", "RowwiseParallel", "fully_shard"]


class _AllReduceBackward(torch.autograd.Function):
    """Identity forward; sums the gradient over the group (a replicated input's)."""

    @staticmethod
    def forward(ctx, x: Tensor, group) -> Tensor:
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class _AllReduceForward(torch.autograd.Function):
    """Sums partial outputs over the group; the gradient (replicated) passes unchanged."""

    @staticmethod
    def forward(ctx, x: Tensor, group) -> Tensor:
        x = x.contiguous().clone()
        dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, grad: Tensor):
        return grad, None


class _ShardedLoRALinear(LoRALinear):
    """A :class:`LoRALinear` holding one rank's shard (see the module docstring).

    Set by the styles below on an existing layer (its class is swapped, as FSDP2 does):
    ``_tp_style`` is ``"colwise"`` or ``"rowwise"``; row-wise, the bias lives in
    ``tp_bias`` (added after the all-reduce).
    """

    _tp_style: str
    _tp_mesh: DeviceMesh
    _tp_use_local_output: bool

    def forward(self, x: Tensor) -> Tensor:
        group = self._tp_mesh.get_group()
        colwise = self._tp_style == "colwise"
        if isinstance(x, DTensor):
            x = x.redistribute(placements=[Replicate() if colwise else Shard(-1)]).to_local()
        if colwise:
            out = super().forward(_AllReduceBackward.apply(x, group))
            placement = Shard(-1)
        else:
            out = _AllReduceForward.apply(super().forward(x), group)
            if self.tp_bias is not None:
                out = out + self.tp_bias.to(out.dtype)
            placement = Replicate()
        if not self._tp_use_local_output:
            out = DTensor.from_local(out, self._tp_mesh, [placement], run_check=False)
        return out

    def cannot_add_reason(self) -> str:
        return (
            f"this layer is sharded ({self._tp_style} tensor parallel); add or load adapters "
            "before parallelize_module"
        )

    def adapter_factors(self, name: str) -> tuple[Tensor, Tensor]:
        a, b = self.lora_A[name], self.lora_B[name]
        group = self._tp_mesh.get_group()
        if self._tp_style == "colwise":  # A whole: each rank's gradient is a partial sum
            return _AllReduceBackward.apply(a, group), b
        return a, _AllReduceBackward.apply(b, group)

    def full_weights(self, name: str) -> tuple[Tensor, Tensor]:
        """``(A, B)`` of ``name`` gathered from every rank (a collective: call on all)."""
        a, b = self.lora_A[name].detach(), self.lora_B[name].detach()
        group = self._tp_mesh.get_group()
        n = self._tp_mesh.size()
        if self._tp_style == "colwise":
            parts = [torch.empty_like(b) for _ in range(n)]
            dist.all_gather(parts, b.contiguous(), group=group)
            return a, torch.cat(parts, 0)
        parts = [torch.empty_like(a) for _ in range(n)]
        dist.all_gather(parts, a.contiguous(), group=group)
        return torch.cat(parts, 1), b

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, {self._tp_style} shard {self._tp_mesh.get_local_rank()}/{self._tp_mesh.size()}"


def _shard_lora(style: _style.ParallelStyle, layer: LoRALinear, mesh: DeviceMesh, kind: str) -> LoRALinear:
    if isinstance(layer, _ShardedLoRALinear):
        raise ValueError("this LoRALinear is already sharded")
    if mesh.ndim != 1:
        raise ValueError(f"lora_ext's parallel styles take a 1-D device mesh, got {mesh.ndim}-D {mesh}")
    if layer.merged_adapter is not None:
        raise ValueError(f"adapter {layer.merged_adapter!r} is merged; unmerge it before sharding")
    colwise = kind == "colwise"
    default_in, default_out = (Replicate(), Shard(-1)) if colwise else (Shard(-1), Replicate())
    if style.input_layouts != (default_in,) or style.output_layouts != (default_out,):
        raise ValueError(
            f"{type(style).__name__} shards a LoRALinear with its default layouts only "
            f"(input {default_in}, output {default_out}); got input {style.input_layouts[0]}, "
            f"output {style.output_layouts[0]}"
        )
    n = mesh.size()
    size, what = (layer.out_features, "out_features") if colwise else (layer.in_features, "in_features")
    if size % n != 0:
        raise ValueError(
            f"{type(style).__name__}: a LoRALinear with {what}={size} cannot be split evenly over a "
            f"mesh of {n} ranks"
        )
    src = style.src_data_rank

    # Collectives (scatter/broadcast from src_data_rank), in the same order on every rank.
    def shard(t: Tensor, dim: int) -> Tensor:
        return distribute_tensor(t.detach(), mesh, [Shard(dim)], src_data_rank=src).to_local()

    def whole(t: Tensor) -> Tensor:
        return distribute_tensor(t.detach(), mesh, [Replicate()], src_data_rank=src).to_local()

    base = layer.base_layer
    bias = base.bias
    names = list(layer.specs)
    if colwise:
        weight, bias = shard(base.weight, 0), (None if bias is None else shard(bias, 0))
        adapters = {k: (whole(layer.lora_A[k]), shard(layer.lora_B[k], 0)) for k in names}
    else:
        weight, bias = shard(base.weight, 1), (None if bias is None else whole(bias))
        adapters = {k: (shard(layer.lora_A[k], 1), whole(layer.lora_B[k])) for k in names}
    with layer.manager.editing(layer):  # the stacks are rebuilt to hold the local shards
        base.weight = nn.Parameter(weight, requires_grad=False)
        if colwise:
            base.out_features = layer.out_features = weight.shape[0]
            base.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
            tp_bias = None
        else:
            base.in_features = layer.in_features = weight.shape[1]
            base.register_parameter("bias", None)
            tp_bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        for k, (a, b) in adapters.items():
            layer.lora_A[k].data, layer.lora_B[k].data = a, b
        layer.__class__ = _ShardedLoRALinear
        layer.register_parameter("tp_bias", tp_bias)
        layer._tp_style, layer._tp_mesh = kind, mesh
        layer._tp_use_local_output = style.use_local_output
    return layer


class ColwiseParallel(_style.ColwiseParallel):
    """Column-wise sharding; a :class:`LoRALinear` keeps its block of output rows and whole ``A``."""

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        if isinstance(module, LoRALinear):
            return _shard_lora(self, module, device_mesh, "colwise")
        return super()._apply(module, device_mesh)


class RowwiseParallel(_style.RowwiseParallel):
    """Row-wise sharding; a :class:`LoRALinear` keeps its block of input columns and whole ``B``,
    and sums base and LoRA partial outputs with one all-reduce."""

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        if isinstance(module, LoRALinear):
            return _shard_lora(self, module, device_mesh, "rowwise")
        return super()._apply(module, device_mesh)


def fully_shard(module: nn.Module, **kwargs):
    """``torch.distributed.fsdp.fully_shard`` for modules that hold LoRA layers (same arguments).

    FSDP2 replaces parameters with its own (sharded, and gathered around forward and
    backward), so the adapters cannot stay views into the layers' slot stacks, and it
    refuses non-contiguous parameters, which ``lora_B`` of an adapter below the layer's
    rank capacity is. This gives every adapter its own contiguous parameters first;
    the layers then read them, not the stacks, in every forward (with or without
    gradients). Torch's ``fully_shard`` works directly when each layer's adapters all
    have the rank capacity (e.g. one adapter).
    """
    from torch.distributed.fsdp import fully_shard as _fully_shard

    for layer in module.modules():
        if isinstance(layer, LoRALinear):
            with layer.manager.editing(layer, rebuild=False), torch.no_grad():
                for d in (layer.lora_A, layer.lora_B):
                    for p in d.values():
                        if not isinstance(p, DTensor):
                            p.data = p.data.clone(memory_format=torch.contiguous_format)
    return _fully_shard(module, **kwargs)

""":class:`LoRALinear`: LoRA adapters on an ``nn.Linear``.

The adapters live in the slot storage of :class:`~lora_ext.storage.AdapterLayer`;
this module adds the ``nn.Linear`` face, the forward routes and merging. Each
forward takes one route:

- ``forward_base``: no adapter selected (or this layer lacks it): the base layer;
- ``forward_merged``: an adapter is merged into the weight;
- ``forward_inplace``: inference: the base GEMM's output takes every row's update
  in place (``multi_lora_add_``), read by slot from the stacks;
- ``forward_compiled``: under ``torch.compile``: functional ops on tensors only, so
  new adapters and selections of the same shape reuse the graph;
- ``forward_one``: one adapter for the whole batch, with autograd (``lora_linear``);
- ``forward_rows``: a mixed batch with autograd or dropout (``multi_lora``).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import ops
from .lifecycle import AdapterManager, register_layer_kind
from .merging import MergeRecord, check_unmerge, merge_exact, merge_is_finite, unmerge_exact
from .selection import Selection, expand_rows
from .storage import AdapterLayer, AdapterSpec, check_adapter_name


class LoRALinear(AdapterLayer):
    """An ``nn.Linear`` with any number of named LoRA adapters.

    The wrapped layer is kept, untouched and frozen, as ``base_layer``. Adapter ``name``
    has ``lora_A[name]`` ``[r, in]`` and ``lora_B[name]`` ``[out, r]`` and adds
    ``scale * B @ A @ x`` with PEFT's ``scale = alpha / r`` (``alpha / sqrt(r)`` with
    rsLoRA). Which adapter each batch row uses is chosen with
    :func:`lora_ext.set_adapter` / :func:`lora_ext.use_adapter`.
    """

    def __init__(self, base_layer: nn.Linear, manager: Optional[AdapterManager] = None):
        self.check_base(base_layer)
        super().__init__(manager if manager is not None else AdapterManager())
        self.base_layer = base_layer
        for p in base_layer.parameters():
            p.requires_grad_(False)
        self.in_features = base_layer.in_features
        self.out_features = base_layer.out_features
        self.merge_record: Optional[MergeRecord] = None

    @classmethod
    def check_base(cls, base_layer: nn.Module) -> None:
        """Raise ``TypeError`` unless this kind can wrap ``base_layer``."""
        if not isinstance(base_layer, nn.Linear):
            raise TypeError(f"{cls.__name__} wraps nn.Linear, got {type(base_layer).__name__}")

    # -- plain nn.Linear face (code that reads q_proj.weight keeps working) ----------------
    @property
    def weight(self) -> Tensor:
        return self.base_layer.weight

    @property
    def bias(self) -> Optional[Tensor]:
        return self.base_layer.bias

    @property
    def merged_adapter(self) -> Optional[str]:
        return self.merge_record.name if self.merge_record is not None else None

    def adapter_options(self) -> dict:
        w = self.base_layer.weight
        return dict(device=w.device, dtype=w.dtype)

    def extra_repr(self) -> str:
        adapters = ", ".join(f"{n}(r={s.r})" for n, s in self.specs.items())
        return f"in_features={self.in_features}, out_features={self.out_features}, adapters=[{adapters}]"

    # -- adapters ---------------------------------------------------------------------------
    def add_adapter(
        self,
        name: str,
        r: int = 8,
        alpha: float = 16,
        dropout: float = 0.0,
        use_rslora: bool = False,
        init: str = "default",
    ) -> None:
        """Add a trainable adapter ``name``: PEFT's init (A Kaiming-uniform, B zero) or ``"gaussian"``."""
        check_adapter_name(name)
        if name in self.specs:
            raise ValueError(f"adapter {name!r} already exists in this layer")
        if init not in ("default", "gaussian"):
            raise ValueError(f"init must be 'default' or 'gaussian', got {init!r}")
        spec = AdapterSpec(int(r), float(alpha), float(dropout), bool(use_rslora))
        spec.validate()
        self.check_rank(spec.r)
        reason = self.cannot_add_reason()
        if reason is not None:
            raise RuntimeError(f"cannot add adapter {name!r}: {reason}")
        self.manager.install(self, name, spec, *self.initial_weights(spec, init), requires_grad=True)

    def delete_adapter(self, name: str) -> None:
        """Remove ``name`` from this layer (from the model's slots too if no layer keeps it)."""
        if name not in self.specs:
            raise ValueError(f"adapter {name!r} is not in this layer")
        if self.merged_adapter == name:
            raise ValueError(f"adapter {name!r} is merged; unmerge it before deleting it")
        self.manager.delete(name, [self])

    def check_rank(self, r: int) -> None:
        """Raise if rank ``r`` exceeds the rank capacity the user fixed."""
        limit = self.manager.max_rank
        if limit is not None and r > limit:
            raise ValueError(
                f"rank {r} exceeds the rank capacity {limit} set with reserve_adapters; "
                "reserve a larger max_rank first"
            )

    # -- forward routes -------------------------------------------------------------------------
    def forward(self, x: Tensor) -> Tensor:
        selection = self.manager.selection.active()
        a_stack = self._buffers["_a_stack"]  # read directly: nn.Module.__getattr__ costs per access
        if selection is None or a_stack is None:
            return self.forward_base(x)
        if self.merge_record is not None:
            return self.forward_merged(x, selection)
        if torch.compiler.is_compiling():  # guards on nothing that a new selection changes
            return self.forward_compiled(x, selection)
        slot = selection.uniform_slot
        if slot is not None and (slot < 0 or self.slot_adapter(slot)[1] is None):
            return self.forward_base(x)
        if not (
            self.dropout_active()
            or self.reads_params(selection.used_names, needs_grad=x.requires_grad)
            or x.dtype != a_stack.dtype
            or torch.is_autocast_enabled(x.device.type)  # the base GEMM's output in another dtype
        ):
            return self.forward_inplace(x, selection)
        if slot is not None:
            return self.forward_one(x, slot)
        if self.reads_params(selection.used_names):
            stacks = self.stack_params(selection.used_names, x.dtype)
            return self.forward_rows(x, selection.row_index(x, compact=True), *stacks)
        return self.forward_rows(x, selection.row_index(x), *self.slot_stacks(x.dtype))

    def forward_base(self, x: Tensor) -> Tensor:
        base = self._modules["base_layer"]
        return F.linear(x, base.weight, base.bias)

    def forward_merged(self, x: Tensor, selection: Selection) -> Tensor:
        name = self.merge_record.name
        if selection.is_uniform and selection.names[0] in (None, name):
            return self.forward_base(x)
        raise RuntimeError(
            f"adapter {name!r} is merged into the weights; call "
            "unmerge_adapter before selecting other adapters or a mixed batch"
        )

    def forward_inplace(self, x: Tensor, selection: Selection) -> Tensor:
        y = self.forward_base(x)
        buffers = self._buffers  # read directly: nn.Module.__getattr__ costs per access
        ops.multi_lora_add_(
            y.view(-1, self.out_features),
            x.reshape(-1, self.in_features),
            buffers["_a_stack"],
            buffers["_b_stack"],
            selection.row_index(x),
            buffers["_scales"],
            buffers["_ranks"],
        )
        return y

    def forward_compiled(self, x: Tensor, selection: Selection) -> Tensor:
        # Everything from tensors: new adapters, replacements and new selections of the
        # same shape reuse the compiled graph (in inference; training reads the used
        # adapters' names, so a new selection recompiles).
        if self.reads_params(selection.used_names):
            index = expand_rows(selection.compact_rows.to(x.device), x)
            return self.forward_rows(x, index, *self.stack_params(selection.used_names, x.dtype))
        index = expand_rows(selection.rows.to(x.device), x)
        return self.forward_rows(x, index, *self.slot_stacks(x.dtype))

    def forward_one(self, x: Tensor, slot: int) -> Tensor:
        a, b, spec = self.one_adapter(x, slot)
        if self.training and spec.dropout > 0:
            return self.forward_one_unfused(x, a, b, spec)
        return ops.lora_linear(x, self.base_layer.weight, self.base_layer.bias, a, b, spec.scale)

    def one_adapter(self, x: Tensor, slot: int) -> tuple[Tensor, Tensor, AdapterSpec]:
        """``(A, B, spec)`` of the adapter in ``slot``, in ``x``'s dtype, for autograd."""
        name, spec = self.slot_adapter(slot)
        if self.reads_params([name]):
            a, b = self.adapter_factors(name)
        else:  # read by slot: a pinned forward keeps the weights it started with
            a, b = self._a_stack[slot, : spec.r], self._b_stack[slot, :, : spec.r]
        return a.to(x.dtype), b.to(x.dtype), spec

    def forward_one_unfused(self, x: Tensor, a: Tensor, b: Tensor, spec: AdapterSpec) -> Tensor:
        """One adapter over a separately computed base output (with dropout when training)."""
        # PEFT: base(x) + B A dropout(x) * scale. multi_lora carries the separate base.
        x2 = x.reshape(-1, self.in_features)
        index = torch.zeros(x2.shape[0], dtype=torch.int32, device=x.device)
        scales = torch.tensor([spec.scale], dtype=torch.float32, device=x.device)
        x_lora = F.dropout(x2, spec.dropout) if self.training and spec.dropout > 0 else x2
        out = ops.multi_lora(x_lora, a[None], b[None], index, scales, None, self.forward_base(x2))
        return out.reshape(*x.shape[:-1], self.out_features)

    def forward_rows(self, x, index, a_stack, b_stack, scales, ranks, dropout) -> Tensor:
        x2 = x.reshape(-1, self.in_features)
        x_lora = row_dropout(x2, index, dropout) if self.dropout_active() else x2
        out = ops.multi_lora(x_lora, a_stack, b_stack, index, scales, ranks, self.forward_base(x2))
        return out.reshape(*x.shape[:-1], self.out_features)

    # -- merging ---------------------------------------------------------------------------------
    def _merge_args(self, name: str) -> tuple[Tensor, Tensor, float]:
        if name not in self.specs:
            raise ValueError(f"adapter {name!r} is not in this layer")
        w = self.base_layer.weight
        a = self.lora_A[name].detach().to(w.dtype).contiguous()
        b = self.lora_B[name].detach().to(w.dtype).contiguous()
        return a, b, self.specs[name].scale

    def merge_refusal(self) -> Optional[str]:
        return None

    def merge_is_finite(self, name: str) -> bool:
        """Whether merging ``name`` would leave every weight finite; writes nothing."""
        return merge_is_finite(self.base_layer.weight, *self._merge_args(name))

    def merge(self, name: str, exact: bool = True) -> None:
        """Add adapter ``name`` into the base weight (no safety check here).

        ``exact``: keep a :class:`~lora_ext.merging.MergeRecord` (an int8 residual per
        weight element plus a rare overflow list) so that :meth:`unmerge` restores the
        weight bit for bit. Without it the merge is permanent (for unloading).
        """
        a, b, scale = self._merge_args(name)
        if self.merge_record is not None:
            raise ValueError(f"adapter {self.merged_adapter!r} is already merged; unmerge it first")
        w = self.base_layer.weight
        if not exact:
            with torch.no_grad():
                ops.merge_(w, a, b, scale)
            return
        self.merge_record = merge_exact(w, name, a, b, scale)

    def check_unmerge(self) -> None:
        """Raise, changing nothing, if the merge can no longer be undone exactly here."""
        if self.merge_record is not None:
            a, b, _ = self._merge_args(self.merge_record.name)
            check_unmerge(self.merge_record, self.base_layer.weight, a, b)

    def unmerge(self) -> None:
        """Restore the base weight bit for bit; a no-op when nothing is merged."""
        if self.merge_record is None:
            return
        unmerge_exact(self.merge_record, self.base_layer.weight, *self._merge_args(self.merge_record.name))
        self.merge_record = None

    def forget_merge(self) -> None:
        """Drop the exact-unmerge record, keeping the merged weight as the new base."""
        self.merge_record = None

    def __setstate__(self, state) -> None:
        super().__setstate__(state)
        if self.merge_record is not None:  # a copy: its weight holds the merged bits it was copied with
            self.merge_record.refresh_weight_state(self.base_layer.weight)


def row_dropout(x2: Tensor, index: Tensor, dropout: Tensor) -> Tensor:
    """Each row of ``x2`` ``[T, in]`` dropped out with its own adapter's probability
    (``dropout[index[t]]``; none for -1 rows): PEFT's semantics for a mixed batch."""
    p = torch.where(index >= 0, dropout[index.clamp(min=0).long()], 0.0)[:, None]
    keep = torch.rand_like(p.expand(-1, x2.shape[1])) >= p
    return x2 * keep.to(x2.dtype) / (1.0 - p).to(x2.dtype)


register_layer_kind(nn.Linear, LoRALinear)

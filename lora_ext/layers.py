"""LoRA modules: :class:`LoRALinear` and the adapter storage it shares with its model.

Each layer keeps its adapters in *slot stacks*, ``a_stack [C, R, in]`` and
``b_stack [C, out, R]`` (zero padded to the layer's rank capacity R) with ``scales
[C]`` and ``ranks [C]``; adapter ``name`` lives in the slot its model's
:class:`~lora_ext.context._AdapterContext` gave it, the same slot in every layer.
Its ``lora_A[name]`` / ``lora_B[name]`` parameters are *views* into that slot
(``a_stack[slot, :r]``, ``b_stack[slot, :, :r]``): one copy of every adapter, seen by
optimizers and state dicts as ordinary parameters, read by ``multi_lora`` directly.
A mixed batch is one ``multi_lora`` call whose work depends on the adapters its rows
use, not on how many are loaded; when gradients are needed the used adapters are
stacked from their parameters instead, so gradients reach them.

Keep the parameters as views: change adapter weights in place, through
:func:`lora_ext.load_adapter` (``replace=True``) or ``load_state_dict``, not by
assigning ``param.data``. ``Module.to``/``half``/``cuda``, ``copy.deepcopy`` and
pickling rebuild the stacks from the parameters.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import ops
from .context import AdapterNames, _AdapterContext, expand_rows  # noqa: F401  (AdapterNames re-exported)

_NAME_RE = re.compile(r"^[A-Za-z0-9_\-]+$")
# Elements of the temporary row block used to check a merge for finiteness.
_SAFE_BLOCK_ELEMENTS = 1 << 22


def _check_adapter_name(name: str) -> None:
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise ValueError(
            f"adapter name must be a non-empty string of letters, digits, '_' or '-', got {name!r}"
        )
    if hasattr(nn.ParameterDict, name):  # would shadow a method of the parameter dicts
        raise ValueError(f"adapter name {name!r} is reserved (an nn.Module attribute); choose another")


@dataclass(frozen=True)
class AdapterSpec:
    """Hyper-parameters of one adapter in one layer (PEFT's meaning)."""

    r: int
    alpha: float
    dropout: float = 0.0
    use_rslora: bool = False

    @property
    def scale(self) -> float:
        return self.alpha / math.sqrt(self.r) if self.use_rslora else self.alpha / self.r

    def validate(self) -> None:
        if not isinstance(self.r, int) or self.r < 1:
            raise ValueError(f"r must be a positive integer, got {self.r!r}")
        if not math.isfinite(self.alpha):
            raise ValueError(f"alpha must be finite, got {self.alpha!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout!r}")


class LoRALinear(nn.Module):
    """An ``nn.Linear`` with any number of named LoRA adapters.

    The wrapped layer is kept, untouched and frozen, as ``base_layer``. Adapter ``name``
    has ``lora_A[name]`` ``[r, in]`` and ``lora_B[name]`` ``[out, r]`` and adds
    ``scale * B @ A @ x`` with PEFT's ``scale = alpha / r`` (``alpha / sqrt(r)`` with
    rsLoRA). Which adapter each batch row uses is chosen model-wide with
    :func:`lora_ext.set_adapter`; a batch on one adapter runs ``lora_linear``, a mixed
    batch one ``multi_lora`` over the slot stacks.
    """

    def __init__(self, base_layer: nn.Linear, context: Optional[_AdapterContext] = None):
        super().__init__()
        if not isinstance(base_layer, nn.Linear):
            raise TypeError(f"LoRALinear wraps nn.Linear, got {type(base_layer).__name__}")
        self.base_layer = base_layer
        for p in base_layer.parameters():
            p.requires_grad_(False)
        self.in_features = base_layer.in_features
        self.out_features = base_layer.out_features
        self.lora_A = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        self.specs: dict[str, AdapterSpec] = {}
        # Slot storage (allocated with the first adapter); not in the state dict, whose
        # lora_A/lora_B entries are the per-adapter views.
        for key in ("_a_stack", "_b_stack", "_scales", "_ranks", "_dropout"):
            self.register_buffer(key, None, persistent=False)
        self._slot_name: list[Optional[str]] = []  # per slot: adapter name or None (empty)
        self._slot_spec: list[Optional[AdapterSpec]] = []
        self._num_dropout = 0  # adapters with dropout > 0
        self._context = context if context is not None else _AdapterContext()
        self._context.register(self)
        self._merged: Optional[dict] = None
        self.register_load_state_dict_post_hook(_resync_if_reassigned)

    # -- plain nn.Linear face (code that reads q_proj.weight keeps working) ----------
    @property
    def weight(self) -> Tensor:
        return self.base_layer.weight

    @property
    def bias(self) -> Optional[Tensor]:
        return self.base_layer.bias

    @property
    def adapter_names(self) -> list[str]:
        return list(self.specs)

    @property
    def merged_adapter(self) -> Optional[str]:
        return self._merged["name"] if self._merged is not None else None

    @property
    def rank_capacity(self) -> int:
        """R: the largest rank the stacks hold without re-allocating (0: no storage yet)."""
        return 0 if self._a_stack is None else self._a_stack.shape[1]

    def slot(self, name: str) -> int:
        """The slot of adapter ``name`` in the stacks."""
        if name not in self.specs:
            raise ValueError(f"adapter {name!r} is not in this layer")
        return self._context.slot_of[name]

    def extra_repr(self) -> str:
        adapters = ", ".join(f"{n}(r={s.r})" for n, s in self.specs.items())
        return f"in_features={self.in_features}, out_features={self.out_features}, adapters=[{adapters}]"

    # -- adapters ---------------------------------------------------------------------
    def add_adapter(
        self,
        name: str,
        r: int = 8,
        alpha: float = 16,
        dropout: float = 0.0,
        use_rslora: bool = False,
        init: str = "default",
    ) -> None:
        """Add adapter ``name``: PEFT's init (A Kaiming-uniform, B zero) or ``"gaussian"``."""
        _check_adapter_name(name)
        if name in self.specs:
            raise ValueError(f"adapter {name!r} already exists in this layer")
        if init not in ("default", "gaussian"):
            raise ValueError(f"init must be 'default' or 'gaussian', got {init!r}")
        spec = AdapterSpec(int(r), float(alpha), float(dropout), bool(use_rslora))
        spec.validate()
        self.check_rank(spec.r)
        w = self.base_layer.weight
        a = torch.empty(spec.r, self.in_features, device=w.device, dtype=w.dtype)
        if init == "gaussian":
            nn.init.normal_(a, std=1.0 / spec.r)
        else:
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        b = torch.zeros(self.out_features, spec.r, device=w.device, dtype=w.dtype)
        self._install(name, spec, a, b, requires_grad=True)

    def _install(self, name: str, spec: AdapterSpec, a: Tensor, b: Tensor, requires_grad: bool) -> None:
        """Store a new adapter (the caller has checked name, spec and shapes)."""
        ctx = self._context
        with ctx._mutex:
            slot = ctx.slot_of.get(name)  # another layer may hold it already
            new = slot is None
            if new:
                slot = ctx.take_slot()
            self._write_slot(slot, name, spec, a, b)
            self._point(name, slot, requires_grad)
            if new:
                ctx.slot_of[name] = slot

    def delete_adapter(self, name: str) -> None:
        """Remove ``name`` from this layer (from the model's slots too if no layer keeps it)."""
        if name not in self.specs:
            raise ValueError(f"adapter {name!r} is not in this layer")
        if self.merged_adapter == name:
            raise ValueError(f"adapter {name!r} is merged; unmerge it before deleting it")
        ctx = self._context
        with ctx._mutex:
            self._detach(name)
            if any(name in layer.specs for layer in ctx.layers):
                self._clear_slot(ctx.slot_of[name])
            else:
                ctx.retire(name)

    def check_rank(self, r: int) -> None:
        """Raise if rank ``r`` exceeds the rank capacity the user fixed."""
        limit = self._context.max_rank
        if limit is not None and r > limit:
            raise ValueError(
                f"rank {r} exceeds the rank capacity {limit} set with reserve_adapters; "
                "reserve a larger max_rank first"
            )

    # -- slot storage (callers hold the context's mutex) ---------------------------------
    def _fit_storage(self, min_rank: int = 0) -> None:
        """Make the stacks hold the context's capacity and rank ``min_rank``."""
        ctx = self._context
        rank = max(min_rank, ctx.max_rank or 0, self.rank_capacity)
        if self._a_stack is not None and self._a_stack.shape[:2] == (ctx.capacity, rank):
            return
        if self._a_stack is None and min_rank == 0:
            return  # allocated with the first adapter
        self._rebuild(ctx.capacity, rank)

    def _rebuild(self, capacity: int, rank: int) -> None:
        """Allocate stacks of ``[capacity, rank]`` and move every adapter in from its parameters.

        New tensors rather than a resize, so a forward still reading the old stacks in
        another thread keeps them alive.
        """
        w = self.base_layer.weight
        kw = dict(device=w.device, dtype=w.dtype)
        a_stack = torch.zeros(capacity, rank, self.in_features, **kw)
        b_stack = torch.zeros(capacity, self.out_features, rank, **kw)
        scales = torch.zeros(capacity, dtype=torch.float32, device=w.device)
        ranks = torch.ones(capacity, dtype=torch.int64, device=w.device)  # empty slots: rank 1, scale 0
        dropout = torch.zeros(capacity, dtype=torch.float32, device=w.device)
        slot_of = self._context.slot_of
        self._slot_name = [None] * capacity
        self._slot_spec = [None] * capacity
        for name, spec in self.specs.items():
            self._slot_name[slot_of[name]], self._slot_spec[slot_of[name]] = name, spec
        with torch.no_grad():
            for name, spec in self.specs.items():
                slot, r = slot_of[name], spec.r
                a_stack[slot, :r].copy_(self.lora_A[name])
                b_stack[slot, :, :r].copy_(self.lora_B[name])
                scales[slot], ranks[slot], dropout[slot] = spec.scale, r, spec.dropout
        self._a_stack, self._b_stack = a_stack, b_stack
        self._scales, self._ranks, self._dropout = scales, ranks, dropout
        for name in self.specs:
            self._point(name, slot_of[name])

    def _write_slot(self, slot: int, name: str, spec: AdapterSpec, a: Tensor, b: Tensor) -> None:
        """Store an adapter's weights in ``slot`` (an empty slot: no forward reads it)."""
        self._fit_storage(spec.r)
        r = spec.r
        with torch.no_grad():  # from pinned memory asynchronously (the pool's side stream)
            self._a_stack[slot, :r].copy_(a, non_blocking=a.is_pinned())
            self._b_stack[slot, :, :r].copy_(b, non_blocking=b.is_pinned())
            self._scales[slot] = spec.scale
            self._ranks[slot] = r
            self._dropout[slot] = spec.dropout
        self._slot_name[slot] = name
        self._slot_spec[slot] = spec

    def _point(self, name: str, slot: int, requires_grad: bool = False) -> None:
        """Make ``name``'s parameters views of ``slot`` (same Parameter objects if they exist)."""
        spec = self._slot_spec[slot]
        old = self.specs.get(name)
        a_view = self._a_stack[slot, : spec.r]
        b_view = self._b_stack[slot, :, : spec.r]
        if name in self.lora_A:
            self.lora_A[name].data = a_view
            self.lora_B[name].data = b_view
        else:
            self.lora_A[name] = nn.Parameter(a_view, requires_grad=requires_grad)
            self.lora_B[name] = nn.Parameter(b_view, requires_grad=requires_grad)
        self._num_dropout += (spec.dropout > 0) - (old is not None and old.dropout > 0)
        self.specs[name] = spec

    def _detach(self, name: str) -> None:
        """Forget ``name``'s parameters; its slot's data stays until it is cleared."""
        self._num_dropout -= self.specs[name].dropout > 0
        del self.lora_A[name]
        del self.lora_B[name]
        del self.specs[name]

    def _clear_slot(self, slot: int) -> None:
        """Zero ``slot`` so that rows pointing at it get the base output."""
        if self._a_stack is None or self._slot_spec[slot] is None:
            return
        with torch.no_grad():
            self._a_stack[slot].zero_()
            self._b_stack[slot].zero_()
            self._scales[slot] = 0.0
            self._ranks[slot] = 1
            self._dropout[slot] = 0.0
        self._slot_name[slot] = None
        self._slot_spec[slot] = None

    def _resync(self) -> None:
        """Rebuild the stacks from the parameters (after ``to()``, deepcopy, unpickling)."""
        if self._a_stack is not None:
            with self._context._mutex:
                self._rebuild(self._context.capacity, self.rank_capacity)

    def _shares_storage(self) -> bool:
        storages = {t.untyped_storage().data_ptr() for t in (self._a_stack, self._b_stack)}
        return all(
            p.untyped_storage().data_ptr() in storages for d in (self.lora_A, self.lora_B) for p in d.values()
        )

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        self._resync()  # fn converted the parameters one by one: views no longer shared
        return self

    def __setstate__(self, state) -> None:
        super().__setstate__(state)
        self._context.register(self)
        self._resync()
        if self._merged is not None:  # a copy: its weight holds the merged bits it was copied with
            self._merged["weight_state"] = _weight_state(self.base_layer.weight)

    # -- stacks ----------------------------------------------------------------------
    def stacks(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``(a_stack [C, R, in], b_stack [C, out, R], scales [C] fp32, ranks [C] int64)``.

        Indexed by slot (:meth:`slot`); empty slots are zero with scale 0 and rank 1.
        These tensors *are* the adapters' storage: writing to them changes the adapters.
        """
        if self._a_stack is None:
            raise ValueError("this layer has no adapters")
        return self._a_stack, self._b_stack, self._scales, self._ranks

    a_stack = property(lambda self: self.stacks()[0])
    b_stack = property(lambda self: self.stacks()[1])
    scales = property(lambda self: self.stacks()[2])
    ranks = property(lambda self: self.stacks()[3])

    def _trains(self, names) -> bool:
        """Whether forward must read the parameters of ``names`` rather than the stacks:
        gradients must reach them, or they are no longer the stacks' views (FSDP2 swaps in
        its own, so the stacks are stale)."""
        if torch.is_grad_enabled() and self._params_require_grad(names):
            return True
        return self._params_replaced(names)

    def _params_require_grad(self, names) -> bool:
        for n in names:
            if n in self.specs and (self.lora_A[n].requires_grad or self.lora_B[n].requires_grad):
                return True
        return False

    def _params_replaced(self, names) -> bool:
        if torch.compiler.is_compiling():
            return False
        return self._storage_swapped(names)

    def _storage_swapped(self, names) -> bool:
        # FSDP2 (lora_ext.parallel.fully_shard) replaces all of a layer's adapters: one tells.
        for n in names:
            p = self._modules["lora_A"]._parameters.get(n)
            if p is not None:
                return p.untyped_storage().data_ptr() != self._buffers["_a_stack"].untyped_storage().data_ptr()
        return False

    def _stack_params(self, names: list[str], dtype: torch.dtype):
        """Differentiable stacks of ``names`` (in that order) from their parameters."""
        present = [n for n in names if n in self.specs]
        rmax = max([self.specs[n].r for n in present], default=1)
        w = self.base_layer.weight
        zero_a = w.new_zeros(rmax, self.in_features, dtype=dtype)
        zero_b = w.new_zeros(self.out_features, rmax, dtype=dtype)
        a_rows, b_rows, scales, ranks, dropout = [], [], [], [], []
        for n in names:
            spec = self.specs.get(n)
            if spec is None:  # absent from this layer: a zero adapter
                a_rows.append(zero_a)
                b_rows.append(zero_b)
                scales.append(0.0), ranks.append(1), dropout.append(0.0)
                continue
            a_rows.append(F.pad(self.lora_A[n].to(dtype), (0, 0, 0, rmax - spec.r)))
            b_rows.append(F.pad(self.lora_B[n].to(dtype), (0, rmax - spec.r)))
            scales.append(spec.scale), ranks.append(spec.r), dropout.append(spec.dropout)
        device = w.device
        return (
            torch.stack(a_rows),
            torch.stack(b_rows),
            torch.tensor(scales, dtype=torch.float32, device=device),
            torch.tensor(ranks, dtype=torch.int64, device=device),
            torch.tensor(dropout, dtype=torch.float32, device=device),
        )

    # -- forward -----------------------------------------------------------------------
    def forward(self, x: Tensor) -> Tensor:
        selection = self._context.active_selection()
        buffers = self._buffers  # read directly: nn.Module.__getattr__ costs per access
        a_stack = buffers["_a_stack"]
        if selection is None or a_stack is None:
            base = self._modules["base_layer"]
            return F.linear(x, base.weight, base.bias)
        if torch.compiler.is_compiling():  # guards on nothing that a new selection changes
            return self._forward_general(x, selection)
        slot = selection.uniform_slot
        # self._trains(names), unrolled: this runs once per layer call, so each check is
        # made once, the cheapest first, and is_compiling is not asked again.
        if (
            self._merged is None
            and (slot is None or (slot >= 0 and self._slot_spec[slot] is not None))
            and not (self.training and self._num_dropout > 0)
            and not (
                torch.is_grad_enabled()
                and (x.requires_grad or self._params_require_grad(selection.used_names))
            )
            and not self._storage_swapped(selection.used_names)
        ):
            # Inference: the base GEMM's output takes the update in place (one [T, out]
            # tensor, as nn.Linear), every row read by slot from the stacks.
            base = self._modules["base_layer"]
            y = F.linear(x, base.weight, base.bias)
            if y.dtype == x.dtype == a_stack.dtype:  # else (autocast) the general path
                ops.multi_lora_add_(
                    y.view(-1, self.out_features),
                    x.reshape(-1, self.in_features),
                    a_stack,
                    buffers["_b_stack"],
                    selection.row_index(x),
                    buffers["_scales"],
                    buffers["_ranks"],
                )
                return y
        return self._forward_general(x, selection)

    def _forward_general(self, x: Tensor, selection) -> Tensor:
        """Merged weights, torch.compile, autograd, dropout: functional ops."""
        w, bias = self.base_layer.weight, self.base_layer.bias
        if self._merged is not None:
            if selection.is_uniform and selection.names[0] in (None, self._merged["name"]):
                return F.linear(x, w, bias)
            raise RuntimeError(
                f"adapter {self._merged['name']!r} is merged into the weights; call "
                "unmerge_adapter before selecting other adapters or a mixed batch"
            )
        if torch.compiler.is_compiling():
            # Everything from tensors: new adapters, replacements and new selections of
            # the same shape reuse the compiled graph (in inference; training reads the
            # used adapters' names, so a new selection recompiles).
            batch = x.shape[0] if x.dim() > 1 else 1
            tokens = math.prod(x.shape[1:-1]) if x.dim() > 2 else 1
            if self._trains(selection.used_names):
                index = expand_rows(selection.compact_rows.to(x.device), batch, tokens)
                return self._forward_rows(x, index, *self._stack_params(selection.used_names, x.dtype))
            index = expand_rows(selection.rows.to(x.device), batch, tokens)
            return self._forward_rows(x, index, *self._slot_stacks(x.dtype))
        if selection.is_uniform:
            slot = selection.uniform_slot
            if slot < 0 or self._slot_spec[slot] is None:
                return F.linear(x, w, bias)
            return self._forward_one(x, slot)
        if self._trains(selection.used_names):
            stacks = self._stack_params(selection.used_names, x.dtype)
            return self._forward_rows(x, selection.row_index(x, compact=True), *stacks)
        return self._forward_rows(x, selection.row_index(x), *self._slot_stacks(x.dtype))

    def _slot_stacks(self, dtype: torch.dtype):
        a, b = self._a_stack, self._b_stack
        if a.dtype != dtype:  # e.g. autocast: converts the whole stack, a slow path
            a, b = a.to(dtype), b.to(dtype)
        return a, b, self._scales, self._ranks, self._dropout

    def _forward_one(self, x: Tensor, slot: int) -> Tensor:
        name, spec = self._slot_name[slot], self._slot_spec[slot]
        if self._trains([name]):
            a, b = self.lora_A[name], self.lora_B[name]
        else:  # read by slot: a pinned forward keeps the weights it started with
            a, b = self._a_stack[slot, : spec.r], self._b_stack[slot, :, : spec.r]
        a, b = a.to(x.dtype), b.to(x.dtype)
        if not (self.training and spec.dropout > 0):
            return ops.lora_linear(x, self.base_layer.weight, self.base_layer.bias, a, b, spec.scale)
        # PEFT: base(x) + B A dropout(x) * scale. multi_lora carries the separate base.
        x2 = x.reshape(-1, self.in_features)
        base = F.linear(x2, self.base_layer.weight, self.base_layer.bias)
        index = torch.zeros(x2.shape[0], dtype=torch.int32, device=x.device)
        scales = torch.tensor([spec.scale], dtype=torch.float32, device=x.device)
        out = ops.multi_lora(
            F.dropout(x2, spec.dropout, training=True), a[None], b[None], index, scales, None, base
        )
        return out.reshape(*x.shape[:-1], self.out_features)

    def _forward_rows(self, x, index, a_stack, b_stack, scales, ranks, dropout) -> Tensor:
        x2 = x.reshape(-1, self.in_features)
        base = F.linear(x2, self.base_layer.weight, self.base_layer.bias)
        x_lora = x2
        if self.training and self._num_dropout > 0:
            # Each row dropped out with its own adapter's probability (PEFT's semantics).
            p = torch.where(index >= 0, dropout[index.clamp(min=0).long()], 0.0)[:, None]
            keep = torch.rand_like(p.expand(-1, self.in_features)) >= p
            x_lora = x2 * keep.to(x2.dtype) / (1.0 - p).to(x2.dtype)
        out = ops.multi_lora(x_lora, a_stack, b_stack, index, scales, ranks, base)
        return out.reshape(*x.shape[:-1], self.out_features)

    # -- merging -----------------------------------------------------------------------
    def _merge_args(self, name: str) -> tuple[Tensor, Tensor, float]:
        w = self.base_layer.weight
        a = self.lora_A[name].detach().to(w.dtype).contiguous()
        b = self.lora_B[name].detach().to(w.dtype).contiguous()
        return a, b, self.specs[name].scale

    def merge_is_finite(self, name: str) -> bool:
        """Whether merging ``name`` would leave every weight finite; writes nothing.

        Merges copies of blocks of rows, so the extra memory is one small block.
        """
        a, b, scale = self._merge_args(name)
        w = self.base_layer.weight.detach()
        rows = max(1, _SAFE_BLOCK_ELEMENTS // max(self.in_features, 1))
        with torch.no_grad():
            for r0 in range(0, self.out_features, rows):
                block = w[r0 : r0 + rows].clone()
                ops.merge_(block, a, b[r0 : r0 + rows].contiguous(), scale)
                if not bool(torch.isfinite(block).all()):
                    return False
        return True

    def merge(self, name: str, exact: bool = True) -> None:
        """Add adapter ``name`` into the base weight (no safety check here).

        ``exact``: keep an int8 residual per weight element (plus a rare overflow list)
        so that :meth:`unmerge` restores the weight bit for bit. Without it the merge is
        permanent (for unloading).
        """
        if name not in self.specs:
            raise ValueError(f"adapter {name!r} is not in this layer")
        if self._merged is not None:
            raise ValueError(f"adapter {self._merged['name']!r} is already merged; unmerge it first")
        a, b, scale = self._merge_args(name)
        w = self.base_layer.weight
        with torch.no_grad():
            if not exact:
                ops.merge_(w, a, b, scale)
                return
            residual = torch.empty(w.shape, dtype=torch.int8, device=w.device)
            over_index, over_values = ops.merge_exact_(w, a, b, scale, residual)
        self._merged = {
            "name": name,
            "residual": residual,
            "overflow": (over_index, over_values),
            "weights": (a.clone(), b.clone()),
            "made_by": _merge_maker(w),
            "weight_state": _weight_state(w),
        }

    def check_unmerge(self) -> None:
        """Raise, changing nothing, if the merge can no longer be undone exactly here.

        Refused: the adapter's parameters changed; the weight was replaced or written in
        place (optimizer step, ``load_state_dict``, ``copy_``); the weight is now on
        another device, dtype or kernel variant than the one that merged it.
        ``unmerge_exact_`` then also checks every element before writing.
        """
        if self._merged is None:
            return
        m, w = self._merged, self.base_layer.weight
        what = f"adapter {m['name']!r} is merged into this layer's weight"
        now = _merge_maker(w)
        if now != m["made_by"]:
            raise RuntimeError(
                f"{what} by {m['made_by']}, but the weight is now on {now}: it can only be "
                "unmerged exactly where it was merged; move it back first (or forget_merge)"
            )
        if _weight_state(w) != m["weight_state"]:
            raise RuntimeError(
                f"{what}, and the weight was replaced or written in place since the merge; "
                "it cannot be unmerged exactly (weight unchanged; forget_merge keeps it as the base)"
            )
        a, b, _ = self._merge_args(m["name"])
        if not all(torch.equal(now, then) for now, then in zip((a, b), m["weights"])):
            raise RuntimeError(f"{what}, and the adapter was modified while merged; it cannot be unmerged exactly")

    def unmerge(self) -> None:
        """Restore the base weight bit for bit; a no-op when nothing is merged."""
        if self._merged is None:
            return
        self.check_unmerge()
        m = self._merged
        a, b, scale = self._merge_args(m["name"])
        with torch.no_grad():
            ops.unmerge_exact_(self.base_layer.weight, a, b, scale, m["residual"], *m["overflow"])
        self._merged = None

    def forget_merge(self) -> None:
        """Drop the exact-unmerge record, keeping the merged weight as the new base."""
        self._merged = None


def _merge_maker(weight: Tensor) -> str:
    """Where a weight is merged: device, dtype and kernel variant (all change the rounding)."""
    return f"{weight.device} {str(weight.dtype).removeprefix('torch.')} ({ops.merge_variant(weight)})"


def _weight_state(weight: Tensor) -> tuple:
    """Changes when the weight tensor is replaced or written in place through autograd's view."""
    return weight.data_ptr(), weight._version


def _resync_if_reassigned(module: LoRALinear, incompatible_keys) -> None:
    """``load_state_dict(assign=True)`` replaces the parameters: rebuild the stacks."""
    if module._a_stack is not None and not module._shares_storage():
        module._resync()

"""Slot storage: the base every LoRA layer kind builds on.

A layer keeps its adapters in *slot stacks*, ``a_stack [C, R, in]`` and
``b_stack [C, out, R]`` (zero padded to the layer's rank capacity R) with ``scales
[C]``, ``ranks [C]`` and ``dropout [C]``; adapter ``name`` lives in the slot its
model's :class:`~lora_ext.lifecycle.AdapterManager` gave it, the same slot in every
layer. Its ``lora_A[name]`` / ``lora_B[name]`` parameters are *views* into that slot
(``a_stack[slot, :r]``, ``b_stack[slot, :, :r]``): one copy of every adapter, seen
by optimizers and state dicts as ordinary parameters, read by the multi-adapter
ops directly. This *view invariant* and every guard that keeps it live here.

A kind whose adapters carry leading dimensions overrides ``factor_shapes`` (the
experts of a mixture, :mod:`lora_ext.moe`: A ``[E, r, in]``, B ``[E, out, r]``); its
stacks are then ``[C, E, R, in]`` / ``[C, E, out, R]`` and its views
``a_stack[slot, ..., :r, :]`` / ``b_stack[slot, ..., :r]``, with everything else here
unchanged (for ``LoRALinear`` these are the same views as before).

Keep the parameters as views: change adapter weights in place (``load_adapter(...,
replace=True)``, ``load_state_dict``), not by assigning ``param.data``.
``Module.to``/``half``/``cuda``, ``copy.deepcopy`` and pickling rebuild the stacks
from the parameters.

On the CPU the stacks sit in reserved address space (an anonymous mapping whose
pages the OS commits only when written, 256 MiB per stack or 4x its capacity), so the
slot capacity grows without copying any adapter and without holding memory for empty
slots; past the reservation it is re-allocated (copied) once into a 4x larger one.
"""

from __future__ import annotations

import math
import mmap
import re
import sys
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

_NAME_RE = re.compile(r"^[A-Za-z0-9_\-]+$")
# Address space reserved per stack on the CPU (pages are committed only when written):
# 256 MiB, or 4x the capacity asked for, whichever is more.
_RESERVE_BYTES = 1 << 28
_STACK_KEYS = ("_a_stack", "_b_stack", "_scales", "_ranks", "_dropout")
_MAP_NORESERVE = getattr(mmap, "MAP_NORESERVE", 0x4000 if sys.platform.startswith("linux") else 0)


def check_adapter_name(name: str) -> None:
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
    use_dora: bool = False  # a DoRA adapter (lora_ext.dora): it needs a layer kind that carries it

    @property
    def scale(self) -> float:
        return self.alpha / math.sqrt(self.r) if self.use_rslora else self.alpha / self.r

    @property
    def variant(self) -> Optional[str]:
        """The LoRA variant this adapter needs its layer to carry (None: plain LoRA)."""
        return "dora" if self.use_dora else None

    def validate(self) -> None:
        if not isinstance(self.r, int) or self.r < 1:
            raise ValueError(f"r must be a positive integer, got {self.r!r}")
        if not math.isfinite(self.alpha):
            raise ValueError(f"alpha must be finite, got {self.alpha!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout!r}")


def _reserve(nbytes: int) -> Optional[mmap.mmap]:
    """``nbytes`` of zeroed, lazily committed address space (None: refused)."""
    if not _MAP_NORESERVE or nbytes == 0:
        return None
    try:
        return mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | _MAP_NORESERVE)
    except (OSError, ValueError, OverflowError):  # e.g. strict overcommit or a ulimit -v
        return None


class _Stack:
    """One slot stack ``[capacity, *per_slot]``.

    On the CPU it lies at the start of reserved address space, and growing makes a new
    tensor over a longer prefix of the same memory: nothing is copied. Each tensor's
    storage covers its own capacity only (not the reservation), so ``torch.save`` of a
    parameter view writes at most the slots that existed when it was made.
    """

    def __init__(self, capacity: int, per_slot: tuple[int, ...], dtype: torch.dtype, device: torch.device):
        self.per_slot, self.dtype = per_slot, dtype
        self.buffer = None
        if device.type == "cpu":
            slot_bytes = max(math.prod(per_slot) * dtype.itemsize, 1)
            self.buffer = _reserve(max(4 * capacity, _RESERVE_BYTES // slot_bytes) * slot_bytes)
        if self.buffer is None:
            self.view = torch.zeros(capacity, *per_slot, dtype=dtype, device=device)
        else:
            self.grow(capacity)

    def grow(self, capacity: int) -> bool:
        """Extend to ``capacity`` slots without a copy; False when that is not possible."""
        count = capacity * math.prod(self.per_slot)
        if self.buffer is None or count * self.dtype.itemsize > len(self.buffer):
            return False
        self.view = torch.frombuffer(self.buffer, dtype=self.dtype, count=count).view(capacity, *self.per_slot)
        return True


def _host_views(*tensors: Tensor):
    """numpy views of CPU tensors (None elsewhere)."""
    return tuple(t.numpy() for t in tensors) if tensors[0].device.type == "cpu" else None


class _SlotBook:
    """A layer's per-slot bookkeeping, as plain attributes (``nn.Module.__setattr__``
    costs microseconds per write, paid per layer on every load)."""

    __slots__ = ("names", "specs", "num_dropout", "written", "host_meta", "stacks")

    def __init__(self) -> None:
        self.names: list[Optional[str]] = []  # per slot: adapter name or None (empty)
        self.specs: list[Optional[AdapterSpec]] = []
        self.num_dropout = 0  # adapters with dropout > 0
        self.written = None  # (slot, A view, B view) of the last write_slot, for point()
        self.host_meta = None  # CPU: numpy views of scales, ranks, dropout (cheap per-slot writes)
        self.stacks: Optional[tuple[_Stack, _Stack]] = None

    def __getstate__(self) -> dict:  # reserved mappings and views are rebuilt, not copied
        return {"names": self.names, "specs": self.specs, "num_dropout": self.num_dropout}

    def __setstate__(self, state: dict) -> None:
        self.__init__()
        for key, value in state.items():
            setattr(self, key, value)


class AdapterLayer(nn.Module):
    """Base of the LoRA layer kinds: named adapters stored in the model's slots.

    A kind (e.g. :class:`~lora_ext.LoRALinear`) sets ``in_features``/``out_features``,
    implements :meth:`adapter_options` and ``forward``, and reads its adapters through
    :meth:`stacks` (inference) or :meth:`adapter_factors` (autograd). The methods under
    "lifecycle protocol" are called by the model's
    :class:`~lora_ext.lifecycle.AdapterManager`, which holds its lock around them; no
    one else writes the slots.
    """

    in_features: int
    out_features: int

    def __init__(self, manager) -> None:
        super().__init__()
        self.lora_A = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        self.specs: dict[str, AdapterSpec] = {}
        # Slot storage (allocated with the first adapter); not in the state dict, whose
        # lora_A/lora_B entries are the per-adapter views.
        for key in _STACK_KEYS:
            self.register_buffer(key, None, persistent=False)
        self._book = _SlotBook()
        self.manager = manager
        manager.register(self)
        self.register_load_state_dict_post_hook(_resync_if_reassigned)

    # -- what a layer kind provides ------------------------------------------------------
    def adapter_options(self) -> dict:
        """``dict(device=..., dtype=...)`` of this layer's adapter weights."""
        raise NotImplementedError

    def factor_shapes(self, r: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """Shapes of one adapter's ``(A, B)`` at rank ``r``: ``[..., r, in]`` and
        ``[..., out, r]``. A kind whose adapters carry leading dimensions (one block per
        expert: ``[E, r, in]``, ``[E, out, r]``) overrides this; the slot stacks are then
        ``[C, ..., R, in]`` and ``[C, ..., out, R]``, and everything else follows."""
        return (r, self.in_features), (self.out_features, r)

    def initial_weights(self, spec: AdapterSpec, init: str) -> tuple[Tensor, Tensor]:
        """A new adapter's ``(A, B)``: PEFT's init (A Kaiming-uniform, B zero) or ``"gaussian"``."""
        options = self.adapter_options()
        a_shape, b_shape = self.factor_shapes(spec.r)
        a = torch.empty(a_shape, **options)
        if init == "gaussian":
            nn.init.normal_(a, std=1.0 / spec.r)
        else:  # fan-in: the input width, however many blocks A holds
            nn.init.kaiming_uniform_(a.view(-1, self.in_features), a=math.sqrt(5))
        return a, torch.zeros(b_shape, **options)

    @classmethod
    def weights_problem(cls, module: nn.Module, a: Tensor, b: Tensor, r: int) -> Optional[str]:
        """Why ``(a, b)`` of rank ``r`` do not fit ``module`` (None: they do).

        ``module``: a layer of this kind, or the plain module it would wrap.
        """
        expected_a, expected_b = AdapterLayer.factor_shapes(module, r)
        if tuple(a.shape) != expected_a or tuple(b.shape) != expected_b:
            return (
                f"expects lora_A {list(expected_a)} and lora_B {list(expected_b)}, "
                f"got {list(a.shape)} and {list(b.shape)}"
            )
        return None

    @classmethod
    def extras_problem(cls, module: nn.Module, spec: AdapterSpec, extras: dict) -> Optional[str]:
        """Why a plan's per-kind extra weights (``LayerPlan.extras``, e.g. DoRA's
        magnitude) do not fit ``module`` (None: they do). This kind takes none."""
        return f"takes no {', '.join(sorted(extras))}" if extras else None

    def extra_weights(self, name: str) -> dict[str, Tensor]:
        """Per-kind weights of ``name`` besides A and B, whole and detached, to save
        (file key suffix -> tensor). This kind has none."""
        return {}

    def cannot_add_reason(self) -> Optional[str]:
        """Why this layer takes no new adapters (None: it does). Sharded layers say so."""
        return None

    def adapter_factors(self, name: str) -> tuple[Tensor, Tensor]:
        """``(A, B)`` parameters of ``name`` as autograd should see them."""
        return self.lora_A[name], self.lora_B[name]

    def adapter_parameters(self, name: str) -> list[nn.Parameter]:
        """Every parameter of adapter ``name`` (what training makes trainable)."""
        return [self.lora_A[name], self.lora_B[name]]

    def full_weights(self, name: str) -> tuple[Tensor, Tensor]:
        """``(A, B)`` of ``name`` whole and detached (FSDP2's DTensors gathered), to save."""
        a, b = (p.detach() for p in (self.lora_A[name], self.lora_B[name]))
        return tuple(t.full_tensor() if hasattr(t, "full_tensor") else t for t in (a, b))

    # -- merging (a kind that can merge into its base overrides these) ------------------------
    @property
    def merged_adapter(self) -> Optional[str]:
        """The adapter merged into the base weights (None: none)."""
        return None

    def unload_target(self, path: str) -> tuple[str, nn.Module]:
        """``(module path, plain module)`` that replaces this layer (at ``path``) when the
        model is unloaded (``merge_and_unload``): by default its ``base_layer``, in place."""
        return path, self.base_layer

    def merge_refusal(self) -> Optional[str]:
        """Why adapters cannot be merged into this layer's base (None: they can)."""
        return f"adapters of a {type(self).__name__} cannot be merged into its base layer"

    def merge_is_finite(self, name: str) -> bool:
        return True

    def merge(self, name: str, exact: bool = True) -> None:
        raise ValueError(self.merge_refusal())

    def check_unmerge(self) -> None:
        """Raise, changing nothing, if the merge cannot be undone exactly."""

    def unmerge(self) -> None:
        """Restore the base weights (a no-op when nothing is merged)."""

    def forget_merge(self) -> None:
        """Keep the merged weights as the new base."""

    # -- read side -----------------------------------------------------------------------
    @property
    def adapter_names(self) -> list[str]:
        return list(self.specs)

    @property
    def rank_capacity(self) -> int:
        """R: the largest rank the stacks hold without re-allocating (0: no storage yet)."""
        return 0 if self._a_stack is None else self._a_stack.shape[-2]

    def slot(self, name: str) -> int:
        """The slot of adapter ``name`` in the stacks."""
        if name not in self.specs:
            raise ValueError(f"adapter {name!r} is not in this layer")
        return self.manager.slot(name)

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

    def slot_stacks(self, dtype: torch.dtype):
        """``(a_stack, b_stack, scales, ranks, dropout)`` in ``dtype`` (a copy if it differs)."""
        a, b = self._a_stack, self._b_stack
        if a.dtype != dtype:  # e.g. autocast: converts the whole stack, a slow path
            a, b = a.to(dtype), b.to(dtype)
        return a, b, self._scales, self._ranks, self._dropout

    def slot_adapter(self, slot: int) -> tuple[Optional[str], Optional[AdapterSpec]]:
        """``(name, spec)`` of the adapter in ``slot`` (``(None, None)``: empty)."""
        return self._book.names[slot], self._book.specs[slot]

    def dropout_active(self) -> bool:
        return self.training and self._book.num_dropout > 0

    def reads_params(self, names, needs_grad: bool = False) -> bool:
        """Whether a forward over ``names`` must read their parameters, not the stacks:
        gradients must reach them (``needs_grad``: the input needs them anyway), or
        they are no longer the stacks' views (FSDP2 swaps in its own)."""
        if torch.is_grad_enabled():
            if needs_grad:
                return True
            lora_a, lora_b = self.lora_A, self.lora_B
            for n in names:
                if n in self.specs and (lora_a[n].requires_grad or lora_b[n].requires_grad):
                    return True
        if torch.compiler.is_compiling():
            return False
        # FSDP2 (lora_ext.parallel.fully_shard) replaces all of a layer's adapters: one tells.
        stack = self._buffers["_a_stack"]
        for n in names:
            p = self._modules["lora_A"]._parameters.get(n)
            if p is not None:
                return p.untyped_storage().data_ptr() != stack.untyped_storage().data_ptr()
        return False

    def stack_params(self, names: list[str], dtype: torch.dtype):
        """Differentiable ``(a, b, scales, ranks, dropout)`` of ``names`` (in that order)."""
        present = [n for n in names if n in self.specs]
        rmax = max([self.specs[n].r for n in present], default=1)
        options = self.adapter_options()
        device = options["device"]
        a_shape, b_shape = self.factor_shapes(rmax)
        zero_a = torch.zeros(a_shape, dtype=dtype, device=device)
        zero_b = torch.zeros(b_shape, dtype=dtype, device=device)
        a_rows, b_rows, scales, ranks, dropout = [], [], [], [], []
        for n in names:
            spec = self.specs.get(n)
            if spec is None:  # absent from this layer: a zero adapter
                a_rows.append(zero_a)
                b_rows.append(zero_b)
                scales.append(0.0), ranks.append(1), dropout.append(0.0)
                continue
            a, b = self.adapter_factors(n)
            a_rows.append(F.pad(a.to(dtype), (0, 0, 0, rmax - spec.r)))
            b_rows.append(F.pad(b.to(dtype), (0, rmax - spec.r)))
            scales.append(spec.scale), ranks.append(spec.r), dropout.append(spec.dropout)
        return (
            torch.stack(a_rows),
            torch.stack(b_rows),
            torch.tensor(scales, dtype=torch.float32, device=device),
            torch.tensor(ranks, dtype=torch.int64, device=device),
            torch.tensor(dropout, dtype=torch.float32, device=device),
        )

    def shares_storage(self) -> bool:
        """Whether every adapter parameter is still a view into the slot stacks."""
        storages = {t.untyped_storage().data_ptr() for t in (self._a_stack, self._b_stack)}
        return all(
            p.untyped_storage().data_ptr() in storages for d in (self.lora_A, self.lora_B) for p in d.values()
        )

    # -- lifecycle protocol (the manager calls these, holding its lock) --------------------
    def fit_storage(self, min_rank: int = 0) -> None:
        """Make the stacks hold the manager's slot capacity and rank ``min_rank``."""
        capacity = self.manager.capacity
        rank = max(min_rank, self.manager.max_rank or 0, self.rank_capacity)
        if self._a_stack is None:
            if min_rank:  # allocated with the first adapter (or a reserved max_rank)
                self.rebuild(capacity, rank)
            return
        if (self._a_stack.shape[0], self.rank_capacity) == (capacity, rank):
            return
        if rank == self.rank_capacity and self._grow_in_place(capacity):
            return
        self.rebuild(capacity, rank)

    def _grow_in_place(self, capacity: int) -> bool:
        a, b = self._book.stacks
        if not (a.grow(capacity) and b.grow(capacity)):
            return False
        old = self._a_stack.shape[0]
        self._a_stack, self._b_stack, self._book.written = a.view, b.view, None
        self._scales, self._ranks, self._dropout = (
            torch.cat([t, torch.full((capacity - old,), fill, dtype=t.dtype, device=t.device)])
            for t, fill in ((self._scales, 0), (self._ranks, 1), (self._dropout, 0))
        )
        self._book.names += [None] * (capacity - old)
        self._book.specs += [None] * (capacity - old)
        self._book.host_meta = _host_views(self._scales, self._ranks, self._dropout)
        return True

    def rebuild(self, capacity: int, rank: int) -> None:
        """Allocate stacks of ``[capacity, rank]`` and move every adapter in from its parameters.

        New tensors rather than a resize, so a forward still reading the old stacks in
        another thread keeps them alive.
        """
        options = self.adapter_options()
        device = options["device"]
        stacks = tuple(_Stack(capacity, shape, options["dtype"], device) for shape in self.factor_shapes(rank))
        a_stack, b_stack = stacks[0].view, stacks[1].view
        scales = torch.zeros(capacity, dtype=torch.float32, device=device)
        ranks = torch.ones(capacity, dtype=torch.int64, device=device)  # empty slots: rank 1, scale 0
        dropout = torch.zeros(capacity, dtype=torch.float32, device=device)
        slot_of = {name: self.manager.slot(name) for name in self.specs}
        self._book.names = [None] * capacity
        self._book.specs = [None] * capacity
        with torch.no_grad():
            for name, spec in self.specs.items():
                slot, r = slot_of[name], spec.r
                self._book.names[slot], self._book.specs[slot] = name, spec
                a_stack[slot, ..., :r, :].copy_(self.lora_A[name])
                b_stack[slot, ..., :r].copy_(self.lora_B[name])
                scales[slot], ranks[slot], dropout[slot] = spec.scale, r, spec.dropout
        self._book.stacks, self._book.written = stacks, None
        self._a_stack, self._b_stack = a_stack, b_stack
        self._scales, self._ranks, self._dropout = scales, ranks, dropout
        self._book.host_meta = _host_views(scales, ranks, dropout)
        for name in self.specs:
            self.point(name, slot_of[name])

    def write_slot(self, slot: int, name: str, spec: AdapterSpec, a: Tensor, b: Tensor) -> None:
        """Store an adapter's weights in ``slot`` (an empty slot: no forward reads it)."""
        r = spec.r
        buffers = self._buffers  # read directly: nn.Module.__getattr__ costs per access
        if buffers["_a_stack"] is None or r > buffers["_a_stack"].shape[-2] or slot >= buffers["_a_stack"].shape[0]:
            self.fit_storage(r)
        a_view, b_view = buffers["_a_stack"][slot, ..., :r, :], buffers["_b_stack"][slot, ..., :r]
        with torch.no_grad():  # from pinned memory asynchronously (the pool's side stream)
            a_view.copy_(a, non_blocking=a.is_pinned())
            b_view.copy_(b, non_blocking=b.is_pinned())
        self._book.written = (slot, a_view, b_view)  # for point(), which usually follows
        self._set_meta(slot, spec.scale, r, spec.dropout)
        self._book.names[slot] = name
        self._book.specs[slot] = spec

    def _set_meta(self, slot: int, scale: float, rank: int, dropout: float) -> None:
        if self._book.host_meta is not None:  # CPU: through numpy views, far cheaper per element
            scales, ranks, dropouts = self._book.host_meta
            scales[slot], ranks[slot], dropouts[slot] = scale, rank, dropout
            return
        with torch.no_grad():
            self._scales[slot], self._ranks[slot], self._dropout[slot] = scale, rank, dropout

    def point(self, name: str, slot: int, requires_grad: bool = False) -> None:
        """Make ``name``'s parameters views of ``slot`` (same Parameter objects if they exist)."""
        spec = self._book.specs[slot]
        old = self.specs.get(name)
        written, self._book.written = self._book.written, None
        if written is not None and written[0] == slot and written[1].shape[-2] == spec.r:
            _, a_view, b_view = written
        else:
            a_view, b_view = self._a_stack[slot, ..., : spec.r, :], self._b_stack[slot, ..., : spec.r]
        lora_a, lora_b = self._modules["lora_A"], self._modules["lora_B"]  # no __getattr__ per load
        existing = lora_a._parameters.get(name)
        if existing is not None:
            existing.data = a_view
            lora_b._parameters[name].data = b_view
        else:
            lora_a[name] = nn.Parameter(a_view, requires_grad=requires_grad)
            lora_b[name] = nn.Parameter(b_view, requires_grad=requires_grad)
        self._book.num_dropout += (spec.dropout > 0) - (old is not None and old.dropout > 0)
        self.specs[name] = spec

    def forget(self, name: str) -> None:
        """Drop ``name``'s parameters; its slot's data stays until it is cleared."""
        self._book.num_dropout -= self.specs[name].dropout > 0
        del self.lora_A[name]
        del self.lora_B[name]
        del self.specs[name]

    def clear_slot(self, slot: int) -> None:
        """Zero ``slot`` so that rows pointing at it get the base output."""
        buffers = self._buffers
        if buffers["_a_stack"] is None or self._book.specs[slot] is None:
            return
        with torch.no_grad():
            buffers["_a_stack"][slot].zero_()
            buffers["_b_stack"][slot].zero_()
        self._set_meta(slot, 0.0, 1, 0.0)
        self._book.names[slot] = None
        self._book.specs[slot] = None

    def resync(self) -> None:
        """Rebuild the stacks from the parameters (after ``to()``, deepcopy, unpickling)."""
        if self._a_stack is not None:
            self.manager.rebuild(self, self.rank_capacity)

    # -- nn.Module hooks that break the views ----------------------------------------------
    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        self.resync()  # fn converted the parameters one by one: views no longer shared
        return self

    def __getstate__(self):
        # The stacks are rebuilt from the parameters, not copied: a CPU stack is a view of
        # reserved address space that a copy would commit in full.
        state = dict(super().__getstate__())
        state["_buffers"] = {k: (None if k in _STACK_KEYS else v) for k, v in self._buffers.items()}
        state["_copied_rank"] = self.rank_capacity
        return state

    def __setstate__(self, state) -> None:
        rank = state.pop("_copied_rank", 0)
        super().__setstate__(state)
        self.manager.register(self)
        if rank:
            self.manager.rebuild(self, rank)


def _resync_if_reassigned(module: AdapterLayer, incompatible_keys) -> None:
    """``load_state_dict(assign=True)`` replaces the parameters: rebuild the stacks."""
    if module._a_stack is not None and not module.shares_storage():
        module.resync()

"""The state all LoRA layers of one model share: adapter slots and the row selection.

Every adapter of a model owns one *slot* number, the same in every layer, so each
layer keeps its adapters in a slot stack (``a_stack[slot]``, ``b_stack[slot]``) and a
batch's row-to-adapter index is built once per model forward and shared by all
layers. Slots are handed out from a free list and reused; the capacity (slots per
stack) grows geometrically, so loading, deleting and replacing an adapter cost O(1)
in the number loaded, amortised.

Selections are model-wide or *local*: a local one (``with set_adapter(...)``) is kept
in a :class:`contextvars.ContextVar`, so it applies only to the thread or asyncio task
that entered the block, and wins over the model-wide one there.

Thread safety: the selection a forward uses is *pinned* for the whole model forward
(a forward pre-hook on the module that :func:`lora_ext.set_adapter` or a loader was
given), so replacing or deleting an adapter while another thread runs forwards
never mixes old and new weights inside one forward. A replaced adapter's old slot is
freed only once no pinned forward can still read it.
"""

from __future__ import annotations

import contextvars
import heapq
import itertools
import math
import threading
import weakref
from typing import Optional, Sequence, Union

import torch
from torch import Tensor

AdapterNames = Union[Optional[str], Sequence[Optional[str]]]

# Slots grow by this factor: amortised O(1) per load, at most 25% unused slots.
_GROWTH = 1.25
# Distinct (input shape, device) index tensors kept per selection.
_MAX_CACHED_INDICES = 64

# Local selections of this thread / asyncio task: {context key: (selection, generation
# it was resolved at)}. One variable for all models (a ContextVar per model would be
# kept alive by every context that ever set it); the dict is replaced, never mutated.
_LOCAL_SELECTIONS: contextvars.ContextVar[dict] = contextvars.ContextVar("lora_ext_local_selections", default={})
_context_keys = itertools.count()


class _Selection:
    """An immutable choice of adapter per batch row, resolved to slots (-1 = base)."""

    def __init__(self, names: AdapterNames, slot_of: dict[str, int]):
        if names is None or isinstance(names, str):
            rows = [names]
            self.per_row = False
        else:
            rows = list(names)
            if not rows:
                raise ValueError("set_adapter: the list of per-row adapters is empty")
            self.per_row = True
        for name in rows:
            if name is not None and name not in slot_of:
                raise ValueError(f"unknown adapter {name!r}; loaded adapters: {list(slot_of)}")
        self.names = rows
        self.slots = [-1 if n is None else slot_of[n] for n in rows]
        self.is_uniform = len(set(rows)) == 1
        self.uniform_slot = self.slots[0] if self.is_uniform else None
        self.used_names = sorted({n for n in rows if n is not None})
        # CPU int32 [rows]; the compiled path expands it in the graph.
        self.rows = torch.tensor(self.slots, dtype=torch.int32)
        # Rows as positions in used_names, for stacks built from the used adapters only.
        self.compact_rows = torch.tensor(
            [-1 if n is None else self.used_names.index(n) for n in rows], dtype=torch.int32
        )
        self._indices: dict = {}

    def as_argument(self) -> AdapterNames:
        """What set_adapter was given (to restore it)."""
        return self.names if self.per_row else self.names[0]

    def row_index(self, x: Tensor, compact: bool = False) -> Tensor:
        """int32 ``[tokens]`` slot of every token row of ``x`` (-1: base), cached per shape.

        ``compact``: positions in :attr:`used_names` instead of slots.

        ``x`` is ``[batch, ..., in]``: every token of batch row b uses row b's adapter. A
        batch k times the selection (``num_beams``, ``num_return_sequences``) repeats each
        entry k times, as ``repeat_interleave`` does.
        """
        # Keyed by the whole shape: cheaper per layer call than deriving batch and tokens.
        shape = x.shape
        key = (shape, x.device, compact)
        index = self._indices.get(key)
        if index is None:
            batch = shape[0] if len(shape) > 1 else 1
            tokens = math.prod(shape[1:-1]) if len(shape) > 2 else 1
            rows = self.compact_rows if compact else self.rows
            index = expand_rows(rows, batch, tokens).to(x.device)
            if len(self._indices) >= _MAX_CACHED_INDICES:
                self._indices = {}
            self._indices[key] = index
        return index


def expand_rows(rows: Tensor, batch: int, tokens: int) -> Tensor:
    """Per-batch-row slots -> per-token-row slots (also traced by torch.compile)."""
    if batch % rows.shape[0] != 0:
        raise ValueError(
            f"the batch has {batch} rows but set_adapter was given {rows.shape[0]} "
            "per-row adapters (expected the same number, or a multiple for "
            "num_beams / num_return_sequences)"
        )
    return rows.repeat_interleave(batch // rows.shape[0] * tokens)


class _ThreadView:
    """One thread's local selection, as compiled forwards read it."""

    def __init__(self) -> None:
        self.is_local = False
        self.selection: Optional[_Selection] = None


class _AdapterContext:
    """Slots, capacity and selection shared by all LoRA layers of one model."""

    def __init__(self) -> None:
        self.slot_of: dict[str, int] = {}  # name -> slot, in load order
        self.capacity = 0  # slots per layer stack
        self.max_rank: Optional[int] = None  # user-set rank capacity (None: grows)
        self._free: list[int] = []  # heap of freed slots
        self._next_slot = 0  # slots [0, _next_slot) have been handed out
        self._init_runtime()

    def _init_runtime(self) -> None:
        self.layers: "weakref.WeakSet" = weakref.WeakSet()
        self._mutex = threading.RLock()  # serialises loads, deletes, replaces
        self._cond = threading.Condition()  # guards the published selection and pins
        self._generation = 0
        self._published: tuple[int, Optional[_Selection]] = (0, None)
        self._slots_changed_at = 0  # generation of the last reselect (slots freed or moved)
        self._pins: dict[int, list] = {}  # thread id -> [selection, depth, generation]
        self._key = next(_context_keys)  # this context's entry in _LOCAL_SELECTIONS
        # Per thread, a copy of its local selection that compiled forwards read (Dynamo
        # traces threading.local, not ContextVar); every thread's view, to re-resolve them.
        self._thread = threading.local()
        self._views: "weakref.WeakSet[_ThreadView]" = weakref.WeakSet()

    # deepcopy / pickle: locks and pins are per process, layers re-register themselves
    def __getstate__(self) -> dict:
        keep = ("slot_of", "capacity", "max_rank", "_free", "_next_slot")
        state = {k: self.__dict__[k] for k in keep}
        state["selection"] = self.selection
        return state

    def __setstate__(self, state: dict) -> None:
        selection = state.pop("selection")
        self.__dict__.update(state)
        self._init_runtime()
        self._published = (0, selection)

    @property
    def names(self) -> list[str]:
        return list(self.slot_of)

    @property
    def selection(self) -> Optional[_Selection]:
        """The selection forwards of this thread / task use: its local one, else the model-wide one."""
        local = self._local()
        return local[0] if local is not None else self._published[1]

    # -- slots ----------------------------------------------------------------------
    def register(self, layer) -> None:
        self.layers.add(layer)

    def take_slot(self) -> int:
        """A free slot, growing every layer's stacks when none is left."""
        if self._free:
            return heapq.heappop(self._free)
        if self._next_slot >= self.capacity:
            self.reserve(max(self.capacity + 1, math.ceil(self.capacity * _GROWTH)))
        slot = self._next_slot
        self._next_slot += 1
        return slot

    def retire(self, name: str) -> None:
        """Drop ``name``'s slot: rows selecting it fall back to the base model.

        Waits for forwards of other threads that pinned a selection using the slot,
        then zeroes it in every layer and puts it on the free list.
        """
        slot = self.slot_of.pop(name)
        self.retire_slot(slot, self.reselect())

    def retire_slot(self, slot: int, generation: int) -> None:
        """Free ``slot`` once no forward older than ``generation`` can read it."""
        self.wait_for_forwards_before(generation)
        for layer in list(self.layers):
            layer._clear_slot(slot)
        heapq.heappush(self._free, slot)

    def reserve(self, capacity: int, max_rank: Optional[int] = None) -> None:
        """Grow the slot capacity (and fix the rank capacity) of every layer."""
        if max_rank is not None:
            self.max_rank = max_rank
        if capacity > self.capacity:
            self.capacity = capacity
        for layer in list(self.layers):
            layer._fit_storage()

    # -- selection and pinning ----------------------------------------------------------
    def resolve(self, names: AdapterNames) -> Optional[_Selection]:
        return None if names is None else _Selection(names, self.slot_of)

    def select(self, names: AdapterNames) -> Optional[_Selection]:
        """Set the model-wide selection; returns it."""
        with self._mutex:  # resolved and published with no load, delete or replace between
            selection = self.resolve(names)
            self.publish(selection)
            return selection

    def publish(self, selection: Optional[_Selection]) -> int:
        """Make ``selection`` the one new forwards use; returns its generation."""
        with self._cond:
            self._generation += 1
            self._published = (self._generation, selection)
            return self._generation

    def _resolve_again(self, old: Optional[_Selection]) -> Optional[_Selection]:
        """``old`` against the current slots; adapters deleted since then -> base."""
        if old is None:
            return None
        names = [n if n in self.slot_of else None for n in old.names]
        return self.resolve(names if old.per_row else names[0])

    def reselect(self) -> int:
        """Re-resolve the model-wide selection after slots changed.

        Local selections are re-resolved when next used (:meth:`_local`).
        """
        with self._cond:
            generation = self.publish(self._resolve_again(self._published[1]))
            self._slots_changed_at = generation
            for view in list(self._views):
                if view.is_local:
                    view.selection = self._resolve_again(view.selection)
            return generation

    # -- local selections (``with set_adapter(...)``) -----------------------------------
    def _local(self) -> Optional[tuple[Optional[_Selection], int]]:
        """This thread's / task's ``(selection, generation)``, re-resolved if slots changed since."""
        entry = _LOCAL_SELECTIONS.get().get(self._key)
        if entry is None or entry[1] >= self._slots_changed_at:
            return entry
        # A slot it used may have been freed, or reused by another adapter. Stored back:
        # the block's exit still restores what was there before the block.
        generation = self._generation
        self.set_local(self._resolve_again(entry[0]), generation)
        return _LOCAL_SELECTIONS.get()[self._key]

    def has_local(self) -> bool:
        return self._key in _LOCAL_SELECTIONS.get()

    def set_local(self, selection: Optional[_Selection], resolved_at: int) -> contextvars.Token:
        """Make ``selection`` this thread's / task's; returns the token that undoes it.

        ``resolved_at``: the generation read before ``selection`` was resolved, so that a
        slot change since then makes :meth:`_local` resolve it again.
        """
        entries = dict(_LOCAL_SELECTIONS.get())
        entries[self._key] = (selection, resolved_at)
        with self._cond:
            token = _LOCAL_SELECTIONS.set(entries)
            self._update_thread_view()
        return token

    def reset_local(self, token: contextvars.Token) -> None:
        with self._cond:
            _LOCAL_SELECTIONS.reset(token)
            self._update_thread_view()

    def _update_thread_view(self) -> None:
        """Copy this thread's local selection to its view (the caller holds ``_cond``)."""
        view = getattr(self._thread, "view", None)
        if view is None:
            view = self._thread.view = _ThreadView()
            self._views.add(view)
        local = self._local()
        view.is_local = local is not None
        view.selection = None if local is None else local[0]

    def _current(self) -> tuple[int, Optional[_Selection]]:
        """``(generation, selection)`` a forward starting now in this thread / task uses."""
        local = self._local()
        return self._published if local is None else (self._generation, local[0])

    def active_selection(self) -> Optional[_Selection]:
        """The selection pinned by this thread's running model forward, else the current one.

        A compiled model reads its thread's local selection as of the last ``with``
        entered or left in the thread (asyncio tasks sharing the thread share it), else
        the model-wide one.
        """
        if torch.compiler.is_compiling():
            view = getattr(self._thread, "view", None)
            return view.selection if view is not None and view.is_local else self._published[1]
        pin = self._pins.get(threading.get_ident())
        return pin[0] if pin is not None else self.selection

    def pin(self, *_) -> None:
        """Forward pre-hook of the model: fix the selection for this whole forward."""
        if torch.compiler.is_compiling():
            return
        tid = threading.get_ident()
        with self._cond:
            pin = self._pins.get(tid)
            if pin is not None:
                pin[1] += 1
            else:
                generation, selection = self._current()
                self._pins[tid] = [selection, 1, generation]

    def unpin(self, *_) -> None:
        """Forward hook (always called, also on errors): release the pin."""
        if torch.compiler.is_compiling():
            return
        tid = threading.get_ident()
        with self._cond:
            pin = self._pins.get(tid)
            if pin is None:
                return
            pin[1] -= 1
            if pin[1] == 0:
                del self._pins[tid]
                self._cond.notify_all()

    def wait_for_forwards_before(self, generation: int) -> None:
        """Block until no other thread's forward uses a selection older than ``generation``."""
        me = threading.get_ident()
        with self._cond:
            self._cond.wait_for(
                lambda: all(p[2] >= generation for t, p in self._pins.items() if t != me)
            )

    def attach_pin_hooks(self, module: torch.nn.Module) -> None:
        """Pin the selection per forward of ``module`` (once per module)."""
        if getattr(module, "_lora_ext_pin_hooks", None) is self:
            return
        module.register_forward_pre_hook(self.pin)
        module.register_forward_hook(self.unpin, always_call=True)
        module._lora_ext_pin_hooks = self

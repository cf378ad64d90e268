"""Which adapter each batch row uses: resolved selections, and who sees which.

A :class:`Selection` is an immutable choice of adapter per batch row, resolved to
slot numbers (the same in every layer of a model, see :mod:`lora_ext.lifecycle`), so
a batch's row-to-adapter index is built once per model forward and shared by all
layers.

:class:`SelectionState` keeps a model's selections:

- the *model-wide* one (:func:`lora_ext.set_adapter`), used by every thread;
- *local* ones (``with lora_ext.use_adapter(...)``), kept in a
  :class:`contextvars.ContextVar`, so each applies only to the thread or asyncio
  task that entered the block, and wins over the model-wide one there. A compiled
  forward (``torch.compile``) cannot read a ContextVar (Dynamo traces
  ``threading.local``, not ``ContextVar.get``), so it reads a per-thread copy: the
  local selection of the last block entered or left in that thread.

Thread safety: the selection a forward uses is *pinned* for the whole model forward
(a forward pre-hook on the model), so replacing or deleting an adapter while another
thread runs forwards never mixes old and new weights inside one forward. A replaced
adapter's old slot is freed only once no pinned forward can still read it
(:meth:`SelectionState.wait_for_forwards_before`).
"""

from __future__ import annotations

import contextvars
import itertools
import math
import threading
import weakref
from collections.abc import Mapping
from typing import Optional, Sequence, Union

import torch
from torch import Tensor

AdapterNames = Union[Optional[str], Sequence[Optional[str]]]

# Distinct (input shape, device) index tensors kept per selection.
_MAX_CACHED_INDICES = 64

# Local selections of this thread / asyncio task: {state key: (selection, generation
# it was resolved at)}. One variable for all models (a ContextVar per model would be
# kept alive by every context that ever set it); the dict is replaced, never mutated.
_LOCAL_SELECTIONS: contextvars.ContextVar[dict] = contextvars.ContextVar("lora_ext_local_selections", default={})
_state_keys = itertools.count()


class Selection:
    """An immutable choice of adapter per batch row, resolved to slots (-1 = base)."""

    def __init__(self, names: AdapterNames, slot_of: Mapping[str, int]):
        if names is None or isinstance(names, str):
            rows = [names]
            self.per_row = False
        else:
            rows = list(names)
            if not rows:
                raise ValueError("the list of per-row adapters is empty")
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

    @property
    def argument(self) -> AdapterNames:
        """What the selection was made from (one name, or one per row)."""
        return self.names if self.per_row else self.names[0]

    @property
    def cached_indices(self) -> int:
        """How many per-shape row indices this selection holds (built once, shared by layers)."""
        return len(self._indices)

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
            index = expand_rows(self.compact_rows if compact else self.rows, x).to(x.device)
            if len(self._indices) >= _MAX_CACHED_INDICES:
                self._indices = {}
            self._indices[key] = index
        return index


def expand_rows(rows: Tensor, x: Tensor) -> Tensor:
    """Per-batch-row entries -> per-token-row entries of ``x`` (also traced by torch.compile)."""
    shape = x.shape
    batch = shape[0] if len(shape) > 1 else 1
    tokens = math.prod(shape[1:-1]) if len(shape) > 2 else 1
    if batch % rows.shape[0] != 0:
        raise ValueError(
            f"the batch has {batch} rows but the selection has {rows.shape[0]} "
            "per-row adapters (expected the same number, or a multiple for "
            "num_beams / num_return_sequences)"
        )
    return rows.repeat_interleave(batch // rows.shape[0] * tokens)


class _ThreadView:
    """One thread's local selection, as compiled forwards read it."""

    def __init__(self) -> None:
        self.is_local = False
        self.selection: Optional[Selection] = None


class SelectionState:
    """The model-wide selection, the local ones and the per-forward pins of one model.

    ``slot_of``: the model's slot table (name -> slot), read when resolving names.
    """

    def __init__(self, slot_of: Mapping[str, int], selection: Optional[Selection] = None) -> None:
        self._slot_of = slot_of
        self._cond = threading.Condition()  # guards the published selection and pins
        self._generation = 0
        self._published: tuple[int, Optional[Selection]] = (0, selection)
        self._slots_changed_at = 0  # generation of the last reselect (slots freed or moved)
        self._pins: dict[int, list] = {}  # thread id -> [selection, depth, generation]
        self._key = next(_state_keys)  # this state's entry in _LOCAL_SELECTIONS
        self._thread = threading.local()
        self._views: "weakref.WeakSet[_ThreadView]" = weakref.WeakSet()

    @property
    def generation(self) -> int:
        """Counts publications; a local selection records the one it was resolved at."""
        return self._generation

    @property
    def model_wide(self) -> Optional[Selection]:
        return self._published[1]

    @property
    def current(self) -> Optional[Selection]:
        """The selection forwards of this thread / task use: its local one, else the model-wide one."""
        local = self._local()
        return local[0] if local is not None else self._published[1]

    def resolve(self, names: AdapterNames) -> Optional[Selection]:
        return None if names is None else Selection(names, self._slot_of)

    def publish(self, selection: Optional[Selection]) -> int:
        """Make ``selection`` the model-wide one new forwards use; returns its generation."""
        with self._cond:
            self._generation += 1
            self._published = (self._generation, selection)
            return self._generation

    def publish_if_current(self, generation: int, selection: Optional[Selection]) -> bool:
        """Publish ``selection`` only if nothing was published since ``generation``."""
        with self._cond:
            if self._generation != generation:
                return False
            self.publish(selection)
            return True

    def _resolve_again(self, old: Optional[Selection]) -> Optional[Selection]:
        """``old`` against the current slots; adapters deleted since then -> base."""
        if old is None:
            return None
        names = [n if n in self._slot_of else None for n in old.names]
        return self.resolve(names if old.per_row else names[0])

    def reselect(self) -> int:
        """Re-resolve the model-wide selection after slots changed; returns its generation.

        Local selections are re-resolved when next used (:meth:`_local`).
        """
        with self._cond:
            generation = self.publish(self._resolve_again(self._published[1]))
            self._slots_changed_at = generation
            for view in list(self._views):
                if view.is_local:
                    view.selection = self._resolve_again(view.selection)
            return generation

    # -- local selections (``with use_adapter(...)``) -------------------------------------
    def _local(self) -> Optional[tuple[Optional[Selection], int]]:
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

    def set_local(self, selection: Optional[Selection], resolved_at: int) -> contextvars.Token:
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

    # -- pinning -------------------------------------------------------------------------
    def active(self) -> Optional[Selection]:
        """The selection pinned by this thread's running model forward, else the current one.

        A compiled model reads its thread's local selection as of the last ``with``
        entered or left in the thread (asyncio tasks sharing the thread share it), else
        the model-wide one.
        """
        if torch.compiler.is_compiling():
            view = getattr(self._thread, "view", None)
            return view.selection if view is not None and view.is_local else self._published[1]
        pin = self._pins.get(threading.get_ident())
        return pin[0] if pin is not None else self.current

    def pin(self, *_) -> None:
        """Forward pre-hook of the model: fix the selection for this whole forward."""
        if torch.compiler.is_compiling():
            return
        tid = threading.get_ident()
        with self._cond:
            pin = self._pins.get(tid)
            if pin is not None:
                pin[1] += 1
                return
            local = self._local()
            generation, selection = self._published if local is None else (self._generation, local[0])
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
            self._cond.wait_for(lambda: all(p[2] >= generation for t, p in self._pins.items() if t != me))

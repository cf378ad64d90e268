"""A resident pool: many adapters registered, at most ``max_resident`` loaded at a time.

Serving engines keep thousands of adapters but only some in device memory (vLLM's
``max_loras`` / ``max_cpu_loras``, S-LoRA, LoRAX). :class:`AdapterPool` does that for a
lora_ext model: every adapter is registered with the pool, kept in host memory (a
state dict; pinned on CUDA) or on disk (a PEFT folder, read when needed), and
loaded into the model's slot stacks when a batch needs it, evicting the least
recently used resident adapter when all ``max_resident`` slots are taken.

On CUDA the host-to-device copies of :meth:`AdapterPool.prefetch` run on a side
stream, so they overlap with the compute already queued; :meth:`set_adapter` makes
the compute stream wait for them (an event per adapter) before the batch runs.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any, Optional, Sequence, Union

import torch
from torch import nn

from .io import load_adapter, plan_adapter
from .model import delete_adapter, list_adapters, lora_layers, reserve_adapters, set_adapter

Source = Union[str, os.PathLike, Mapping[str, torch.Tensor]]


class AdapterPool:
    """Register many adapters for ``model``; keep at most ``max_resident`` of them loaded.

    ``max_rank``: the largest rank any registered adapter may have (the stacks are
    allocated for it once). Adapters loaded into the model outside the pool are left
    alone and do not count against ``max_resident``.
    """

    def __init__(self, model: nn.Module, max_resident: int, max_rank: Optional[int] = None):
        if not isinstance(max_resident, int) or max_resident < 1:
            raise ValueError(f"max_resident must be a positive integer, got {max_resident!r}")
        self.model = model
        self.max_resident = max_resident
        self._sources: dict[str, tuple[Source, Optional[dict]]] = {}
        self._resident: "OrderedDict[str, None]" = OrderedDict()  # least recently used first
        self._ready: dict[str, Any] = {}  # name -> CUDA event of its copy
        self._lock = threading.RLock()
        self._device = next(model.parameters()).device
        self._stream = torch.cuda.Stream(self._device) if self._device.type == "cuda" else None
        self._max_rank = max_rank
        self._reserved = False
        self.loads = self.evictions = 0  # counters, for a serving loop's metrics
        if lora_layers(model):
            self._reserve()

    def _reserve(self) -> None:
        """Room for max_resident adapters besides those loaded outside the pool."""
        unmanaged = len(set(list_adapters(self.model)) - set(self._resident))
        reserve_adapters(self.model, unmanaged + self.max_resident, self._max_rank)
        self._reserved = True

    # -- registry ----------------------------------------------------------------------
    @property
    def names(self) -> list[str]:
        """Every registered adapter, in registration order."""
        return list(self._sources)

    @property
    def resident(self) -> list[str]:
        """The loaded adapters, least recently used first."""
        return list(self._resident)

    def add(self, name: str, source: Source, config: Optional[Any] = None) -> None:
        """Register adapter ``name`` without loading it.

        ``source``: a PEFT folder (stays on disk, read when the adapter is loaded) or a
        state dict in PEFT's key layout with its ``config`` (copied to host memory,
        pinned when the model is on CUDA). It is checked against the model now, so a
        bad adapter fails here rather than in the middle of serving.
        """
        with self._lock:
            if name in self._sources or name in list_adapters(self.model):
                raise ValueError(f"adapter {name!r} is already registered or loaded")
            if isinstance(source, Mapping):
                if config is None:
                    raise ValueError("a state dict needs its config (a dict or a peft.LoraConfig)")
                pin = self._device.type == "cuda"
                host = {k: _host_copy(v, pin) for k, v in source.items()}
                self._sources[name] = (host, config)
            else:
                self._sources[name] = (os.fspath(source), None)
            try:  # the checks load_adapter makes, without loading
                rank = plan_adapter(self.model, *self._sources[name]).max_rank
                if self._max_rank is not None and rank > self._max_rank:
                    raise ValueError(f"adapter {name!r} has rank {rank} > the pool's max_rank {self._max_rank}")
            except Exception:
                del self._sources[name]
                raise

    def remove(self, name: str) -> None:
        """Unregister ``name`` (unloading it if resident)."""
        with self._lock:
            if name not in self._sources:
                raise ValueError(f"adapter {name!r} is not registered; registered: {len(self._sources)}")
            if name in self._resident:
                self._evict(name)
            del self._sources[name]

    # -- residency ---------------------------------------------------------------------
    def prefetch(self, names: Sequence[Optional[str]]) -> None:
        """Start loading ``names`` (None entries ignored) so a later batch finds them resident.

        Evicts the least recently used adapters not in ``names``; raises if ``names``
        has more distinct adapters than ``max_resident``. On CUDA the copies are queued
        on a side stream and this returns without waiting for them.
        """
        with self._lock:
            wanted = list(dict.fromkeys(n for n in names if n is not None))
            unknown = [n for n in wanted if n not in self._sources]
            if unknown:
                raise ValueError(f"adapters {unknown} are not registered with the pool")
            if len(wanted) > self.max_resident:
                raise ValueError(
                    f"the batch needs {len(wanted)} distinct adapters but max_resident is "
                    f"{self.max_resident}; split the batch or raise max_resident"
                )
            missing = [n for n in wanted if n not in self._resident]
            keep = set(wanted)
            victims = [n for n in self._resident if n not in keep]
            excess = len(self._resident) + len(missing) - self.max_resident
            for victim in victims[:max(excess, 0)]:
                self._evict(victim)
            if missing and self._stream is not None:
                # the side stream must not overwrite a slot queued work may still read
                self._stream.wait_stream(torch.cuda.current_stream(self._device))
            for name in missing:
                self._load(name)
            for name in wanted:
                self._resident.move_to_end(name)

    def set_adapter(self, names: Union[Optional[str], Sequence[Optional[str]]]) -> None:
        """Make the adapters of ``names`` resident (loading on first use) and select them.

        ``names`` as for :func:`lora_ext.set_adapter`: one name or None for the whole
        batch, or one per row.
        """
        rows = [names] if names is None or isinstance(names, str) else list(names)
        with self._lock:
            self.prefetch(rows)
            if self._stream is not None:
                compute = torch.cuda.current_stream(self._device)
                for name in {n for n in rows if n is not None}:
                    event = self._ready.pop(name, None)
                    if event is not None:
                        compute.wait_event(event)
            set_adapter(self.model, names)

    def _load(self, name: str) -> None:
        source, config = self._sources[name]
        if self._stream is None:
            load_adapter(self.model, source, name, config=config, select=False)
        else:
            with torch.cuda.stream(self._stream):
                load_adapter(self.model, source, name, config=config, select=False)
                event = torch.cuda.Event()
                event.record(self._stream)
            self._ready[name] = event
        self._resident[name] = None
        self.loads += 1
        if not self._reserved:  # the model had no LoRA layers before this adapter
            self._reserve()

    def _evict(self, name: str) -> None:
        self._ready.pop(name, None)
        delete_adapter(self.model, name)
        del self._resident[name]
        self.evictions += 1


def _host_copy(t: torch.Tensor, pin: bool) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"state dict values must be tensors, got {type(t).__name__}")
    host = t.detach().to("cpu", copy=True)
    return host.pin_memory() if pin else host

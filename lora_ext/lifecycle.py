"""The adapter lifecycle of a model: one owner for slots, the lock and every change.

Every adapter of a model owns one *slot* number, the same in every LoRA layer, so
each layer keeps its adapters in slot stacks (:mod:`lora_ext.storage`) and one
row-to-adapter index serves all layers (:mod:`lora_ext.selection`). The model's
:class:`AdapterManager` is the only code that hands out slots, takes the lock, and
attaches, replaces, deletes or reserves adapters; layers implement the small
protocol of :class:`~lora_ext.storage.AdapterLayer` and read their slots.

Loading is a :class:`AdapterPlan` (what goes into which module, checked) handed to
:meth:`AdapterManager.attach` or :meth:`AdapterManager.replace`. Plain modules that
a plan targets are wrapped by the layer kind registered for their type
(:func:`register_layer_kind`).

Slots are handed out from a free list and reused; the capacity (slots per stack)
grows geometrically (on the CPU without copying: :mod:`lora_ext.storage`), so
loading, deleting and replacing an adapter cost O(1) in the number loaded.
"""

from __future__ import annotations

import contextlib
import heapq
import math
import threading
import weakref
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
from torch import Tensor, nn

from .selection import SelectionState
from .storage import AdapterLayer, AdapterSpec, check_adapter_name

# Slots grow by this factor: amortised O(1) per load, at most 25% unused slots.
_GROWTH = 1.25

# Layer kinds: (plain module type, its LoRA layer class, which of them it takes), the
# latest registered first.
_LAYER_KINDS: list[tuple[type, Callable, Optional[Callable[[nn.Module], bool]]]] = []


def register_layer_kind(
    base_type: type, layer_class: Callable, accepts: Optional[Callable[[nn.Module], bool]] = None
) -> None:
    """Wrap modules of ``base_type`` in ``layer_class(module, manager)`` when a plan targets them.

    ``accepts(module)``: narrows the kind to some modules of that type (e.g. the
    ``nn.Linear`` layers whose weight is quantized); kinds registered later are asked first.
    """
    _LAYER_KINDS.insert(0, (base_type, layer_class, accepts))


def layer_kind(module: nn.Module) -> Optional[Callable]:
    """The layer class that holds adapters on ``module``: its own for a LoRA layer, the
    registered kind for a plain module (None: no LoRA layer kind takes it)."""
    if isinstance(module, AdapterLayer):
        return type(module)
    for base_type, layer_class, accepts in _LAYER_KINDS:
        if isinstance(module, base_type) and (accepts is None or accepts(module)):
            return layer_class
    return None


# Adapter variants (AdapterSpec.variant, e.g. "dora"): variant -> {layer class: the layer
# class that carries adapters of that variant as well as plain ones}.
_VARIANT_KINDS: dict[str, dict[type, type]] = {}


def register_variant_kind(variant: str, layer_class: type, variant_class: type) -> None:
    """Adapters of ``variant`` go into ``variant_class`` layers where ``layer_class`` would
    hold a plain adapter: a plain module is wrapped in ``variant_class``, and an existing
    ``layer_class`` layer is converted in place by ``variant_class.convert(layer)`` (its
    adapters and parameters stay as they are)."""
    _VARIANT_KINDS.setdefault(variant, {})[layer_class] = variant_class


def kind_for(module: nn.Module, spec: AdapterSpec) -> Optional[type]:
    """The layer class that holds an adapter of ``spec`` on ``module`` (None: none can)."""
    kind = layer_kind(module)
    if kind is None or spec.variant is None:
        return kind
    carriers = _VARIANT_KINDS.get(spec.variant, {})
    return kind if kind in carriers.values() else carriers.get(kind)


def cannot_add_reason(module: nn.Module) -> Optional[str]:
    """Why ``module`` takes no new adapter (a sharded layer says so); None: it does."""
    return module.cannot_add_reason() if isinstance(module, AdapterLayer) else None


# Modules whose *parameters* take adapters (a mixture's fused experts): a plan names such a
# parameter "<module path>.<parameter>"; attaching wraps the module in the kind's wrapper,
# whose child of that name is the AdapterLayer. (adapted(module) -> parameter names, wrapper)
_PARAMETER_KINDS: list[tuple[Callable[[nn.Module], tuple], Callable]] = []


def register_parameter_kind(adapted: Callable[[nn.Module], tuple], wrapper_class: Callable) -> None:
    """Wrap a module in ``wrapper_class(module, manager)`` when a plan targets one of the
    parameters ``adapted(module)`` names; the wrapper's child of that name holds its adapters."""
    _PARAMETER_KINDS.insert(0, (adapted, wrapper_class))


@dataclass(frozen=True)
class ParameterTarget:
    """A parameter of a plain module that a plan targets (wrapped when attached)."""

    module_path: str
    module: nn.Module
    parameter: str
    wrapper: Callable

    def weights_problem(self, a: Tensor, b: Tensor, r: int) -> Optional[str]:
        """Why ``(a, b)`` do not fit this parameter (None: they do); the wrapper class answers."""
        return self.wrapper.weights_problem(self.module, self.parameter, a, b, r)


def parameter_target(by_path: dict, path: str) -> Optional[ParameterTarget]:
    """The plain module parameter ``path`` names, when a parameter kind adapts it."""
    module_path, _, parameter = path.rpartition(".")
    module = by_path.get(module_path)
    if module is None or isinstance(module, AdapterLayer):
        return None
    for adapted, wrapper in _PARAMETER_KINDS:
        if parameter in adapted(module):
            return ParameterTarget(module_path, module, parameter, wrapper)
    return None


def supported_kinds() -> str:
    return ", ".join(dict.fromkeys(t.__name__ for t, _, _ in _LAYER_KINDS))


def named_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``model.named_modules()`` as a list, without the insides of LoRA layers; several
    times faster (loads walk the model on every call: a generator per level costs more
    than the rest of a small load)."""
    out, seen, stack = [], set(), [("", model)]
    while stack:
        path, module = stack.pop()
        if id(module) in seen:
            continue
        seen.add(id(module))
        out.append((path, module))
        if isinstance(module, AdapterLayer):
            continue
        prefix = path + "." if path else ""
        children = [(prefix + name, child) for name, child in module._modules.items() if child is not None]
        stack.extend(reversed(children))
    return out


def lora_layers(model: nn.Module) -> list[tuple[str, AdapterLayer]]:
    """``(path, layer)`` of every LoRA layer in ``model``, in module order."""
    return [(n, m) for n, m in named_modules(model) if isinstance(m, AdapterLayer)]


@dataclass
class LayerPlan:
    """One module's part of an adapter: its hyper-parameters and weights (None: initialise)."""

    spec: AdapterSpec
    a: Optional[Tensor] = None
    b: Optional[Tensor] = None
    # Weights a layer kind takes besides A and B (DoRA: {"magnitude": [out]}), passed to
    # its write_slot as keyword arguments; checked by its extras_problem.
    extras: dict = field(default_factory=dict)


@dataclass
class AdapterPlan:
    """A checked adapter, ready to attach: module path -> :class:`LayerPlan`.

    ``init`` (for plans without weights): ``"default"`` (PEFT's: A Kaiming-uniform,
    B zero) or ``"gaussian"``.
    """

    layers: dict[str, LayerPlan] = field(default_factory=dict)
    init: str = "default"

    @property
    def max_rank(self) -> int:
        return max((p.spec.r for p in self.layers.values()), default=0)


class AdapterManager:
    """Slots, capacity, the lock and the selection state shared by all LoRA layers of one model."""

    def __init__(self) -> None:
        self._slot_of: dict[str, int] = {}  # name -> slot, in load order
        self.capacity = 0  # slots per layer stack
        self.max_rank: Optional[int] = None  # user-set rank capacity (None: grows)
        self._free: list[int] = []  # heap of freed slots
        self._next_slot = 0  # slots [0, _next_slot) have been handed out
        self._init_runtime()

    def _init_runtime(self, selection=None) -> None:
        self._layers: "weakref.WeakSet[AdapterLayer]" = weakref.WeakSet()
        self._lock = threading.RLock()  # serialises loads, deletes, replaces
        self.selection = SelectionState(self._slot_of, selection)

    # deepcopy / pickle: the lock and pins are per process; layers re-register themselves
    def __getstate__(self) -> dict:
        keep = ("_slot_of", "capacity", "max_rank", "_free", "_next_slot")
        state = {k: self.__dict__[k] for k in keep}
        state["model_wide"] = self.selection.model_wide
        return state

    def __setstate__(self, state: dict) -> None:
        selection = state.pop("model_wide")
        self.__dict__.update(state)
        self._init_runtime(selection)

    # -- reading ---------------------------------------------------------------------------
    @property
    def names(self) -> list[str]:
        return list(self._slot_of)

    def __contains__(self, name: str) -> bool:
        return name in self._slot_of

    def slot(self, name: str) -> int:
        return self._slot_of[name]

    @property
    def layers(self) -> list[AdapterLayer]:
        return list(self._layers)

    def register(self, layer: AdapterLayer) -> None:
        self._layers.add(layer)

    def unregister(self, layer: AdapterLayer) -> None:
        self._layers.discard(layer)

    # -- slots -----------------------------------------------------------------------------
    def _take_slot(self) -> int:
        """A free slot, growing every layer's stacks when none is left."""
        if self._free:
            return heapq.heappop(self._free)
        if self._next_slot >= self.capacity:
            self._grow(max(self.capacity + 1, math.ceil(self.capacity * _GROWTH)))
        slot = self._next_slot
        self._next_slot += 1
        return slot

    def _grow(self, capacity: int) -> None:
        self.capacity = max(self.capacity, capacity)
        for layer in list(self._layers):
            layer.fit_storage()

    def _retire_slot(self, slot: int, generation: int) -> None:
        """Free ``slot`` once no forward older than ``generation`` can read it."""
        self.selection.wait_for_forwards_before(generation)
        for layer in list(self._layers):
            layer.clear_slot(slot)
        heapq.heappush(self._free, slot)

    def rebuild(self, layer: AdapterLayer, rank: int) -> None:
        """Re-allocate ``layer``'s stacks from its parameters (after ``to()``, a copy, sharding)."""
        with self._lock:
            layer.rebuild(self.capacity, max(rank, self.max_rank or 0))

    @contextlib.contextmanager
    def editing(self, layer: AdapterLayer, rebuild: bool = True):
        """Change ``layer``'s parameters under the lock (sharding them, say).

        ``rebuild``: then rebuild its stacks from them (the parameters are views again);
        False leaves the parameters on their own (FSDP2 swaps in its own anyway).
        """
        with self._lock:
            yield
            if rebuild and layer.rank_capacity:
                layer.rebuild(self.capacity, layer.rank_capacity)

    def adopt(self, layer: AdapterLayer) -> None:
        """Move a layer built with another manager into this one (layers composed into a model)."""
        with self._lock:
            for name in layer.specs:
                if name not in self._slot_of:
                    self._slot_of[name] = self._take_slot()
            layer.manager.unregister(layer)
            layer.manager = self
            self.register(layer)
            if layer.rank_capacity:
                layer.rebuild(self.capacity, max(layer.rank_capacity, self.max_rank or 0))

    def attach_pin_hooks(self, model: nn.Module) -> None:
        """Pin the selection per forward of ``model`` (once per module)."""
        if getattr(model, "_lora_ext_pin_hooks", None) is self:
            return
        # Bound to the manager, not its selection state: a copy of the model (deepcopy,
        # pickle) then pins through the copy's manager.
        model.register_forward_pre_hook(self._pin)
        model.register_forward_hook(self._unpin, always_call=True)
        model._lora_ext_pin_hooks = self

    def _pin(self, *_) -> None:
        self.selection.pin()

    def _unpin(self, *_) -> None:
        self.selection.unpin()

    # -- lifecycle ---------------------------------------------------------------------------
    def check_plan(self, model: nn.Module, name: str, plan: AdapterPlan, modules: Optional[list] = None
                   ) -> dict[str, nn.Module]:
        """Raise, changing nothing, if ``plan`` cannot be attached to ``model`` as ``name``.

        Returns path -> module (a LoRA layer, or a plain module a layer kind wraps).
        ``modules``: ``named_modules(model)`` if the caller has it.
        """
        check_adapter_name(name)
        if plan.init not in ("default", "gaussian"):
            raise ValueError(f"init must be 'default' or 'gaussian', got {plan.init!r}")
        if not plan.layers:
            raise ValueError(f"adapter {name!r} targets no module")
        if name in self._slot_of:
            raise ValueError(
                f"adapter {name!r} is already loaded; delete_adapter it first, or load "
                "with replace=True to swap its weights"
            )
        by_path = dict(modules if modules is not None else named_modules(model))
        for spec in {part.spec for part in plan.layers.values()}:  # layers share specs
            spec.validate()
        found = {}
        for path, part in plan.layers.items():
            if self.max_rank is not None and part.spec.r > self.max_rank:
                raise ValueError(
                    f"{path}: rank {part.spec.r} exceeds the rank capacity {self.max_rank} set with "
                    "reserve_adapters; reserve a larger max_rank first"
                )
            module = by_path.get(path)
            if module is None:
                target = parameter_target(by_path, path)
                if target is not None and part.spec.variant is not None:
                    raise ValueError(f"{path}: a {target.parameter} parameter cannot carry {part.spec.variant} adapters")
                if target is not None:
                    found[path] = target
                    continue
                raise ValueError(f"the model has no module {path!r}")
            if layer_kind(module) is None:
                raise TypeError(
                    f"module {path!r} is a {type(module).__name__}; lora_ext supports {supported_kinds()}"
                )
            reason = cannot_add_reason(module)
            if reason is not None:
                raise ValueError(f"{path}: {reason}")
            if kind_for(module, part.spec) is None:
                raise ValueError(
                    f"{path}: a {type(module).__name__} cannot carry {part.spec.variant} adapters"
                )
            if not path and not isinstance(module, AdapterLayer):
                raise ValueError("the model itself is a plain layer; wrap it in a LoRA layer directly")
            found[path] = module
        return found

    def attach(self, model: nn.Module, name: str, plan: AdapterPlan, requires_grad: bool,
               modules: Optional[list] = None) -> list[AdapterLayer]:
        """Add adapter ``name`` to the modules of ``plan`` (wrapping plain ones); all or nothing.

        ``modules``: ``named_modules(model)`` if the caller has it (a walk costs per load).
        """
        modules = modules if modules is not None else named_modules(model)
        layers = []
        by_path = None
        with self._lock:  # checked under the lock: two loads of one name cannot both pass
            found = self.check_plan(model, name, plan, modules)
            self.attach_pin_hooks(model)
            wrapped = {}
            for path, module in found.items():
                if isinstance(module, ParameterTarget):
                    wrapper = wrapped.get(module.module_path)
                    if wrapper is None:
                        by_path = by_path or dict(modules)
                        wrapper = wrapped[module.module_path] = module.wrapper(module.module, self)
                        parent, _, child = module.module_path.rpartition(".")
                        setattr(by_path[parent], child, wrapper)
                    module = getattr(wrapper, module.parameter)
                kind = kind_for(module, plan.layers[path].spec)
                if not isinstance(module, AdapterLayer):
                    by_path = by_path or dict(modules)
                    module = kind(module, self)
                    parent, _, child = path.rpartition(".")
                    setattr(by_path[parent], child, module)
                elif type(module) is not kind:  # a plain layer that must carry a variant
                    kind.convert(module)
                layers.append(module)
            parts = [plan.layers[path] for path in found]
            weights = [
                (p.a, p.b) if p.a is not None else layer.initial_weights(p.spec, plan.init)
                for layer, p in zip(layers, parts)
            ]
            slot = self._take_slot()
            for layer, part, (a, b) in zip(layers, parts, weights):
                layer.write_slot(slot, name, part.spec, a, b, **part.extras)
                layer.point(name, slot, requires_grad)
            self._slot_of[name] = slot
        return layers

    def install(self, layer: AdapterLayer, name: str, spec: AdapterSpec, a: Tensor, b: Tensor,
                requires_grad: bool) -> None:
        """Store ``name`` in one layer, in the slot other layers give it (or a new one)."""
        with self._lock:
            slot = self._slot_of.get(name)
            new = slot is None
            if new:
                slot = self._take_slot()
            layer.write_slot(slot, name, spec, a, b)
            layer.point(name, slot, requires_grad)
            if new:
                self._slot_of[name] = slot

    def replace(self, name: str, layers: dict[str, AdapterLayer], plan: AdapterPlan) -> None:
        """Swap ``name``'s weights for the plan's in every layer, atomically.

        The new weights go to a fresh slot; then one publication switches the selection
        to it, so a forward sees the old adapter or the new one, never a mix. The old
        slot is freed once forwards that started before the switch are done. The
        parameters stay the same objects (optimizers keep them), re-pointed.
        """
        missing, extra = sorted(set(layers) - set(plan.layers)), sorted(set(plan.layers) - set(layers))
        if missing or extra:
            raise ValueError(
                f"replacing {name!r}: the new weights must cover the same layers; "
                f"missing {missing}, extra {extra}"
            )
        for path, layer in layers.items():
            if layer.merged_adapter == name:
                raise ValueError(f"adapter {name!r} is merged; unmerge_adapter before replacing it")
            if plan.layers[path].spec.use_dora != layer.specs[name].use_dora:
                raise ValueError(f"replacing {name!r}: {path} cannot change between LoRA and DoRA")
            if plan.layers[path].spec.r != layer.specs[name].r:
                raise ValueError(
                    f"replacing {name!r}: {path} has rank {layer.specs[name].r}, the "
                    f"new weights rank {plan.layers[path].spec.r} (a replacement keeps every shape)"
                )
            plan.layers[path].spec.validate()
        with self._lock:
            new = self._take_slot()
            for path, layer in layers.items():
                part = plan.layers[path]
                layer.write_slot(new, name, part.spec, part.a, part.b, **part.extras)
            old = self._slot_of[name]
            self._slot_of[name] = new
            for layer in layers.values():
                layer.point(name, new)
            self._retire_slot(old, self.selection.reselect())

    def delete(self, name: str, layers: Optional[list[AdapterLayer]] = None) -> None:
        """Remove ``name`` from ``layers`` (default: all); its slot is freed when no layer keeps it.

        Rows selected for it fall back to the base model.
        """
        with self._lock:
            targets = [layer for layer in (layers or self.layers) if name in layer.specs]
            for layer in targets:
                layer.forget(name)
            if any(name in layer.specs for layer in self._layers):
                for layer in targets:
                    layer.clear_slot(self._slot_of[name])
                return
            slot = self._slot_of.pop(name)
            self._retire_slot(slot, self.selection.reselect())

    def reserve(self, capacity: int, max_rank: Optional[int] = None) -> None:
        """Grow the slot capacity (and fix the rank capacity) of every layer."""
        with self._lock:
            if max_rank is not None:
                self.max_rank = max_rank
            self._grow(capacity)
            if max_rank is not None:
                for layer in self.layers:
                    layer.fit_storage(max_rank)

    def select(self, names) -> tuple:
        """Set the model-wide selection, resolved with no load, delete or replace between.

        Returns ``(previous, new, generation)``.
        """
        with self._lock:
            previous = self.selection.model_wide
            new = self.selection.resolve(names)
            return previous, new, self.selection.publish(new)


def manager_of(model: nn.Module, create: bool = True, modules: Optional[list] = None
               ) -> Optional[AdapterManager]:
    """The model's adapter manager; layers built separately and composed are moved into one.

    ``modules``: ``named_modules(model)`` if the caller has it.
    """
    modules = modules if modules is not None else named_modules(model)
    layers = [m for _, m in modules if isinstance(m, AdapterLayer)]
    if not layers:
        return AdapterManager() if create else None
    manager = layers[0].manager
    for layer in layers:
        if layer.manager is not manager:
            manager.adopt(layer)
    return manager

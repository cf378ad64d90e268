"""Whole-model LoRA: injection, selection, deletion, reservation, exact merging.

The public face over :mod:`lora_ext.lifecycle` (which owns the slots and every
change) and :mod:`lora_ext.selection` (who sees which adapter).
"""

from __future__ import annotations

import re
from typing import Optional, Sequence, Union

from torch import nn

from .layers import LoRALinear
from .quantized import dequantize_linear, forget_quantization_config, is_quantized_linear
from .lifecycle import AdapterManager, AdapterPlan, LayerPlan, layer_kind, lora_layers, manager_of, named_modules, supported_kinds
from .selection import AdapterNames
from .storage import AdapterLayer, AdapterSpec

TargetModules = Union[str, Sequence[str]]

__all__ = [
    "inject_lora", "set_adapter", "use_adapter", "active_adapters", "list_adapters", "lora_layers",
    "delete_adapter", "reserve_adapters", "merge_adapter", "unmerge_adapter", "merge_and_unload",
    "trainable_parameters", "print_trainable_parameters", "resolve_targets",
]


def _manager(model: nn.Module) -> AdapterManager:
    """The model's manager, with the per-forward selection pinning hooked onto ``model``."""
    if not lora_layers(model):
        raise ValueError("the model has no LoRA layers; inject_lora or load_adapter first")
    manager = manager_of(model)
    manager.attach_pin_hooks(model)
    return manager


def list_adapters(model: nn.Module) -> list[str]:
    """Names of the adapters loaded in ``model``, in load order."""
    manager = manager_of(model, create=False)
    return manager.names if manager is not None else []


def _matches(name: str, target_modules: TargetModules) -> bool:
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, name) is not None
    return any(name == t or name.endswith("." + t) for t in target_modules)


def resolve_targets(model: nn.Module, target_modules: TargetModules, modules: Optional[list] = None) -> list[str]:
    """Paths of the modules ``target_modules`` selects; each must be an ``nn.Linear``.

    A list matches a module's full name or its last components (``"q_proj"``); a string
    is a regular expression over the full name; ``"all-linear"`` is every ``nn.Linear``
    except the output layer. ``modules``: ``named_modules(model)`` if the caller has it.
    """
    modules = modules if modules is not None else named_modules(model)
    if target_modules == "all-linear":
        output = getattr(model, "get_output_embeddings", lambda: None)()
        return [
            n
            for n, m in modules
            if layer_kind(m) is not None and m is not output and n
        ]
    if not isinstance(target_modules, str):
        target_modules = list(target_modules)
        if not target_modules or not all(isinstance(t, str) for t in target_modules):
            raise ValueError(f"target_modules must be a regex or a non-empty list of names, got {target_modules!r}")
    paths = []
    for name, module in modules:
        if not name or not _matches(name, target_modules):
            continue
        if layer_kind(module) is None:
            raise TypeError(
                f"target module {name!r} is a {type(module).__name__}; lora_ext supports {supported_kinds()}"
            )
        paths.append(name)
    if not paths:
        raise ValueError(f"target_modules {target_modules!r} matched no nn.Linear in the model")
    return paths


def inject_lora(
    model: nn.Module,
    target_modules: TargetModules,
    r: int = 8,
    alpha: float = 16,
    dropout: float = 0.0,
    use_rslora: bool = False,
    adapter_name: str = "default",
    init: str = "default",
    use_dora: bool = False,
) -> nn.Module:
    """Add a trainable LoRA adapter to every ``nn.Linear`` that ``target_modules`` selects.

    Matching modules become :class:`LoRALinear` (modules that already are get one more
    adapter). Every other parameter is frozen; the new adapter is the only trainable
    one and becomes the model-wide selection. Returns ``model``.

    ``use_dora``: a DoRA adapter (PEFT's ``use_dora=True``; :mod:`lora_ext.dora`), its
    magnitude initialised as PEFT does.
    """
    spec = AdapterSpec(int(r), float(alpha), float(dropout), bool(use_rslora), bool(use_dora))
    plan = AdapterPlan({p: LayerPlan(spec) for p in resolve_targets(model, target_modules)}, init=init)
    manager = manager_of(model)
    manager.attach(model, adapter_name, plan, requires_grad=True)  # checks first: a refusal changes nothing
    for p in model.parameters():
        p.requires_grad_(False)
    for _, layer in lora_layers(model):
        if adapter_name in layer.specs:
            for p in layer.adapter_parameters(adapter_name):
                p.requires_grad_(True)
    manager.select(adapter_name)
    return model


class ModelWideSelection:
    """What :func:`set_adapter` returns: the change is already made, model-wide.

    It is not a context manager: ``with set_adapter(...)`` raises, naming
    :func:`use_adapter`, and puts the previous model-wide selection back when nothing
    else changed it in between.
    """

    def __init__(self, manager: AdapterManager, before, generation: int):
        self._manager, self._before, self._generation = manager, before, generation

    def __enter__(self):
        state = self._manager.selection
        restored = state.publish_if_current(self._generation, self._before)
        raise TypeError(
            "set_adapter is a plain call that changes the model-wide selection; for a selection "
            "local to this thread or asyncio task write `with lora_ext.use_adapter(model, names):` "
            + ("(the model-wide selection was put back)" if restored else
               "(the model-wide selection had changed again since, and stays)")
        )

    def __exit__(self, *exc) -> None:  # never reached: __enter__ raises
        return None


def set_adapter(model: nn.Module, names: AdapterNames) -> ModelWideSelection:
    """Choose the adapter of every batch row, model-wide: every thread's forwards use it.

    ``names``: one adapter name (or None for the base model) for the whole batch, or a
    list with one entry per batch row (None: that row uses the base model). Token rows
    of a ``[batch, seq, hidden]`` input use their batch row's adapter; a batch k times
    longer than the list (``generate`` with ``num_beams=k``) repeats each entry k times.

    Inside a :func:`use_adapter` block the block's selection wins for this thread or
    task; a plain call there changes the model-wide choice and the block's as well.
    """
    manager = _manager(model)
    before, selection, generation = manager.select(names)
    state = manager.selection
    if state.has_local():  # inside a block: the caller's own forwards follow too
        state.set_local(selection, generation)
    return ModelWideSelection(manager, before, generation)


class use_adapter:  # noqa: N801  (used like a function: `with use_adapter(model, names):`)
    """``with use_adapter(model, names):`` selects ``names`` for the forwards that this
    thread or asyncio task runs inside the block; other threads and tasks keep theirs.

    However it is entered (directly, through ``contextlib.ExitStack``, a helper
    function or a conditional expression), nothing changes model-wide. Names are
    checked at the call. Blocks nest; the exit restores what was there before.
    Compiled models (``torch.compile``) read, per thread, the selection of the last
    block entered or left in that thread (asyncio tasks that share a thread share it).
    """

    def __init__(self, model: nn.Module, names: AdapterNames):
        self._state = _manager(model).selection
        self._resolved_at = self._state.generation
        self._selection = self._state.resolve(names)  # unknown names raise here
        self._tokens: list = []

    def __enter__(self) -> "use_adapter":
        self._tokens.append(self._state.set_local(self._selection, self._resolved_at))
        return self

    def __exit__(self, *exc) -> None:
        self._state.reset_local(self._tokens.pop())


def active_adapters(model: nn.Module) -> AdapterNames:
    """The selection this thread's / task's forwards of ``model`` use now (as given)."""
    selection = _manager(model).selection.current
    return None if selection is None else selection.argument


def delete_adapter(model: nn.Module, adapter_name: str) -> None:
    """Remove ``adapter_name`` from every layer and free its memory.

    Rows selected for it fall back to the base model.
    """
    modules = named_modules(model)
    layers = [m for _, m in modules if isinstance(m, AdapterLayer) and adapter_name in m.specs]
    if not layers:
        raise ValueError(f"no adapter {adapter_name!r}; loaded adapters: {list_adapters(model)}")
    if any(m.merged_adapter == adapter_name for m in layers):
        raise ValueError(f"adapter {adapter_name!r} is merged; unmerge_adapter first")
    manager_of(model, modules=modules).delete(adapter_name)


def reserve_adapters(model: nn.Module, max_adapters: int, max_rank: Optional[int] = None) -> None:
    """Allocate room for ``max_adapters`` adapters of rank up to ``max_rank`` in every LoRA layer.

    Loading more than fits still works (the stacks grow by 25%: on the CPU in place,
    elsewhere by re-allocating them; a compiled model recompiles once); reserving up
    front avoids that. ``max_rank`` also becomes a limit: loading an adapter of a
    larger rank raises.
    """
    if not isinstance(max_adapters, int) or max_adapters < 1:
        raise ValueError(f"max_adapters must be a positive integer, got {max_adapters!r}")
    layers = lora_layers(model)
    if not layers:
        raise ValueError("the model has no LoRA layers; inject_lora or load_adapter first")
    loaded = max((s.r for _, m in layers for s in m.specs.values()), default=0)
    if max_rank is not None and (not isinstance(max_rank, int) or max_rank < max(loaded, 1)):
        raise ValueError(
            f"max_rank must be an integer >= the largest loaded rank ({loaded}), got {max_rank!r}"
        )
    manager_of(model).reserve(max_adapters, max_rank)


def _merge_targets(model: nn.Module, adapter_name: str, safe: bool) -> list[LoRALinear]:
    layers = [(n, m) for n, m in lora_layers(model) if adapter_name in m.specs]
    if not layers:
        raise ValueError(f"no adapter {adapter_name!r}; loaded adapters: {list_adapters(model)}")
    for name, m in layers:
        if m.merged_adapter is not None:
            raise ValueError(f"{name}: adapter {m.merged_adapter!r} is already merged; unmerge_adapter first")
        reason = m.merge_refusal()
        if reason is not None:
            raise ValueError(f"cannot merge adapter {adapter_name!r} into {name}: {reason}; nothing was changed")
    if safe:
        for name, m in layers:
            if not m.merge_is_finite(adapter_name):
                raise ValueError(
                    f"merging adapter {adapter_name!r} into {name} gives non-finite weights; "
                    "nothing was changed"
                )
    return [m for _, m in layers]


def merge_adapter(model: nn.Module, adapter_name: str, safe: bool = True) -> None:
    """Add ``adapter_name`` into the base weights (undo with :func:`unmerge_adapter`).

    The round trip is bit-exact in every dtype: each layer keeps an int8 residual per
    weight element (plus a list of the rare elements that do not fit). ``safe`` first
    checks, for every layer, that the merged weights would be finite, and changes
    nothing otherwise. While merged, the model computes with the merged weights.
    """
    for layer in _merge_targets(model, adapter_name, safe):
        layer.merge(adapter_name, exact=True)


def unmerge_adapter(model: nn.Module) -> None:
    """Restore every base weight bit for bit from a :func:`merge_adapter`.

    All or nothing: if any layer refuses, the layers already restored are merged again.
    """
    layers = [(m, m.merged_adapter) for _, m in lora_layers(model) if m.merged_adapter is not None]
    for layer, _ in layers:
        layer.check_unmerge()
    restored = []
    try:
        for layer, name in layers:
            layer.unmerge()  # its element check can still refuse (a write that bypassed autograd)
            restored.append((layer, name))
    except RuntimeError:
        for layer, name in restored:  # merging is deterministic: the same merged bits again
            layer.merge(name, exact=True)
        raise


def merge_and_unload(
    model: nn.Module, adapter_name: str = "default", safe: bool = True, dequantize: bool = False
) -> nn.Module:
    """Merge ``adapter_name`` for good and replace every LoRA layer by its plain ``nn.Linear``.

    A quantized base refuses the merge (it would round the update away), unless
    ``dequantize``: then every quantized linear layer of the model becomes a float
    ``nn.Linear`` first (:func:`~lora_ext.quantized.dequantize_linear`), the adapter
    merges in full precision, and the result is a full-precision model. Nothing changes
    if the merge is refused.
    """
    layers = lora_layers(model)
    merged = {m.merged_adapter for _, m in layers} - {None}
    if merged and merged != {adapter_name}:
        raise ValueError(f"adapter {merged.pop()!r} is merged; unmerge_adapter first")
    undo = _dequantize_linears(model) if dequantize else []
    try:
        if merged:
            for _, m in layers:
                m.forget_merge()
        else:
            targets = _merge_targets(model, adapter_name, safe)  # refuses before changing any weight
            for layer in targets:
                layer.merge(adapter_name, exact=False)
    except Exception:
        for parent, child, module in reversed(undo):
            setattr(parent, child, module)
        raise
    if undo:
        forget_quantization_config(model)
    for path, m in layers:
        path, base = m.unload_target(path)
        parent, _, child = path.rpartition(".")
        if not path:
            return base
        setattr(model.get_submodule(parent) if parent else model, child, base)
    return model


def _dequantize_linears(model: nn.Module) -> list[tuple[nn.Module, str, nn.Module]]:
    """Swap every quantized linear layer (LoRA layers' bases included) for its float
    ``nn.Linear``; returns ``(parent, attribute, old module)`` to undo it. All the float
    layers are made before any is swapped in."""
    found = []
    for path, module in named_modules(model):
        if isinstance(module, LoRALinear) and is_quantized_linear(module.base_layer):
            found.append((module, "base_layer", module.base_layer))
        elif not isinstance(module, AdapterLayer) and isinstance(module, nn.Linear) and is_quantized_linear(module):
            parent, _, child = path.rpartition(".")
            found.append((model.get_submodule(parent) if parent else model, child, module))
    replacements = [dequantize_linear(module) for _, _, module in found]
    for (parent, child, _), linear in zip(found, replacements):
        setattr(parent, child, linear)
    return found


def trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """``(trainable, total)`` parameter counts (shared parameters counted once)."""
    trainable = total = 0
    for p in model.parameters():
        total += p.numel()
        if p.requires_grad:
            trainable += p.numel()
    return trainable, total


def print_trainable_parameters(model: nn.Module) -> None:
    """Print PEFT's one-line report of trainable vs. total parameters."""
    trainable, total = trainable_parameters(model)
    print(
        f"trainable params: {trainable:,d} || all params: {total:,d} || "
        f"trainable%: {100.0 * trainable / max(total, 1):.4f}"
    )

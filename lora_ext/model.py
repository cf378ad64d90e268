"""Whole-model LoRA: injection, adapter selection, deletion, replacement, exact merging."""

from __future__ import annotations

import dis
import functools
import re
import sys
import warnings
from typing import Iterable, Optional, Sequence, Union

from torch import Tensor, nn

from .layers import AdapterNames, AdapterSpec, LoRALinear, _AdapterContext, _check_adapter_name

TargetModules = Union[str, Sequence[str]]


def lora_layers(model: nn.Module) -> list[tuple[str, LoRALinear]]:
    """``(path, layer)`` of every LoRA layer in ``model``, in module order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoRALinear)]


_lora_layers = lora_layers


def _context(model: nn.Module) -> _AdapterContext:
    """The model's shared adapter context; one is created (and shared) when needed."""
    layers = [m for _, m in _lora_layers(model)]
    ctx = layers[0]._context if layers else _AdapterContext()
    for layer in layers:  # layers built separately and composed: move them to one slot table
        if layer._context is not ctx:
            _adopt(ctx, layer)
    return ctx


def _adopt(ctx: _AdapterContext, layer: LoRALinear) -> None:
    with ctx._mutex:
        for name in layer.specs:
            if name not in ctx.slot_of:
                ctx.slot_of[name] = ctx.take_slot()
        layer._context.layers.discard(layer)
        layer._context = ctx
        ctx.register(layer)
        if layer._a_stack is not None:
            layer._rebuild(ctx.capacity, max(layer.rank_capacity, ctx.max_rank or 0))


def _model_context(model: nn.Module) -> _AdapterContext:
    """:func:`_context`, with the per-forward selection pinning hooked onto ``model``."""
    ctx = _context(model)
    ctx.attach_pin_hooks(model)
    return ctx


def list_adapters(model: nn.Module) -> list[str]:
    """Names of the adapters loaded in ``model``, in load order."""
    return list(_context(model).names) if _lora_layers(model) else []


def _candidate_modules(model: nn.Module) -> Iterable[tuple[str, nn.Module]]:
    """Named modules, without the insides of LoRA layers."""
    inside: Optional[str] = None  # prefix of the last LoRA layer's insides (pre-order walk)
    for name, module in model.named_modules():
        if inside is not None and name.startswith(inside):
            continue
        if isinstance(module, LoRALinear):
            inside = name + "."
        yield name, module


def _matches(name: str, target_modules: TargetModules) -> bool:
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, name) is not None
    return any(name == t or name.endswith("." + t) for t in target_modules)


def _resolve_targets(model: nn.Module, target_modules: TargetModules) -> list[str]:
    """Paths of the modules ``target_modules`` selects; each must be an ``nn.Linear``.

    A list matches a module's full name or its last components (``"q_proj"``); a string
    is a regular expression over the full name; ``"all-linear"`` is every ``nn.Linear``
    except the output layer.
    """
    if target_modules == "all-linear":
        output = getattr(model, "get_output_embeddings", lambda: None)()
        return [
            n
            for n, m in _candidate_modules(model)
            if isinstance(m, (nn.Linear, LoRALinear)) and m is not output and n
        ]
    if not isinstance(target_modules, str):
        target_modules = list(target_modules)
        if not target_modules or not all(isinstance(t, str) for t in target_modules):
            raise ValueError(f"target_modules must be a regex or a non-empty list of names, got {target_modules!r}")
    paths = []
    for name, module in _candidate_modules(model):
        if not name or not _matches(name, target_modules):
            continue
        if not isinstance(module, (nn.Linear, LoRALinear)):
            raise TypeError(
                f"target module {name!r} is a {type(module).__name__}; lora_ext supports nn.Linear only"
            )
        paths.append(name)
    if not paths:
        raise ValueError(f"target_modules {target_modules!r} matched no nn.Linear in the model")
    return paths


def _attach(
    model: nn.Module,
    plan: dict[str, AdapterSpec],
    adapter_name: str,
    init: str = "default",
    weights: Optional[dict[str, tuple[Tensor, Tensor]]] = None,
) -> list[LoRALinear]:
    """Add ``adapter_name`` to each module of ``plan`` (wrapping plain ``nn.Linear`` s).

    ``weights``: path -> (A, B) to store (frozen); None: ``init`` them (trainable).
    Checks everything first, so a failure changes nothing.
    """
    _check_adapter_name(adapter_name)
    if init not in ("default", "gaussian"):
        raise ValueError(f"init must be 'default' or 'gaussian', got {init!r}")
    ctx = _context(model)
    if adapter_name in ctx.slot_of:
        raise ValueError(
            f"adapter {adapter_name!r} is already loaded; delete_adapter it first, or load "
            "with replace=True to swap its weights"
        )
    modules = {}
    for path, spec in plan.items():
        spec.validate()
        if ctx.max_rank is not None and spec.r > ctx.max_rank:
            raise ValueError(
                f"{path}: rank {spec.r} exceeds the rank capacity {ctx.max_rank} set with "
                "reserve_adapters"
            )
        try:
            module = model.get_submodule(path) if path else model
        except AttributeError:
            raise ValueError(f"the model has no module {path!r}") from None
        if not isinstance(module, (nn.Linear, LoRALinear)):
            raise TypeError(f"module {path!r} is a {type(module).__name__}; lora_ext supports nn.Linear only")
        if not path and not isinstance(module, LoRALinear):
            raise ValueError("the model itself is an nn.Linear; wrap it in LoRALinear directly")
        modules[path] = module
    ctx.attach_pin_hooks(model)
    layers = []
    with ctx._mutex:
        for path, module in modules.items():
            if not isinstance(module, LoRALinear):
                module = LoRALinear(module, ctx)
                parent, _, child = path.rpartition(".")
                setattr(model.get_submodule(parent) if parent else model, child, module)
            spec = plan[path]
            if weights is None:
                module.add_adapter(adapter_name, spec.r, spec.alpha, spec.dropout, spec.use_rslora, init)
            else:
                module._install(adapter_name, spec, *weights[path], requires_grad=False)
            layers.append(module)
    return layers


def inject_lora(
    model: nn.Module,
    target_modules: TargetModules,
    r: int = 8,
    alpha: float = 16,
    dropout: float = 0.0,
    use_rslora: bool = False,
    adapter_name: str = "default",
    init: str = "default",
) -> nn.Module:
    """Add a trainable LoRA adapter to every ``nn.Linear`` that ``target_modules`` selects.

    Matching modules become :class:`LoRALinear` (modules that already are get one more
    adapter). Every other parameter is frozen; the new adapter is the only trainable
    one and becomes the active adapter. Returns ``model``.
    """
    spec = AdapterSpec(int(r), float(alpha), float(dropout), bool(use_rslora))
    paths = _resolve_targets(model, target_modules)
    layers = _attach(model, {p: spec for p in paths}, adapter_name, init)
    for p in model.parameters():
        p.requires_grad_(False)
    for layer in layers:
        layer.lora_A[adapter_name].requires_grad_(True)
        layer.lora_B[adapter_name].requires_grad_(True)
    _model_context(model).select(adapter_name)
    return model


class AdapterSelection:
    """Returned by :func:`set_adapter`.

    Called plainly, :func:`set_adapter` changes the model-wide selection at once. Used
    directly as a ``with`` statement's context manager, it changes nothing model-wide:
    inside the block, forwards run by this thread or asyncio task use the selection,
    and the block's exit restores what they used before.
    """

    def __init__(self, ctx: _AdapterContext, names: AdapterNames, local: bool):
        self._ctx = ctx
        self._resolved_at = ctx._generation
        if local:
            self._selection = ctx.resolve(names)  # unknown names raise here, in both forms
        else:
            self._selection = ctx.select(names)
            if ctx.has_local():  # inside a block: the caller's own forwards follow too
                ctx.set_local(self._selection, self._resolved_at)
        self._local = local
        self._tokens: list = []

    def __enter__(self) -> "AdapterSelection":
        if not self._local:
            warnings.warn(
                "set_adapter(...) was entered as a context manager, but the call was not the "
                "with statement's own expression, so it also changed the model-wide selection "
                "(write `with lora_ext.set_adapter(model, names):` for a selection local to "
                "this thread or task)",
                stacklevel=2,
            )
        self._tokens.append(self._ctx.set_local(self._selection, self._resolved_at))
        return self

    def __exit__(self, *exc) -> None:
        self._ctx.reset_local(self._tokens.pop())


# Opcodes that can follow the call in `with set_adapter(...):` (3.10: SETUP_WITH;
# 3.11-3.13: BEFORE_WITH; 3.14 opens with COPY then LOAD_SPECIAL __exit__).
_WITH_OPCODES = {"SETUP_WITH", "BEFORE_WITH"}


@functools.lru_cache(maxsize=1024)
def _call_opens_with(code, call_offset: int) -> bool:
    """Whether the call at ``call_offset`` in ``code`` is the context expression of a ``with``."""
    following = [i.opname for i in dis.get_instructions(code) if i.offset > call_offset][:2]
    return bool(following) and (following[0] in _WITH_OPCODES or following == ["COPY", "LOAD_SPECIAL"])


def set_adapter(model: nn.Module, names: AdapterNames) -> AdapterSelection:
    """Choose the adapter of every batch row, for all LoRA layers of ``model``.

    ``names``: one adapter name (or None for the base model) for the whole batch, or a
    list with one entry per batch row (None: that row uses the base model). Token rows
    of a ``[batch, seq, hidden]`` input use their batch row's adapter; a batch k times
    longer than the list (``generate`` with ``num_beams=k``) repeats each entry k times.

    A plain call sets the model-wide choice. ``with set_adapter(model, ["a", None, "b"]):``
    sets it only for the forwards this thread or asyncio task runs inside the block
    (other threads and tasks keep theirs), and restores it on exit. A compiled model
    (``torch.compile``) reads the model-wide choice.
    """
    if not _lora_layers(model):
        raise ValueError("the model has no LoRA layers; inject_lora or load_adapter first")
    caller = sys._getframe(1)
    # Decided from the caller's bytecode, before anything changes: a model-wide change
    # undone at __enter__ would leak to other threads in between.
    local = _call_opens_with(caller.f_code, caller.f_lasti)
    return AdapterSelection(_model_context(model), names, local)


def delete_adapter(model: nn.Module, adapter_name: str) -> None:
    """Remove ``adapter_name`` from every layer and free its memory.

    Rows selected for it fall back to the base model.
    """
    layers = [m for _, m in _lora_layers(model) if adapter_name in m.specs]
    if not layers:
        raise ValueError(f"no adapter {adapter_name!r}; loaded adapters: {list_adapters(model)}")
    if any(m.merged_adapter == adapter_name for m in layers):
        raise ValueError(f"adapter {adapter_name!r} is merged; unmerge_adapter first")
    ctx = _context(model)
    with ctx._mutex:
        for layer in layers:
            layer._detach(adapter_name)
        ctx.retire(adapter_name)


def reserve_adapters(model: nn.Module, max_adapters: int, max_rank: Optional[int] = None) -> None:
    """Allocate room for ``max_adapters`` adapters of rank up to ``max_rank`` in every LoRA layer.

    Loading more than fits still works (the stacks grow by 25%, which re-allocates
    them and makes a compiled model recompile once); reserving up front avoids that
    and the unused room growth leaves. ``max_rank`` also becomes a limit: loading an
    adapter of a larger rank raises.
    """
    if not isinstance(max_adapters, int) or max_adapters < 1:
        raise ValueError(f"max_adapters must be a positive integer, got {max_adapters!r}")
    layers = _lora_layers(model)
    if not layers:
        raise ValueError("the model has no LoRA layers; inject_lora or load_adapter first")
    loaded = max((s.r for _, m in layers for s in m.specs.values()), default=0)
    if max_rank is not None and (not isinstance(max_rank, int) or max_rank < max(loaded, 1)):
        raise ValueError(
            f"max_rank must be an integer >= the largest loaded rank ({loaded}), got {max_rank!r}"
        )
    ctx = _context(model)
    with ctx._mutex:
        ctx.reserve(max_adapters, max_rank)
        for _, layer in layers:
            if layer._a_stack is None and max_rank is not None:
                layer._fit_storage(max_rank)


def _replace(model: nn.Module, adapter_name: str, plan: dict[str, AdapterSpec],
             weights: dict[str, tuple[Tensor, Tensor]]) -> None:
    """Swap ``adapter_name``'s weights for ``weights`` in every layer, atomically.

    The new weights go to a fresh slot; then one assignment switches the selection to
    it, so a forward sees the old adapter or the new one, never a mix. The old slot is
    freed once forwards that started before the switch are done. The parameters stay
    the same objects (optimizers keep them), re-pointed to the new slot.
    """
    held = {n: m for n, m in _lora_layers(model) if adapter_name in m.specs}
    if not held:
        raise ValueError(
            f"no adapter {adapter_name!r} to replace; loaded adapters: {list_adapters(model)}"
        )
    missing, extra = sorted(set(held) - set(plan)), sorted(set(plan) - set(held))
    if missing or extra:
        raise ValueError(
            f"replacing {adapter_name!r}: the new weights must cover the same layers; "
            f"missing {missing}, extra {extra}"
        )
    for path, layer in held.items():
        if layer.merged_adapter == adapter_name:
            raise ValueError(f"adapter {adapter_name!r} is merged; unmerge_adapter before replacing it")
        if plan[path].r != layer.specs[adapter_name].r:
            raise ValueError(
                f"replacing {adapter_name!r}: {path} has rank {layer.specs[adapter_name].r}, the "
                f"new weights rank {plan[path].r} (a replacement keeps every shape)"
            )
        plan[path].validate()
    ctx = _context(model)
    with ctx._mutex:
        new = ctx.take_slot()
        for path, layer in held.items():
            layer._write_slot(new, adapter_name, plan[path], *weights[path])
        old = ctx.slot_of[adapter_name]
        ctx.slot_of[adapter_name] = new
        for layer in held.values():
            layer._point(adapter_name, new)
        ctx.retire_slot(old, ctx.reselect())


def _merge_targets(model: nn.Module, adapter_name: str, safe: bool) -> list[LoRALinear]:
    layers = [(n, m) for n, m in _lora_layers(model) if adapter_name in m.specs]
    if not layers:
        raise ValueError(f"no adapter {adapter_name!r}; loaded adapters: {list_adapters(model)}")
    for name, m in layers:
        if m.merged_adapter is not None:
            raise ValueError(f"{name}: adapter {m.merged_adapter!r} is already merged; unmerge_adapter first")
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
    layers = [(m, m.merged_adapter) for _, m in _lora_layers(model) if m.merged_adapter is not None]
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


def merge_and_unload(model: nn.Module, adapter_name: str = "default", safe: bool = True) -> nn.Module:
    """Merge ``adapter_name`` for good and replace every LoRA layer by its plain ``nn.Linear``."""
    layers = _lora_layers(model)
    merged = {m.merged_adapter for _, m in layers} - {None}
    if merged and merged != {adapter_name}:
        raise ValueError(f"adapter {merged.pop()!r} is merged; unmerge_adapter first")
    if merged:
        for _, m in layers:
            m.forget_merge()
    else:
        for layer in _merge_targets(model, adapter_name, safe):
            layer.merge(adapter_name, exact=False)
    for path, m in layers:
        parent, _, child = path.rpartition(".")
        if not path:
            return m.base_layer
        setattr(model.get_submodule(parent) if parent else model, child, m.base_layer)
    return model


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

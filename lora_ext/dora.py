""":class:`DoRALinear`: DoRA and LoRA adapters side by side on an ``nn.Linear``.

DoRA (weight-decomposed LoRA, PEFT's ``use_dora=True``) gives adapter ``name`` a
trainable per-output-row ``magnitude`` ``m [out]`` and computes, with PEFT's semantics,

    y = g * (W x + s B A x) + bias,    g = m / ||W + s B A||  (per output row, detached)

(with dropout in training, PEFT's form: ``W x + bias + (g - 1) W d(x) + g s B A d(x)``).

How a model holds both kinds: a DoRA adapter is a LoRA adapter plus one per-slot vector,
so :class:`DoRALinear` is :class:`~lora_ext.LoRALinear` with two more slot stacks,
``magnitude [C, out]`` (the ``lora_magnitude_vector`` parameters are views of it, as
``lora_A``/``lora_B`` are of theirs) and ``row_scale [C, out]`` (fp32: ``g`` for a DoRA
slot, 1 for a plain LoRA slot). The same layer then serves a batch that mixes DoRA
adapters, LoRA adapters and base rows in one ``multi_dora_add_`` call after the
bias-free base GEMM. A layer gets this kind only when a DoRA adapter arrives
(:func:`~lora_ext.lifecycle.register_variant_kind`): a plain ``nn.Linear`` is wrapped in
it, an existing ``LoRALinear`` is converted in place (its parameters stay the same
objects), so models without DoRA adapters run exactly the LoRA code.

``g`` is computed once per adapter per layer, when it is written (load, replace), with
``dora_weight_norm`` (one pass over ``W`` that never forms ``B @ A``). The layer notes the
versions of ``W`` and the stacks it was computed from; any other change (an optimizer
step, ``load_state_dict``, a merge or unmerge of the base weight) is seen at the next
eager forward, which recomputes every DoRA slot's ``g`` first. (A compiled model does
not check: call :meth:`DoRALinear.refresh_row_scales` after changing the base weight
of one.) With autograd, ``g`` is computed from the parameters on every forward, the
norm detached as in PEFT.

Merging writes PEFT's ``W' = g * (W + s B A)``. ``g`` rescales every element, so the
int8 residual of a LoRA merge record cannot undo it; the exact record keeps a copy of
the original weight instead (one weight's memory per merged layer).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import ops
from .layers import LoRALinear, row_dropout
from .lifecycle import register_variant_kind
from .merging import check_unmerge, merge_maker, weight_state
from .selection import Selection, expand_rows
from .storage import AdapterSpec

# Rows of the weight checked per block by merge_is_finite (memory: one block).
_FINITE_BLOCK_ELEMENTS = 1 << 22


@dataclass
class DoraMergeRecord:
    """What undoes a DoRA merge bit for bit: the weight as it was, and what was merged."""

    name: str
    original: Tensor
    lora_a: Tensor
    lora_b: Tensor
    magnitude: Tensor
    made_by: str
    weight_state: tuple

    def refresh_weight_state(self, weight: Tensor) -> None:
        self.weight_state = weight_state(weight)


class DoRALinear(LoRALinear):
    """A :class:`~lora_ext.LoRALinear` whose adapters may also be DoRA adapters.

    A DoRA adapter ``name`` has ``lora_A[name]``, ``lora_B[name]`` and
    ``lora_magnitude_vector[name]`` ``[out]`` (PEFT's names); plain LoRA adapters in the
    same layer work as in ``LoRALinear``.
    """

    def __init__(self, base_layer: nn.Linear, manager=None):
        super().__init__(base_layer, manager)
        self._init_dora()

    def _init_dora(self) -> None:
        self.lora_magnitude_vector = nn.ParameterDict()
        self.register_buffer("_magnitude", None, persistent=False)
        self.register_buffer("_row_scale", None, persistent=False)
        self.dora_names: set[str] = set()
        self.has_dora = False  # read by the compiled route: a bool, so swaps keep the graph
        self._dora_fresh = None  # _dora_state() when every DoRA slot's g was last computed
        if self._a_stack is not None:
            self._fit_dora_storage()

    @classmethod
    def convert(cls, layer: LoRALinear) -> None:
        """Make a ``LoRALinear`` a ``DoRALinear`` in place (it keeps every adapter and parameter)."""
        if type(layer) is not LoRALinear:
            raise TypeError(f"DoRALinear converts a LoRALinear, got {type(layer).__name__}")
        layer.__class__ = cls
        layer._init_dora()

    # -- checks and files --------------------------------------------------------------------
    @classmethod
    def extras_problem(cls, module: nn.Module, spec: AdapterSpec, extras: dict) -> Optional[str]:
        unknown = set(extras) - {"magnitude"}
        if unknown or (extras and not spec.use_dora):
            return f"takes no {', '.join(sorted(unknown or extras))} for a plain LoRA adapter"
        magnitude = extras.get("magnitude")
        if magnitude is None:
            return None
        if tuple(magnitude.shape) != (module.out_features,) or not magnitude.is_floating_point():
            return (
                f"expects lora_magnitude_vector of shape [{module.out_features}] (one per output "
                f"row), floating point, got {list(magnitude.shape)} {magnitude.dtype}"
            )
        return None

    def extra_weights(self, name: str) -> dict[str, Tensor]:
        if name not in self.dora_names:
            return {}
        m = self.lora_magnitude_vector[name].detach()
        return {"lora_magnitude_vector": m.full_tensor() if hasattr(m, "full_tensor") else m}

    def adapter_parameters(self, name: str) -> list[nn.Parameter]:
        params = super().adapter_parameters(name)
        if name in self.dora_names:
            params.append(self.lora_magnitude_vector[name])
        return params

    def extra_repr(self) -> str:
        return super().extra_repr() + (f", dora=[{', '.join(sorted(self.dora_names))}]" if self.dora_names else "")

    # -- slot storage (the manager calls these, holding its lock) ------------------------------
    def _acc_dtype(self) -> torch.dtype:
        return torch.float64 if self.base_layer.weight.dtype == torch.float64 else torch.float32

    def _fit_dora_storage(self) -> None:
        """The magnitude and row-scale stacks hold as many slots as the A/B stacks."""
        capacity = self._a_stack.shape[0]
        options = self.adapter_options()
        old_m, old_g = self._buffers["_magnitude"], self._buffers["_row_scale"]
        if old_m is not None and old_m.shape[0] == capacity and old_m.dtype == options["dtype"] \
                and old_m.device == options["device"]:
            return
        fresh = self._is_fresh()
        magnitude = torch.zeros(capacity, self.out_features, **options)
        row_scale = torch.ones(capacity, self.out_features, dtype=self._acc_dtype(), device=options["device"])
        if old_m is not None:
            n = min(old_m.shape[0], capacity)
            with torch.no_grad():
                magnitude[:n].copy_(old_m[:n])
                row_scale[:n].copy_(old_g[:n])
        self._magnitude, self._row_scale = magnitude, row_scale
        for name, p in self.lora_magnitude_vector.items():
            p.data = magnitude[self.manager.slot(name)]
        self._dora_fresh = self._dora_state() if fresh else None

    def fit_storage(self, min_rank: int = 0) -> None:
        super().fit_storage(min_rank)
        if self._a_stack is not None:
            self._fit_dora_storage()

    def rebuild(self, capacity: int, rank: int) -> None:
        options = self.adapter_options()
        magnitude = torch.zeros(capacity, self.out_features, **options)
        with torch.no_grad():
            for name, p in self.lora_magnitude_vector.items():
                magnitude[self.manager.slot(name)].copy_(p)
        self._magnitude = magnitude
        self._row_scale = torch.ones(capacity, self.out_features, dtype=self._acc_dtype(), device=options["device"])
        super().rebuild(capacity, rank)  # points A, B and (point below) the magnitudes
        self.refresh_row_scales()

    def write_slot(self, slot: int, name: str, spec: AdapterSpec, a: Tensor, b: Tensor,
                   magnitude: Optional[Tensor] = None) -> None:
        """Store an adapter; a DoRA one's magnitude (default: PEFT's init, ``||W + s B A||``)
        and its row scale ``g`` with it."""
        if magnitude is not None and not spec.use_dora:
            raise ValueError(f"adapter {name!r} is not a DoRA adapter but comes with a magnitude")
        fresh = self._is_fresh()
        super().write_slot(slot, name, spec, a, b)
        self._fit_dora_storage()
        with torch.no_grad():
            if spec.use_dora:
                norm = self._weight_norm(self._a_stack[slot, : spec.r], self._b_stack[slot, :, : spec.r], spec.scale)
                self._magnitude[slot].copy_(norm if magnitude is None else magnitude)
                torch.div(self._magnitude[slot].to(norm.dtype), norm, out=self._row_scale[slot])
            else:
                self._magnitude[slot].zero_()
                self._row_scale[slot].fill_(1.0)
        self._dora_fresh = self._dora_state() if fresh else None

    def point(self, name: str, slot: int, requires_grad: bool = False) -> None:
        super().point(name, slot, requires_grad)
        params = self._modules["lora_magnitude_vector"]
        if self._book.specs[slot].use_dora:
            view = self._magnitude[slot]
            existing = params._parameters.get(name)
            if existing is not None:
                existing.data = view
            else:
                params[name] = nn.Parameter(view, requires_grad=requires_grad)
            self.dora_names.add(name)
        elif name in params:
            del params[name]
            self.dora_names.discard(name)
        self.has_dora = bool(self.dora_names)

    def forget(self, name: str) -> None:
        super().forget(name)
        if name in self.dora_names:
            del self.lora_magnitude_vector[name]
            self.dora_names.discard(name)
            self.has_dora = bool(self.dora_names)

    def clear_slot(self, slot: int) -> None:
        fresh = self._is_fresh()
        super().clear_slot(slot)
        if self._buffers["_magnitude"] is not None and slot < self._magnitude.shape[0]:
            with torch.no_grad():
                self._magnitude[slot].zero_()
                self._row_scale[slot].fill_(1.0)
        self._dora_fresh = self._dora_state() if fresh else None

    # -- the row scales g ----------------------------------------------------------------------
    def _weight_norm(self, a: Tensor, b: Tensor, scale: float) -> Tensor:
        w = self.base_layer.weight.detach()
        return ops.dora_weight_norm(w, a.detach().to(w.dtype), b.detach().to(w.dtype), scale)

    def _dora_state(self) -> Optional[tuple]:
        """Changes whenever W, the A/B stacks or the magnitudes are written or replaced."""
        w, mag = self.base_layer.weight, self._buffers["_magnitude"]
        if mag is None:
            return None
        return (w.data_ptr(), w._version, self._a_stack._version, self._b_stack._version, mag._version,
                mag.data_ptr())

    def _is_fresh(self) -> bool:
        return self._dora_fresh is not None and self._dora_fresh == self._dora_state()

    def refresh_row_scales(self) -> None:
        """Recompute every DoRA slot's ``g = m / ||W + s B A||`` from the current weights."""
        with torch.no_grad():
            for name in self.dora_names:
                slot, spec = self.manager.slot(name), self.specs[name]
                norm = self._weight_norm(self._a_stack[slot, : spec.r], self._b_stack[slot, :, : spec.r], spec.scale)
                torch.div(self._magnitude[slot].to(norm.dtype), norm, out=self._row_scale[slot])
        self._dora_fresh = self._dora_state()

    def row_scales_of(self, names: list[str], dtype: torch.dtype) -> Tensor:
        """Differentiable ``g`` of ``names`` ``[len(names), out]`` (1 for plain LoRA adapters
        and absent ones); the norm detached, as PEFT does."""
        rows = []
        for n in names:
            spec = self.specs.get(n)
            if n not in self.dora_names:
                rows.append(torch.ones(self.out_features, dtype=dtype, device=self.base_layer.weight.device))
                continue
            a, b = self.adapter_factors(n)
            norm = self._weight_norm(a, b, spec.scale)
            rows.append((self.lora_magnitude_vector[n] / norm).to(dtype))
        return torch.stack(rows)

    def reads_params(self, names, needs_grad: bool = False) -> bool:
        if torch.is_grad_enabled():  # a trainable magnitude needs the autograd routes too
            magnitudes = self._modules["lora_magnitude_vector"]._parameters
            if any(n in magnitudes and magnitudes[n].requires_grad for n in names):
                return True
        return super().reads_params(names, needs_grad)

    # -- forward routes --------------------------------------------------------------------------
    def forward(self, x: Tensor) -> Tensor:
        selection = self.manager.selection.active()
        if (
            selection is None
            or not self.has_dora
            or self.merge_record is not None
            or self._buffers["_a_stack"] is None
        ):
            return super().forward(x)
        if torch.compiler.is_compiling():
            return self.forward_dora_compiled(x, selection)
        if not any(n in self.dora_names for n in selection.used_names):
            return super().forward(x)  # LoRA adapters and base rows only: LoRA's routes
        reads_params = self.reads_params(selection.used_names)
        if not reads_params and not self._is_fresh():  # the routes below read the cached g
            self.refresh_row_scales()
        slot = selection.uniform_slot
        if not (
            self.dropout_active()
            or reads_params
            or (x.requires_grad and torch.is_grad_enabled())
            or x.dtype != self._a_stack.dtype
            or torch.is_autocast_enabled(x.device.type)
        ):
            return self.forward_dora_inplace(x, selection)
        if slot is not None:
            return self.forward_dora_one(x, slot)
        if reads_params:
            stacks = self.stack_params(selection.used_names, x.dtype)
            g = self.row_scales_of(selection.used_names, x.dtype)
            return self.forward_dora_rows(x, selection.row_index(x, compact=True), *stacks, g)
        return self.forward_dora_rows(x, selection.row_index(x), *self.slot_stacks(x.dtype), self._row_scale)

    def forward_dora_inplace(self, x: Tensor, selection: Selection) -> Tensor:
        """Inference: the bias-free base GEMM, then one ``multi_dora_add_`` for every row."""
        base = self._modules["base_layer"]
        y = F.linear(x, base.weight)
        buffers = self._buffers
        ops.multi_dora_add_(
            y.view(-1, self.out_features),
            x.reshape(-1, self.in_features),
            buffers["_a_stack"],
            buffers["_b_stack"],
            selection.row_index(x),
            buffers["_scales"],
            buffers["_ranks"],
            buffers["_row_scale"],
            base.bias,
        )
        return y

    def forward_dora_compiled(self, x: Tensor, selection: Selection) -> Tensor:
        # As LoRALinear.forward_compiled: inference reads tensors only (a swap keeps the graph).
        if self.reads_params(selection.used_names):
            index = expand_rows(selection.compact_rows.to(x.device), x)
            stacks = self.stack_params(selection.used_names, x.dtype)
            return self.forward_dora_rows(x, index, *stacks, self.row_scales_of(selection.used_names, x.dtype))
        index = expand_rows(selection.rows.to(x.device), x)
        return self.forward_dora_rows(x, index, *self.slot_stacks(x.dtype), self._row_scale)

    def forward_dora_one(self, x: Tensor, slot: int) -> Tensor:
        """One adapter for the whole batch, with autograd: ``lora_linear`` times ``g``."""
        name, _ = self.slot_adapter(slot)
        if name not in self.dora_names:
            return self.forward_one(x, slot)
        a, b, spec = self.one_adapter(x, slot)
        if self.reads_params([name]):
            g = self.row_scales_of([name], x.dtype)[0]
        else:  # read by slot: a pinned forward keeps the weights it started with
            g = self._row_scale[slot].to(x.dtype)
        weight, bias = self.base_layer.weight, self.base_layer.bias
        if not (self.training and spec.dropout > 0):
            y = ops.lora_linear(x, weight, None, a, b, spec.scale) * g
            return y if bias is None else y + bias
        # PEFT with dropout: W x + bias + (g - 1) W d(x) + g s B A d(x).
        x_drop = F.dropout(x, spec.dropout, training=True)
        base_drop = F.linear(x_drop, weight)
        return F.linear(x, weight, bias) + (ops.lora_linear(x_drop, weight, None, a, b, spec.scale) * g - base_drop)

    def forward_dora_rows(self, x, index, a_stack, b_stack, scales, ranks, dropout, row_scale) -> Tensor:
        """A mixed batch with autograd: ``multi_lora`` over the bias-free base, times each
        row's ``g`` (``row_scale[index]``, 1 for base rows), plus the bias."""
        x2 = x.reshape(-1, self.in_features)
        weight, bias = self.base_layer.weight, self.base_layer.bias
        g = torch.where((index >= 0)[:, None], row_scale[index.clamp(min=0).long()], 1.0).to(x.dtype)
        if self.dropout_active():
            x_drop = row_dropout(x2, index, dropout)
            base_drop = F.linear(x_drop, weight)
            out = ops.multi_lora(x_drop, a_stack, b_stack, index, scales, ranks, base_drop)
            y = F.linear(x2, weight, bias) + (g * out - base_drop)
        else:
            out = ops.multi_lora(x2, a_stack, b_stack, index, scales, ranks, F.linear(x2, weight))
            y = g * out if bias is None else torch.addcmul(bias, g, out)
        return y.reshape(*x.shape[:-1], self.out_features)

    # -- merging ---------------------------------------------------------------------------------
    def _merge_factor(self, name: str, a: Tensor, b: Tensor, scale: float) -> Tensor:
        """``g = m / ||W + s B A||`` of ``name`` against the current (unmerged) weight, fp32."""
        with torch.no_grad():
            norm = self._weight_norm(a, b, scale)
            return self.lora_magnitude_vector[name].detach().to(norm.dtype) / norm

    def merge_is_finite(self, name: str) -> bool:
        if name not in self.dora_names:
            return super().merge_is_finite(name)
        a, b, scale = self._merge_args(name)
        g = self._merge_factor(name, a, b, scale)
        w = self.base_layer.weight.detach()
        rows = max(1, _FINITE_BLOCK_ELEMENTS // max(w.shape[1], 1))
        with torch.no_grad():
            for r0 in range(0, w.shape[0], rows):
                block = w[r0 : r0 + rows].clone()
                ops.merge_(block, a, b[r0 : r0 + rows].contiguous(), scale)
                if not bool(torch.isfinite(block * g[r0 : r0 + rows, None].to(block.dtype)).all()):
                    return False
        return True

    def merge(self, name: str, exact: bool = True) -> None:
        """PEFT's DoRA merge, ``W' = g * (W + s B A)``; ``exact`` keeps the original weight
        so that :meth:`unmerge` restores it bit for bit."""
        if name not in self.dora_names:
            return super().merge(name, exact)
        a, b, scale = self._merge_args(name)
        if self.merge_record is not None:
            raise ValueError(f"adapter {self.merged_adapter!r} is already merged; unmerge it first")
        w = self.base_layer.weight
        g = self._merge_factor(name, a, b, scale)
        original = w.detach().clone() if exact else None
        with torch.no_grad():
            ops.merge_(w, a, b, scale)
            w.mul_(g[:, None].to(w.dtype))
        if exact:
            magnitude = self.lora_magnitude_vector[name].detach().clone()
            self.merge_record = DoraMergeRecord(
                name, original, a.clone(), b.clone(), magnitude, merge_maker(w), weight_state(w)
            )

    def check_unmerge(self) -> None:
        record = self.merge_record
        if not isinstance(record, DoraMergeRecord):
            return super().check_unmerge()
        a, b, _ = self._merge_args(record.name)
        check_unmerge(record, self.base_layer.weight, a, b)
        if not torch.equal(self.lora_magnitude_vector[record.name].detach(), record.magnitude):
            raise RuntimeError(
                f"adapter {record.name!r} is merged into this layer's weight, and its magnitude was "
                "modified while merged; it cannot be unmerged exactly"
            )

    def unmerge(self) -> None:
        record = self.merge_record
        if not isinstance(record, DoraMergeRecord):
            return super().unmerge()
        self.check_unmerge()
        with torch.no_grad():
            self.base_layer.weight.copy_(record.original)
        self.merge_record = None


register_variant_kind("dora", LoRALinear, DoRALinear)

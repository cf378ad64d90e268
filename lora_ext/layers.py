"""LoRA modules: :class:`LoRALinear` and the adapter selection it shares with its model.

Every adapter's ``A [r, in]`` and ``B [out, r]`` are ``nn.Parameter`` s (the source of
truth: optimizers and state dicts see them). For mixed-adapter batches each layer also
keeps them stacked, ``a_stack [N, R, in]`` / ``b_stack [N, out, R]`` (zero padded to the
largest rank R) with ``scales [N]`` and ``ranks [N]``, so that one ``multi_lora`` call
serves the whole batch; ``ranks`` makes the padding cost no work. The stacks are a cache,
rebuilt only when an adapter is added or removed or a parameter changes (in-place
updates bump a tensor's version counter), never per forward in inference. When
gradients are needed the stacks are rebuilt differentiably each forward instead, so
gradients of a mixed batch reach each adapter's parameters.

Which adapter a row uses lives on one :class:`_AdapterContext` shared by all LoRA layers
of a model; it turns the selection into the row-to-adapter index tensor once per input
shape and hands the same tensor to every layer.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import ops

AdapterNames = Union[Optional[str], Sequence[Optional[str]]]

_NAME_RE = re.compile(r"^[A-Za-z0-9_\-]+$")
# Distinct (input shape, layer layout) index tensors kept per selection.
_MAX_CACHED_INDICES = 64
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


class _Selection:
    """The adapter of each batch row, as global slots (-1 = base model)."""

    def __init__(self, names: AdapterNames, known: Sequence[str]):
        if names is None or isinstance(names, str):
            rows = [names]
            self.per_row = False
        else:
            rows = list(names)
            if not rows:
                raise ValueError("set_adapter: the list of per-row adapters is empty")
            self.per_row = True
        slots = []
        for name in rows:
            if name is None:
                slots.append(-1)
            elif name in known:
                slots.append(known.index(name))
            else:
                raise ValueError(f"unknown adapter {name!r}; loaded adapters: {list(known)}")
        self.names = rows
        self.slots = slots
        # One adapter (or none) for every row: served without an index tensor.
        self.uniform: Optional[str] = rows[0] if len(set(rows)) == 1 else None
        self.is_uniform = len(set(rows)) == 1


class _AdapterContext:
    """State shared by all LoRA layers of one model: adapter slots and the selection."""

    def __init__(self) -> None:
        self.names: list[str] = []  # global slot order
        self.generation = 0  # bumped when the slots change
        self.selection: Optional[_Selection] = None  # None: base model
        self._indices: dict = {}

    def add(self, name: str) -> None:
        if name not in self.names:
            self.names.append(name)  # existing slots keep their numbers
            self.generation += 1
            self._indices.clear()

    def remove(self, name: str) -> None:
        """Forget adapter ``name``; rows that used it fall back to the base model."""
        if name not in self.names:
            return
        old = self.selection
        self.names.remove(name)
        self.generation += 1
        self.selection = None
        self._indices.clear()
        if old is not None:
            names = [None if n == name else n for n in old.names]
            self.select(names if old.per_row else names[0])

    def select(self, names: AdapterNames) -> None:
        self.selection = None if names is None else _Selection(names, self.names)
        self._indices.clear()

    def row_indices(self, x: Tensor, lut: Optional[tuple[int, ...]]) -> Tensor:
        """int32 ``[tokens]`` local adapter index of every token row of ``x`` (-1: none).

        ``x`` is ``[batch, ..., in]``: every token of batch row b uses row b's adapter. A
        batch that is k times the selection (generate's ``num_beams``,
        ``num_return_sequences``) repeats each entry k times, as ``repeat_interleave`` does.
        ``lut`` maps global slots to the layer's own slots (None: identity).
        """
        batch = x.shape[0] if x.dim() > 1 else 1
        tokens = math.prod(x.shape[1:-1]) if x.dim() > 2 else 1
        key = (x.device, batch, tokens, lut)
        index = self._indices.get(key)
        if index is None:
            slots = self.selection.slots
            if batch % len(slots) != 0:
                raise ValueError(
                    f"the batch has {batch} rows but set_adapter was given {len(slots)} "
                    "per-row adapters (expected the same number, or a multiple for "
                    "num_beams / num_return_sequences)"
                )
            repeat = batch // len(slots)
            local = [s if lut is None or s < 0 else lut[s] for s in slots]
            index = torch.tensor(local, dtype=torch.int32).repeat_interleave(repeat * tokens)
            index = index.to(x.device)
            if len(self._indices) >= _MAX_CACHED_INDICES:
                self._indices.clear()
            self._indices[key] = index
        return index


class LoRALinear(nn.Module):
    """An ``nn.Linear`` with any number of named LoRA adapters.

    The wrapped layer is kept, untouched and frozen, as ``base_layer``. Adapter ``name``
    has ``lora_A[name]`` ``[r, in]`` and ``lora_B[name]`` ``[out, r]`` and adds
    ``scale * B @ A @ x`` with PEFT's ``scale = alpha / r`` (``alpha / sqrt(r)`` with
    rsLoRA). Which adapter each batch row uses is chosen model-wide with
    :func:`lora_ext.set_adapter`; a batch on one adapter runs ``lora_linear``, a mixed
    batch one ``multi_lora``.
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
        self._context = context if context is not None else _AdapterContext()
        self._layout_version = 0
        self._lut_key: tuple = ()
        self._lut: Optional[tuple[int, ...]] = None
        self._stack_key: tuple = ()
        self._stack: Optional[tuple[Tensor, Tensor, Tensor, Tensor, Tensor]] = None
        self._merged: Optional[dict] = None

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
        w = self.base_layer.weight
        a = torch.empty(spec.r, self.in_features, device=w.device, dtype=w.dtype)
        if init == "gaussian":
            nn.init.normal_(a, std=1.0 / spec.r)
        else:
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        b = torch.zeros(self.out_features, spec.r, device=w.device, dtype=w.dtype)
        self.lora_A[name] = nn.Parameter(a)
        self.lora_B[name] = nn.Parameter(b)
        self.specs[name] = spec
        self._layout_changed()
        self._context.add(name)

    def delete_adapter(self, name: str) -> None:
        if name not in self.specs:
            raise ValueError(f"adapter {name!r} is not in this layer")
        if self.merged_adapter == name:
            raise ValueError(f"adapter {name!r} is merged; unmerge it before deleting it")
        del self.lora_A[name]
        del self.lora_B[name]
        del self.specs[name]
        self._layout_changed()

    def _layout_changed(self) -> None:
        self._layout_version += 1
        self._stack = None
        self._stack_key = ()

    def _local_lut(self) -> Optional[tuple[int, ...]]:
        """Global slot -> this layer's slot (-1 where absent); None when identical."""
        key = (self._context.generation, self._layout_version)
        if key != self._lut_key:
            local = list(self.specs)
            lut = tuple(local.index(n) if n in self.specs else -1 for n in self._context.names)
            self._lut = None if lut == tuple(range(len(lut))) and len(lut) == len(local) else lut
            self._lut_key = key
        return self._lut

    # -- stacks ----------------------------------------------------------------------
    def stacks(self, dtype: Optional[torch.dtype] = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``(a_stack [N, R, in], b_stack [N, out, R], scales [N] fp32, ranks [N] int32)``.

        In this layer's adapter order (:attr:`adapter_names`), zero padded to the largest
        rank R. Cached; differentiable (rebuilt per call) when grad mode is on and an
        adapter parameter requires grad.
        """
        if not self.specs:
            raise ValueError("this layer has no adapters")
        dtype = dtype or self.base_layer.weight.dtype
        return self._stacks(dtype)[:4]

    a_stack = property(lambda self: self.stacks()[0])
    b_stack = property(lambda self: self.stacks()[1])
    scales = property(lambda self: self.stacks()[2])
    ranks = property(lambda self: self.stacks()[3])

    def _needs_grad(self) -> bool:
        return torch.is_grad_enabled() and any(
            p.requires_grad for d in (self.lora_A, self.lora_B) for p in d.values()
        )

    def _stacks(self, dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """The four stacks plus the per-adapter dropout probabilities ``[N]`` fp32."""
        if self._needs_grad():
            return self._build_stacks(dtype)
        key = (dtype, self._layout_version) + tuple(
            (p._version, p.data_ptr()) for d in (self.lora_A, self.lora_B) for p in d.values()
        )
        if self._stack is None or key != self._stack_key:
            with torch.no_grad():
                self._stack = self._build_stacks(dtype)
            self._stack_key = key
        return self._stack

    def _build_stacks(self, dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        names = list(self.specs)
        rmax = max(s.r for s in self.specs.values())
        a_stack = torch.stack(
            [F.pad(self.lora_A[n].to(dtype), (0, 0, 0, rmax - self.specs[n].r)) for n in names]
        )
        b_stack = torch.stack(
            [F.pad(self.lora_B[n].to(dtype), (0, rmax - self.specs[n].r)) for n in names]
        )
        device = a_stack.device
        specs = [self.specs[n] for n in names]
        scales = torch.tensor([s.scale for s in specs], dtype=torch.float32, device=device)
        ranks = torch.tensor([s.r for s in specs], dtype=torch.int32, device=device)
        dropout = torch.tensor([s.dropout for s in specs], dtype=torch.float32, device=device)
        return a_stack, b_stack, scales, ranks, dropout

    # -- forward -----------------------------------------------------------------------
    def forward(self, x: Tensor) -> Tensor:
        w, bias = self.base_layer.weight, self.base_layer.bias
        selection = self._context.selection
        if selection is None or not self.specs:
            return F.linear(x, w, bias)
        if self._merged is not None:
            if selection.is_uniform and selection.uniform in (None, self._merged["name"]):
                return F.linear(x, w, bias)
            raise RuntimeError(
                f"adapter {self._merged['name']!r} is merged into the weights; call "
                "unmerge_adapter before selecting other adapters or a mixed batch"
            )
        if selection.is_uniform:
            name = selection.uniform
            if name is None or name not in self.specs:
                return F.linear(x, w, bias)
            return self._forward_one(x, name)
        return self._forward_mixed(x, self._context.row_indices(x, self._local_lut()))

    def _forward_one(self, x: Tensor, name: str) -> Tensor:
        spec = self.specs[name]
        a = self.lora_A[name].to(x.dtype)
        b = self.lora_B[name].to(x.dtype)
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

    def _forward_mixed(self, x: Tensor, index: Tensor) -> Tensor:
        a_stack, b_stack, scales, ranks, dropout = self._stacks(x.dtype)
        x2 = x.reshape(-1, self.in_features)
        base = F.linear(x2, self.base_layer.weight, self.base_layer.bias)
        x_lora = x2
        if self.training and any(s.dropout > 0 for s in self.specs.values()):
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
            "versions": self._param_versions(name),
        }

    def _param_versions(self, name: str) -> tuple:
        return tuple((p._version, p.data_ptr()) for p in (self.lora_A[name], self.lora_B[name]))

    def check_unmerge(self) -> None:
        """Raise if the merged adapter's parameters changed since the merge."""
        if self._merged is not None and self._param_versions(self._merged["name"]) != self._merged["versions"]:
            raise RuntimeError(
                f"adapter {self._merged['name']!r} was modified while merged; it cannot be "
                "unmerged exactly"
            )

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

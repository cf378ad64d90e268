"""LoRA on a mixture of experts' fused expert weights.

transformers keeps a MoE layer's experts as 3-D parameters of one module
(``Qwen3MoeExperts``, ``OlmoeExperts``: ``gate_up_proj [E, 2I, H]``, ``down_proj [E, H, I]``;
``GptOssExperts``: ``gate_up_proj [E, H, 2I]``, ``down_proj [E, I, H]`` plus biases, its own
clamped, interleaved gate). PEFT adapts them with ``target_parameters`` (one LoRA per
parameter, one ``[r, in]`` / ``[out, r]`` block per expert). Here:

- An experts module is recognised by what it holds, not by its class
  (:func:`experts_layout`): 3-D ``gate_up_proj`` and ``down_proj`` with a common expert
  count; the layout comes from transformers' ``is_transposed`` flag when it sets one, else
  from the shapes; ``*_bias`` parameters are added when present; the activation is the
  module's own ``_apply_gate`` when it has one (GPT-OSS), else ``act_fn`` on the two halves.
- Each adapted parameter is an :class:`ExpertsProjection`, a small kind on the shared
  slot storage (:class:`~lora_ext.storage.AdapterLayer`) whose adapters carry one block per
  expert (``factor_shapes``: A ``[E, r, in]``, B ``[E, out, r]``), so its stacks are
  ``[C, E, R, in]`` and ``[C, E, out, R]`` and the model's slots, lifecycle, selection
  and pool serve it unchanged. A plan names it ``<experts path>.<parameter>``
  (``lifecycle.register_parameter_kind``).
- :class:`LoRAExperts` replaces the experts module (kept untouched as ``base_layer``) and
  re-implements its loop: the routed (token, expert) pairs sorted by expert once, the base
  GEMMs per expert as transformers does them, and each projection's adapters added by one
  :func:`~lora_ext.ops.moe_lora` call over all pairs (grouped by expert and adapter in
  C++; no expert's weight update is formed). Router, shared experts and attention are
  untouched, so adapters on attention (``LoRALinear``) and experts mix in one model and
  one ``set_adapter(model, [per-row names])``.

Dropout is not applied on expert adapters (PEFT refuses it there too).
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
from .lifecycle import AdapterManager, register_parameter_kind
from .merging import MergeRecord, check_unmerge, merge_exact, merge_is_finite, unmerge_exact
from .storage import AdapterLayer

PROJECTIONS = ("gate_up_proj", "down_proj")


@dataclass(frozen=True)
class ExpertsLayout:
    """Shapes of a fused experts module: ``transposed``: weights are ``[E, in, out]``
    (``x @ W[e]``) rather than ``[E, out, in]`` (``F.linear(x, W[e])``)."""

    num_experts: int
    hidden: int
    intermediate: int
    transposed: bool

    def features(self, parameter: str) -> tuple[int, int]:
        """``(in, out)`` of one expert of ``parameter``."""
        if parameter == "gate_up_proj":
            return self.hidden, 2 * self.intermediate
        return self.intermediate, self.hidden


def experts_layout(module: nn.Module) -> Optional[ExpertsLayout]:
    """The layout of a fused experts module (None: ``module`` is not one)."""
    params = module._parameters
    gate_up, down = params.get("gate_up_proj"), params.get("down_proj")
    if gate_up is None or down is None or gate_up.dim() != 3 or down.dim() != 3:
        return None
    if gate_up.shape[0] != down.shape[0]:
        return None
    e, g1, g2 = gate_up.shape
    _, d1, d2 = down.shape
    plain = g1 % 2 == 0 and g2 == d1 and d2 == g1 // 2  # [E, 2I, H], [E, H, I]
    transposed = g2 % 2 == 0 and g1 == d2 and d1 == g2 // 2  # [E, H, 2I], [E, I, H]
    flag = getattr(module, "is_transposed", None)
    if isinstance(flag, bool):
        if (transposed if flag else plain) is False:
            return None
        is_transposed = flag
    elif plain == transposed:  # neither, or ambiguous (H == I)
        return None
    else:
        is_transposed = transposed
    if is_transposed:
        return ExpertsLayout(e, g1, g2 // 2, True)
    return ExpertsLayout(e, g2, g1 // 2, False)


def adapted_parameters(module: nn.Module) -> tuple[str, ...]:
    """The parameters of ``module`` that take expert adapters (none: not an experts module)."""
    return PROJECTIONS if experts_layout(module) is not None else ()


def _factors_problem(expected, a: Tensor, b: Tensor) -> Optional[str]:
    expected_a, expected_b = expected
    if tuple(a.shape) != expected_a or tuple(b.shape) != expected_b:
        return (
            f"expects lora_A {list(expected_a)} and lora_B {list(expected_b)} "
            f"([experts, r, in] / [experts, out, r]), got {list(a.shape)} and {list(b.shape)}"
        )
    return None


class ExpertsProjection(AdapterLayer):
    """Adapters on one fused expert parameter: per adapter ``lora_A [E, r, in]`` and
    ``lora_B [E, out, r]`` (expert e adds ``scale * B[e] @ A[e] @ x`` to its projection)."""

    def __init__(self, experts: nn.Module, parameter: str, layout: ExpertsLayout, manager: AdapterManager):
        super().__init__(manager)
        self.parameter = parameter
        self.layout = layout
        self.num_experts = layout.num_experts
        self.in_features, self.out_features = layout.features(parameter)
        self._owner = (experts,)  # not a child: LoRAExperts holds it as base_layer
        self.merge_name: Optional[str] = None
        self.merge_records: Optional[list[MergeRecord]] = None  # per expert; None: not exact

    @property
    def weight(self) -> Tensor:
        """The base parameter (``[E, out, in]``, or ``[E, in, out]`` when transposed)."""
        return self._owner[0]._parameters[self.parameter]

    @property
    def bias(self) -> Optional[Tensor]:
        return self._owner[0]._parameters.get(self.parameter + "_bias")

    def adapter_options(self) -> dict:
        w = self.weight
        return dict(device=w.device, dtype=w.dtype)

    def factor_shapes(self, r: int):
        e = self.num_experts
        return (e, r, self.in_features), (e, self.out_features, r)

    @classmethod
    def weights_problem(cls, module, a: Tensor, b: Tensor, r: int) -> Optional[str]:
        return _factors_problem(module.factor_shapes(r), a, b)

    def extra_repr(self) -> str:
        adapters = ", ".join(f"{n}(r={s.r})" for n, s in self.specs.items())
        return (
            f"{self.parameter}: experts={self.num_experts}, in_features={self.in_features}, "
            f"out_features={self.out_features}, adapters=[{adapters}]"
        )

    # -- merging: expert by expert, each slice [out, in] (or [in, out]) as LoRALinear's weight --
    @property
    def merged_adapter(self) -> Optional[str]:
        return self.merge_name

    def merge_refusal(self) -> Optional[str]:
        return None

    def unload_target(self, path: str) -> tuple[str, nn.Module]:
        """Unloading puts the plain experts module back where the LoRAExperts wrapper is."""
        return path.rpartition(".")[0], self._owner[0]

    def _expert_factors(self, name: str) -> list[tuple[Tensor, Tensor, Tensor]]:
        """Per expert ``(weight slice, a, b)`` with ``slice += scale * b @ a``."""
        if name not in self.specs:
            raise ValueError(f"adapter {name!r} is not in this layer")
        w = self.weight.detach()
        a, b = (p.detach().to(w.dtype) for p in (self.lora_A[name], self.lora_B[name]))
        if self.layout.transposed:  # W[e] is [in, out]: += scale * A[e]^T B[e]^T
            return [(w[e], b[e].T.contiguous(), a[e].T.contiguous()) for e in range(self.num_experts)]
        return [(w[e], a[e].contiguous(), b[e].contiguous()) for e in range(self.num_experts)]

    def merge_is_finite(self, name: str) -> bool:
        scale = self.specs[name].scale
        return all(merge_is_finite(w, a, b, scale) for w, a, b in self._expert_factors(name))

    def merge(self, name: str, exact: bool = True) -> None:
        """Add adapter ``name`` into every expert's weight; ``exact`` keeps per-expert
        records (:mod:`lora_ext.merging`) so :meth:`unmerge` restores the bits."""
        factors = self._expert_factors(name)
        if self.merge_name is not None:
            raise ValueError(f"adapter {self.merge_name!r} is already merged; unmerge it first")
        scale = self.specs[name].scale
        if not exact:
            with torch.no_grad():
                for w, a, b in factors:
                    ops.merge_(w, a, b, scale)
            return
        records = [merge_exact(w, name, a, b, scale) for w, a, b in factors]
        for record, (w, _, _) in zip(records, factors):  # the slices share one version counter
            record.refresh_weight_state(w)
        self.merge_name, self.merge_records = name, records

    def check_unmerge(self) -> None:
        if self.merge_records is not None:
            for record, (w, a, b) in zip(self.merge_records, self._expert_factors(self.merge_name)):
                check_unmerge(record, w, a, b)

    def unmerge(self) -> None:
        if self.merge_records is None:
            return
        self.check_unmerge()  # every expert before any is written
        scale = self.specs[self.merge_name].scale
        for record, (w, a, b) in zip(self.merge_records, self._expert_factors(self.merge_name)):
            record.refresh_weight_state(w)  # the previous expert's unmerge bumped the shared counter
            unmerge_exact(record, w, a, b, scale)
        self.merge_name = self.merge_records = None

    def forget_merge(self) -> None:
        self.merge_name = self.merge_records = None

    # -- forward pieces (LoRAExperts calls these) ------------------------------------------
    def forward_base(self, x: Tensor, counts: list[int]) -> Tensor:
        """Each expert's base projection of its rows (``x`` sorted by expert, ``counts``
        rows per expert), one GEMM per expert as transformers does."""
        w, bias = self.weight, self.bias
        outs, start = [], 0
        for e, n in enumerate(counts):
            if n == 0:
                continue
            rows = x[start : start + n]
            y = rows @ w[e] if self.layout.transposed else F.linear(rows, w[e])
            outs.append(y if bias is None else y + bias[e])
            start += n
        if not outs:
            return x.new_zeros(0, self.out_features)
        return torch.cat(outs) if len(outs) > 1 else outs[0]

    def add_adapters(self, y: Tensor, x: Tensor, experts: Tensor, pair_tokens: Tensor, tokens: Tensor, selection) -> Tensor:
        """``y`` plus every pair's adapter update. ``pair_tokens``: each pair's token row,
        ``tokens``: the experts module's input (the selection's rows are its rows)."""
        buffers = self._buffers
        if buffers["_a_stack"] is None:
            return y
        slot = selection.uniform_slot
        if slot is not None and (slot < 0 or self.slot_adapter(slot)[1] is None):
            return y
        if not (
            self.reads_params(selection.used_names, needs_grad=x.requires_grad)
            or x.dtype != buffers["_a_stack"].dtype
            or torch.is_autocast_enabled(x.device.type)
        ):
            adapters = selection.row_index(tokens)[pair_tokens]
            ops.moe_lora_add_(y, x, buffers["_a_stack"], buffers["_b_stack"], experts, adapters,
                              buffers["_scales"], buffers["_ranks"])
            return y
        if self.reads_params(selection.used_names):
            a, b, scales, ranks, _ = self.stack_params(selection.used_names, x.dtype)
            adapters = selection.row_index(tokens, compact=True)[pair_tokens]
        else:
            a, b, scales, ranks, _ = self.slot_stacks(x.dtype)
            adapters = selection.row_index(tokens)[pair_tokens]
        return ops.moe_lora(x, a, b, experts, adapters, scales, ranks, y)


class LoRAExperts(nn.Module):
    """A fused experts module with adapters on ``gate_up_proj`` and ``down_proj``.

    Called as the experts module is: ``(hidden_states [T, H], top_k_index [T, K],
    top_k_weights [T, K]) -> [T, H]``. With no adapter selected (or none here) it calls
    the wrapped module itself.
    """

    def __init__(self, experts: nn.Module, manager: AdapterManager):
        super().__init__()
        layout = experts_layout(experts)
        if layout is None:
            raise TypeError(f"{type(experts).__name__} holds no fused gate_up_proj/down_proj experts")
        self.base_layer = experts
        for p in experts.parameters():
            p.requires_grad_(False)
        self.layout = layout
        self.num_experts = layout.num_experts
        for parameter in PROJECTIONS:
            self.add_module(parameter, ExpertsProjection(experts, parameter, layout, manager))

    @classmethod
    def weights_problem(cls, experts: nn.Module, parameter: str, a: Tensor, b: Tensor, r: int) -> Optional[str]:
        """Why ``(a, b)`` do not fit ``parameter`` of the plain ``experts`` (None: they do)."""
        layout = experts_layout(experts)
        fan_in, fan_out = layout.features(parameter)
        e = layout.num_experts
        return _factors_problem(((e, r, fan_in), (e, fan_out, r)), a, b)

    @property
    def manager(self) -> AdapterManager:
        return self.gate_up_proj.manager

    def activation(self, gate_up: Tensor) -> Tensor:
        base = self.base_layer
        if hasattr(base, "_apply_gate"):  # GPT-OSS: interleaved, clamped
            return base._apply_gate(gate_up)
        gate, up = gate_up.chunk(2, dim=-1)
        return base.act_fn(gate) * up

    def forward(self, hidden_states: Tensor, top_k_index: Tensor, top_k_weights: Tensor) -> Tensor:
        selection = self.manager.selection.active()
        projections = (self.gate_up_proj, self.down_proj)
        if selection is None or all(p._buffers["_a_stack"] is None for p in projections):
            return self.base_layer(hidden_states, top_k_index, top_k_weights)
        merged = {p.merge_name for p in projections} - {None}
        if merged:
            if selection.is_uniform and selection.names[0] in (None, *merged):
                return self.base_layer(hidden_states, top_k_index, top_k_weights)
            raise RuntimeError(
                f"adapter {merged.pop()!r} is merged into the experts' weights; call "
                "unmerge_adapter before selecting other adapters or a mixed batch"
            )
        if selection.uniform_slot is not None and all(
            p._buffers["_a_stack"] is None or selection.uniform_slot < 0 or p.slot_adapter(selection.uniform_slot)[1] is None
            for p in projections
        ):
            return self.base_layer(hidden_states, top_k_index, top_k_weights)
        num_experts, top_k = self.num_experts, top_k_index.shape[-1]
        flat = top_k_index.reshape(-1)
        # The routed pairs sorted by expert, once; an index E (some routers' "no expert") sorts last and is dropped.
        order = torch.argsort(flat, stable=True)
        counts = torch.bincount(flat, minlength=num_experts + 1)[:num_experts].tolist()
        order = order[: sum(counts)]
        experts = flat[order]
        pair_tokens = order // top_k
        x = hidden_states[pair_tokens]
        h = self.gate_up_proj.forward_base(x, counts)
        h = self.gate_up_proj.add_adapters(h, x, experts, pair_tokens, hidden_states, selection)
        h = self.activation(h)
        y = self.down_proj.forward_base(h, counts)
        y = self.down_proj.add_adapters(y, h, experts, pair_tokens, hidden_states, selection)
        y = y * top_k_weights.reshape(-1)[order, None]
        out = torch.zeros_like(hidden_states)
        return out.index_add_(0, pair_tokens, y.to(out.dtype))


register_parameter_kind(adapted_parameters, LoRAExperts)


# -- PEFT's file layouts -----------------------------------------------------------------------
# PEFT's target_parameters keys: one ParamWrapper per parameter, nested in the module's
# parameter order (the first adapted parameter innermost): with k adapted parameters of one
# experts module, the j-th one's keys carry k-1-j ".base_layer". Its lora_A is
# [r * E, in] (expert-major rows), its lora_B [out, r * E] (expert-minor columns).


def _experts_at(by_path: dict, path: str) -> Optional[nn.Module]:
    module = by_path.get(path)
    if isinstance(module, LoRAExperts):
        return module.base_layer
    return module if module is not None and experts_layout(module) is not None else None


def _targeted(experts: nn.Module, path: str, target_parameters) -> list[str]:
    """The parameters of ``experts`` (at ``path``) PEFT's ``target_parameters`` select, in module order."""
    out = []
    for name in PROJECTIONS + tuple(n for n in experts._parameters if n not in PROJECTIONS):
        key = f"{path}.{name}"
        if any(key == t or key.endswith("." + t) for t in target_parameters):
            out.append(name)
    return [n for n in experts._parameters if n in out]


def from_peft_pairs(pairs: dict, config: dict, by_path: dict, where: str) -> tuple[dict, dict]:
    """``pairs`` (module path -> {"lora_A", "lora_B"}) with expert entries renamed
    ``<experts>.<parameter>`` and reshaped to ``[E, r, in]`` / ``[E, out, r]``: PEFT's
    target_parameters layout, and the per-expert one (``experts.<i>.gate_proj`` /
    ``up_proj`` / ``down_proj``, or Mixtral's ``w1`` / ``w3`` / ``w2``). Also returns
    path -> ``(r, alpha)`` where the file's own do not apply (a fused gate_up has rank 2r)."""
    targets = config.get("target_parameters") or []
    if isinstance(targets, str):
        targets = [targets]
    pairs, overrides = _from_per_expert(pairs, config, by_path, where)
    out = {}
    for path, pair in pairs.items():
        host, depth = path, 0
        while host.endswith(".base_layer"):  # PEFT's nesting, not a module path of ours
            host, depth = host[: -len(".base_layer")], depth + 1
        experts = _experts_at(by_path, host)
        if experts is None or not targets:
            out[path] = pair
            continue
        names = _targeted(experts, host, targets)
        if depth >= len(names):
            raise ValueError(
                f"{where}: {path} does not match target_parameters {targets!r} (the module's "
                f"adapted parameters: {names})"
            )
        parameter = names[len(names) - 1 - depth]
        if parameter not in PROJECTIONS:
            raise ValueError(f"{where}: LoRA on {host}.{parameter} is not supported (only {', '.join(PROJECTIONS)})")
        e = experts_layout(experts).num_experts
        a, b = pair.get("lora_A"), pair.get("lora_B")
        if a is None or b is None:
            out[f"{host}.{parameter}"] = pair  # reported by the caller
            continue
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] % e or b.shape[1] != a.shape[0]:
            raise ValueError(
                f"{where}: {host}.{parameter}: expected PEFT's expert layout lora_A [r * {e}, in] "
                f"and lora_B [out, r * {e}] for {e} experts, got {list(a.shape)} and {list(b.shape)}"
            )
        r = a.shape[0] // e
        out[f"{host}.{parameter}"] = {
            "lora_A": a.reshape(e, r, a.shape[1]),
            "lora_B": b.reshape(b.shape[0], r, e).permute(2, 0, 1),
        }
    return out, overrides


_PER_EXPERT = re.compile(r"^(.*)\.(\d+)\.(gate_proj|up_proj|down_proj|w1|w3|w2)$")
_ROLE = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}


def _from_per_expert(pairs: dict, config: dict, by_path: dict, where: str) -> tuple[dict, dict]:
    """Per-expert keys gathered into ``<experts>.gate_up_proj`` / ``.down_proj`` entries.

    gate and up of one expert become one rank-2r adapter on the fused weight: A stacks
    ``[A_gate; A_up]``, B is block-diagonal, its rows placed as the module lays gate and
    up out (two halves, or interleaved when ``is_concatenated`` is False: GPT-OSS); alpha
    is scaled so that the scale stays the file's.
    """
    groups: dict[str, dict[str, dict[int, dict]]] = {}
    rest = {}
    for path, pair in pairs.items():
        m = _PER_EXPERT.match(path)
        if m is None or _experts_at(by_path, m[1]) is None:
            rest[path] = pair
            continue
        groups.setdefault(m[1], {}).setdefault(_ROLE.get(m[3], m[3]), {})[int(m[2])] = pair
    overrides = {}
    r_default, alpha_default = config.get("r", 8), config.get("lora_alpha", 8)
    rslora = bool(config.get("use_rslora", False))
    for host, roles in groups.items():
        experts = _experts_at(by_path, host)
        e = experts_layout(experts).num_experts
        for role, per in roles.items():
            missing = sorted(set(range(e)) - set(per))
            extra = sorted(set(per) - set(range(e)))
            if missing or extra:
                raise ValueError(
                    f"{where}: {host} has {e} experts, but the file's {role} adapters are for experts "
                    f"{sorted(per)[:8]}{' ...' if len(per) > 8 else ''} (missing {missing[:8]}, extra {extra[:8]})"
                )
            for i, pair in per.items():
                if set(pair) != {"lora_A", "lora_B"}:
                    raise ValueError(f"{where}: {host}.{i}.{role} needs lora_A and lora_B")

        def stacked(role, which):
            try:
                return torch.stack([roles[role][i][which] for i in range(e)])
            except RuntimeError as err:
                raise ValueError(f"{where}: {host}: the experts' {role} {which} shapes differ: {err}") from None

        if "down_proj" in roles:
            rest[f"{host}.down_proj"] = {"lora_A": stacked("down_proj", "lora_A"), "lora_B": stacked("down_proj", "lora_B")}
        if ("gate_proj" in roles) != ("up_proj" in roles):
            raise ValueError(f"{where}: {host}: the fused gate_up_proj needs adapters on both gate_proj and up_proj")
        if "gate_proj" in roles:
            a_gate, a_up = stacked("gate_proj", "lora_A"), stacked("up_proj", "lora_A")
            b_gate, b_up = stacked("gate_proj", "lora_B"), stacked("up_proj", "lora_B")
            if a_gate.shape != a_up.shape or b_gate.shape != b_up.shape or a_gate.dim() != 3 or b_gate.dim() != 3:
                raise ValueError(f"{where}: {host}: gate_proj and up_proj adapters must have the same shapes")
            r, width = a_gate.shape[1], b_gate.shape[1]
            b = b_gate.new_zeros(e, 2 * width, 2 * r)
            if getattr(experts, "is_concatenated", True) is False:
                b[:, 0::2, :r], b[:, 1::2, r:] = b_gate, b_up
            else:
                b[:, :width, :r], b[:, width:, r:] = b_gate, b_up
            rest[f"{host}.gate_up_proj"] = {"lora_A": torch.cat([a_gate, a_up], dim=1), "lora_B": b}
            alpha = float(alpha_default) * (math.sqrt(2) if rslora else 2.0)
            overrides[f"{host}.gate_up_proj"] = (2 * int(r_default), alpha)
    return rest, overrides


def to_peft(path: str, layer: ExpertsProjection, a: Tensor, b: Tensor, adapted: list[str]) -> dict:
    """PEFT's keys and shapes for ``layer``'s ``(a [E, r, in], b [E, out, r])``; ``adapted``:
    the parameters of its experts module that this adapter adapts (they nest in that order)."""
    host = path.rpartition(".")[0]
    order = [n for n in layer._owner[0]._parameters if n in adapted]
    depth = len(order) - 1 - order.index(layer.parameter)
    prefix = host + ".base_layer" * depth
    e, r = a.shape[0], a.shape[1]
    return {
        f"{prefix}.lora_A.weight": a.reshape(e * r, a.shape[2]),
        f"{prefix}.lora_B.weight": b.permute(1, 2, 0).reshape(b.shape[1], r * e),
    }

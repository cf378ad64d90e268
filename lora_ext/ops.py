"""Typed Python face of the lora_ext operators: wrappers, fake kernels, autograd.

Shapes follow PyTorch's ``[out, in]`` weight layout and PEFT's LoRA layout:
``lora_a`` is ``[r, in]`` and ``lora_b`` is ``[out, r]``, so the update is
``delta_W = scale * lora_b @ lora_a``.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

_ops = torch.ops.lora_ext


def lora_linear(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    lora_a: Tensor,
    lora_b: Tensor,
    scale: float,
) -> Tensor:
    """``x @ weight.T + bias + scale * (x @ lora_a.T) @ lora_b.T``, fused.

    x: ``[..., in]``; weight: ``[out, in]``; bias: ``[out]`` or None;
    lora_a: ``[r, in]``; lora_b: ``[out, r]``. Returns ``[..., out]``.
    Differentiable w.r.t. every tensor argument. (The op also returns ``x @ lora_a.T``
    in fp32, which its backward reuses; this wrapper returns the output only.)

    Bit for bit, the result is ``F.linear(x, weight, bias)`` followed by
    :func:`multi_lora_add_` of this adapter: what a serving path computes, so training and
    serving agree (RELIABILITY.md, "Exactness"). Under
    ``torch.use_deterministic_algorithms(True)`` the LoRA part of each row (forward and
    backward) does not depend on the rest of the batch; the base GEMM is ATen's.
    """
    return _ops.lora_linear.default(x, weight, bias, lora_a, lora_b, float(scale))[0]


def multi_lora(
    x: Tensor,
    a_stack: Tensor,
    b_stack: Tensor,
    indices: Tensor,
    scales: Tensor,
    ranks: Optional[Tensor] = None,
    base: Optional[Tensor] = None,
) -> Tensor:
    """A different adapter per row: the batched multi-adapter gather.

    x: ``[T, in]``; a_stack: ``[N, R, in]``; b_stack: ``[N, out, R]``;
    indices: ``[T]`` int32/int64 in ``[-1, N)``; scales: ``[N]`` float;
    ranks: ``[N]`` int with ``1 <= ranks[i] <= R`` (None: all R);
    base: ``[T, out]`` or None (zeros). Returns ``[T, out]`` where row t with
    ``i = indices[t] >= 0`` is
    ``base[t] + scales[i] * (x[t] @ a_stack[i, :ranks[i]].T) @ b_stack[i, :, :ranks[i]].T``
    and a row with -1 is ``base[t]``. Differentiable w.r.t. x, a_stack, b_stack, base.

    Under ``torch.use_deterministic_algorithms(True)`` each row's result (and its
    gradient w.r.t. x) is the same bits whatever else is in the batch: other adapters,
    how many rows share its adapter, T, the thread count; the weight gradients are the
    same on every run. That mode costs up to about a third more for decode batches of
    one row per adapter (BENCHMARKS.md, "Issue 19").
    """
    return _ops.multi_lora.default(x, a_stack, b_stack, indices, scales, ranks, base)


def multi_lora_add_(
    y: Tensor,
    x: Tensor,
    a_stack: Tensor,
    b_stack: Tensor,
    indices: Tensor,
    scales: Tensor,
    ranks: Optional[Tensor] = None,
) -> None:
    """In place, :func:`multi_lora` added into ``y``: no output is allocated.

    y: ``[T, out]`` with unit column stride and row stride ``>= out``, so a column
    slice of a wider output (``y_full[:, o0:o0 + out]``) is updated where it lies.
    Row t with ``i = indices[t] >= 0`` gets
    ``y[t] += scales[i] * (x[t] @ a_stack[i, :ranks[i]].T) @ b_stack[i, :, :ranks[i]].T``
    (fp32 accumulation, rounded once); rows with -1 are not touched. The other
    arguments are as for :func:`multi_lora`, and so is the deterministic mode. y must not
    share memory with any input (refused). On any error y is left unchanged.
    """
    _multi_lora_add(y, x, a_stack, b_stack, indices, scales, ranks)
    _increment_version(y)


# Looked up once: it runs for every LoRA layer of every inference forward.
_multi_lora_add = _ops.multi_lora_add_.default
# The in-place ops have no ADInplaceOrView kernel, so the dispatcher does not bump the
# version counter of what they mutate: done here, after success, so that autograd (and
# LoRALinear's merge record) see the write.
_increment_version = torch.autograd.graph.increment_version


def merge_(weight: Tensor, lora_a: Tensor, lora_b: Tensor, scale: float) -> None:
    """In place, ``weight += scale * lora_b @ lora_a`` in one pass, fp32 accumulation.

    weight: ``[out, in]`` (contiguous); lora_a: ``[r, in]``; lora_b: ``[out, r]``.
    On any error weight is left unchanged.
    """
    _ops.merge_.default(weight, lora_a, lora_b, float(scale))
    _increment_version(weight)


def unmerge_(weight: Tensor, lora_a: Tensor, lora_b: Tensor, scale: float) -> None:
    """In place, ``weight -= scale * lora_b @ lora_a``; the inverse of :func:`merge_`."""
    _ops.unmerge_.default(weight, lora_a, lora_b, float(scale))
    _increment_version(weight)


def merge_exact_(
    weight: Tensor, lora_a: Tensor, lora_b: Tensor, scale: float, residual: Tensor
) -> tuple[Tensor, Tensor]:
    """:func:`merge_` that also records how to undo it bit for bit.

    residual: int8 ``[out, in]``, written with a per-element correction. Returns
    ``(overflow_index, overflow_values)``: flat indices and original values of the
    (rare) elements whose correction does not fit in int8.
    """
    overflow = _ops.merge_exact_.default(weight, lora_a, lora_b, float(scale), residual)
    _increment_version(weight)
    _increment_version(residual)
    return overflow


def unmerge_exact_(
    weight: Tensor,
    lora_a: Tensor,
    lora_b: Tensor,
    scale: float,
    residual: Tensor,
    overflow_index: Tensor,
    overflow_values: Tensor,
) -> None:
    """Undo :func:`merge_exact_`, restoring every element of weight bit for bit.

    Refuses, writing nothing, a weight, factors, scale, residual or overflow list that do
    not match the merge (the overflow list must be the one merge_exact_ returned: entries
    only where residual is -128, none twice; its order does not matter).
    """
    _ops.unmerge_exact_.default(
        weight, lora_a, lora_b, float(scale), residual, overflow_index, overflow_values
    )
    _increment_version(weight)


def merge_variant(weight: Tensor) -> str:
    """The kernel :func:`merge_exact_` runs for ``weight`` (device type and CPU instruction
    set, e.g. ``"cpu/AVX512"``, ``"cuda"``); only the same one undoes its merge exactly.

    Eager only: it names the kernel of the running process, not a traced value.
    """
    return _ops.merge_variant.default(weight)


# ---------------------------------------------------------------------------
# Fake (meta) kernels, for torch.compile and opcheck.


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


@torch.library.register_fake("lora_ext::lora_linear")
def _lora_linear_fake(x, weight, bias, lora_a, lora_b, scale):
    xa = x.new_empty((*x.shape[:-1], lora_a.shape[0]), dtype=_acc_dtype(x.dtype))
    return x.new_empty((*x.shape[:-1], weight.shape[0])), xa


def _empty_unless(flag: bool, like: Tensor) -> Tensor:
    # Contiguous, as the kernels return their gradients (empty_like would copy the
    # strides of a non-contiguous input, and torch.compile would plan for those).
    return like.new_empty(like.shape) if flag else like.new_empty((0,))


@torch.library.register_fake("lora_ext::lora_linear_backward")
def _lora_linear_backward_fake(grad_out, x, weight, lora_a, lora_b, xa, scale, output_mask):
    bias_like = weight.new_empty((weight.shape[0],))
    likes = (x, weight, bias_like, lora_a, lora_b)
    return tuple(_empty_unless(flag, like) for flag, like in zip(output_mask, likes))


@torch.library.register_fake("lora_ext::multi_lora")
def _multi_lora_fake(x, a_stack, b_stack, indices, scales, ranks, base):
    return x.new_empty((x.shape[0], b_stack.shape[1]))


@torch.library.register_fake("lora_ext::multi_lora_add_")
def _multi_lora_add_fake(y, x, a_stack, b_stack, indices, scales, ranks):
    return None


@torch.library.register_fake("lora_ext::multi_lora_backward")
def _multi_lora_backward_fake(grad_out, x, a_stack, b_stack, indices, scales, ranks, output_mask):
    return tuple(_empty_unless(f, like) for f, like in zip(output_mask, (x, a_stack, b_stack)))


@torch.library.register_fake("lora_ext::merge_")
def _merge_fake(weight, lora_a, lora_b, scale):
    return None


@torch.library.register_fake("lora_ext::unmerge_")
def _unmerge_fake(weight, lora_a, lora_b, scale):
    return None


@torch.library.register_fake("lora_ext::merge_exact_")
def _merge_exact_fake(weight, lora_a, lora_b, scale, residual):
    count = torch.library.get_ctx().new_dynamic_size()
    return weight.new_empty((count,), dtype=torch.int64), weight.new_empty((count,))


@torch.library.register_fake("lora_ext::unmerge_exact_")
def _unmerge_exact_fake(weight, lora_a, lora_b, scale, residual, overflow_index, overflow_values):
    return None


@torch.library.register_fake("lora_ext::merge_variant")
def _merge_variant_fake(weight):
    # A property of the process and the weight's device and dtype, not of its data.
    with torch._subclasses.fake_tensor.unset_fake_temporarily():
        return _ops.merge_variant.default(torch.empty(0, dtype=weight.dtype, device=weight.device))


# ---------------------------------------------------------------------------
# Autograd: the backward passes are themselves custom ops.


def _lora_linear_setup_context(ctx, inputs, output):
    x, weight, bias, lora_a, lora_b, scale = inputs
    xa = output[1]  # x @ lora_a.T in fp32: grad of lora_b without recomputing it
    ctx.mark_non_differentiable(xa)
    ctx.save_for_backward(x, weight, lora_a, lora_b, xa)
    ctx.scale = scale
    ctx.has_bias = bias is not None


def _lora_linear_backward(ctx, grad, _grad_xa):
    x, weight, lora_a, lora_b, xa = ctx.saved_tensors
    need = ctx.needs_input_grad
    mask = [need[0], need[1], need[2] and ctx.has_bias, need[3], need[4]]
    grads = _ops.lora_linear_backward.default(
        grad.contiguous(), x, weight, lora_a, lora_b, xa, ctx.scale, mask
    )
    gx, gw, gb, ga, gB = (g if m else None for g, m in zip(grads, mask))
    return gx, gw, gb, ga, gB, None


torch.library.register_autograd(
    "lora_ext::lora_linear", _lora_linear_backward, setup_context=_lora_linear_setup_context
)


def _multi_lora_setup_context(ctx, inputs, output):
    x, a_stack, b_stack, indices, scales, ranks, base = inputs
    ctx.save_for_backward(x, a_stack, b_stack, indices, scales, ranks)
    ctx.has_base = base is not None


def _multi_lora_backward(ctx, grad):
    x, a_stack, b_stack, indices, scales, ranks = ctx.saved_tensors
    need = ctx.needs_input_grad
    mask = [need[0], need[1], need[2]]
    grad = grad.contiguous()
    gx, ga, gb = _ops.multi_lora_backward.default(
        grad, x, a_stack, b_stack, indices, scales, ranks, mask
    )
    grad_base = grad if (ctx.has_base and need[6]) else None
    return (
        gx if mask[0] else None,
        ga if mask[1] else None,
        gb if mask[2] else None,
        None,
        None,
        None,
        grad_base,
    )


torch.library.register_autograd(
    "lora_ext::multi_lora", _multi_lora_backward, setup_context=_multi_lora_setup_context
)


# ---------------------------------------------------------------------------
# LoRA on a mixture of experts' routed (token, expert) pairs (issue 20).


def moe_lora(
    x: Tensor,
    a_stack: Tensor,
    b_stack: Tensor,
    experts: Tensor,
    adapters: Tensor,
    scales: Tensor,
    ranks: Optional[Tensor] = None,
    base: Optional[Tensor] = None,
) -> Tensor:
    """LoRA on the rows of routed pairs: a different expert and adapter per row.

    x: ``[P, in]``, one row per routed (token, expert) pair; a_stack: ``[C, E, R, in]``;
    b_stack: ``[C, E, out, R]``; experts: ``[P]`` int in ``[0, E)``; adapters: ``[P]`` int
    in ``[-1, C)``; scales: ``[C]``; ranks: ``[C]`` in ``[1, R]`` (None: all R); base:
    ``[P, out]`` or None (zeros). Row p with ``c = adapters[p] >= 0``, ``e = experts[p]`` is
    ``base[p] + scales[c] * B[c, e, :, :r] @ (A[c, e, :r] @ x[p])`` with ``r = ranks[c]``;
    a row with -1 is ``base[p]``. The rows are grouped by (adapter, expert) once per call,
    so each used block of A and B is read once; no expert's weight update is formed.
    Differentiable w.r.t. x, a_stack, b_stack and base.
    """
    return _ops.moe_lora.default(x, a_stack, b_stack, experts, adapters, scales, ranks, base)


def moe_lora_add_(
    y: Tensor,
    x: Tensor,
    a_stack: Tensor,
    b_stack: Tensor,
    experts: Tensor,
    adapters: Tensor,
    scales: Tensor,
    ranks: Optional[Tensor] = None,
) -> None:
    """In place, :func:`moe_lora` added into ``y`` ``[P, out]`` (rows with -1 untouched);
    y may be a column slice of a wider output and must not share memory with an input."""
    _ops.moe_lora_add_.default(y, x, a_stack, b_stack, experts, adapters, scales, ranks)
    _increment_version(y)


@torch.library.register_fake("lora_ext::moe_lora")
def _moe_lora_fake(x, a_stack, b_stack, experts, adapters, scales, ranks, base):
    return x.new_empty((x.shape[0], b_stack.shape[2]))


@torch.library.register_fake("lora_ext::moe_lora_add_")
def _moe_lora_add_fake(y, x, a_stack, b_stack, experts, adapters, scales, ranks):
    return None


@torch.library.register_fake("lora_ext::moe_lora_backward")
def _moe_lora_backward_fake(grad_out, x, a_stack, b_stack, experts, adapters, scales, ranks, output_mask):
    return tuple(_empty_unless(f, like) for f, like in zip(output_mask, (x, a_stack, b_stack)))


def _moe_lora_setup_context(ctx, inputs, output):
    x, a_stack, b_stack, experts, adapters, scales, ranks, base = inputs
    ctx.save_for_backward(x, a_stack, b_stack, experts, adapters, scales, ranks)
    ctx.has_base = base is not None


def _moe_lora_backward(ctx, grad):
    x, a_stack, b_stack, experts, adapters, scales, ranks = ctx.saved_tensors
    need = ctx.needs_input_grad
    mask = [need[0], need[1], need[2]]
    grad = grad.contiguous()
    gx, ga, gb = _ops.moe_lora_backward.default(grad, x, a_stack, b_stack, experts, adapters, scales, ranks, mask)
    grad_base = grad if (ctx.has_base and need[7]) else None
    return (gx if mask[0] else None, ga if mask[1] else None, gb if mask[2] else None,
            None, None, None, None, grad_base)


torch.library.register_autograd("lora_ext::moe_lora", _moe_lora_backward, setup_context=_moe_lora_setup_context)


# ---------------------------------------------------------------------------
# DoRA (weight-decomposed LoRA): lora_ext/dora.py is the layer kind.


def dora_weight_norm(weight: Tensor, lora_a: Tensor, lora_b: Tensor, scale: float) -> Tensor:
    """``||weight[o] + scale * (lora_b @ lora_a)[o]||_2`` per output row o, in one pass.

    weight: ``[out, in]`` (unit column stride); lora_a: ``[r, in]``; lora_b: ``[out, r]``,
    one dtype. Returns ``[out]`` fp32 (fp64 for double). ``lora_b @ lora_a`` is never
    formed: each tile of the merged weight is built in a cache-sized buffer, rounded to the
    weight's dtype (as a merged weight is), and squared in fp32. Not differentiable: DoRA
    detaches the norm (PEFT and the paper, section 4.3).
    """
    return _ops.dora_weight_norm.default(weight, lora_a, lora_b, float(scale))


def multi_dora_add_(
    y: Tensor,
    x: Tensor,
    a_stack: Tensor,
    b_stack: Tensor,
    indices: Tensor,
    scales: Tensor,
    ranks: Optional[Tensor],
    row_scale: Tensor,
    bias: Optional[Tensor] = None,
) -> None:
    """In place, DoRA rows: :func:`multi_lora_add_` then each row's output scale and the bias.

    y: ``[T, out]``, holding ``x @ weight.T`` *without* the bias; row_scale: ``[N, out]``
    fp32 (fp64 for double), DoRA's ``magnitude / ||W + s B A||`` for a DoRA slot and 1 for
    a plain LoRA slot; bias: ``[out]`` or None. Row t with ``i = indices[t] >= 0`` becomes
    ``row_scale[i] * (y[t] + scales[i] * B_i A_i x[t]) + bias``, a row with -1
    ``y[t] + bias``. Other arguments as for :func:`multi_lora_add_`; on any error y is
    left unchanged.
    """
    _ops.multi_dora_add_.default(y, x, a_stack, b_stack, indices, scales, ranks, row_scale, bias)
    _increment_version(y)


@torch.library.register_fake("lora_ext::dora_weight_norm")
def _dora_weight_norm_fake(weight, lora_a, lora_b, scale):
    return weight.new_empty((weight.shape[0],), dtype=_acc_dtype(weight.dtype))


@torch.library.register_fake("lora_ext::multi_dora_add_")
def _multi_dora_add_fake(y, x, a_stack, b_stack, indices, scales, ranks, row_scale, bias):
    return None

"""Fake kernels describe the real kernels' outputs exactly (shapes and strides), so that
torch.compile plans with the layouts the kernels really return, also for non-contiguous
inputs; and every op compiles with non-contiguous inputs."""

from __future__ import annotations

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from conftest import assert_close_to_ref
from lora_ext import ops

_ops = torch.ops.lora_ext
T, IN, OUT, N, R, RANK = 6, 5, 7, 3, 4, 2


def _transposed(*shape, device="cpu"):
    """Random values in a column-major (last two dims swapped) layout."""
    t = torch.randn(*shape[:-2], shape[-1], shape[-2], device=device)
    return t.transpose(-1, -2)


def _cases(device):
    idx = torch.tensor([0, -1, 2, 1, 0, 2], device=device)
    scales = torch.ones(N, device=device)
    nc = lambda *s: _transposed(*s, device=device)  # noqa: E731
    return {
        "lora_linear": (_ops.lora_linear.default, (nc(T, IN), nc(OUT, IN), None, nc(RANK, IN), nc(OUT, RANK), 0.5)),
        "lora_linear_backward": (
            _ops.lora_linear_backward.default,
            (nc(T, OUT), nc(T, IN), nc(OUT, IN), nc(RANK, IN), nc(OUT, RANK), nc(T, RANK), 0.5, [True] * 5),
        ),
        "multi_lora": (_ops.multi_lora.default, (nc(T, IN), nc(N, R, IN), nc(N, OUT, R), idx, scales, None, nc(T, OUT))),
        "multi_lora_backward": (
            _ops.multi_lora_backward.default,
            (nc(T, OUT), nc(T, IN), nc(N, R, IN), nc(N, OUT, R), idx, scales, None, [True] * 3),
        ),
    }


@pytest.mark.parametrize("name", ["lora_linear", "lora_linear_backward", "multi_lora", "multi_lora_backward"])
def test_fake_outputs_have_the_real_strides(name, device):
    op, args = _cases(device)[name]
    real = op(*args)
    mode = FakeTensorMode()
    with mode:
        fake = op(*[mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args])
    real = real if isinstance(real, tuple) else (real,)
    fake = fake if isinstance(fake, tuple) else (fake,)
    for k, (r, f) in enumerate(zip(real, fake)):
        assert (tuple(f.shape), f.stride()) == (tuple(r.shape), r.stride()), f"{name} output {k}"


def test_compile_differentiable_ops_with_non_contiguous_inputs(device):
    torch._dynamo.reset()
    cases = _cases(device)
    x, w, _, a, b, s = cases["lora_linear"][1]
    xm, a_stack, b_stack, idx, scales, _, base = cases["multi_lora"][1]

    def step(x, a, b, xm, a_stack, b_stack, base):
        y1 = ops.lora_linear(x, w, None, a, b, s)
        y2 = ops.multi_lora(xm, a_stack, b_stack, idx, scales, None, base)
        return (y1 * y1).sum() + (y2 * y2).sum()

    leaves = [t.detach().clone().requires_grad_() for t in (x, a, b, xm, a_stack, b_stack, base)]
    eager = [t.detach().clone().requires_grad_() for t in (x, a, b, xm, a_stack, b_stack, base)]
    loss = torch.compile(step, fullgraph=True, backend="aot_eager")(*leaves)
    loss.backward()
    ref = step(*eager)
    ref.backward()
    torch.testing.assert_close(loss, ref)
    for mine, theirs in zip(leaves, eager):
        torch.testing.assert_close(mine.grad, theirs.grad)


def test_compile_in_place_ops_with_non_contiguous_factors(device):
    torch._dynamo.reset()
    xm, a_stack, b_stack, idx, scales, _, _ = _cases(device)["multi_lora"][1]
    w = torch.randn(OUT, IN, device=device)
    a, b = _transposed(RANK, IN, device=device), _transposed(OUT, RANK, device=device)
    y = torch.randn(T, OUT + 3, device=device)[:, 1 : 1 + OUT]
    expected_w = w.double() + 0.5 * (b.double() @ a.double())
    expected_y = y.double().clone()
    expected_y[idx >= 0] += ops.multi_lora(xm, a_stack, b_stack, idx, scales).double()[idx >= 0]

    def step(w, y):
        ops.merge_(w, a, b, 0.5)
        ops.multi_lora_add_(y, xm, a_stack, b_stack, idx, scales, None)
        return w.sum() + y.sum()

    torch.compile(step, fullgraph=True, backend="aot_eager")(w, y)
    assert_close_to_ref(w, expected_w, torch.float32, "merge_")
    assert_close_to_ref(y, expected_y, torch.float32, "multi_lora_add_")

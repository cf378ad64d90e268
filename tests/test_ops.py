"""The four lora_ext ops (and their backward/exact variants) against float64 references."""

import os
import subprocess
import sys

import pytest
import torch
from torch.library import opcheck

import lora_ext
from lora_ext import ops

from conftest import DTYPES, assert_close_to_ref, available_devices, id_formatter

INDEX_DTYPES = [torch.int32, torch.int64]


# ---------------------------------------------------------------------------
# float64 references


def ref_multi_lora(x, a_stack, b_stack, indices, scales, ranks=None, base=None):
    x, a, b = x.double().cpu(), a_stack.double().cpu(), b_stack.double().cpu()
    n, r_max = a.shape[:2]
    ranks = torch.full((n,), r_max) if ranks is None else ranks.cpu().long()
    keep = (torch.arange(r_max)[None, :] < ranks[:, None]).double()  # [N, R]
    a = a * keep[:, :, None]
    b = b * keep[:, None, :]
    idx = indices.cpu().long()
    used = idx >= 0
    safe = idx.clamp(min=0)
    xa = torch.einsum("tk,tjk->tj", x, a[safe])
    delta = torch.einsum("tj,toj->to", xa, b[safe]) * scales.cpu().double()[safe][:, None]
    y = torch.zeros(x.shape[0], b.shape[1], dtype=torch.float64) if base is None else base.double().cpu().clone()
    y[used] += delta[used]
    return y


def ref_lora_linear(x, weight, bias, lora_a, lora_b, scale):
    x64 = x.double().cpu()
    y = x64 @ weight.double().cpu().T + scale * (x64 @ lora_a.double().cpu().T) @ lora_b.double().cpu().T
    return y if bias is None else y + bias.double().cpu()


def make_multi_lora(T, d_in, d_out, N, R, device, dtype, index_dtype=torch.int64, mixed_ranks=True, with_base=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, d_in, generator=g).to(device, dtype)
    a = (torch.randn(N, R, d_in, generator=g) / d_in**0.5).to(device, dtype)
    b = torch.randn(N, d_out, R, generator=g).to(device, dtype)
    indices = torch.randint(-1, N, (T,), generator=g).to(device, index_dtype)
    scales = (torch.rand(N, generator=g) + 0.5).to(device)
    ranks = torch.randint(1, R + 1, (N,), generator=g).to(device) if mixed_ranks else None
    base = torch.randn(T, d_out, generator=g).to(device, dtype) if with_base else None
    return x, a, b, indices, scales, ranks, base


# ---------------------------------------------------------------------------
# multi_lora

MULTI_SHAPES = [  # (T, in, out, N, R)
    (37, 1, 7, 3, 4),
    (16, 7, 1, 2, 1),
    (9, 3424, 33, 4, 256),
    (5, 4097, 130, 3, 16),
    (70, 64, 96, 6, 32),
    (0, 64, 32, 2, 8),
    # Groups of 64 rows or more with ranks above 4: the CPU's packed (panel) shrink, with
    # 4-rank (ranks 5-8) and 8-rank panels, two to nine of them, several chunks of k, row
    # counts off its blocks; ranks of one panel, and an `in` that is not a whole number
    # of steps (bf16 with 1028, any dtype with 777), take the dot-product shrink.
    (300, 1032, 40, 2, 80),
    (300, 1032, 40, 3, 8),
    (300, 1028, 40, 3, 24),
    (160, 777, 20, 1, 40),
]


@pytest.mark.parametrize("shape", MULTI_SHAPES, ids=lambda s: "T{}_in{}_out{}_N{}_R{}".format(*s))
@pytest.mark.parametrize("index_dtype", INDEX_DTYPES, ids=id_formatter("idx"))
def test_multi_lora_matches_reference(shape, index_dtype, device, dtype):
    args = make_multi_lora(*shape, device, dtype, index_dtype)
    y = ops.multi_lora(*args)
    assert y.dtype == dtype and y.device.type == device
    assert_close_to_ref(y, ref_multi_lora(*args), dtype, "multi_lora")


@pytest.mark.parametrize("with_base", [False, True], ids=id_formatter("base"))
def test_multi_lora_all_ranks_and_no_base(with_base, device, dtype):
    x, a, b, idx, scales, _, base = make_multi_lora(23, 129, 65, 4, 12, device, dtype, with_base=with_base)
    y = ops.multi_lora(x, a, b, idx, scales, None, base)
    assert_close_to_ref(y, ref_multi_lora(x, a, b, idx, scales, None, base), dtype)


def test_multi_lora_skipped_rows_are_base(device, dtype):
    x, a, b, idx, scales, ranks, base = make_multi_lora(12, 40, 24, 3, 8, device, dtype)
    idx[::2] = -1
    y = ops.multi_lora(x, a, b, idx, scales, ranks, base)
    assert torch.equal(y[::2], base[::2])
    idx_all_skipped = torch.full_like(idx, -1)
    assert torch.equal(ops.multi_lora(x, a, b, idx_all_skipped, scales, ranks, None), torch.zeros_like(base))


def test_multi_lora_rank_padding_is_ignored(device):
    """Entries of A/B past an adapter's rank must not affect its rows."""
    x, a, b, idx, scales, ranks, base = make_multi_lora(20, 48, 24, 3, 16, device, torch.float32)
    ranks = torch.tensor([3, 16, 7], device=device)
    y = ops.multi_lora(x, a, b, idx, scales, ranks, base)
    a2, b2 = a.clone(), b.clone()
    for i, r in enumerate(ranks.tolist()):
        a2[i, r:] = float("nan")
        b2[i, :, r:] = float("nan")
    assert torch.equal(ops.multi_lora(x, a2, b2, idx, scales, ranks, base), y)


@pytest.mark.parametrize("R", [8, 16], ids=id_formatter("R"))
def test_multi_lora_decode_rows_rank_padding_is_ignored(R, device, dtype):
    """Few rows per adapter (the decode kernels, which read B in place; with R = 8 two B
    rows per vector): padding past each rank ignored, NaN included, outputs in order."""
    x, a, b, _, scales, _, base = make_multi_lora(9, 48, 83, 3, R, device, dtype)
    idx = torch.tensor([0, 0, 1, 1, 2, -1, 2, 2, 1], device=device)
    ranks = torch.tensor([3, R, R // 2 + 1], device=device)
    y = ops.multi_lora(x, a, b, idx, scales, ranks, base)
    assert_close_to_ref(y, ref_multi_lora(x, a, b, idx, scales, ranks, base), dtype, "multi_lora")
    a2, b2 = a.clone(), b.clone()
    for i, r in enumerate(ranks.tolist()):
        a2[i, r:] = float("nan")
        b2[i, :, r:] = float("nan")
    assert torch.equal(ops.multi_lora(x, a2, b2, idx, scales, ranks, base), y)
    y_add = base.clone()
    ops.multi_lora_add_(y_add, x, a2, b2, idx, scales, ranks)
    assert torch.equal(y_add, y)


def test_multi_lora_non_contiguous(device, dtype):
    x, a, b, idx, scales, ranks, base = make_multi_lora(17, 33, 29, 3, 8, device, dtype)
    x_nc = torch.randn(33, 17, device=device).to(dtype).t()  # transposed view
    a_nc = a.transpose(1, 2).contiguous().transpose(1, 2)
    b_nc = torch.randn(3, 8, 29, device=device).to(dtype).transpose(1, 2)
    base_nc = base.t().contiguous().t()
    y = ops.multi_lora(x_nc, a_nc, b_nc, idx[::1], scales, ranks, base_nc)
    assert_close_to_ref(y, ref_multi_lora(x_nc, a_nc, b_nc, idx, scales, ranks, base_nc), dtype)


# ---------------------------------------------------------------------------
# multi_lora_add_ (in place, into a column slice)

ADD_SHAPES = MULTI_SHAPES + [(200, 96, 48, 5, 8)]  # 200 rows: the CUDA prefill path


def _wide_output(T, d_out, device, dtype, left=5, right=3, seed=1):
    """A [T, left + d_out + right] tensor and the column slice the op writes into."""
    g = torch.Generator().manual_seed(seed)
    full = torch.randn(T, left + d_out + right, generator=g).to(device, dtype)
    return full, full[:, left : left + d_out]


@pytest.mark.parametrize("shape", ADD_SHAPES, ids=lambda s: "T{}_in{}_out{}_N{}_R{}".format(*s))
@pytest.mark.parametrize("index_dtype", INDEX_DTYPES, ids=id_formatter("idx"))
def test_multi_lora_add_into_slice_matches_reference(shape, index_dtype, device, dtype):
    T, _, d_out = shape[:3]
    x, a, b, idx, scales, ranks, _ = make_multi_lora(*shape, device, dtype, index_dtype, with_base=False)
    full, y = _wide_output(T, d_out, device, dtype)
    before = full.clone()
    expected = ref_multi_lora(x, a, b, idx, scales, ranks, y)
    ops.multi_lora_add_(y, x, a, b, idx, scales, ranks)
    assert_close_to_ref(y, expected, dtype, "multi_lora_add_")
    # Outside the slice, and rows with no adapter, are left bit for bit.
    assert torch.equal(full[:, :5], before[:, :5]) and torch.equal(full[:, 5 + d_out :], before[:, 5 + d_out :])
    skipped = (idx == -1).cpu()
    assert torch.equal(full.cpu()[skipped], before.cpu()[skipped])


def test_multi_lora_add_matches_multi_lora(device, dtype):
    """The in-place op and the functional one share their kernel: same bits."""
    x, a, b, idx, scales, ranks, base = make_multi_lora(40, 72, 56, 4, 16, device, dtype)
    y = base.clone()
    ops.multi_lora_add_(y, x, a, b, idx, scales, None)
    assert torch.equal(y, ops.multi_lora(x, a, b, idx, scales, None, base))


def test_multi_lora_add_slices_of_one_output(device, dtype):
    """vLLM's packed layers: one call per slice of a fused output, each its own adapters."""
    T, d_in, slices = 33, 64, (48, 16, 16)
    g = torch.Generator().manual_seed(5)
    x = torch.randn(T, d_in, generator=g).to(device, dtype)
    idx = torch.randint(-1, 4, (T,), generator=g).to(device)
    y = torch.randn(T, sum(slices), generator=g).to(device, dtype)
    expected = y.double().cpu().clone()
    offset = 0
    for width in slices:
        a = torch.randn(4, 8, d_in, generator=g).to(device, dtype)
        b = torch.randn(4, width, 8, generator=g).to(device, dtype)
        scales = torch.full((4,), 0.5, device=device)
        expected[:, offset : offset + width] = ref_multi_lora(x, a, b, idx, scales, None, y[:, offset : offset + width])
        ops.multi_lora_add_(y[:, offset : offset + width], x, a, b, idx, scales)
        offset += width
    assert_close_to_ref(y, expected, dtype, "packed slices")


# ---------------------------------------------------------------------------
# lora_linear

LINEAR_SHAPES = [  # (leading dims, in, out, r)
    ((5,), 1, 7, 1),
    ((2, 3), 7, 1, 4),
    ((3, 4), 4097, 33, 16),
    ((6,), 64, 130, 256),
    ((0,), 16, 8, 4),
    ((2,), 100, 70, 700),  # a rank past 512 on the few-rows path
]


@pytest.mark.parametrize("shape", LINEAR_SHAPES, ids=lambda s: "x{}_in{}_out{}_r{}".format(*s))
@pytest.mark.parametrize("with_bias", [False, True], ids=id_formatter("bias"))
def test_lora_linear_matches_reference(shape, with_bias, device, dtype):
    lead, d_in, d_out, r = shape
    g = torch.Generator().manual_seed(1)
    x = torch.randn(*lead, d_in, generator=g).to(device, dtype)
    w = (torch.randn(d_out, d_in, generator=g) / d_in**0.5).to(device, dtype)
    bias = torch.randn(d_out, generator=g).to(device, dtype) if with_bias else None
    a = (torch.randn(r, d_in, generator=g) / d_in**0.5).to(device, dtype)
    b = torch.randn(d_out, r, generator=g).to(device, dtype)
    y = ops.lora_linear(x, w, bias, a, b, 0.75)
    assert y.shape == (*lead, d_out)
    ref = ref_lora_linear(x.reshape(-1, d_in), w, bias, a, b, 0.75).reshape(*lead, d_out)
    assert_close_to_ref(y, ref, dtype, "lora_linear")


def test_lora_linear_backward_matches_autograd_reference(device, dtype):
    g = torch.Generator().manual_seed(2)
    d_in, d_out, r = 45, 31, 6
    leaves = [
        torch.randn(3, 5, d_in, generator=g),
        torch.randn(d_out, d_in, generator=g) / 7,
        torch.randn(d_out, generator=g),
        torch.randn(r, d_in, generator=g) / 7,
        torch.randn(d_out, r, generator=g),
    ]
    ours = [t.to(device, dtype).clone().requires_grad_() for t in leaves]
    refs = [t.double().clone().requires_grad_() for t in leaves]
    grad_out = torch.randn(3, 5, d_out, generator=g)
    ops.lora_linear(*ours, 0.5).backward(grad_out.to(device, dtype))
    x, w, bias, a, b = refs
    (x @ w.T + bias + 0.5 * (x @ a.T) @ b.T).backward(grad_out.double())
    for name, mine, ref in zip(["x", "weight", "bias", "lora_a", "lora_b"], ours, refs):
        assert_close_to_ref(mine.grad, ref.grad, dtype, f"grad {name}")


def test_multi_lora_backward_matches_autograd_reference(device, dtype):
    x, a, b, idx, scales, ranks, base = make_multi_lora(40, 37, 29, 4, 8, device, torch.float64)
    ours = [t.to(dtype).clone().requires_grad_() for t in (x, a, b, base)]
    refs = [t.detach().clone().requires_grad_() for t in (x, a, b, base)]
    grad_out = torch.randn(40, 29, dtype=torch.float64, device=device)
    ops.multi_lora(ours[0], ours[1], ours[2], idx, scales, ranks, ours[3]).backward(grad_out.to(dtype))
    ref_multi_lora_autograd(refs[0], refs[1], refs[2], idx, scales, ranks, refs[3]).backward(grad_out)
    for name, mine, ref in zip(["x", "a_stack", "b_stack", "base"], ours, refs):
        assert_close_to_ref(mine.grad, ref.grad, dtype, f"grad {name}")


def ref_multi_lora_autograd(x, a, b, idx, scales, ranks, base):
    """Differentiable float64 reference (same math as ref_multi_lora)."""
    r_max = a.shape[1]
    keep = (torch.arange(r_max, device=a.device)[None, :] < ranks[:, None]).to(a.dtype)
    safe = idx.long().clamp(min=0)
    xa = torch.einsum("tk,tjk->tj", x, (a * keep[:, :, None])[safe])
    delta = torch.einsum("tj,toj->to", xa, (b * keep[:, None, :])[safe]) * scales.to(a.dtype)[safe][:, None]
    return base + delta * (idx >= 0).to(a.dtype)[:, None]


# ---------------------------------------------------------------------------
# merge_ / unmerge_

MERGE_SHAPES = [(1, 1, 1), (33, 4097, 16), (130, 7, 3), (64, 96, 256)]  # (out, in, r)


def make_merge(out, d_in, r, device, dtype, seed=3):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, d_in, generator=g).to(device, dtype)
    a = (torch.randn(r, d_in, generator=g) / r**0.5).to(device, dtype)
    b = (torch.randn(out, r, generator=g) / 4).to(device, dtype)
    return w, a, b


@pytest.mark.parametrize("shape", MERGE_SHAPES, ids=lambda s: "out{}_in{}_r{}".format(*s))
def test_merge_and_unmerge_match_reference(shape, device, dtype):
    w, a, b = make_merge(*shape, device, dtype)
    w0 = w.clone()
    ops.merge_(w, a, b, 1.5)
    delta = 1.5 * b.double().cpu() @ a.double().cpu()
    assert_close_to_ref(w, w0.double().cpu() + delta, dtype, "merge_")
    merged = w.clone()
    ops.unmerge_(w, a, b, 1.5)
    assert_close_to_ref(w, merged.double().cpu() - delta, dtype, "unmerge_")


def _bits(t):
    return t.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


@pytest.mark.parametrize("shape", MERGE_SHAPES, ids=lambda s: "out{}_in{}_r{}".format(*s))
def test_exact_merge_round_trip_is_bit_exact(shape, device, dtype):
    w, a, b = make_merge(*shape, device, dtype)
    w[0, 0] = -0.0  # signed zero must survive too
    w0 = w.clone()
    residual = torch.empty(w.shape, dtype=torch.int8, device=device)
    for cycle in range(5):
        idx, vals = ops.merge_exact_(w, a, b, 2.0, residual)
        plain = w0.clone()
        ops.merge_(plain, a, b, 2.0)
        assert_close_to_ref(w, plain.double().cpu(), dtype, "merge_exact_ result")
        ops.unmerge_exact_(w, a, b, 2.0, residual, idx, vals)
        assert torch.equal(_bits(w), _bits(w0)), f"cycle {cycle}: weights not restored bit for bit"


def test_exact_merge_overflow_list_restores_tiny_weights(device):
    """Weights far below the delta need more than the int8 residual."""
    w, a, b = make_merge(16, 40, 4, device, torch.bfloat16)
    w[:, :8] = 1e-6
    w0 = w.clone()
    residual = torch.empty(w.shape, dtype=torch.int8, device=device)
    idx, vals = ops.merge_exact_(w, a, b, 1.0, residual)
    assert idx.numel() > 0 and torch.all(residual.view(-1)[idx] == -128)
    ops.unmerge_exact_(w, a, b, 1.0, residual, idx, vals)
    assert torch.equal(_bits(w), _bits(w0))


# ---------------------------------------------------------------------------
# opcheck, gradcheck, torch.compile


def _opcheck_samples(device):
    x, a, b, idx, scales, ranks, base = make_multi_lora(11, 24, 20, 3, 6, device, torch.float32)
    xr = x.clone().requires_grad_()
    w, la, lb = make_merge(20, 24, 4, device, torch.float32)
    grad = torch.randn(11, 20, device=device)
    residual = torch.empty(w.shape, dtype=torch.int8, device=device)
    w_exact, exact_residual = w.clone(), residual.clone()
    oidx, ovals = ops.merge_exact_(w_exact, la, lb, 0.5, exact_residual)
    return {
        "lora_linear": (x, w, None, la, lb, 0.5),
        "lora_linear_bias_grad": (xr, w, torch.randn(20, device=device), la, lb, 0.5),
        "lora_linear_backward": (grad, x, w, la, lb, x @ la.T, 0.5, [True, True, True, True, True]),
        "multi_lora": (x, a, b, idx, scales, ranks, base),
        "multi_lora_no_opt": (xr, a, b, idx.int(), scales, None, None),
        "multi_lora_backward": (grad, x, a, b, idx, scales, ranks, [True, True, False]),
        "multi_lora_add_": (torch.randn(11, 26, device=device)[:, 3:23], x, a, b, idx, scales, ranks),
        "multi_lora_add__no_opt": (base.clone(), x, a, b, idx.int(), scales, None),
        "merge_": (w.clone(), la, lb, 0.5),
        "unmerge_": (w.clone(), la, lb, 0.5),
        "merge_exact_": (w.clone(), la, lb, 0.5, residual.clone()),
        "unmerge_exact_": (w_exact, la, lb, 0.5, exact_residual, oidx, ovals),
    }


OPCHECK_CASES = [
    "lora_linear",
    "lora_linear_bias_grad",
    "lora_linear_backward",
    "multi_lora",
    "multi_lora_no_opt",
    "multi_lora_backward",
    "multi_lora_add_",
    "multi_lora_add__no_opt",
    "merge_",
    "unmerge_",
    "merge_exact_",
    "unmerge_exact_",
]


@pytest.mark.parametrize("case", OPCHECK_CASES)
def test_opcheck(case, device):
    op_name = case.replace("_bias_grad", "").replace("_no_opt", "")
    args = _opcheck_samples(device)[case]
    tests = "ALL"
    if op_name == "merge_exact_":
        # Its outputs have a data-dependent size, which AOT dispatch cannot trace.
        tests = ("test_schema", "test_autograd_registration", "test_faketensor")
    opcheck(getattr(torch.ops.lora_ext, op_name).default, args, test_utils=tests)


def test_gradcheck_lora_linear():
    g = torch.Generator().manual_seed(4)
    args = [
        torch.randn(2, 3, 6, generator=g, dtype=torch.float64, requires_grad=True),
        torch.randn(5, 6, generator=g, dtype=torch.float64, requires_grad=True),
        torch.randn(5, generator=g, dtype=torch.float64, requires_grad=True),
        torch.randn(3, 6, generator=g, dtype=torch.float64, requires_grad=True),
        torch.randn(5, 3, generator=g, dtype=torch.float64, requires_grad=True),
    ]
    assert torch.autograd.gradcheck(lambda *t: ops.lora_linear(*t, 0.7), args)


def test_gradcheck_multi_lora():
    x, a, b, idx, scales, ranks, base = make_multi_lora(9, 6, 5, 3, 4, "cpu", torch.float64)
    idx[0] = -1
    leaves = [t.requires_grad_() for t in (x, a, b, base)]
    fn = lambda x, a, b, base: ops.multi_lora(x, a, b, idx, scales, ranks, base)  # noqa: E731
    assert torch.autograd.gradcheck(fn, leaves)


def test_compile_lora_linear_fullgraph(device):
    torch._dynamo.reset()
    x, w, _, a, b, s = _opcheck_samples(device)["lora_linear"]
    a = a.clone().requires_grad_()
    fn = torch.compile(lambda x, a: ops.lora_linear(x, w, None, a, b, s).sum(), fullgraph=True, backend="aot_eager")
    loss = fn(x, a)
    loss.backward()
    ref = ref_lora_linear(x, w, None, a.detach(), b, s).sum()
    assert abs(loss.item() - ref.item()) <= 1e-4 * max(1.0, abs(ref.item()))
    assert a.grad is not None and torch.isfinite(a.grad).all()


def test_compile_multi_lora_fullgraph(device):
    torch._dynamo.reset()
    args = _opcheck_samples(device)["multi_lora"]
    fn = torch.compile(ops.multi_lora, fullgraph=True, backend="aot_eager")
    assert_close_to_ref(fn(*args), ref_multi_lora(*args), torch.float32)


def test_compile_multi_lora_add_fullgraph(device):
    torch._dynamo.reset()
    y, x, a, b, idx, scales, ranks = _opcheck_samples(device)["multi_lora_add_"]
    expected = ref_multi_lora(x, a, b, idx, scales, ranks, y)

    def step(y):
        ops.multi_lora_add_(y, x, a, b, idx, scales, ranks)
        return y.sum()

    torch.compile(step, fullgraph=True, backend="aot_eager")(y)
    assert_close_to_ref(y, expected, torch.float32)


@pytest.mark.parametrize("op", ["merge_", "unmerge_"])
def test_compile_merge_fullgraph(op, device):
    torch._dynamo.reset()
    w, a, b, s = _opcheck_samples(device)[op]
    expected = w.clone()
    getattr(ops, op)(expected, a, b, s)

    def step(w):
        getattr(ops, op)(w, a, b, s)
        return w.sum()

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    compiled(w)
    assert torch.equal(w, expected)


# ---------------------------------------------------------------------------
# Every instruction-set build of the CPU micro-kernels gives the same answers.


_ISA_SCRIPT = r"""
import torch, lora_ext
from test_ops import make_multi_lora, ref_multi_lora, make_merge
for dtype in (torch.float32, torch.bfloat16, torch.float16):
    args = make_multi_lora(21, 77, 70, 3, 12, "cpu", dtype)
    err = (lora_ext.multi_lora(*args).double() - ref_multi_lora(*args)).abs().max().item()
    assert err < {"float32": 1e-3}.get(str(dtype)[6:], 0.3), (dtype, err)
    w, a, b = make_merge(19, 45, 5, "cpu", dtype)
    ref = w.double() + 0.5 * b.double() @ a.double()
    lora_ext.merge_(w, a, b, 0.5)
    assert (w.double() - ref).abs().max().item() < 0.1, dtype
print("ok")
"""


@pytest.mark.parametrize("isa", ["default", "avx2", "avx512", "avx512bf16"])
def test_cpu_isa_variants(isa):
    env = dict(os.environ, LORA_EXT_CPU_ISA=isa)
    proc = subprocess.run(
        [sys.executable, "-c", _ISA_SCRIPT], env=env, cwd=os.path.dirname(__file__), capture_output=True, text=True
    )
    if "not supported by this CPU or build" in proc.stderr:
        pytest.skip(f"{isa} micro-kernels not available here")
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr[-2000:]

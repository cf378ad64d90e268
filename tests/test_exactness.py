"""Exactness contracts (issue 19) and the edge cases a kernel review found.

- Under ``torch.use_deterministic_algorithms(True)`` each row's result of every op is the
  same bits whatever else is in the batch (other adapters, group sizes, T, thread count),
  forward and backward, and the weight gradients are the same on every run.
- The training op (``lora_linear``) and the serving op (``multi_lora_add_`` onto the base
  layer's output) give a row the same bits; ``LoRALinear`` in train and in eval mode too.
- ``lora_linear`` with ``in`` or ``out`` == 0; ``multi_lora_add_`` into a ``y`` that shares
  memory with an input; ``unmerge_exact_`` with an overflow list that is not the merge's;
  the vLLM plugin's default on CUDA.
"""

import contextlib
import logging
import os
import subprocess
import sys
import types

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lora_ext
from lora_ext import ops

from conftest import id_formatter


@contextlib.contextmanager
def deterministic(on: bool = True):
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(on)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before)


@contextlib.contextmanager
def num_threads(n: int):
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


# (in, out, R): decode-like and prefill-like hidden sizes, a large rank, and sizes with
# vector tails (no panel shrink: `in` is not a whole number of its steps).
SHAPES = [(64, 64, 8), (256, 512, 16), (1024, 1024, 64), (4096, 4096, 16), (100, 70, 12)]
T = 300


def _batch(device, dtype, din, dout, R, n=8, seed=0):
    """A 300-row mixed batch: adapter 0 on a prefill-sized group (120 rows), the others
    spread thin, some rows on no adapter; ranks and scales differ per adapter."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, din, generator=g).to(device, dtype)
    a = (torch.randn(n, R, din, generator=g) / din**0.5).to(device, dtype)
    b = torch.randn(n, dout, R, generator=g).to(device, dtype)
    ranks = torch.randint(1, R + 1, (n,), generator=g)
    ranks[0] = R
    scales = (torch.rand(n, generator=g) + 0.5).to(device)
    idx = torch.randint(1, n, (T,), generator=g)
    idx[:120] = 0
    idx[::17] = -1
    idx = idx[torch.randperm(T, generator=g)].to(device)
    base = torch.randn(T, dout, generator=g).to(device, dtype)
    return x, a, b, idx, scales, ranks.to(device), base


def _probe_rows(idx):
    """Rows to check: some of the big group, some of small ones, one with no adapter."""
    rows = []
    for want in (0, 0, 0, 1, 2, 3, -1):
        candidates = (idx == want).nonzero().flatten().tolist()
        rows += [r for r in candidates if r not in rows][:1]
    return rows


def _contexts(t, idx):
    """Batches that hold row t, and where it lands in each: alone; with two more rows of
    its adapter (a few-row group); repeated 64 times (a prefill-sized group); the whole
    batch reversed."""
    same = (idx == idx[t]).nonzero().flatten().tolist()
    others = [r for r in same if r != t][:2]
    rev = torch.arange(T - 1, -1, -1)
    return [
        (torch.tensor([t]), 0),
        (torch.tensor([t] + others), 0),
        (torch.full((64,), t), 63),
        (rev, T - 1 - t),
    ]


@pytest.mark.parametrize("shape", SHAPES, ids=id_formatter("shape"))
def test_multi_lora_rows_do_not_depend_on_the_batch(device, dtype, shape):
    x, a, b, idx, scales, ranks, base = _batch(device, dtype, *shape)
    with deterministic():
        full = ops.multi_lora(x, a, b, idx, scales, ranks, base)
        full_add = base.clone()
        ops.multi_lora_add_(full_add, x, a, b, idx, scales, ranks)
        assert torch.equal(full, full_add)
        with num_threads(1):
            assert torch.equal(ops.multi_lora(x, a, b, idx, scales, ranks, base), full)
        for t in _probe_rows(idx.cpu()):
            for rows, at in _contexts(t, idx.cpu()):
                rows = rows.to(device)
                y = ops.multi_lora(x[rows], a, b, idx[rows], scales, ranks, base[rows])
                y_add = base[rows].clone()
                ops.multi_lora_add_(y_add, x[rows], a, b, idx[rows], scales, ranks)
                what = f"row {t} (adapter {idx[t].item()}) in a batch of {rows.numel()}"
                assert torch.equal(y[at], full[t]), f"multi_lora: {what}"
                assert torch.equal(y_add[at], full[t]), f"multi_lora_add_: {what}"


def test_multi_lora_backward_rows_and_weight_gradients_are_exact(device, dtype):
    x, a, b, idx, scales, ranks, _ = _batch(device, dtype, 256, 512, 16)
    grad = torch.randn(T, 512, generator=torch.Generator().manual_seed(1)).to(device, dtype)
    backward = torch.ops.lora_ext.multi_lora_backward.default
    mask = [True, True, True]
    with deterministic():
        full = backward(grad, x, a, b, idx, scales, ranks, mask)
        with num_threads(1):
            one_thread = backward(grad, x, a, b, idx, scales, ranks, mask)
        again = backward(grad, x, a, b, idx, scales, ranks, mask)
        for name, p, q, r in zip(("grad_x", "grad_a", "grad_b"), full, one_thread, again):
            assert torch.equal(p, q), f"{name} changed with the thread count"
            assert torch.equal(p, r), f"{name} changed from one run to the next"
        for t in _probe_rows(idx.cpu()):
            for rows, at in _contexts(t, idx.cpu()):
                rows = rows.to(device)
                gx = backward(grad[rows], x[rows], a, b, idx[rows], scales, ranks, [True, False, False])[0]
                assert torch.equal(gx[at], full[0][t]), f"grad_x of row {t} in a batch of {rows.numel()}"


def test_lora_linear_rows_do_not_depend_on_the_batch(device, dtype):
    """The LoRA part of lora_linear, forward and backward (a zero base weight: the base GEMM
    is ATen's, whose rows torch does not promise to keep; see RELIABILITY.md)."""
    din, dout, r = 256, 512, 16
    x, a, b, *_ = _batch(device, dtype, din, dout, r)
    w = torch.zeros(dout, din, device=device, dtype=dtype)
    lora_a, lora_b = a[0], b[0]
    grad = torch.randn(T, dout, generator=torch.Generator().manual_seed(1)).to(device, dtype)
    backward = torch.ops.lora_ext.lora_linear_backward.default
    mask = [True, False, False, True, True]
    with deterministic():
        y, xa = torch.ops.lora_ext.lora_linear.default(x, w, None, lora_a, lora_b, 0.75)
        grads = backward(grad, x, w, lora_a, lora_b, xa, 0.75, mask)
        with num_threads(1):
            assert torch.equal(torch.ops.lora_ext.lora_linear.default(x, w, None, lora_a, lora_b, 0.75)[0], y)
            grads1 = backward(grad, x, w, lora_a, lora_b, xa, 0.75, mask)
        for name, p, q in zip(("grad_x", "grad_w", "grad_bias", "grad_a", "grad_b"), grads, grads1):
            assert torch.equal(p, q), f"{name} changed with the thread count"
        for t in (0, 7, 150, 299):
            for n in (1, 3, 64):
                rows = torch.full((n,), t, device=device)
                y_t, xa_t = torch.ops.lora_ext.lora_linear.default(x[rows], w, None, lora_a, lora_b, 0.75)
                assert torch.equal(y_t[-1], y[t]), f"row {t} in a batch of {n}"
                gx = backward(grad[rows], x[rows], w, lora_a, lora_b, xa_t, 0.75, mask)[0]
                assert torch.equal(gx[-1], grads[0][t]), f"grad_x of row {t} in a batch of {n}"


def test_training_and_serving_ops_give_a_row_the_same_update(device, dtype):
    """lora_linear (what training runs, through autograd) over a batch of one adapter
    against multi_lora_add_ (what serving runs) over a mixed batch holding those rows."""
    din, dout, R = 256, 512, 16
    x, a, b, idx, scales, ranks, _ = _batch(device, dtype, din, dout, R)
    zero_w = torch.zeros(dout, din, device=device, dtype=dtype)
    rows = (idx == 0).nonzero().flatten()
    with deterministic():
        # The update alone (a zero base): the row's bits whatever the batch; training
        # batches of 2, 40 and all of adapter 0's rows, against the whole mixed batch.
        lora_a = a[0, : ranks[0]].clone().requires_grad_()
        lora_b = b[0, :, : ranks[0]].clone().requires_grad_()
        served = torch.zeros(T, dout, device=device, dtype=dtype)
        ops.multi_lora_add_(served, x, a, b, idx, scales, ranks)
        for n in (2, 40, rows.numel()):
            trained = lora_ext.lora_linear(x[rows[:n]], zero_w, None, lora_a, lora_b, scales[0].item())
            assert trained.requires_grad
            assert torch.equal(trained.detach(), served[rows[:n]]), f"a training batch of {n} rows"
        # With the base layer (the same batch on both sides: the base GEMM is ATen's).
        w = torch.randn(dout, din, generator=torch.Generator().manual_seed(2)).to(device, dtype) / din**0.5
        bias = torch.randn(dout, generator=torch.Generator().manual_seed(3)).to(device, dtype)
        trained = lora_ext.lora_linear(x[rows], w, bias, lora_a, lora_b, scales[0].item())
        served = F.linear(x[rows], w, bias)
        ops.multi_lora_add_(served, x[rows], a, b, idx[rows], scales, ranks)
        assert torch.equal(trained.detach(), served)


@pytest.mark.parametrize("mixed", [False, True], ids=["one_adapter", "per_row_adapters"])
def test_lora_linear_layer_gives_the_same_bits_in_train_and_eval_mode(device, dtype, mixed):
    """Public API only: a model in train mode (autograd, dropout 0) and in eval mode (the
    in-place serving path) returns the same bits."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 384), nn.Linear(384, 320)).to(device, dtype)
    x = torch.randn(6, 40, 256, device=device, dtype=dtype)

    def sgd_step():  # B starts at zero: one step makes the update non-zero
        params = [p for p in model.parameters() if p.requires_grad]
        model(x).float().square().mean().backward()
        torch.optim.SGD(params, lr=0.5).step()

    model.train()
    lora_ext.inject_lora(model, ["0", "1"], r=8, alpha=16, init="gaussian", adapter_name="first")
    sgd_step()
    lora_ext.inject_lora(model, ["0", "1"], r=16, alpha=64, init="gaussian", adapter_name="second")
    sgd_step()
    names = ["first", "second", None, "second", "first", "first"] if mixed else "second"
    lora_ext.set_adapter(model, names)
    with deterministic():
        model.train()
        trained = model(x)
        assert trained.requires_grad  # the training path, with autograd
        model.eval()
        with torch.no_grad():
            served = model(x)
    assert torch.equal(trained.detach(), served)


@pytest.mark.parametrize("din, dout", [(5, 0), (0, 6)], ids=["out0", "in0"])
def test_lora_linear_with_no_outputs_or_no_inputs(device, din, dout):
    x = torch.randn(2, 3, din, device=device, requires_grad=True)
    w = torch.randn(dout, din, device=device, requires_grad=True)
    bias = torch.randn(dout, device=device, requires_grad=True)
    lora_a = torch.randn(4, din, device=device, requires_grad=True)
    lora_b = torch.randn(dout, 4, device=device, requires_grad=True)
    y = lora_ext.lora_linear(x, w, bias, lora_a, lora_b, 0.5)
    assert y.shape == (2, 3, dout)
    assert torch.equal(y, F.linear(x, w, bias))  # no update when in == 0; nothing when out == 0
    y.backward(torch.ones_like(y))
    for p in (x, w, bias, lora_a, lora_b):
        assert p.grad is not None and p.grad.shape == p.shape
    # Nothing reaches the factors: with out == 0 there is no output, with in == 0 no input.
    assert not lora_a.grad.any() and not lora_b.grad.any()
    assert torch.equal(x.grad, torch.zeros_like(x) if dout == 0 else torch.ones(2, 3, dout, device=device) @ w)


def _add_call(device, share):
    """multi_lora_add_'s arguments with y carved from the same buffer as `share` (bytes
    overlapping), or from its own buffer (share=None)."""
    T_, din, dout, n, R = 4, 6, 8, 2, 4
    g = torch.Generator().manual_seed(0)
    args = dict(
        x=torch.randn(T_, din, generator=g),
        a_stack=torch.randn(n, R, din, generator=g),
        b_stack=torch.randn(n, dout, R, generator=g),
        indices=torch.tensor([0, 1, 0, 1]),
        scales=torch.tensor([0.5, 2.0]),
        ranks=torch.tensor([4, 3]),
    )
    args = {k: v.to(device) for k, v in args.items()}
    y = torch.randn(T_, dout, generator=g).to(device)
    if share is not None:
        other = args[share]
        buf = torch.randn(max(other.numel() * other.element_size() // 4, y.numel()) + 8).to(device)
        y = buf[1 : 1 + y.numel()].view(T_, dout)  # from float 1 of the buffer
        as_bytes = buf.view(torch.uint8)[: other.numel() * other.element_size()]
        args[share] = as_bytes.view(other.dtype).view(other.shape)  # from byte 0
        args[share].copy_(other)
        return buf, y, args
    return y, y, args


@pytest.mark.parametrize("share", ["b_stack", "a_stack", "x", "scales", "ranks", "indices"])
def test_multi_lora_add_refuses_y_sharing_memory_with_an_input(device, share):
    buf, y, args = _add_call(device, share)
    before = buf.clone()
    with pytest.raises(RuntimeError, match=f"{share} shares memory with y"):
        ops.multi_lora_add_(y, args["x"], args["a_stack"], args["b_stack"], args["indices"],
                            args["scales"], args["ranks"])
    assert torch.equal(buf, before), "a refused call wrote into y"


def test_multi_lora_add_takes_disjoint_parts_of_one_buffer(device):
    """The check is by bytes: y and b_stack side by side in one storage are fine."""
    _, y_own, args = _add_call(device, None)
    expected = y_own.clone()
    ops.multi_lora_add_(expected, *args.values())
    buf = torch.empty(args["b_stack"].numel() + y_own.numel(), device=device)
    b_stack = buf[: args["b_stack"].numel()].view_as(args["b_stack"]).copy_(args["b_stack"])
    y = buf[args["b_stack"].numel() :].view_as(y_own).copy_(y_own)
    ops.multi_lora_add_(y, args["x"], args["a_stack"], b_stack, args["indices"], args["scales"], args["ranks"])
    assert torch.equal(y, expected)


def _merged_with_overflow(device, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(32, 48, generator=g).to(device, dtype)
    w[:4] *= 1e-6  # elements far below the update: their corrections do not fit in int8
    a = torch.randn(4, 48, generator=g).to(device, dtype)
    b = torch.randn(32, 4, generator=g).to(device, dtype)
    original = w.clone()
    residual = torch.empty(w.shape, dtype=torch.int8, device=device)
    index, values = ops.merge_exact_(w, a, b, 0.75, residual)
    assert index.numel() > 0 and (residual != -128).any(), "the case needs overflow and plain elements"
    return original, w, a, b, residual, index, values


def test_unmerge_exact_refuses_an_overflow_list_that_is_not_the_merges(device):
    original, w, a, b, residual, index, values = _merged_with_overflow(device)
    merged = w.clone()
    plain = (residual.flatten() != -128).nonzero().flatten()[:1]
    bogus = torch.tensor([123.0], device=device)
    cases = {
        "an element whose correction fitted in int8": (torch.cat([index, plain]), torch.cat([values, bogus])),
        "an element listed twice, with another value": (torch.cat([index, index[:1]]), torch.cat([values, bogus])),
        "an element listed twice, with its value": (torch.cat([index, index[:1]]), torch.cat([values, values[:1]])),
    }
    for what, (i, v) in cases.items():
        with pytest.raises(RuntimeError, match="overflow_index lists an element"):
            ops.unmerge_exact_(w, a, b, 0.75, residual, i, v)
        assert torch.equal(w, merged), f"{what}: the refused unmerge wrote"
    ops.unmerge_exact_(w, a, b, 0.75, residual, index, values)  # the merge's own list
    assert torch.equal(w.view(torch.int32), original.view(torch.int32))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=id_formatter("dtype"))
def test_lora_linear_backward_keeps_its_intermediates_in_fp32(device, dtype):
    """g @ B kept in fp32 before it meets x: with cancellation grad_a is 0.25, not 0, and in
    fp16 a g @ B past the range (76800) stays finite. (The CPU always did; this pins the
    CUDA kernels, which rounded g @ B and x @ A^T to the input dtype.)"""
    big = 2.0 / torch.finfo(dtype).eps  # big + 1 rounds to big in dtype (a tie, to even)
    x = torch.tensor([[0.25], [0.25]], dtype=dtype, device=device)  # T=2, in=1, r=1
    w = torch.zeros(2, 1, dtype=dtype, device=device)
    lora_a = torch.ones(1, 1, dtype=dtype, device=device)
    lora_b = torch.ones(2, 1, dtype=dtype, device=device)
    grad = torch.tensor([[big, 1.0], [-big, 0.0]], dtype=dtype, device=device)  # g @ B: big + 1, -big
    backward = torch.ops.lora_ext.lora_linear_backward.default
    _, xa = torch.ops.lora_ext.lora_linear.default(x, w, None, lora_a, lora_b, 1.0)
    assert backward(grad, x, w, lora_a, lora_b, xa, 1.0, [False, False, False, True, False])[3].item() == 0.25
    if dtype != torch.float16:
        return
    g = torch.tensor([[300.0, 300.0]], dtype=dtype, device=device)
    lora_b = torch.full((2, 1), 128.0, dtype=dtype, device=device)  # g @ B = 76800 > 65504
    x1 = torch.tensor([[1e-3]], dtype=dtype, device=device)
    _, xa1 = torch.ops.lora_ext.lora_linear.default(x1, w, None, lora_a, lora_b, 1.0)
    grad_a = backward(g, x1, w, lora_a, lora_b, xa1, 1.0, [False, False, False, True, False])[3]
    assert torch.equal(grad_a.cpu(), (torch.tensor(76800.0) * x1.float().cpu()).to(dtype))


def _isa_names() -> list[str]:
    best = ops.merge_variant(torch.empty(0)).split("/")[-1].lower()
    order = ["default", "avx2", "avx512", "avx512bf16"]
    return order[: order.index(best)] if best in order else []


@pytest.mark.parametrize("isa", _isa_names())
def test_rows_do_not_depend_on_the_batch_on_other_cpu_builds(isa):
    """The same contract with the kernels of another instruction set (chosen per process)."""
    code = """
import torch, lora_ext
from lora_ext import ops
torch.use_deterministic_algorithms(True)
g = torch.Generator().manual_seed(0)
for dtype in (torch.float32, torch.bfloat16, torch.float16):
    x = torch.randn(200, 256, generator=g).to(dtype)
    a = (torch.randn(4, 16, 256, generator=g) / 16).to(dtype)
    b = torch.randn(4, 96, 16, generator=g).to(dtype)
    idx = torch.randint(0, 4, (200,), generator=g); idx[:100] = 0
    s = torch.rand(4, generator=g) + 0.5
    full = ops.multi_lora(x, a, b, idx, s)
    for t in (0, 1, 150, 199):
        for rows in (torch.tensor([t]), torch.full((64,), t)):
            assert torch.equal(ops.multi_lora(x[rows], a, b, idx[rows], s)[0], full[t]), (dtype, t, len(rows))
print(ops.merge_variant(torch.empty(0)))
"""
    env = dict(os.environ, LORA_EXT_CPU_ISA=isa)
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().lower() == f"cpu/{isa}"


# ---------------------------------------------------------------------------
# The vLLM plugin's default on CUDA (a stand-in for vllm.platforms: runs without vLLM).


def _fake_vllm(monkeypatch, cuda: bool):
    from lora_ext.integrations import vllm as plugin

    class Platform:
        @classmethod
        def get_punica_wrapper(cls):
            return "vllm.lora.punica_wrapper.punica_gpu.PunicaWrapperGPU" if cuda else "vllm.lora.punica_wrapper.punica_cpu.PunicaWrapperCPU"

        def is_cpu(self):
            return not cuda

        def is_cuda(self):
            return cuda

    platforms = types.ModuleType("vllm.platforms")
    platforms.current_platform = Platform()
    monkeypatch.setitem(sys.modules, "vllm", types.ModuleType("vllm"))
    monkeypatch.setitem(sys.modules, "vllm.platforms", platforms)
    monkeypatch.setattr(plugin, "_base_wrapper_qualname", None)
    return plugin, Platform


@pytest.mark.parametrize(
    "cuda, env, ours",
    [(True, None, False), (True, "1", True), (True, "0", False), (False, None, True), (False, "0", False)],
    ids=["cuda-default", "cuda-opt-in", "cuda-off", "cpu-default", "cpu-off"],
)
def test_vllm_plugin_stays_off_on_cuda_until_opted_in(monkeypatch, caplog, cuda, env, ours):
    plugin, platform = _fake_vllm(monkeypatch, cuda)
    if env is None:
        monkeypatch.delenv(plugin.ENV_SWITCH, raising=False)
    else:
        monkeypatch.setenv(plugin.ENV_SWITCH, env)
    before = platform.get_punica_wrapper()
    plugin._logger.addHandler(caplog.handler)  # vLLM's own logging config may not propagate
    try:
        with caplog.at_level(logging.INFO, logger="vllm.lora_ext"):
            plugin.register()
    finally:
        plugin._logger.removeHandler(caplog.handler)
    assert (platform.get_punica_wrapper() == plugin._WRAPPER_QUALNAME) is ours
    if not ours:
        assert platform.get_punica_wrapper() == before
    if cuda and env is None:
        assert "gpu_check.sh" in caplog.text and f"{plugin.ENV_SWITCH}=1" in caplog.text

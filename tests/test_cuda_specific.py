"""CUDA-only behaviour: graph capture/replay, torch.compile(mode="reduce-overhead"),
the decode and prefill paths of multi_lora, and index checks. Skipped without a GPU."""

import pytest
import torch

import lora_ext
from lora_ext import ops

from conftest import DTYPES, assert_close_to_ref, id_formatter
from test_ops import make_multi_lora, ref_multi_lora

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

# T <= 128 takes the decode kernels, larger T the grouped (prefill) kernels.
PATH_SHAPES = [  # (T, in, out, N, R)
    (64, 4096, 4096, 64, 16),
    (128, 136, 72, 5, 24),
    (129, 136, 72, 5, 24),
    (700, 257, 129, 3, 64),
    (300, 4104, 40, 2, 512),
]


@pytest.mark.parametrize("shape", PATH_SHAPES, ids=lambda s: "T{}_in{}_out{}_N{}_R{}".format(*s))
@pytest.mark.parametrize("dtype", DTYPES, ids=id_formatter("dtype"))
def test_multi_lora_decode_and_prefill_paths(shape, dtype):
    args = make_multi_lora(*shape, "cuda", dtype)
    assert_close_to_ref(ops.multi_lora(*args), ref_multi_lora(*args), dtype, "multi_lora")


@pytest.mark.parametrize("T", [40, 200], ids=lambda t: f"T{t}")
def test_multi_lora_misaligned_inputs(T):
    """Inputs that are not 16-byte aligned take the scalar loads and still match."""
    x, a, b, idx, scales, ranks, base = make_multi_lora(T, 128, 64, 4, 8, "cuda", torch.bfloat16)
    x_off = torch.empty(T * 128 + 1, device="cuda", dtype=x.dtype)[1:].view(T, 128)
    x_off.copy_(x)
    b_off = torch.empty(b.numel() + 3, device="cuda", dtype=b.dtype)[3:].view(b.shape)
    b_off.copy_(b)
    y = ops.multi_lora(x_off, a, b_off, idx, scales, ranks, base)
    assert_close_to_ref(y, ref_multi_lora(x, a, b, idx, scales, ranks, base), torch.bfloat16)


@pytest.mark.parametrize("T", [8, 300], ids=lambda t: f"T{t}")
def test_multi_lora_bad_index_raises_naming_it(T):
    x, a, b, idx, scales, ranks, base = make_multi_lora(T, 32, 16, 3, 4, "cuda", torch.float32)
    idx[T // 2] = 3
    with pytest.raises(RuntimeError, match=r"indices\[\d+\] = 3"):
        ops.multi_lora(x, a, b, idx, scales, ranks, base)
    idx[T // 2] = 0
    bad_ranks = ranks.clone()
    bad_ranks[1] = 5
    with pytest.raises(RuntimeError, match=r"ranks\[1\] = 5"):
        ops.multi_lora(x, a, b, idx, scales, bad_ranks, base)


@pytest.mark.parametrize("T", [16, 300], ids=lambda t: f"T{t}")
def test_multi_lora_cuda_graph_capture_and_replay(T):
    x, a, b, idx, scales, ranks, base = make_multi_lora(T, 96, 80, 4, 8, "cuda", torch.bfloat16)
    static = [t.clone() for t in (x, idx, base)]
    ops.multi_lora(static[0], a, b, static[1], scales, ranks, static[2])  # warm up
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = ops.multi_lora(static[0], a, b, static[1], scales, ranks, static[2])
    for seed in range(3):
        g = torch.Generator().manual_seed(100 + seed)
        static[0].copy_(torch.randn(x.shape, generator=g).to(x))
        static[1].copy_(torch.randint(-1, 4, idx.shape, generator=g).to(idx))
        static[2].copy_(torch.randn(base.shape, generator=g).to(base))
        graph.replay()
        ref = ref_multi_lora(static[0], a, b, static[1], scales, ranks, static[2])
        assert_close_to_ref(y, ref, torch.bfloat16, f"replay {seed}")
    # Out-of-range indices inside a graph cannot raise; they must act as -1 (base).
    static[1].fill_(7)
    graph.replay()
    assert torch.equal(y, static[2])


def test_lora_linear_and_merge_cuda_graph_capture():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(33, 70, generator=g).cuda()
    w = torch.randn(50, 70, generator=g).cuda() / 8
    a = torch.randn(6, 70, generator=g).cuda() / 8
    b = torch.randn(50, 6, generator=g).cuda()
    w_graph = w.clone()
    ops.lora_linear(x, w, None, a, b, 0.5)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = ops.lora_linear(x, w, None, a, b, 0.5)
        ops.merge_(w_graph, a, b, 0.5)
    graph.replay()
    ref = x.double() @ w.double().T + 0.5 * (x.double() @ a.double().T) @ b.double().T
    assert_close_to_ref(y, ref.cpu(), torch.float32, "lora_linear in a graph")
    assert_close_to_ref(w_graph, (w.double() + 0.5 * b.double() @ a.double()).cpu(), torch.float32, "merge_ in a graph")


def test_multi_lora_compile_reduce_overhead():
    torch._dynamo.reset()
    x, a, b, idx, scales, ranks, base = make_multi_lora(24, 64, 48, 4, 8, "cuda", torch.float16)
    fn = torch.compile(ops.multi_lora, mode="reduce-overhead", fullgraph=True)
    for step in range(4):  # warm-up runs, then recorded and replayed graphs
        g = torch.Generator().manual_seed(step)
        xs = torch.randn(x.shape, generator=g).to(x)
        ids = torch.randint(-1, 4, idx.shape, generator=g).to(idx)
        y = fn(xs, a, b, ids, scales, ranks, base).clone()
        assert_close_to_ref(y, ref_multi_lora(xs, a, b, ids, scales, ranks, base), torch.float16, f"step {step}")


def test_lora_linear_compile_reduce_overhead_with_backward():
    torch._dynamo.reset()
    g = torch.Generator().manual_seed(6)
    w = (torch.randn(40, 56, generator=g) / 8).cuda()
    a = (torch.randn(4, 56, generator=g) / 8).cuda().requires_grad_()
    b = torch.randn(40, 4, generator=g).cuda().requires_grad_()

    def step(x):
        return ops.lora_linear(x, w, None, a, b, 0.5).square().sum()

    fn = torch.compile(step, mode="reduce-overhead", fullgraph=True)
    for i in range(3):
        x = torch.randn(9, 56, generator=g).cuda()
        a.grad = b.grad = None
        loss = fn(x)
        loss.backward()
        a64, b64 = a.detach().double().requires_grad_(), b.detach().double().requires_grad_()
        ref = (x.double() @ w.double().T + 0.5 * (x.double() @ a64.T) @ b64.T).square().sum()
        ref.backward()
        assert abs(loss.item() - ref.item()) <= 1e-4 * max(1.0, abs(ref.item()))
        assert_close_to_ref(a.grad, a64.grad.cpu(), torch.float32, f"grad a, step {i}")
        assert_close_to_ref(b.grad, b64.grad.cpu(), torch.float32, f"grad b, step {i}")


@pytest.mark.parametrize("dtype", DTYPES, ids=id_formatter("dtype"))
def test_multi_lora_backward_prefill_sizes(dtype):
    """Grouped backward kernels with many rows per adapter and ranks below R."""
    x, a, b, idx, scales, ranks, base = make_multi_lora(300, 72, 40, 3, 24, "cuda", torch.float64)
    ours = [t.to(dtype).clone().requires_grad_() for t in (x, a, b)]
    refs = [t.detach().clone().requires_grad_() for t in (x, a, b)]
    grad = torch.randn(300, 40, dtype=torch.float64, device="cuda")
    ops.multi_lora(*ours, idx, scales, ranks, None).backward(grad.to(dtype))
    keep = (torch.arange(24, device="cuda")[None, :] < ranks[:, None]).double()
    safe = idx.clamp(min=0)
    xa = torch.einsum("tk,tjk->tj", refs[0], (refs[1] * keep[:, :, None])[safe])
    y = torch.einsum("tj,toj->to", xa, (refs[2] * keep[:, None, :])[safe]) * scales.double()[safe][:, None]
    (y * (idx >= 0).double()[:, None]).backward(grad)
    for name, mine, ref in zip(["x", "a_stack", "b_stack"], ours, refs):
        assert_close_to_ref(mine.grad, ref.grad.cpu(), dtype, f"grad {name}")


def test_float64_matches_cpu():
    args = make_multi_lora(200, 33, 17, 3, 6, "cuda", torch.float64)
    cpu_args = [t.cpu() if isinstance(t, torch.Tensor) else t for t in args]
    torch.testing.assert_close(ops.multi_lora(*args).cpu(), ops.multi_lora(*cpu_args), rtol=1e-12, atol=1e-12)
    assert lora_ext.multi_lora is ops.multi_lora

"""The kernel workloads of benchmarks/run.py, through lora_ext's public ops: W1-W4
(``multi_lora``), W5 (``lora_linear``, forward and backward), W6 (``merge_``) and W12
(the prefill shrink and expand kernels' rate). W1-W6 are also the C++ harness's
(benchmarks/cpp/bench.cpp); both take their shapes from benchmarks/shapes.txt."""

from __future__ import annotations

import math
from typing import Callable, Optional

import torch
import torch.nn.functional as F

import lora_ext
from harness import Fixed, dtype_name, measure, median, peak_extra_bytes, rel_err, result

# ---------------------------------------------------------------------------
# W1-W4: multi_lora


class MultiLoraCase:
    def __init__(self, device, dtype, tokens, hidden, ranks: list[int], indices: torch.Tensor):
        n, rmax = len(ranks), max(ranks)
        self.ranks = ranks
        self.x = torch.randn(tokens, hidden, device=device, dtype=dtype)
        self.a_stack = torch.randn(n, rmax, hidden, device=device, dtype=dtype) / math.sqrt(hidden)
        self.b_stack = torch.randn(n, hidden, rmax, device=device, dtype=dtype) / math.sqrt(rmax)
        for i, r in enumerate(ranks):  # zero beyond each rank, so padded baselines agree
            self.a_stack[i, r:] = 0
            self.b_stack[i, :, r:] = 0
        self.scales = (torch.rand(n) + 0.5).to(device)
        self.ranks_t = torch.tensor(ranks, device=device)
        self.indices = indices.to(device)
        self.host_indices = indices.tolist()  # what PEFT loops over (its adapter_names)
        self.base = torch.randn(tokens, hidden, device=device, dtype=dtype)
        self.weight = torch.randn(hidden, hidden, device=device, dtype=dtype) / math.sqrt(hidden)
        # PEFT keeps a separate lora_A / lora_B per adapter.
        self.peft_a = [self.a_stack[i, :r].contiguous() for i, r in enumerate(ranks)]
        self.peft_b = [self.b_stack[i, :, :r].contiguous() for i, r in enumerate(ranks)]
        self.peft_s = self.scales.tolist()

    def lora_ext(self, pass_ranks: bool):
        ranks = self.ranks_t if pass_ranks else None
        return lora_ext.multi_lora(self.x, self.a_stack, self.b_stack, self.indices, self.scales,
                                   ranks, self.base)

    def lora_ext_add(self, pass_ranks: bool):
        """The in-place form LoRALinear's inference forward uses: the update added into an
        existing output (there, the base GEMM's), so no fresh [T, out] tensor. Here it
        accumulates into one buffer again and again: the timing is the same."""
        if not hasattr(self, "y_acc"):
            self.y_acc = self.base.clone()
        ranks = self.ranks_t if pass_ranks else None
        lora_ext.ops.multi_lora_add_(self.y_acc, self.x, self.a_stack, self.b_stack, self.indices,
                                     self.scales, ranks)
        return self.y_acc

    def peft_loop(self):
        """PEFT's mixed batch: per used adapter, index rows, two matmuls, index_add."""
        rows: dict[int, list[int]] = {}
        for t, i in enumerate(self.host_indices):
            if i >= 0:
                rows.setdefault(i, []).append(t)
        y = self.base.clone()
        for i, r in rows.items():
            idx = torch.tensor(r, device=self.x.device)
            h = F.linear(self.x.index_select(0, idx), self.peft_a[i])
            y.index_add_(0, idx, F.linear(h, self.peft_b[i]).mul_(self.peft_s[i]))
        return y

    def gather_bmm(self):
        """Copy each row's A and B, then batched matmuls."""
        used = self.indices >= 0
        idx = self.indices.clamp_min(0)
        a = self.a_stack.index_select(0, idx)
        b = self.b_stack.index_select(0, idx)
        d = torch.bmm(torch.bmm(self.x.unsqueeze(1), a.transpose(1, 2)), b.transpose(1, 2)).squeeze(1)
        s = (self.scales.index_select(0, idx) * used).to(d.dtype).unsqueeze(1)
        return self.base + d * s

    def traffic(self) -> tuple[float, float]:
        """(FLOPs, bytes): x of adapted rows, base and y of all rows, each used A/B once."""
        hidden, tokens = self.x.shape[1], self.x.shape[0]
        esz = self.x.element_size()
        active = [i for i in self.host_indices if i >= 0]
        used = set(active)
        flops = sum(2.0 * self.ranks[i] * 2 * hidden for i in active)
        bytes_ = esz * (len(active) * hidden + 2 * tokens * hidden + sum(self.ranks[i] * 2 * hidden for i in used))
        return flops, bytes_


def run_multi_lora(name, description, device, dtype, case: MultiLoraCase, pass_ranks, ceil, args,
                   uniform: Optional[MultiLoraCase] = None):
    ref = case.peft_loop()
    err = max(rel_err(case.lora_ext(pass_ranks), ref), rel_err(case.gather_bmm(), ref),
              rel_err(case.lora_ext_add(pass_ranks), ref))
    fns = {
        "lora_ext": lambda: case.lora_ext(pass_ranks),
        "lora_ext_add_": lambda: case.lora_ext_add(pass_ranks),
        "peft_loop": case.peft_loop,
        "gather_bmm": case.gather_bmm,
        "base_linear": lambda: F.linear(case.x, case.weight),
    }
    if uniform is not None:  # W4's reference, interleaved with the rest so drift cancels
        fns["lora_ext_uniform_rank"] = lambda: uniform.lora_ext(False)
    with torch.inference_mode():
        variants = measure(device, fns, args)
    flops, bytes_ = case.traffic()
    res = result(name, description, device, dtype, flops, bytes_, variants, err)
    ceil.floors(res, dtype)
    return res


def distinct_indices(tokens: int, adapters: int) -> torch.Tensor:
    if tokens <= adapters:
        return torch.randperm(adapters)[:tokens]
    return torch.arange(tokens) % adapters


def multi_lora_workloads(device, dtype, args, ceil, selected) -> list[dict]:
    H, r, Td, Tp, N = args.hidden, args.rank, args.tokens_decode, args.tokens_prefill, args.adapters
    fixed = Fixed()
    out = []
    if "W1" in selected:
        case = MultiLoraCase(device, dtype, Td, H, [r] * N, distinct_indices(Td, N))
        out.append(run_multi_lora("W1", f"decode, distinct: T={Td}, {N} adapters, every row its own, r={r}",
                                  device, dtype, case, False, ceil, args))
    if "W2" in selected:
        n2 = fixed.w2_adapters
        idx = torch.randint(0, n2, (Td,))
        idx[torch.randperm(Td)[: int(Td * fixed.w2_unadapted)]] = -1
        case = MultiLoraCase(device, dtype, Td, H, [r] * n2, idx)
        out.append(run_multi_lora("W2", f"decode, shared: T={Td} over {n2} adapters, "
                                  f"{fixed.w2_unadapted:.0%} rows -1, r={r}", device, dtype, case, False, ceil, args))
    if "W3" in selected:
        n3 = fixed.w3_adapters
        p = torch.arange(1, n3 + 1, dtype=torch.float64).pow(-fixed.w3_zipf)
        idx = torch.multinomial(p, Tp, replacement=True)
        case = MultiLoraCase(device, dtype, Tp, H, [r] * n3, idx)
        out.append(run_multi_lora("W3", f"prefill, skewed: T={Tp} over {n3} adapters, Zipf({fixed.w3_zipf:g}), r={r}",
                                  device, dtype, case, False, ceil, args))
    if "W4" in selected:
        choices = fixed.w4_ranks
        ranks = [choices[int(k)] for k in torch.randint(0, len(choices), (N,))]
        idx = distinct_indices(Td, N)
        mean = sum(ranks[i] for i in idx.tolist()) / len(idx)
        mean_rank = round(mean)
        case = MultiLoraCase(device, dtype, Td, H, ranks, idx)
        ref_case = MultiLoraCase(device, dtype, Td, H, [mean_rank] * N, idx)
        listed = ",".join(map(str, choices))
        w4 = run_multi_lora("W4", f"mixed ranks: like W1, ranks from {{{listed}}} (R={max(choices)}), mean rank "
                            f"{mean:.2f}; lora_ext_uniform_rank: W1 at r={mean_rank}", device, dtype, case, True,
                            ceil, args, uniform=ref_case)
        # Work is linear in rank: scale the reference to the exact mean.
        ref_ms = median(w4, "lora_ext_uniform_rank") * mean / mean_rank
        w4["extra"].update(mean_rank=mean, time_over_w1_at_mean_rank=median(w4, "lora_ext") / ref_ms)
        out.append(w4)
    return out


# ---------------------------------------------------------------------------
# W5: lora_linear forward, and forward+backward through autograd


def _saved_bytes(fn: Callable[[], torch.Tensor], inputs: list[torch.Tensor]) -> tuple[int, int]:
    """(all, activations): bytes of the distinct storages autograd saves for backward;
    activations excludes the storages of the inputs and parameters, which exist anyway."""
    saved: dict[int, int] = {}

    def pack(t):
        s = t.untyped_storage()
        saved[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = fn()
    del y
    own = {t.untyped_storage().data_ptr() for t in inputs}
    return sum(saved.values()), sum(n for p, n in saved.items() if p not in own)


def lora_linear_workloads(device, dtype, args, ceil) -> list[dict]:
    T, H, r, s = args.tokens_prefill, args.hidden, args.rank, 2.0
    x = torch.randn(T, H, device=device, dtype=dtype, requires_grad=True)
    w = torch.randn(H, H, device=device, dtype=dtype) / math.sqrt(H)
    bias = torch.randn(H, device=device, dtype=dtype)
    a = (torch.randn(r, H, device=device, dtype=dtype) / math.sqrt(H)).requires_grad_()
    b = (torch.randn(H, r, device=device, dtype=dtype) / math.sqrt(r)).requires_grad_()
    g = torch.randn(T, H, device=device, dtype=dtype)
    leaves = [x, a, b]

    forwards = {
        "lora_ext": lambda: lora_ext.lora_linear(x, w, bias, a, b, s),
        # PEFT: base_layer(x) + lora_B(lora_A(dropout(x))) * scaling
        "peft_compose": lambda: F.linear(x, w, bias) + F.linear(F.linear(x, a), b) * s,
        "base_linear": lambda: F.linear(x, w, bias),
    }

    def fwd_bwd(fwd):
        def step():
            for t in leaves:
                t.grad = None
            fwd().backward(g)
        return step

    def grads(fwd):
        fwd_bwd(fwd)()
        return [t.grad.clone() for t in leaves]

    esz = x.element_size()
    out = []
    for backward in (False, True):
        base_flops = (4.0 if backward else 2.0) * T * H * H
        lora_flops = (6.0 if backward else 2.0) * T * r * 2 * H
        bytes_ = esz * (T * H + H * H + 2 * r * H + T * H + ((T * H + T * H + 2 * r * H) if backward else 0))
        if backward:
            got, ref = grads(forwards["lora_ext"]), grads(forwards["peft_compose"])
            err = max(rel_err(u, v) for u, v in zip(got, ref))
            variants = measure(device, {k: fwd_bwd(f) for k, f in forwards.items()}, args)
        else:
            with torch.no_grad():
                err = rel_err(forwards["lora_ext"](), forwards["peft_compose"]())
                variants = measure(device, forwards, args)
        extra = {"lora_flop_share": lora_flops / base_flops}
        name = "W5-fwd+bwd" if backward else "W5-fwd"
        res = result(name, f"lora_linear T={T} in=out={H} r={r}" + (
            ", autograd grads for x, A, B (weight frozen)" if backward else ""),
            device, dtype, base_flops + lora_flops, bytes_, variants, err, extra)
        base_ms = median(res, "base_linear")
        overhead = median(res, "lora_ext") / base_ms - 1
        extra.update(lora_ext_overhead_over_base=overhead,
                     peft_overhead_over_base=median(res, "peft_compose") / base_ms - 1,
                     overhead_over_flop_share=overhead / extra["lora_flop_share"])
        if backward:
            params = [x, w, bias, a, b]
            for k in ("lora_ext", "peft_compose", "base_linear"):
                total, act = _saved_bytes(forwards[k], params)
                extra[f"saved_bytes_{k}"] = total
                extra[f"saved_activation_bytes_{k}"] = act
        ceil.floors(res, dtype)
        out.append(res)
    return out


# ---------------------------------------------------------------------------
# W12: the prefill shrink and expand kernels' rate (issue 10)


def prefill_rate_workloads(device, args, ceil) -> list[dict]:
    """One adapter over every prefill row, r from 8 to 64, fp32 and bf16, timed as two
    problems that are almost all one kernel: shrink (in = hidden, 16 outputs) and expand
    (16 inputs, out = hidden), each through multi_lora_add_ against ATen's GEMM on the
    same shape (x @ A.T, y += s * xa @ B.T)."""
    T, H = args.tokens_prefill, args.hidden
    ranks = (8, 16) if args.tiny else (8, 16, 32, 64)
    out = []
    for dtype in (torch.float32, torch.bfloat16):
        esz = torch.tensor([], dtype=dtype).element_size()
        for r in ranks:
            for phase, (d_in, d_out) in (("shrink", (H, 16)), ("expand", (16, H))):
                x = torch.randn(T, d_in, device=device, dtype=dtype)
                a = torch.randn(1, r, d_in, device=device, dtype=dtype) / math.sqrt(d_in)
                b = torch.randn(1, d_out, r, device=device, dtype=dtype) / math.sqrt(r)
                y = torch.randn(T, d_out, device=device, dtype=dtype)
                idx = torch.zeros(T, dtype=torch.int32, device=device)
                s = torch.tensor([0.5], device=device)
                xa = torch.randn(T, r, device=device, dtype=dtype)
                ref = y.double() + 0.5 * (x.double() @ a[0].double().T) @ b[0].double().T
                got = y.clone()
                lora_ext.ops.multi_lora_add_(got, x, a, b, idx, s)
                err = rel_err(got, ref)
                if phase == "shrink":
                    fns = {"lora_ext": lambda: lora_ext.ops.multi_lora_add_(y, x, a, b, idx, s),
                           "aten": lambda: torch.mm(x, a[0].T, out=xa)}
                else:
                    fns = {"lora_ext": lambda: lora_ext.ops.multi_lora_add_(y, x, a, b, idx, s),
                           "aten": lambda: y.addmm_(xa, b[0].T, alpha=0.5)}
                with torch.inference_mode():
                    variants = measure(device, fns, args)
                flops = 2.0 * T * r * (d_in + d_out)
                bytes_ = esz * (T * d_in + r * (d_in + d_out) + 2 * T * d_out)
                res = result(f"W12-{phase}", f"prefill {phase}: T={T}, {d_in} -> {d_out}, r={r}, one adapter",
                              device, dtype, flops, bytes_, variants, err, {"rank": r})
                ceil.floors(res, dtype)
                gemm = ceil.compute_rate(dtype)
                res["extra"].update(
                    gflops=flops / median(res, "lora_ext") / 1e6,
                    rate_over_gemm=flops / median(res, "lora_ext") / 1e6 / gemm,
                    time_over_aten=median(res, "lora_ext") / median(res, "aten"))
                out.append(res)
    return out


# ---------------------------------------------------------------------------
# W6: merge_


def peft_merge(w: torch.Tensor, a: torch.Tensor, b: torch.Tensor, s: float) -> None:
    """PEFT's merge: materialise scale * B @ A (in fp32 for fp16/bf16 on the CPU), add."""
    if w.device.type == "cpu" and w.dtype in (torch.float16, torch.bfloat16):
        delta = ((b.float() @ a.float()) * s).to(w.dtype)
    else:
        delta = (b @ a) * s
    w += delta


def merge_workloads(device, args, ceil) -> list[dict]:
    n, r, s = args.hidden, args.rank, 0.5
    out = []
    for dtype in (torch.float32, torch.bfloat16):
        w = torch.randn(n, n, device=device, dtype=dtype)
        a = torch.randn(r, n, device=device, dtype=dtype) / math.sqrt(n)
        b = torch.randn(n, r, device=device, dtype=dtype) * 1e-3
        w1, w2 = w.clone(), w.clone()
        lora_ext.merge_(w1, a, b, s)
        err = rel_err(w1, w.float() + (b.float() @ a.float()) * s)
        extra = {
            "peak_extra_bytes_lora_ext": peak_extra_bytes(device, lambda: lora_ext.merge_(w1, a, b, s)),
            "peak_extra_bytes_peft_merge": peak_extra_bytes(device, lambda: peft_merge(w2, a, b, s)),
            "weight_bytes": float(w.numel() * w.element_size()),
        }
        del w1, w2
        wp = w.clone()
        variants = measure(device, {"lora_ext": lambda: lora_ext.merge_(w, a, b, s),
                                    "peft_merge": lambda: peft_merge(wp, a, b, s)}, args)
        esz = w.element_size()
        res = result(f"W6-{dtype_name(dtype)}", f"merge_ on a {n}x{n} weight, r={r}", device, dtype,
                      2.0 * n * n * r, esz * (2.0 * n * n + 2 * r * n), variants, err, extra)
        ceil.floors(res, dtype)
        out.append(res)
    return out

#!/usr/bin/env python
"""The Python benchmark suite: lora_ext's public API against PEFT-style baselines.

W1-W6 are the C++ harness's workloads (benchmarks/cpp) run through ``lora_ext.*``
and real autograd; W7 (mixed-adapter generation) and W8 (a LoRA training step)
run SmolLM2-135M; W12 times the prefill shrink and expand kernels against ATen's GEMM
on the same shapes. Writes ``latest.json``, ``latest.md`` and ``latest.png`` to
``--out`` (default benchmarks/results). Timings: median and p10..p90 over repeats
after warm-up, variants interleaved round-robin; CUDA events on the GPU. Floors:
bytes over the copy bandwidth and FLOPs over the GEMM rate, both measured in the
same run. See BENCHMARKS.md.

    python benchmarks/run.py                       # everything, CPU (and CUDA if present)
    python benchmarks/run.py --workloads W1,W3 --hidden 2048 --reps 5
    python benchmarks/run.py --tiny --workloads W1,W2,W3,W4,W5,W6   # smoke test
    python benchmarks/run.py --cpp build/bench/lora_ext_bench       # also embed the C++ harness
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F

import lora_ext

ROOT = Path(__file__).resolve().parents[1]
ALL_WORKLOADS = ["W1", "W2", "W3", "W4", "W5", "W6", "W7", "W8", "W9"]
ALL_WORKLOADS.append("W10")  # vLLM with the lora_ext plugin: benchmarks/vllm_w10.py
ALL_WORKLOADS.append("W11")  # W8's step on 2 ranks (DDP, FSDP2): benchmarks/train_w11.py
ALL_WORKLOADS.append("W12")  # the prefill shrink/expand kernels' rate, fp32 and bf16
LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
NOT_YET = "not yet available"


# ---------------------------------------------------------------------------
# Timing


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_once_ms(device: torch.device, fn: Callable[[], object]) -> float:
    if device.type == "cuda":
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        stop.record()
        stop.synchronize()
        return start.elapsed_time(stop)
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def _quantile(values: list[float], q: float) -> float:
    v = sorted(values)
    pos = q * (len(v) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(v) - 1)
    return v[lo] + (pos - lo) * (v[hi] - v[lo])


def measure(device, variants: dict[str, Callable], args, reps: Optional[int] = None,
            warmup: Optional[int] = None) -> list[dict]:
    """Time each variant; one call of each per round, so drift hits all alike."""
    reps = args.reps if reps is None else reps
    round_ms = warm_ms = 0.0
    for _ in range(max(1, args.warmup if warmup is None else warmup)):
        if warm_ms > args.max_seconds * 250:  # slow workload: a quarter of the budget is enough
            break
        round_ms = sum(time_once_ms(device, fn) for fn in variants.values())
        warm_ms += round_ms
    if round_ms > 0:
        reps = min(reps, int(args.max_seconds * 1e3 / round_ms))
    reps = max(reps, 3)
    times = {name: [] for name in variants}
    for _ in range(reps):
        for name, fn in variants.items():
            times[name].append(time_once_ms(device, fn))
    return [
        {
            "name": name,
            "median_ms": _quantile(t, 0.5),
            "p10_ms": _quantile(t, 0.1),
            "p90_ms": _quantile(t, 0.9),
            "min_ms": min(t),
            "n": len(t),
        }
        for name, t in times.items()
    ]


class Ceilings:
    """The machine's copy bandwidth (read + write counted) and GEMM rate, measured now."""

    def __init__(self, device: torch.device, args):
        self.device, self.args = device, args
        n = 1 << 22 if args.tiny else (1 << 28 if device.type == "cuda" else 1 << 26)
        src = torch.rand(n, device=device)
        dst = torch.empty_like(src)
        (v,) = measure(device, {"copy": lambda: dst.copy_(src)}, args, reps=max(args.reps, 10))
        self.copy_gbps = 2 * n * 4 / (v["median_ms"] * 1e-3) / 1e9
        self.gemm_gflops: dict[str, float] = {}

    def gemm(self, dtype: torch.dtype) -> float:
        key = str(dtype).replace("torch.", "")
        if key not in self.gemm_gflops:
            n = 256 if self.args.tiny else (8192 if self.device.type == "cuda" else 2048)
            a = torch.randn(n, n, device=self.device, dtype=dtype)
            b, c = torch.randn_like(a), torch.empty_like(a)
            (v,) = measure(self.device, {"gemm": lambda: torch.mm(a, b, out=c)}, self.args,
                           reps=max(self.args.reps, 5))
            self.gemm_gflops[key] = 2 * n**3 / (v["median_ms"] * 1e-3) / 1e9
        return self.gemm_gflops[key]

    def floors(self, res: dict, dtype: torch.dtype) -> None:
        res["memory_floor_ms"] = res["bytes"] / (self.copy_gbps * 1e9) * 1e3
        res["compute_floor_ms"] = res["flops"] / (self.gemm(dtype) * 1e9) * 1e3


def _dtype_name(dtype: torch.dtype) -> str:
    return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]


def _tolerance(dtype: torch.dtype) -> float:
    return 1e-4 if dtype == torch.float32 else 2e-2


def _rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    got, ref = got.double().cpu(), ref.double().cpu()
    if ref.numel() == 0:
        return 0.0
    return float((got - ref).abs().max() / ref.abs().max().clamp_min(1e-30))


def _result(workload, description, device, dtype, flops, bytes_, variants, err, extra=None):
    return {
        "workload": workload,
        "description": description,
        "device": str(device),
        "dtype": _dtype_name(dtype),
        "flops": flops,
        "bytes": bytes_,
        "variants": variants,
        "max_rel_err": err,
        "check_ok": err <= _tolerance(dtype),
        "extra": extra or {},
    }


def _median(res: dict, name: str) -> float:
    return next(v["median_ms"] for v in res["variants"] if v["name"] == name)


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
    err = max(_rel_err(case.lora_ext(pass_ranks), ref), _rel_err(case.gather_bmm(), ref),
              _rel_err(case.lora_ext_add(pass_ranks), ref))
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
    res = _result(name, description, device, dtype, flops, bytes_, variants, err)
    ceil.floors(res, dtype)
    return res


def _distinct_indices(tokens: int, adapters: int) -> torch.Tensor:
    if tokens <= adapters:
        return torch.randperm(adapters)[:tokens]
    return torch.arange(tokens) % adapters


def multi_lora_workloads(device, dtype, args, ceil, selected) -> list[dict]:
    H, r, Td, Tp, N = args.hidden, args.rank, args.tokens_decode, args.tokens_prefill, args.adapters
    out = []
    if "W1" in selected:
        case = MultiLoraCase(device, dtype, Td, H, [r] * N, _distinct_indices(Td, N))
        out.append(run_multi_lora("W1", f"decode, distinct: T={Td}, {N} adapters, every row its own, r={r}",
                                  device, dtype, case, False, ceil, args))
    if "W2" in selected:
        idx = torch.randint(0, 4, (Td,))
        idx[torch.randperm(Td)[: Td // 4]] = -1
        case = MultiLoraCase(device, dtype, Td, H, [r] * 4, idx)
        out.append(run_multi_lora("W2", f"decode, shared: T={Td} over 4 adapters, 25% rows -1, r={r}",
                                  device, dtype, case, False, ceil, args))
    if "W3" in selected:
        p = torch.arange(1, 9, dtype=torch.float64).pow(-1.5)
        idx = torch.multinomial(p, Tp, replacement=True)
        case = MultiLoraCase(device, dtype, Tp, H, [r] * 8, idx)
        out.append(run_multi_lora("W3", f"prefill, skewed: T={Tp} over 8 adapters, Zipf(1.5), r={r}",
                                  device, dtype, case, False, ceil, args))
    if "W4" in selected:
        ranks = [(8, 16, 32, 64)[int(k)] for k in torch.randint(0, 4, (N,))]
        idx = _distinct_indices(Td, N)
        mean = sum(ranks[i] for i in idx.tolist()) / len(idx)
        mean_rank = round(mean)
        case = MultiLoraCase(device, dtype, Td, H, ranks, idx)
        ref_case = MultiLoraCase(device, dtype, Td, H, [mean_rank] * N, idx)
        w4 = run_multi_lora("W4", f"mixed ranks: like W1, ranks from {{8,16,32,64}} (R=64), mean rank {mean:.2f}; "
                            f"lora_ext_uniform_rank: W1 at r={mean_rank}", device, dtype, case, True, ceil, args,
                            uniform=ref_case)
        # Work is linear in rank: scale the reference to the exact mean.
        ref_ms = _median(w4, "lora_ext_uniform_rank") * mean / mean_rank
        w4["extra"].update(mean_rank=mean, time_over_w1_at_mean_rank=_median(w4, "lora_ext") / ref_ms)
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
            err = max(_rel_err(u, v) for u, v in zip(got, ref))
            variants = measure(device, {k: fwd_bwd(f) for k, f in forwards.items()}, args)
        else:
            with torch.no_grad():
                err = _rel_err(forwards["lora_ext"](), forwards["peft_compose"]())
                variants = measure(device, forwards, args)
        extra = {"lora_flop_share": lora_flops / base_flops}
        name = "W5-fwd+bwd" if backward else "W5-fwd"
        res = _result(name, f"lora_linear T={T} in=out={H} r={r}" + (
            ", autograd grads for x, A, B (weight frozen)" if backward else ""),
            device, dtype, base_flops + lora_flops, bytes_, variants, err, extra)
        base_ms = _median(res, "base_linear")
        overhead = _median(res, "lora_ext") / base_ms - 1
        extra.update(lora_ext_overhead_over_base=overhead,
                     peft_overhead_over_base=_median(res, "peft_compose") / base_ms - 1,
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
                err = _rel_err(got, ref)
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
                res = _result(f"W12-{phase}", f"prefill {phase}: T={T}, {d_in} -> {d_out}, r={r}, one adapter",
                              device, dtype, flops, bytes_, variants, err, {"rank": r})
                ceil.floors(res, dtype)
                gemm = ceil.gemm(dtype)
                res["extra"].update(
                    gflops=flops / _median(res, "lora_ext") / 1e6,
                    rate_over_gemm=flops / _median(res, "lora_ext") / 1e6 / gemm,
                    time_over_aten=_median(res, "lora_ext") / _median(res, "aten"))
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


def _peak_extra_bytes(device, fn) -> Optional[float]:
    """Peak memory above the level before ``fn``: the CUDA allocator's peak on the GPU,
    the process's peak RSS on the CPU (approximate: blocks malloc reuses are not seen)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return float(torch.cuda.max_memory_allocated() - before)
    try:
        with open("/proc/self/clear_refs", "w") as f:  # resets VmHWM to the current RSS
            f.write("5")
    except OSError:
        return None

    def status(key):
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key))

    before = status("VmRSS:")
    fn()
    return float(status("VmHWM:") - before)


def merge_workloads(device, args, ceil) -> list[dict]:
    n, r, s = args.hidden, args.rank, 0.5
    out = []
    for dtype in (torch.float32, torch.bfloat16):
        w = torch.randn(n, n, device=device, dtype=dtype)
        a = torch.randn(r, n, device=device, dtype=dtype) / math.sqrt(n)
        b = torch.randn(n, r, device=device, dtype=dtype) * 1e-3
        w1, w2 = w.clone(), w.clone()
        lora_ext.merge_(w1, a, b, s)
        err = _rel_err(w1, w.float() + (b.float() @ a.float()) * s)
        extra = {
            "peak_extra_bytes_lora_ext": _peak_extra_bytes(device, lambda: lora_ext.merge_(w1, a, b, s)),
            "peak_extra_bytes_peft_merge": _peak_extra_bytes(device, lambda: peft_merge(w2, a, b, s)),
            "weight_bytes": float(w.numel() * w.element_size()),
        }
        del w1, w2
        wp = w.clone()
        variants = measure(device, {"lora_ext": lambda: lora_ext.merge_(w, a, b, s),
                                    "peft_merge": lambda: peft_merge(wp, a, b, s)}, args)
        esz = w.element_size()
        res = _result(f"W6-{_dtype_name(dtype)}", f"merge_ on a {n}x{n} weight, r={r}", device, dtype,
                      2.0 * n * n * r, esz * (2.0 * n * n + 2 * r * n), variants, err, extra)
        ceil.floors(res, dtype)
        out.append(res)
    return out


# ---------------------------------------------------------------------------
# W7, W8: SmolLM2-135M end to end


def _load_llm():
    from lora_ext import llm
    return llm.load_model()


def _not_yet(workload: str, description: str, variants: list[str], why: str) -> dict:
    return {"workload": workload, "description": description, "device": "cpu", "status": NOT_YET,
            "todo": why, "variants": [{"name": v, "status": NOT_YET} for v in variants]}


def w7_generation(args) -> dict:
    """Mixed-adapter generation: lora_ext's one-call mixed batch vs PEFT adapter_names vs base."""
    desc = "`lora-ext demo`'s mixed batch on SmolLM2-135M: generated tokens/s"
    try:
        from lora_ext import cli  # noqa: F401
    except ImportError:
        cli = None
    try:
        from lora_ext import llm, tasks
        import peft
    except ImportError as e:
        return _not_yet("W7", desc, ["lora_ext", "peft_adapter_names", "base"], f"{NOT_YET}: {e}")

    lm, tok = _load_llm()
    rng_seed = 0
    rows: list[tuple[Optional[str], str]] = []
    for name, task in tasks.TASKS.items():
        rows += [(name, p) for p, _ in task.examples(2, seed=rng_seed)]
    rows += [(None, q) for q, _ in tasks.BASE_QUESTIONS]
    names = [n for n, _ in rows]
    prompts = [p for _, p in rows]
    new_tokens = args.gen_tokens

    # The shipped adapters when present (the demo's), else random ones of the same shape.
    shipped = ROOT / "adapters"
    tmp = Path(tempfile.mkdtemp(prefix="lora_ext_w7_"))
    lx = copy.deepcopy(lm)
    adapter_dirs = {}
    for name in tasks.TASKS:
        d = shipped / name
        if (d / "adapter_config.json").is_file():
            lora_ext.load_adapter(lx, str(d), name)
            adapter_dirs[name] = d
        else:
            torch.manual_seed(hash(name) % 1000)
            lora_ext.inject_lora(lx, LLAMA_TARGETS, r=8, alpha=16, adapter_name=name, init="gaussian")
            lora_ext.save_adapter(lx, str(tmp / name), name)
            adapter_dirs[name] = tmp / name
    lx.eval()
    pm = None
    for name, d in adapter_dirs.items():
        if pm is None:
            pm = peft.PeftModel.from_pretrained(copy.deepcopy(lm), str(d), adapter_name=name)
        else:
            pm.load_adapter(str(d), adapter_name=name)
    pm.eval()
    peft_names = [n if n is not None else "__base__" for n in names]
    fixed = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens)  # same steps for all

    def ours():
        with lora_ext.set_adapter(lx, names):
            return llm.generate(lx, tok, prompts, **fixed)

    variants = measure(torch.device("cpu"), {
        "lora_ext": ours,
        "peft_adapter_names": lambda: llm.generate(pm, tok, prompts, adapter_names=peft_names, **fixed),
        "base": lambda: llm.generate(lm, tok, prompts, **fixed),
    }, args, reps=args.model_reps, warmup=1)
    tokens = len(prompts) * new_tokens
    for v in variants:
        v["tokens_per_s"] = tokens / (v["median_ms"] * 1e-3)
    source = "shipped adapters" if all(d.parent == shipped for d in adapter_dirs.values()) else \
        "random adapters (r=8 on q,k,v,o,gate,up,down; shipped adapters not yet available)"
    return {"workload": "W7", "description": f"{desc}; {len(prompts)} rows ({sum(n is None for n in names)} base), "
            f"{new_tokens} new tokens each, {source}", "device": "cpu", "variants": variants,
            "extra": {"rows": len(prompts), "new_tokens": new_tokens,
                      "demo_cli": "present" if cli is not None else NOT_YET},
            "check_ok": True}


def w8_training(args) -> dict:
    """One LoRA training step (forward, loss, backward, AdamW) vs the frozen base's fwd+bwd."""
    desc = "training step on SmolLM2-135M, r=16 on q,k,v,o,gate,up,down, batch 8x128: tokens/s"
    try:
        import peft
        lm, _ = _load_llm()
    except Exception as e:  # noqa: BLE001 (any missing piece makes this a TODO, not a failure)
        return _not_yet("W8", desc, ["lora_ext", "peft", "frozen_base"], f"{NOT_YET}: {e}")
    batch, seq = (2, 16) if args.tiny else (8, 128)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, lm.config.vocab_size, (batch, seq), generator=gen)

    base = copy.deepcopy(lm)
    for p in base.parameters():
        p.requires_grad_(False)
    base.enable_input_require_grads()  # so backward runs through every layer
    base.train()

    lx = lora_ext.inject_lora(copy.deepcopy(lm), LLAMA_TARGETS, r=16, alpha=32)
    lx.train()
    pm = peft.get_peft_model(copy.deepcopy(lm), peft.LoraConfig(
        r=16, lora_alpha=32, lora_dropout=0.0, target_modules=LLAMA_TARGETS))
    pm.train()
    del lm

    def train_step(model):
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-4)

        def step():
            opt.zero_grad(set_to_none=True)
            model(input_ids=ids, labels=ids).loss.backward()
            opt.step()
        return step, sum(p.numel() for p in params)

    ours, n_ours = train_step(lx)
    theirs, n_theirs = train_step(pm)
    variants = measure(torch.device("cpu"), {
        "lora_ext": ours,
        "peft": theirs,
        "frozen_base": lambda: base(input_ids=ids, labels=ids).loss.backward(),
    }, args, reps=args.model_reps, warmup=1)
    for v in variants:
        v["tokens_per_s"] = batch * seq / (v["median_ms"] * 1e-3)
    t = {v["name"]: v["median_ms"] for v in variants}
    return {"workload": "W8", "description": desc.replace("8x128", f"{batch}x{seq}"), "device": "cpu",
            "variants": variants, "check_ok": n_ours == n_theirs,
            "extra": {"trainable_params_lora_ext": n_ours, "trainable_params_peft": n_theirs,
                      "lora_ext_overhead_over_base": t["lora_ext"] / t["frozen_base"] - 1,
                      "peft_overhead_over_base": t["peft"] / t["frozen_base"] - 1}}


# ---------------------------------------------------------------------------
# W10: vLLM with lora_ext's plugin (benchmarks/vllm_w10.py)


def w10_vllm(args) -> dict:
    """vLLM offline throughput: no LoRA, vLLM's own LoRA path, lora_ext's plugin."""
    import importlib.util
    import shutil

    import vllm_w10 as w10  # benchmarks/, next to this file

    desc = (f"vLLM {w10.REQUESTS} requests x {w10.NEW_TOKENS} generated tokens on SmolLM2-135M, "
            f"max_loras={w10.MAX_LORAS}, r={w10.RANK} on q,k,v,o; mix3: the 3 shipped adapters + base rows "
            f"(8 each), mix16: 31 rows over 16 adapters + 1 base row; per dtype one process holds the four engines "
            f"(lora_skipped: LoRA on, linear-layer LoRA math skipped, a floor), timed in turn, "
            f"repetition after repetition")
    names = [f"{v} {d} {m}" for d in w10.DTYPES for m in w10.MIXES for v in w10.VARIANTS]
    if importlib.util.find_spec("vllm") is None:
        return _not_yet("W10", desc, names, f"{NOT_YET}: vLLM is not installed (scripts/setup_vllm.sh)")
    if args.w10_json:  # per-dtype results vllm_w10.py wrote earlier (DIR/float32.json, ...)
        res = {d: json.loads((Path(args.w10_json) / f"{d}.json").read_text()) for d in w10.DTYPES
               if (Path(args.w10_json) / f"{d}.json").is_file()}
    else:
        work = Path(tempfile.mkdtemp(prefix="lora_ext_w10_"))  # kept on failure, for the raw results
        res = w10.run_all(args.model_reps, work, dtypes=args.w10_dtypes.split(","))
        shutil.rmtree(work, ignore_errors=True)
    desc += f"; dtypes: {', '.join(res)}"
    tokens = w10.REQUESTS * w10.NEW_TOKENS
    variants, extra, check_ok = [], {}, True
    for d in res:
        for m in w10.MIXES:
            for v in w10.VARIANTS:
                ms = [s * 1e3 for s in res[d][v][m]["seconds"]]
                med = _quantile(ms, 0.5)
                variants.append({"name": f"{v} {d} {m}", "median_ms": med, "p10_ms": _quantile(ms, 0.1),
                                 "p90_ms": _quantile(ms, 0.9), "min_ms": min(ms), "n": len(ms),
                                 "tokens_per_s": tokens / (med * 1e-3)})
            tps = {v: tokens / (_quantile(res[d][v][m]["seconds"], 0.5)) for v in w10.VARIANTS}
            if all("cpu_seconds" in res[d][v][m] for v in w10.VARIANTS):
                cpu = {v: _quantile(res[d][v][m]["cpu_seconds"], 0.5) for v in w10.VARIANTS}
                for v in ("lora_ext", "vllm_lora", "lora_skipped"):
                    extra[f"cpu_time_{v}_over_no_lora_{d}_{m}"] = cpu[v] / cpu["no_lora"]
            extra[f"lora_ext_over_no_lora_{d}_{m}"] = tps["lora_ext"] / tps["no_lora"]
            extra[f"vllm_lora_over_no_lora_{d}_{m}"] = tps["vllm_lora"] / tps["no_lora"]
            extra[f"lora_skipped_over_no_lora_{d}_{m}"] = tps["lora_skipped"] / tps["no_lora"]
            rows = res[d]["rows"][m]
            extra[f"greedy_tokens_same_every_rep_{d}_{m}"] = all(
                res[d][v][m]["same_tokens_every_rep"] for v in w10.VARIANTS)
            ours, theirs, plain = (res[d][v][m]["tokens"] for v in ("lora_ext", "vllm_lora", "no_lora"))
            lora_rows = [i for i, a in enumerate(rows) if a is not None]
            base_rows = [i for i, a in enumerate(rows) if a is None]
            same_lora = sum(ours[i] == theirs[i] for i in lora_rows)
            extra[f"same_tokens_as_vllm_lora_{d}_{m}"] = f"{same_lora}/{len(lora_rows)} adapter rows"
            extra[f"base_rows_same_as_no_lora_{d}_{m}"] = (
                f"lora_ext {sum(ours[i] == plain[i] for i in base_rows)}/{len(base_rows)}, "
                f"vllm_lora {sum(theirs[i] == plain[i] for i in base_rows)}/{len(base_rows)}")
            if d == "float32":  # bf16 rounding may flip a late greedy token; fp32 must agree
                check_ok &= same_lora == len(lora_rows) and all(ours[i] == plain[i] for i in base_rows)
    return {"workload": "W10", "description": desc, "device": "cpu", "variants": variants, "extra": extra,
            "check_ok": check_ok}


# ---------------------------------------------------------------------------
# W9: many adapters in one model


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _lora_bytes(model) -> tuple[int, int]:
    """(bytes of the adapters' parameters, bytes of the slot stacks) over all LoRA layers."""
    from lora_ext.model import _lora_layers
    params = stacks = 0
    for _, layer in _lora_layers(model):
        params += sum(p.numel() * p.element_size() for d in (layer.lora_A, layer.lora_B) for p in d.values())
        stacks += sum(t.numel() * t.element_size() for t in layer.stacks()[:2])
    return params, stacks


def w9_many_adapters(args) -> dict:
    """Thousands of adapters on SmolLM2-135M: per-step cost, memory, load/replace, a pool."""
    import random

    from safetensors.torch import load_file
    from lora_ext import llm, tasks

    counts = (3, 10, 40) if args.tiny else (3, 100, 1000)
    new_tokens = 4 if args.tiny else args.gen_tokens
    desc = (f"{counts[-1]} adapters on SmolLM2-135M (the 3 shipped r=8 q/k/v/o adapters + random ones of "
            f"the same shape, fp32): W7's 8-row mixed batch over the 3 shipped adapters, "
            f"{new_tokens} new tokens, with {counts[0]}, {counts[1]} and {counts[2]} loaded")
    started = time.perf_counter()

    def progress(what):
        print(f"  W9 {time.perf_counter() - started:6.1f} s: {what}", file=sys.stderr)

    lm, tok = _load_llm()
    lm.eval()
    shipped = {name: ROOT / "lora_ext" / "adapters" / name for name in tasks.TASKS}
    config = json.loads((next(iter(shipped.values())) / "adapter_config.json").read_text())
    template = load_file(next(iter(shipped.values())) / "adapter_model.safetensors")

    def synthetic(index):
        """Random adapter ``index`` (the same tensors each call): nothing kept in between."""
        gen = torch.Generator().manual_seed(args.seed * 1_000_003 + index)
        return {k: (torch.randn(v.shape, generator=gen) * v.float().std()).to(v.dtype) for k, v in template.items()}

    def with_shipped():
        m = copy.deepcopy(lm)
        for name, folder in shipped.items():
            lora_ext.load_adapter(m, folder, name)
        return m

    rows = []
    for name, task in tasks.TASKS.items():
        rows += [(name, p) for p, _ in task.examples(2, seed=0)]
    rows += [(None, q) for q, _ in tasks.BASE_QUESTIONS]
    names, prompts = [n for n, _ in rows], [p for _, p in rows]

    # Models with 3, 100 (room reserved up front) and 1000 (default growth) adapters.
    few, mid, many = with_shipped(), with_shipped(), with_shipped()
    rss0 = _rss_bytes()
    lora_ext.reserve_adapters(mid, counts[1])  # the room is part of the growth measured
    for i in range(counts[1] - 3):
        lora_ext.load_adapter(mid, synthetic(i), f"s{i}", config=config)
    rss_mid = _rss_bytes() - rss0
    load_ms = []  # per load from a state dict, in order: N = 3 .. counts[-1] - 1 loaded
    rss0 = _rss_bytes()
    for i in range(counts[2] - 3):
        state = synthetic(i)
        t0 = time.perf_counter()
        lora_ext.load_adapter(many, state, f"s{i}", config=config)
        load_ms.append((time.perf_counter() - t0) * 1e3)
    rss_many = _rss_bytes() - rss0
    progress(f"loaded {counts[1]} and {counts[2]} adapters")
    one_adapter = _lora_bytes(few)[0] / 3
    mid_params, mid_stacks = _lora_bytes(mid)
    many_params, many_stacks = _lora_bytes(many)

    def generate(model):
        with lora_ext.set_adapter(model, names):
            return llm.generate(model, tok, prompts, max_new_tokens=new_tokens, min_new_tokens=new_tokens)

    def rounds(fns: dict, count: int) -> tuple[list[dict], dict]:
        """Time ``fns`` round-robin (rotating who goes first); also each round's time of
        the first variant over each other's: paired ratios, robust to a busy machine."""
        ms = {k: [] for k in fns}
        keys = list(fns)
        for r in range(count + 1):
            for k in keys[r % len(keys):] + keys[:r % len(keys)]:
                t0 = time.perf_counter()
                fns[k]()
                if r > 0:  # round 0 warms up
                    ms[k].append((time.perf_counter() - t0) * 1e3)
        summary = [{"name": k, "median_ms": _quantile(t, 0.5), "p10_ms": _quantile(t, 0.1),
                    "p90_ms": _quantile(t, 0.9), "min_ms": min(t), "n": len(t)} for k, t in ms.items()]
        paired = {k: _quantile([a / b for a, b in zip(ms[keys[0]], ms[k])], 0.5) for k in keys[1:]}
        return summary, paired

    outputs = [generate(m).texts for m in (few, mid, many)]
    variants, paired_generate = rounds({
        f"{counts[0]}_loaded": lambda: generate(few),
        f"{counts[1]}_loaded": lambda: generate(mid),
        f"{counts[2]}_loaded": lambda: generate(many),
    }, max(args.model_reps, 3))
    for v in variants:
        v["tokens_per_s"] = len(prompts) * new_tokens / (v["median_ms"] * 1e-3)
    # One decode-sized forward of the same rows (the per-step cost): many more samples.
    ids = torch.randint(0, lm.config.vocab_size, (len(names), 4), generator=torch.Generator().manual_seed(0))

    def forward(model):
        with torch.no_grad(), lora_ext.set_adapter(model, names):
            return model(ids).logits

    steps, paired_forward = rounds({"few": lambda: forward(few), "mid": lambda: forward(mid),
                                    "many": lambda: forward(many)}, 5 if args.tiny else 60)
    steps = {v["name"]: v for v in steps}
    progress("timed the mixed generate and forward")

    # Load (folder, state dict), delete, replace at N = 3 and N = counts[-1], interleaved.
    reps = 3 if args.tiny else 10
    folder = shipped["upper"]
    states = [synthetic(10 * counts[2] + i) for i in range(reps)]
    operations = {
        "load_folder": lambda m, i: lora_ext.load_adapter(m, folder, f"f{i}"),
        "delete_folder_loaded": lambda m, i: lora_ext.delete_adapter(m, f"f{i}"),
        "load_state_dict": lambda m, i: lora_ext.load_adapter(m, states[i], f"d{i}", config=config),
        "delete": lambda m, i: lora_ext.delete_adapter(m, f"d{i}"),
        "replace": lambda m, i: lora_ext.load_adapter(m, states[i], "upper", config=config, replace=True),
    }
    ops_ms = {}
    for op, fn in operations.items():
        spent = {"few": [], "many": []}
        for i in range(reps):
            pair = [("few", few), ("many", many)]
            for label, model in (pair if i % 2 == 0 else pair[::-1]):
                t0 = time.perf_counter()
                fn(model, i)
                spent[label].append((time.perf_counter() - t0) * 1e3)
        for label, t in spent.items():
            ops_ms[f"{op}_ms_{label}"] = _quantile(t, 0.5)
    del few, mid
    progress("timed load / delete / replace")

    # Serving trace: batches of 8-32 rows, each row's adapter Zipf over all of them;
    # a pool with max_resident=64 against the all-resident model.
    max_resident = 32 if args.tiny else 64  # a batch has up to 32 distinct adapters
    pooled = copy.deepcopy(lm)
    pool = lora_ext.AdapterPool(pooled, max_resident=max_resident, max_rank=config["r"])
    for name, folder in shipped.items():
        lora_ext.load_adapter(many, folder, name, replace=True)  # undo the replacements above
        pool.add(name, folder)  # from disk
    for i in range(counts[2] - 3):
        pool.add(f"s{i}", synthetic(i), config=config)  # host memory (the pool's own copy)
    all_names = list(pool.names)
    rng = random.Random(args.seed)
    popularity = all_names[:]
    rng.shuffle(popularity)
    weights = [1.0 / (k + 1) ** 1.1 for k in range(len(popularity))]
    prompt_pool = [p for t in tasks.TASKS.values() for p, _ in t.examples(12, seed=1)]
    trace = []
    for _ in range(2 if args.tiny else 10):
        batch = rng.randint(8, 32)
        trace.append(rng.choices(popularity, weights=weights, k=batch))
    trace_tokens = 4 if args.tiny else 8
    times = {"pool": 0.0, "all_resident": 0.0}
    same = True
    for b, batch_names in enumerate(trace):
        batch_prompts = [prompt_pool[j % len(prompt_pool)] for j in range(len(batch_names))]
        texts = {}
        order = (("pool", pooled), ("all_resident", many))
        for key, model in (order if b % 2 == 0 else order[::-1]):  # alternate who goes first
            t0 = time.perf_counter()
            if key == "pool":
                pool.set_adapter(batch_names)
            else:
                lora_ext.set_adapter(model, batch_names)
            texts[key] = llm.generate(model, tok, batch_prompts, max_new_tokens=trace_tokens,
                                      min_new_tokens=trace_tokens).texts
            times[key] += time.perf_counter() - t0
        same = same and texts["pool"] == texts["all_resident"]
    progress("ran the serving trace")
    trace_tokens_total = sum(len(n) for n in trace) * trace_tokens
    distinct = [len(set(n)) for n in trace]

    extra = {
        "loaded_few_mid_many": "/".join(map(str, counts)),
        "adapter_bytes": one_adapter,
        "tokens_per_s_many_over_few": variants[2]["tokens_per_s"] / variants[0]["tokens_per_s"],
        "tokens_per_s_mid_over_few": variants[1]["tokens_per_s"] / variants[0]["tokens_per_s"],
        "tokens_per_s_many_over_few_paired": paired_generate[variants[2]["name"]],
        "tokens_per_s_many_over_few_best_of_reps": variants[0]["min_ms"] / variants[2]["min_ms"],
        "forward_ms_few_mid_many": "/".join(f"{steps[k]['median_ms']:.1f}" for k in ("few", "mid", "many")),
        "forward_speed_many_over_few": steps["few"]["median_ms"] / steps["many"]["median_ms"],
        "forward_speed_many_over_few_paired": paired_forward["many"],
        "forward_speed_mid_over_few_paired": paired_forward["mid"],
        "forward_speed_many_over_few_best_of_reps": steps["few"]["min_ms"] / steps["many"]["min_ms"],
        "stacks_over_adapter_bytes_many_default_growth": many_stacks / many_params,
        "rss_growth_over_adapter_bytes_many_default_growth": rss_many / (len(load_ms) * one_adapter),
        "stacks_over_adapter_bytes_mid_reserved": mid_stacks / mid_params,
        "rss_growth_over_adapter_bytes_mid_reserved": rss_mid / ((counts[1] - 3) * one_adapter),
        "load_state_dict_ms_first10": _quantile(load_ms[:10], 0.5),
        "load_state_dict_ms_last10": _quantile(load_ms[-10:], 0.5),
        **ops_ms,
        "trace_batches": len(trace),
        "trace_distinct_adapters_per_batch": f"{min(distinct)}-{max(distinct)} (mean {sum(distinct) / len(distinct):.1f})",
        "trace_max_resident": max_resident,
        "trace_pool_loads": pool.loads,
        "trace_pool_evictions": pool.evictions,
        "trace_tokens_per_s_pool": trace_tokens_total / times["pool"],
        "trace_tokens_per_s_all_resident": trace_tokens_total / times["all_resident"],
        "trace_pool_over_all_resident": times["all_resident"] / times["pool"],
    }
    return {"workload": "W9", "description": desc, "device": "cpu", "variants": variants, "extra": extra,
            "check_ok": outputs[0] == outputs[1] == outputs[2] and same}


# ---------------------------------------------------------------------------
# Targets, report, plot


def targets(results: list[dict]) -> list[dict]:
    out = []

    def add(r, what, value, limit, at_least):
        met = value is not None and (value >= limit if at_least else value <= limit)
        out.append({"workload": r["workload"], "device": r["device"], "what": what,
                    "value": value, "limit": limit, "at_least": at_least, "met": met})

    for r in results:
        if r.get("status") == NOT_YET:
            continue
        w, e = r["workload"], r.get("extra", {})
        if w in ("W1", "W3", "W4", "W6-fp32", "W6-bf16"):
            ours = _median(r, "lora_ext")
        if w == "W1":
            add(r, "speedup vs peft_loop", _median(r, "peft_loop") / ours, 3.0, True)
            add(r, "time / memory floor", ours / r["memory_floor_ms"], 2.0, False)
        if w in ("W2", "W3"):  # issue 10: x floor, for the op and its in-place form
            floor = max(r["memory_floor_ms"], r["compute_floor_ms"])
            for v in ("lora_ext", "lora_ext_add_"):
                add(r, f"{v} time / floor", _median(r, v) / floor, 1.5 if w == "W2" else 2.0, False)
        if w == "W3":
            add(r, "speedup vs peft_loop", _median(r, "peft_loop") / ours, 5.0, True)
        elif w == "W4":
            add(r, "time / W1 at mean rank", e["time_over_w1_at_mean_rank"], 1.3, False)
        elif w == "W5-fwd+bwd":
            add(r, "overhead / LoRA FLOP share", e["overhead_over_flop_share"], 2.0, False)
            add(r, "saved bytes: lora_ext / PEFT", e["saved_bytes_lora_ext"] / e["saved_bytes_peft_compose"], 1.0, False)
        elif w.startswith("W12"):  # issue 10: >= 80% of the rate the machine allows
            floor = max(r["memory_floor_ms"], r["compute_floor_ms"])
            add(r, f"{r['dtype']} r={e['rank']}: floor / time", floor / _median(r, "lora_ext"), 0.8, True)
        elif w.startswith("W6"):
            add(r, "time / read+write of weight", ours / r["memory_floor_ms"], 1.3, False)
            add(r, "speedup vs peft_merge", _median(r, "peft_merge") / ours, 5.0, True)
            if e.get("peak_extra_bytes_lora_ext") is not None:
                add(r, "peak extra / weight bytes", e["peak_extra_bytes_lora_ext"] / e["weight_bytes"], 0.5, False)
        elif w == "W7":
            tps = {v["name"]: v["tokens_per_s"] for v in r["variants"]}
            add(r, "tokens/s vs PEFT adapter_names", tps["lora_ext"] / tps["peft_adapter_names"], 1.5, True)
            add(r, "tokens/s vs the base model", tps["lora_ext"] / tps["base"], 0.97, True)
        elif w == "W8":
            peft_over = e["peft_overhead_over_base"]
            ratio = e["lora_ext_overhead_over_base"] / peft_over if peft_over > 0 else None
            add(r, "overhead over base / PEFT's", ratio, 1 / 3, False)
        elif w == "W10":
            for key, value in e.items():
                if key.startswith("lora_ext_over_no_lora_"):
                    add(r, "tokens/s vs vLLM without LoRA, " + key[len("lora_ext_over_no_lora_"):], value, 0.9, True)
        elif w == "W9":
            add(r, "tokens/s, many loaded / 3 loaded (paired rounds)", e["tokens_per_s_many_over_few_paired"], 0.95, True)
            add(r, "forward speed, many loaded / 3 loaded (paired rounds)", e["forward_speed_many_over_few_paired"], 0.95, True)
            add(r, "stack bytes / adapter bytes, default growth", e["stacks_over_adapter_bytes_many_default_growth"], 1.1, False)
            add(r, "RSS growth / adapter bytes, default growth", e["rss_growth_over_adapter_bytes_many_default_growth"], 1.1, False)
            add(r, "load ms (state dict), many loaded / 3 loaded", e["load_state_dict_ms_many"] / e["load_state_dict_ms_few"], 1.5, False)
            add(r, "load ms (folder), many loaded / 3 loaded", e["load_folder_ms_many"] / e["load_folder_ms_few"], 1.5, False)
            add(r, "replace ms, many loaded / 3 loaded", e["replace_ms_many"] / e["replace_ms_few"], 1.5, False)
    return out


def _fmt(v, digits=3):
    if v is None:
        return "n/a"
    if isinstance(v, float):
        return f"{v:.{digits}g}" if abs(v) < 1e4 else f"{v:.3e}"
    return str(v)


def markdown(report: dict) -> str:
    m = report["machine"]
    lines = [
        "# lora_ext benchmarks: latest run",
        "",
        f"- date: {report['date']}",
        f"- machine: {m['cpu']}, {m['threads']} torch threads; torch {m['torch']}; device(s): "
        + ", ".join(report["devices"]),
        f"- command: `{report['command']}`",
        "- ceilings measured in this run: " + "; ".join(
            f"{d}: copy {c['copy_gbps']:.1f} GB/s (read+write), "
            + ", ".join(f"{k} GEMM {v:.0f} GFLOP/s" for k, v in c["gemm_gflops"].items())
            for d, c in report["ceilings"].items()),
        "",
        "## Kernels (W1-W6, W12; Python runner through the public API)",
        "",
        "`lora x`: the variant's median over lora_ext's (> 1: lora_ext is faster). "
        "`x floor`: median over max(bytes / copy bandwidth, FLOPs / GEMM rate).",
        "",
        "| workload | dev | dtype | variant | median ms | p10..p90 ms | lora x | GB/s | GFLOP/s | x floor |",
        "|---|---|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in report["results"]:
        if "bytes" not in r:
            continue
        ours = _median(r, "lora_ext")
        floor = max(r["memory_floor_ms"], r["compute_floor_ms"])
        for v in r["variants"]:
            ms = v["median_ms"]
            lines.append(
                f"| {r['workload']} | {r['device']} | {r['dtype']} | {v['name']} | {ms:.3f} | "
                f"{v['p10_ms']:.3f}..{v['p90_ms']:.3f} | {ms / ours:.2f} | {r['bytes'] / ms / 1e6:.1f} | "
                f"{r['flops'] / ms / 1e6:.1f} | {ms / floor:.2f} |")
    lines += ["", "Workloads and extra measurements:", ""]
    for r in report["results"]:
        extra = "; ".join(f"{k} {_fmt(v)}" for k, v in r.get("extra", {}).items())
        floors = (f" floors: memory {r['memory_floor_ms']:.3f} ms, compute {r['compute_floor_ms']:.3f} ms;"
                  if "memory_floor_ms" in r else "")
        check = "" if "check_ok" not in r else f" check {'ok' if r['check_ok'] else 'FAILED'};"
        lines.append(f"- **{r['workload']}** ({r['device']}): {r['description']}.{floors}{check} {extra}")
    lines += ["", "## End to end (W7, W8)", "", "| workload | variant | median s | p10..p90 s | tokens/s |",
              "|---|---|---:|---:|---:|"]
    for r in report["results"]:
        if r["workload"] not in ("W7", "W8", "W9"):
            continue
        for v in r["variants"]:
            if v.get("status") == NOT_YET:
                lines.append(f"| {r['workload']} | {v['name']} | TODO: {NOT_YET} | | |")
            else:
                lines.append(f"| {r['workload']} | {v['name']} | {v['median_ms'] / 1e3:.2f} | "
                             f"{v['p10_ms'] / 1e3:.2f}..{v['p90_ms'] / 1e3:.2f} | {v['tokens_per_s']:.1f} |")
    for r in report["results"]:
        if r["workload"] == "W10" and r.get("status") != NOT_YET:
            lines += ["", "## vLLM (W10)", "", "| variant dtype mix | median s | p10..p90 s | tokens/s |",
                      "|---|---:|---:|---:|"]
            lines += [f"| {v['name']} | {v['median_ms'] / 1e3:.2f} | {v['p10_ms'] / 1e3:.2f}..{v['p90_ms'] / 1e3:.2f} | "
                      f"{v['tokens_per_s']:.1f} |" for v in r["variants"]]
    lines += ["", "## Targets (issues 4 and 10; stated for the 2-core CPU)", "",
              "| workload | dev | measure | value | target | met |", "|---|---|---|---:|---:|---|"]
    for t in report["targets"]:
        lines.append(f"| {t['workload']} | {t['device']} | {t['what']} | {_fmt(t['value'])} | "
                     f"{'>=' if t['at_least'] else '<='} {_fmt(t['limit'])} | {'met' if t['met'] else '**not met**'} |")
    for r in report["results"]:
        if r.get("status") == NOT_YET:
            lines.append(f"| {r['workload']} | | {r['todo']} | | | TODO |")
    if report.get("cpp"):
        lines += ["", "## C++ harness (build/bench/lora_ext_bench), same run", "",
                  "| workload | dev | dtype | variant | median ms | p10..p90 ms | lora x | x floor |",
                  "|---|---|---|---|---:|---:|---:|---:|"]
        for r in report["cpp"]["results"]:
            ours = next(v["median_ms"] for v in r["variants"] if v["name"] == "lora_ext")
            floor = max(r["memory_floor_ms"], r["compute_floor_ms"])
            for v in r["variants"]:
                lines.append(f"| {r['workload']} | {r['device']} | {r['dtype']} | {v['name']} | "
                             f"{v['median_ms']:.3f} | {v['p10_ms']:.3f}..{v['p90_ms']:.3f} | "
                             f"{v['median_ms'] / ours:.2f} | {v['median_ms'] / floor:.2f} |")
        lines += ["", "| workload | dev | measure | value | target | met |", "|---|---|---|---:|---:|---|"]
        for t in report["cpp"]["targets"]:
            lines.append(f"| {t['workload']} | {t['device']} | {t['what']} | {_fmt(t['value'])} | "
                         f"{'>=' if t['at_least'] else '<='} {_fmt(t['limit'])} | {'met' if t['met'] else '**not met**'} |")
    return "\n".join(lines) + "\n"


def plot(report: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # W12's sixteen rate problems are in the tables only.
    panels = [r for r in report["results"] if r.get("status") != NOT_YET and not r["workload"].startswith("W12")]
    if not panels:
        return
    cols = min(4, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.4 * rows), squeeze=False)
    colors = {"lora_ext": "tab:blue"}
    for ax, r in zip(axes.flat, panels):
        names = [v["name"] for v in r["variants"]]
        med = [v["median_ms"] for v in r["variants"]]
        err = [[m - v["p10_ms"] for m, v in zip(med, r["variants"])],
               [v["p90_ms"] - m for m, v in zip(med, r["variants"])]]
        ax.bar(range(len(names)), med, yerr=err, capsize=3,
               color=[colors.get(n, "tab:gray") for n in names])
        ax.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=8)
        ax.set_ylabel("ms (median, p10..p90)", fontsize=8)
        ax.set_title(f"{r['workload']} ({r['device']}{', ' + r['dtype'] if 'dtype' in r else ''})", fontsize=9)
        if "memory_floor_ms" in r:
            ax.axhline(r["memory_floor_ms"], color="tab:red", ls="--", lw=1, label="memory floor")
            ax.axhline(r["compute_floor_ms"], color="tab:green", ls=":", lw=1.2, label="compute floor")
            ax.legend(fontsize=7)
        if max(med) / max(min(med), 1e-9) > 30:
            ax.set_yscale("log")
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.suptitle(f"lora_ext vs baselines, {report['machine']['cpu']} ({report['date']})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            name = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        name = platform.processor() or platform.machine()
    return f"{name}, {os.cpu_count()} cores"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workloads", default=",".join(ALL_WORKLOADS), help="comma list of W1..W12")
    p.add_argument("--device", choices=["cpu", "cuda", "all"], default="all")
    p.add_argument("--hidden", type=int)
    p.add_argument("--rank", type=int)
    p.add_argument("--tokens-decode", type=int)
    p.add_argument("--tokens-prefill", type=int)
    p.add_argument("--adapters", type=int)
    p.add_argument("--warmup", type=int)
    p.add_argument("--reps", type=int)
    p.add_argument("--model-reps", type=int, default=3, help="repeats of W7/W8 (default 3)")
    p.add_argument("--gen-tokens", type=int, default=16, help="new tokens per row in W7 (default 16)")
    p.add_argument("--max-seconds", type=float, default=30.0, help="measuring cap per workload")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tiny", action="store_true", help="small sizes, for a smoke test")
    p.add_argument("--cpp", metavar="BIN", help="also run the C++ harness BIN and embed its results")
    p.add_argument("--cpp-json", metavar="FILE", help="embed results the C++ harness wrote earlier (--json)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    p.add_argument("--w10-json", metavar="DIR", help="W10 from the per-dtype results vllm_w10.py wrote in DIR")
    p.add_argument("--w10-dtypes", default="float32,bfloat16", help="W10's dtypes (default float32,bfloat16)")
    args = p.parse_args(argv)
    defaults = dict(hidden=4096, rank=16, tokens_decode=64, tokens_prefill=2048, adapters=64, warmup=3, reps=15)
    if args.tiny:
        defaults.update(hidden=128, rank=8, tokens_decode=16, tokens_prefill=64, adapters=16, warmup=1, reps=3)
    for k, v in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    selected = [w.strip() for w in args.workloads.split(",") if w.strip()]
    bad = [w for w in selected if w not in ALL_WORKLOADS]
    if bad:
        p.error(f"unknown workload(s) {bad}; expected some of {ALL_WORKLOADS}")
    if args.threads:
        torch.set_num_threads(args.threads)

    devices = [torch.device("cpu")] if args.device != "cuda" else []
    if args.device != "cpu":
        if torch.cuda.is_available():
            devices.append(torch.device("cuda"))
        elif args.device == "cuda":
            p.error("no CUDA device")

    results, ceilings = [], {}
    for device in devices:
        torch.manual_seed(args.seed)
        ceil = Ceilings(device, args)
        main_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        ceil.gemm(main_dtype)
        print(f"{device}: copy {ceil.copy_gbps:.1f} GB/s, GEMM {ceil.gemm_gflops}", file=sys.stderr)
        results += multi_lora_workloads(device, main_dtype, args, ceil, selected)
        if "W5" in selected:
            results += lora_linear_workloads(device, main_dtype, args, ceil)
        if "W6" in selected:
            results += merge_workloads(device, args, ceil)
        if "W12" in selected:
            results += prefill_rate_workloads(device, args, ceil)
        ceilings[str(device)] = {"copy_gbps": ceil.copy_gbps, "gemm_gflops": ceil.gemm_gflops}
        for r in results:
            print(f"  {r['workload']:<11} {r['device']:<5} lora_ext {_median(r, 'lora_ext'):.3f} ms", file=sys.stderr)
    if "W7" in selected:
        results.append(w7_generation(args))
    if "W8" in selected:
        results.append(w8_training(args))
    if "W9" in selected:
        results.append(w9_many_adapters(args))

    if "W10" in selected:
        results.append(w10_vllm(args))
    if "W11" in selected:
        import train_w11  # benchmarks/, next to this file

        results.append(train_w11.result(args))

    report = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": "python " + " ".join([os.path.relpath(__file__, ROOT)] + (argv if argv is not None else sys.argv[1:])),
        "machine": {"cpu": _cpu_name(), "threads": torch.get_num_threads(), "torch": torch.__version__,
                    "python": platform.python_version()},
        "devices": [str(d) for d in devices],
        "config": {k: getattr(args, k) for k in defaults},
        "ceilings": ceilings,
        "results": results,
        "targets": targets(results),
    }
    if args.cpp_json:
        report["cpp"] = json.loads(Path(args.cpp_json).read_text())
    if args.cpp:
        with tempfile.TemporaryDirectory() as tmp:
            cmd = [args.cpp, "--json", f"{tmp}/cpp.json", "--device", args.device]
            cmd += ["--tiny"] if args.tiny else []
            cwl = [w for w in selected if w in ALL_WORKLOADS[:6]]
            if cwl:
                subprocess.run(cmd + ["--workloads", ",".join(cwl)], check=True)
                report["cpp"] = json.loads(Path(f"{tmp}/cpp.json").read_text())
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "latest.json").write_text(json.dumps(report, indent=1) + "\n")
    (out / "latest.md").write_text(markdown(report))
    plot(report, out / "latest.png")
    print((out / "latest.md").read_text())
    failed = [r["workload"] for r in results if r.get("check_ok") is False]
    if failed:
        print(f"lora_ext disagrees with its baseline in {failed}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

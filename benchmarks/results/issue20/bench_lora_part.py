#!/usr/bin/env python
"""W13's LoRA part alone (``moe_lora_add_`` on the gate_up and down projections of one
experts layer), against its floor measured in the same process, at a given thread count.

Decode: 64 tokens x top-k pairs, 8 adapters (a random one per token), floor = the used
(adapter, expert) blocks' bytes plus the rows' input/output bytes at the copy rate.
Prefill: 2,048 tokens, floor = max(those bytes at the copy rate, rank-r FLOPs at the GEMM
rate). Qwen3-30B-A3B and GPT-OSS-20B layer shapes, r = 16, fp32.

    python benchmarks/results/issue20/bench_lora_part.py --threads 1
    python benchmarks/results/issue20/bench_lora_part.py --threads 1 --group-sizes

``--group-sizes``: instead, multi_lora_add_'s rate on Qwen's gate_up prefill shape (16,384
rows, 2048 -> 1536, r = 16) with the rows in groups of 16, 64, 256 and all rows in one:
what the 16-row (adapter, expert) groups of W13's prefill cost by themselves.
"""

import argparse
import time

import torch

import lora_ext  # noqa: F401
from lora_ext import ops

SHAPES = {"qwen3-30b-a3b": (2048, 768, 128, 8), "gpt-oss-20b": (2880, 2880, 32, 4)}


def median_ms(fn, n):
    fn()
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return sorted(times)[n // 2] * 1e3


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--reps", type=int, default=9)
    p.add_argument("--group-sizes", action="store_true")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.group_sizes:
        return group_sizes(args)
    src = torch.randn(1 << 25)
    dst = torch.empty_like(src)
    m = torch.randn(2048, 2048)
    mo = torch.empty_like(m)
    rank, adapters = 16, 8
    for name, (hidden, width, num, top_k) in SHAPES.items():
        g = torch.Generator().manual_seed(0)
        projections = [(hidden, 2 * width), (width, hidden)]
        stacks = [(torch.randn(adapters, num, rank, i, generator=g) / i**0.5,
                   torch.randn(adapters, num, o, rank, generator=g) / rank**0.5) for i, o in projections]
        scales, ranks = torch.ones(adapters), torch.full((adapters,), rank)
        for phase, tokens in (("decode", 64), ("prefill", 2048)):
            index = torch.rand(tokens, num, generator=g).topk(top_k, dim=-1).indices
            experts = index.reshape(-1)
            slots = torch.randint(0, adapters, (tokens,), generator=g, dtype=torch.int32)
            slots = slots.repeat_interleave(top_k)
            pairs = experts.shape[0]
            rows = [(torch.randn(pairs, i, generator=g), torch.zeros(pairs, o)) for i, o in projections]

            def lora_part():
                for (a, b), (x, y) in zip(stacks, rows):
                    ops.moe_lora_add_(y, x, a, b, experts, slots, scales, ranks)

            used = torch.unique(slots.long() * num + experts).numel()
            nbytes = sum(4 * used * rank * (i + o) + 4 * pairs * (i + 2 * o) for i, o in projections)
            flops = sum(2.0 * pairs * rank * (i + o) for i, o in projections)
            for _ in range(2):
                copy_ms = median_ms(lambda: dst.copy_(src), args.reps)
                gbps = 2 * src.numel() * 4 / copy_ms / 1e6
                gemm_ms = median_ms(lambda: torch.mm(m, m, out=mo), 5)
                gflops = 2 * 2048**3 / gemm_ms / 1e6
                ms = median_ms(lora_part, args.reps)
                floor = max(nbytes / gbps / 1e6, flops / gflops / 1e6)
                print(f"{name:14} {phase:7} threads={args.threads} pairs={pairs:5} blocks={used:4}  "
                      f"lora part {ms:8.2f} ms  floor {floor:7.2f} ms (copy {gbps:4.1f} GB/s, "
                      f"GEMM {gflops:4.0f} GFLOP/s)  x floor {ms / floor:.2f}", flush=True)


def group_sizes(args):
    rows, rank, fan_in, fan_out = 16384, 16, 2048, 1536
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(rows, fan_in, generator=g), torch.zeros(rows, fan_out)
    for size in (16, 64, 256, rows):
        n = rows // size
        a = torch.randn(n, rank, fan_in, generator=g) / fan_in**0.5
        b = torch.randn(n, fan_out, rank, generator=g) / rank**0.5
        index = torch.arange(n, dtype=torch.int32).repeat_interleave(size)[torch.randperm(rows, generator=g)]
        ms = median_ms(lambda: ops.multi_lora_add_(y, x, a, b, index, torch.ones(n)), 5)
        print(f"rows per group {size:6}: {ms:7.1f} ms, {2 * rows * rank * (fan_in + fan_out) / ms / 1e6:5.1f} GFLOP/s",
              flush=True)


if __name__ == "__main__":
    main()

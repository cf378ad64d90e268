# W2's call (64 rows, 4096 -> 4096, 4 adapters of r = 16, 25% of rows without one) through
# multi_lora_add_, 2 threads, one call at a time: warm (the same buffers every call) or
# cold (48 MB written before each call, as the harness evicts the caches), for timing and
# for `perf record`. usage: python .../w2_calls.py [calls] [warm|cold]
import sys, time
import torch
torch.set_num_threads(2)
import lora_ext

calls = int(sys.argv[1]) if len(sys.argv) > 1 else 1000
mode = sys.argv[2] if len(sys.argv) > 2 else "cold"
torch.manual_seed(0)
T, H, r = 64, 4096, 16
idx = torch.randint(0, 4, (T,))
idx[torch.randperm(T)[: T // 4]] = -1
x, y = torch.randn(T, H), torch.randn(T, H)
a, b = torch.randn(4, r, H) / H**0.5, torch.randn(4, H, r) / r**0.5
scales = torch.rand(4) + 0.5
flush = torch.zeros(12 * 2**20)  # 48 MB, more than the last-level cache
times = []
with torch.inference_mode():
    for _ in range(calls):
        if mode == "cold":
            flush.add_(1.0)
        t0 = time.perf_counter()
        lora_ext.ops.multi_lora_add_(y, x, a, b, idx, scales)
        times.append(time.perf_counter() - t0)
times.sort()
print(f"{mode}: median {times[len(times) // 2] * 1e3:.3f} ms, p10 {times[len(times) // 10] * 1e3:.3f} ms")

"""Issue 19: the cost of deterministic mode, round-robin against the default in one process (see BENCHMARKS.md)."""
# Deterministic-mode cost on W1-W3 (multi_lora, multi_lora_add_) and W5: round-robin in one process.
import sys, time, statistics, argparse, torch
sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[2] / "benchmarks"))
import lora_ext
from harness import preset, Fixed
from workloads_ops import MultiLoraCase, distinct_indices
ap = argparse.ArgumentParser(); ap.add_argument("--reps", type=int, default=30); ap.add_argument("--dtype", default="float32")
ap.add_argument("--workloads", default="W1,W2,W3,W5")
args = ap.parse_args()
dtype = getattr(torch, args.dtype)
d = preset("default"); fx = Fixed()
H, r, Td, Tp, N = d["hidden"], d["rank"], d["tokens_decode"], d["tokens_prefill"], d["adapters"]
torch.manual_seed(0)
cases = {}
sel = args.workloads.split(",")
if "W1" in sel: cases["W1"] = MultiLoraCase("cpu", dtype, Td, H, [r]*N, distinct_indices(Td, N))
if "W2" in sel:
    idx = torch.randint(0, fx.w2_adapters, (Td,)); idx[torch.randperm(Td)[: int(Td * fx.w2_unadapted)]] = -1
    cases["W2"] = MultiLoraCase("cpu", dtype, Td, H, [r]*fx.w2_adapters, idx)
if "W3" in sel:
    p = torch.arange(1, fx.w3_adapters + 1, dtype=torch.float64).pow(-fx.w3_zipf)
    cases["W3"] = MultiLoraCase("cpu", dtype, Tp, H, [r]*fx.w3_adapters, torch.multinomial(p, Tp, replacement=True))
fns = {}
FLUSH_PLACEHOLDER = 0
import os; FLUSH = os.environ.get("NOFLUSH") is None
flush = torch.empty(64 << 20, dtype=torch.uint8)
for name, c in cases.items():
    fns[f"{name} multi_lora"] = lambda c=c: c.lora_ext(False)
    fns[f"{name} multi_lora_add_"] = lambda c=c: c.lora_ext_add(False)
if "W5" in sel:
    x = torch.randn(Tp, H, dtype=dtype, requires_grad=True); w = torch.randn(H, H, dtype=dtype) / H**0.5
    a = (torch.randn(r, H, dtype=dtype) / H**0.5).requires_grad_(); b = (torch.randn(H, r, dtype=dtype) / r**0.5).requires_grad_()
    def w5f():
        with torch.no_grad(): return lora_ext.lora_linear(x, w, None, a, b, 2.0)
    def w5b():
        y = lora_ext.lora_linear(x, w, None, a, b, 2.0); y.backward(torch.ones_like(y))
    fns["W5 fwd"] = w5f; fns["W5 fwd+bwd"] = w5b
times = {(n, m): [] for n in fns for m in (False, True)}
def once(fn, det):
    torch.use_deterministic_algorithms(det)
    flush.fill_(1) if FLUSH else None
    t0 = time.perf_counter(); fn(); t = time.perf_counter() - t0
    torch.use_deterministic_algorithms(False)
    return t * 1e3
for n, fn in fns.items():
    for m in (False, True): once(fn, m); once(fn, m)
for rep in range(args.reps):
    for n, fn in fns.items():
        for m in ((False, True) if rep % 2 == 0 else (True, False)):
            times[(n, m)].append(once(fn, m))
print(f"dtype={args.dtype} isa={lora_ext.ops.merge_variant(torch.empty(1, dtype=dtype))} threads={torch.get_num_threads()} reps={args.reps}")
print(f"{'workload':28s} {'default ms':>10s} {'determ. ms':>10s} {'ratio':>6s}")
for n in fns:
    a0 = statistics.median(times[(n, False)]); a1 = statistics.median(times[(n, True)])
    print(f"{n:28s} {a0:10.3f} {a1:10.3f} {a1/a0:6.3f}")

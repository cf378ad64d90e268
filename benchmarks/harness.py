"""What every workload of benchmarks/run.py uses: timing, the machine's ceilings, result
records and their tolerances, and the W1-W6 shapes (benchmarks/shapes.txt, which the
C++ harness reads too)."""

from __future__ import annotations

import math
import os
import time
from pathlib import Path
from typing import Callable, Optional

import torch

ROOT = Path(__file__).resolve().parents[1]
SHAPES = ROOT / "benchmarks" / "shapes.txt"
NOT_YET = "not yet available"


# ---------------------------------------------------------------------------
# Shapes


def read_shapes(path: Path = SHAPES) -> dict[str, dict[str, str]]:
    """benchmarks/shapes.txt: {preset: {key: value text}}, keys in the file's order."""
    shapes: dict[str, dict[str, str]] = {}
    for number, line in enumerate(Path(path).read_text().splitlines(), 1):
        words = line.split("#", 1)[0].split()
        if not words:
            continue
        preset = shapes.setdefault(words[0], {})
        for word in words[1:]:
            key, eq, value = word.partition("=")
            if not eq or not key or not value:
                raise ValueError(f"{path}:{number}: expected key=value, got {word!r}")
            preset[key] = value
    return shapes


def preset(name: str, path: Path = SHAPES) -> dict[str, int]:
    """A preset of sizes (``default`` or ``tiny``) as integers."""
    return {k: int(v) for k, v in read_shapes(path)[name].items()}


class Fixed:
    """The ``fixed`` line of benchmarks/shapes.txt: the parts of W2-W4 that do not scale."""

    def __init__(self, path: Path = SHAPES):
        f = read_shapes(path)["fixed"]
        self.w2_adapters = int(f["w2_adapters"])
        self.w2_unadapted = float(f["w2_unadapted"])
        self.w3_adapters = int(f["w3_adapters"])
        self.w3_zipf = float(f["w3_zipf"])
        self.w4_ranks = [int(r) for r in f["w4_ranks"].split(",")]


# ---------------------------------------------------------------------------
# Timing


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


def quantile(values: list[float], q: float) -> float:
    v = sorted(values)
    pos = q * (len(v) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(v) - 1)
    return v[lo] + (pos - lo) * (v[hi] - v[lo])


def summary(name: str, ms: list[float]) -> dict:
    """A variant's record: median, p10, p90 and min of its times (ms), and how many."""
    return {"name": name, "median_ms": quantile(ms, 0.5), "p10_ms": quantile(ms, 0.1),
            "p90_ms": quantile(ms, 0.9), "min_ms": min(ms), "n": len(ms)}


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
    return [summary(name, t) for name, t in times.items()]


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

    def compute_rate(self, dtype: torch.dtype) -> float:
        """The rate the compute floor assumes for dtype: its GEMM's, or on the CPU for a
        16-bit dtype the fp32 GEMM's where that is higher. A CPU without bf16/fp16
        arithmetic (AVX2) runs ATen's 16-bit GEMM hundreds of times slower than converting
        to fp32 and multiplying there, which any kernel may do."""
        rate = self.gemm(dtype)
        if self.device.type == "cpu" and dtype in (torch.float16, torch.bfloat16):
            rate = max(rate, self.gemm(torch.float32))
        return rate

    def floors(self, res: dict, dtype: torch.dtype) -> None:
        res["memory_floor_ms"] = res["bytes"] / (self.copy_gbps * 1e9) * 1e3
        res["compute_floor_ms"] = res["flops"] / (self.compute_rate(dtype) * 1e9) * 1e3


# ---------------------------------------------------------------------------
# Results and tolerances


def dtype_name(dtype: torch.dtype) -> str:
    return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]


def tolerance(dtype: torch.dtype) -> float:
    return 1e-4 if dtype == torch.float32 else 2e-2


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    got, ref = got.double().cpu(), ref.double().cpu()
    if ref.numel() == 0:
        return 0.0
    return float((got - ref).abs().max() / ref.abs().max().clamp_min(1e-30))


def result(workload, description, device, dtype, flops, bytes_, variants, err, extra=None):
    return {
        "workload": workload,
        "description": description,
        "device": str(device),
        "dtype": dtype_name(dtype),
        "flops": flops,
        "bytes": bytes_,
        "variants": variants,
        "max_rel_err": err,
        "check_ok": err <= tolerance(dtype),
        "extra": extra or {},
    }


def not_yet(workload: str, description: str, variants: list[str], why: str) -> dict:
    return {"workload": workload, "description": description, "device": "cpu", "status": NOT_YET,
            "todo": why, "variants": [{"name": v, "status": NOT_YET} for v in variants]}


def median(res: dict, name: str) -> float:
    return next(v["median_ms"] for v in res["variants"] if v["name"] == name)


# ---------------------------------------------------------------------------
# Memory


def peak_extra_bytes(device, fn) -> Optional[float]:
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


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

#!/usr/bin/env bash
# One-shot check on the GPU machine (no network): build against its own torch, time
# the three CUDA targets, run the whole test suite, compute-sanitizer passes and the
# benchmark runner, then print a summary table last. Fits in 8 minutes: every step
# has its own time limit and the summary is printed whatever fails.
#
#   OUT=/some/dir scripts/gpu_check.sh   results in $OUT (default build/gpu_check)
#   SKIP_BUILD=1 ...                      reuse the extension installed by an earlier run
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="$(mkdir -p "${OUT:-$ROOT/build/gpu_check}" && cd "${OUT:-$ROOT/build/gpu_check}" && pwd)"
PY="${PYTHON:-python3}"
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}"
export MAX_JOBS="${MAX_JOBS:-$(nproc)}" CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}"
START=$(date +%s)
BUDGET_S="${BUDGET_S:-470}"
declare -a SUMMARY=()

left() { echo $(( BUDGET_S - ($(date +%s) - START) )); }

# step NAME LIMIT_S CMD...: runs CMD with a time limit (capped by what is left), logs to $OUT/NAME.log
step() {
  local name="$1" limit="$2"; shift 2
  local remaining; remaining=$(left)
  if (( remaining < 20 )); then
    SUMMARY+=("$(printf '%-16s %-8s %6s  %s' "$name" SKIPPED - "out of time budget")"); return 0
  fi
  (( limit > remaining )) && limit=$remaining
  echo "=== $name (limit ${limit}s) ==="
  local t0=$(date +%s) rc
  timeout --kill-after=10 "$limit" "$@" > "$OUT/$name.log" 2>&1
  rc=$?
  local dt=$(( $(date +%s) - t0 )) status=ok
  (( rc != 0 )) && status="FAIL($rc)"
  (( rc == 124 || rc == 137 )) && status=TIMEOUT
  tail -n 5 "$OUT/$name.log"
  SUMMARY+=("$(printf '%-16s %-8s %5ss  %s' "$name" "$status" "$dt" "$OUT/$name.log")")
  return $rc
}

cd "$ROOT"
"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())" | tee "$OUT/env.txt"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv >> "$OUT/env.txt" 2>&1

# 1. Build (own build dir so a rerun is incremental).
BUILD_RC=0
if [[ "${SKIP_BUILD:-0}" != 1 ]]; then
  step build 240 "$PY" -m pip install --no-build-isolation --no-deps -v -Cbuild-dir=build/gpu \
    -Ccmake.define.LORA_EXT_CUDA=ON .
  BUILD_RC=$?
fi

# Everything else runs from $OUT so `import lora_ext` finds the installed package, not ./lora_ext.
cd "$OUT"
if (( BUILD_RC == 0 )); then
  # 2. The three targets, timed with CUDA events (eager and CUDA-graph replay).
  cat > cuda_targets.py <<'EOF'
import json, statistics, sys
import torch
import lora_ext

torch.manual_seed(0)
dev, bf = "cuda", torch.bfloat16


def time_ms(fn, reps=50, warmup=10):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record(); fn(); e.record(); e.synchronize()
        times.append(s.elapsed_time(e))
    return statistics.median(times)


def graph_ms(fn, reps=50):
    fn(); torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    return time_ms(g.replay, reps)


src = torch.empty(1 << 29, dtype=bf, device=dev)  # 1 GiB
dst = torch.empty_like(src)
copy_gbs = 2 * src.numel() * 2 / (time_ms(lambda: dst.copy_(src), reps=20) * 1e-3) / 1e9
del src, dst

res = {"copy_GBps": copy_gbs, "device": torch.cuda.get_device_name()}

# multi_lora decode: T=64 rows on 64 distinct adapters, 4096 -> 4096, r=16.
T, N, H, r = 64, 64, 4096, 16
x = torch.randn(T, H, device=dev, dtype=bf)
A = torch.randn(N, r, H, device=dev, dtype=bf) / 64
B = torch.randn(N, H, r, device=dev, dtype=bf)
idx = torch.randperm(N, device=dev)[:T]
sc = torch.ones(N, device=dev)
nbytes = (A.numel() + B.numel() + 2 * x.numel()) * 2
fn = lambda: lora_ext.multi_lora(x, A, B, idx, sc)
for mode, ms in (("eager", time_ms(fn)), ("graph", graph_ms(fn))):
    res[f"multi_lora_decode_{mode}_us"] = ms * 1e3
    res[f"multi_lora_decode_{mode}_pct_copy"] = 100 * nbytes / (ms * 1e-3) / 1e9 / copy_gbs

# merge_ 4096x4096 bf16, r=16.
W = torch.randn(H, H, device=dev, dtype=bf)
a, b = torch.randn(r, H, device=dev, dtype=bf) / 64, torch.randn(H, r, device=dev, dtype=bf) / 64
ms = time_ms(lambda: lora_ext.merge_(W, a, b, 1e-3))
res["merge_us"] = ms * 1e3
res["merge_pct_copy"] = 100 * 2 * W.numel() * 2 / (ms * 1e-3) / 1e9 / copy_gbs

# lora_linear forward T=4096, 4096x4096, r=16 vs the base GEMM alone.
X = torch.randn(4096, H, device=dev, dtype=bf)
base_ms = time_ms(lambda: torch.nn.functional.linear(X, W))
lora_ms = time_ms(lambda: lora_ext.lora_linear(X, W, None, a, b, 2.0))
res.update(base_gemm_us=base_ms * 1e3, lora_linear_us=lora_ms * 1e3, lora_linear_ratio=lora_ms / base_ms)
res["base_gemm_TFLOPs"] = 2 * 4096**3 / (base_ms * 1e-3) / 1e12

json.dump(res, open("cuda_targets.json", "w"), indent=1)
for k, v in res.items():
    print(f"{k:36s} {v:.4g}" if isinstance(v, float) else f"{k:36s} {v}")
EOF
  step cuda_targets 90 "$PY" cuda_targets.py

  # 3. The whole test suite (CUDA cases appear automatically).
  step pytest 200 "$PY" -m pytest -q -ra -p no:cacheprovider --junitxml="$OUT/pytest.xml" "$ROOT/tests"

  # 4. compute-sanitizer (memcheck, racecheck, synccheck) on small multi_lora (both paths,
  #    backward), merge and lora_linear cases, then memcheck over the CUDA op tests.
  if command -v compute-sanitizer >/dev/null 2>&1; then
    cat > sanitize_case.py <<'EOF'
import torch
import lora_ext
from lora_ext import ops

dev = "cuda"
for T in (9, 150):  # decode and grouped paths
    for dt in (torch.bfloat16, torch.float32):
        x = torch.randn(T, 37, device=dev, dtype=dt, requires_grad=True)
        a = torch.randn(3, 8, 37, device=dev, dtype=dt, requires_grad=True)
        b = torch.randn(3, 21, 8, device=dev, dtype=dt, requires_grad=True)
        idx = torch.randint(-1, 3, (T,), device=dev)
        ranks = torch.tensor([1, 8, 5], device=dev)
        y = ops.multi_lora(x, a, b, idx, torch.rand(3, device=dev), ranks, None)
        y.sum().backward()
w = torch.randn(33, 70, device=dev, dtype=torch.bfloat16)
la, lb = torch.randn(5, 70, device=dev, dtype=w.dtype), torch.randn(33, 5, device=dev, dtype=w.dtype)
ops.merge_(w, la, lb, 0.5); ops.unmerge_(w, la, lb, 0.5)
res = torch.empty(w.shape, dtype=torch.int8, device=dev)
i, v = ops.merge_exact_(w, la, lb, 0.5, res); ops.unmerge_exact_(w, la, lb, 0.5, res, i, v)
xl = torch.randn(2, 5, 70, device=dev, requires_grad=True)
ops.lora_linear(xl, w.float(), None, la.float(), lb.float(), 0.5).sum().backward()
torch.cuda.synchronize()
print("sanitize case ok")
EOF
    # Without the caching allocator, so out-of-bounds accesses hit unallocated memory.
    export PYTORCH_NO_CUDA_MEMORY_CACHING=1
    for tool in memcheck racecheck synccheck; do
      step "sanitize_$tool" 60 compute-sanitizer --tool "$tool" --error-exitcode 1 "$PY" sanitize_case.py
    done
    # memcheck over the CUDA cases of the op and merge tests (as many as the limit allows).
    step sanitize_tests 150 compute-sanitizer --tool memcheck --error-exitcode 1 \
      "$PY" -m pytest -q -x -p no:cacheprovider -k cuda "$ROOT/tests/test_ops.py" "$ROOT/tests/test_merge_guards.py"
    unset PYTORCH_NO_CUDA_MEMORY_CACHING
  else
    SUMMARY+=("$(printf '%-16s %-8s %6s  %s' sanitizer SKIPPED - "compute-sanitizer not found")")
  fi

  # 5. The benchmark runner, when it exists (W1-W6; W7/W8 need the model package).
  if [[ -f "$ROOT/benchmarks/run.py" ]]; then
    step benchmarks 100 "$PY" "$ROOT/benchmarks/run.py" --device cuda \
      --workloads W1,W2,W3,W4,W5,W6 --max-seconds 8 --out "$OUT/bench"
  fi
fi

# Summary, last.
echo
echo "================ gpu_check summary ($(( $(date +%s) - START ))s) ================"
head -n 1 "$OUT/env.txt"
printf '%-16s %-8s %6s  %s\n' step status time log
for line in "${SUMMARY[@]}"; do echo "$line"; done
if [[ -f "$OUT/cuda_targets.json" ]]; then
  "$PY" - "$OUT/cuda_targets.json" <<'EOF'
import json, sys
r = json.load(open(sys.argv[1]))
print(f"copy bandwidth {r['copy_GBps']:.0f} GB/s, base GEMM {r['base_gemm_TFLOPs']:.0f} TFLOP/s")
rows = [
    ("multi_lora decode (graph)", f"{r['multi_lora_decode_graph_us']:.1f} us", f"{r['multi_lora_decode_graph_pct_copy']:.0f}% of copy bw", ">= 50%", r['multi_lora_decode_graph_pct_copy'] >= 50),
    ("multi_lora decode (eager)", f"{r['multi_lora_decode_eager_us']:.1f} us", f"{r['multi_lora_decode_eager_pct_copy']:.0f}% of copy bw", "(info)", None),
    ("merge_ 4096^2 bf16", f"{r['merge_us']:.1f} us", f"{r['merge_pct_copy']:.0f}% of copy bw", ">= 70%", r['merge_pct_copy'] >= 70),
    ("lora_linear T=4096", f"{r['lora_linear_us']:.1f} us", f"{r['lora_linear_ratio']:.3f}x base GEMM", "<= 1.10x", r['lora_linear_ratio'] <= 1.10),
]
print(f"{'target':28s} {'time':>10s}  {'result':24s} {'goal':9s} met")
for name, t, v, goal, ok in rows:
    print(f"{name:28s} {t:>10s}  {v:24s} {goal:9s} {'-' if ok is None else ('yes' if ok else 'NO')}")
EOF
fi
grep -h "passed\|failed" "$OUT/pytest.log" 2>/dev/null | tail -n 1

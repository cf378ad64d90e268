"""Issue 19: the cost of deterministic mode, round-robin against the default in one process (see BENCHMARKS.md)."""
# W8 (benchmarks/workloads_model.py: LoRA training step on SmolLM2-135M, r=16 on q,k,v,o,gate,up,down,
# batch 8x128, AdamW) with torch.use_deterministic_algorithms off and on, alternating in one process.
import sys, time, statistics, copy, argparse, torch
sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[2] / "benchmarks"))
import lora_ext
from workloads_model import load_llm, LLAMA_TARGETS
ap = argparse.ArgumentParser(); ap.add_argument("--reps", type=int, default=6); args = ap.parse_args()
lm, _ = load_llm()
gen = torch.Generator().manual_seed(0)
ids = torch.randint(0, lm.config.vocab_size, (8, 128), generator=gen)
model = lora_ext.inject_lora(lm, LLAMA_TARGETS, r=16, alpha=32)
model.train()
params = [p for p in model.parameters() if p.requires_grad]
opt = torch.optim.AdamW(params, lr=1e-4)
def step():
    opt.zero_grad(set_to_none=True)
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
def once(det):
    torch.use_deterministic_algorithms(det)
    t0 = time.perf_counter(); step(); t = time.perf_counter() - t0
    torch.use_deterministic_algorithms(False)
    return t * 1e3
once(False); once(True)
times = {False: [], True: []}
for rep in range(args.reps):
    for m in ((False, True) if rep % 2 == 0 else (True, False)):
        times[m].append(once(m))
a0, a1 = statistics.median(times[False]), statistics.median(times[True])
print(f"W8 threads={torch.get_num_threads()} isa={lora_ext.ops.merge_variant(torch.empty(1))} reps={args.reps}")
print(f"default ms {a0:.0f} (p10..p90 {min(times[False]):.0f}..{max(times[False]):.0f}); deterministic ms {a1:.0f} ({min(times[True]):.0f}..{max(times[True]):.0f}); ratio {a1/a0:.3f}")

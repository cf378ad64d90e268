import sys, time, copy, cProfile, pstats, statistics
import torch
torch.set_num_threads(2)
import lora_ext
from lora_ext import llm, tasks
TARGETS = ["q_proj","k_proj","v_proj","o_proj","gate_proj","up_proj","down_proj"]
lm, tok = llm.load_model()
lm.eval()
rows = []
for name, task in tasks.TASKS.items():
    rows += [(name, p) for p, _ in task.examples(2, seed=0)]
rows += [(None, q) for q, _ in tasks.BASE_QUESTIONS]
names = [n for n, _ in rows]; prompts = [p for _, p in rows]
lx = copy.deepcopy(lm)
for name in tasks.TASKS:
    torch.manual_seed(hash(name) % 1000)
    lora_ext.inject_lora(lx, TARGETS, r=8, alpha=16, adapter_name=name, init="gaussian")
lx.eval()
fixed = dict(max_new_tokens=16, min_new_tokens=16)
def ours():
    with lora_ext.set_adapter(lx, names):
        return llm.generate(lx, tok, prompts, **fixed)
def base():
    return llm.generate(lm, tok, prompts, **fixed)
mode = sys.argv[1] if len(sys.argv) > 1 else "time"
with torch.inference_mode(False), torch.no_grad():
    ours(); base()
    if mode == "prof":
        cProfile.run("ours()", "/tmp/i10/w7.prof")
        pstats.Stats("/tmp/i10/w7.prof").sort_stats("tottime").print_stats(25)
    else:
        reps = int(sys.argv[2]) if len(sys.argv) > 2 else 5
        ratios = []; to=[]; tb=[]
        for i in range(reps):
            fns = [("o", ours), ("b", base)] if i % 2 == 0 else [("b", base), ("o", ours)]
            t = {}
            for k, f in fns:
                t0 = time.perf_counter(); f(); t[k] = time.perf_counter() - t0
            ratios.append(t["b"] / t["o"]); to.append(t["o"]); tb.append(t["b"])
        print("ours s", [round(v,3) for v in to]); print("base s", [round(v,3) for v in tb])
        print("speed ours/base per round", [round(r,3) for r in ratios], "median", round(statistics.median(ratios),3),
              "ratio of medians", round(statistics.median(tb)/statistics.median(to),3))

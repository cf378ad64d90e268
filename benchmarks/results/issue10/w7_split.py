# W7 split: the mixed generate as is, with multi_lora_add_ replaced by a no-op (what the
# Python path and F.linear cost without the op), and the base model; interleaved rounds.
# usage: python benchmarks/results/issue10/w7_split.py [rounds]
import sys, time, copy, statistics
import torch
torch.set_num_threads(2)
import lora_ext
from lora_ext import llm, tasks, ops, layers
TARGETS = ["q_proj","k_proj","v_proj","o_proj","gate_proj","up_proj","down_proj"]
lm, tok = llm.load_model(); lm.eval()
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
real_add = layers.ops.multi_lora_add_
def ours():
    with lora_ext.set_adapter(lx, names):
        return llm.generate(lx, tok, prompts, **fixed)
def noop_op():
    layers.ops.multi_lora_add_ = lambda *a: None
    try: return ours()
    finally: layers.ops.multi_lora_add_ = real_add
def base():
    return llm.generate(lm, tok, prompts, **fixed)
# shapes of op calls
calls = []
def rec(y, x, *a):
    calls.append(x.shape[0]); return real_add(y, x, *a)
with torch.no_grad():
    layers.ops.multi_lora_add_ = rec; ours(); layers.ops.multi_lora_add_ = real_add
    print("op calls", len(calls), "rows of prefill calls", max(calls), "decode calls", sum(1 for c in calls if c == 8))
    fns = [("ours", ours), ("python_only", noop_op), ("base", base)]
    for _, f in fns: f()
    t = {k: [] for k, _ in fns}
    for i in range(int(sys.argv[1]) if len(sys.argv) > 1 else 10):
        for k, f in (fns if i % 2 == 0 else fns[::-1]):
            t0 = time.perf_counter(); f(); t[k].append(time.perf_counter() - t0)
    for k, v in t.items(): print(k, "s", [round(s, 3) for s in v])
    m = {k: statistics.median(v) for k, v in t.items()}
    print({k: round(v, 4) for k, v in m.items()})
    print("ratios base/x:", {k: round(m["base"] / v, 4) for k, v in m.items()})
    # paired: per round
    for k in ("ours", "python_only"):
        print(k, "median paired", round(statistics.median([b / o for b, o in zip(t["base"], t[k])]), 4))

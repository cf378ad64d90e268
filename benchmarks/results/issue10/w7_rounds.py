# W7 (the demo's mixed batch on SmolLM2-135M, random r = 8 adapters on all seven
# projections) against the base model alone, in interleaved rounds.
# usage: python benchmarks/results/issue10/w7_rounds.py [time|split|prof] [rounds]
#   time:  mixed generate vs base, per-round ratios and the ratio of medians
#   split: also the mixed generate with multi_lora_add_ a no-op (what the Python path and
#          F.linear cost without the op), and the op's call shapes
#   prof:  cProfile of one mixed generate
import cProfile, copy, pstats, statistics, sys, time
import torch
torch.set_num_threads(2)
import lora_ext
from lora_ext import layers
from lora_ext.apps import llm, tasks
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
mode = sys.argv[1] if len(sys.argv) > 1 else "time"
rounds = int(sys.argv[2]) if len(sys.argv) > 2 else (10 if mode == "split" else 5)

lm, tok = llm.load_model()
lm.eval()
rows = []
for name, task in tasks.TASKS.items():
    rows += [(name, p) for p, _ in task.examples(2, seed=0)]
rows += [(None, q) for q, _ in tasks.BASE_QUESTIONS]
names = [n for n, _ in rows]
prompts = [p for _, p in rows]
lx = copy.deepcopy(lm)
for seed, name in enumerate(tasks.TASKS):
    torch.manual_seed(seed)
    lora_ext.inject_lora(lx, TARGETS, r=8, alpha=16, adapter_name=name, init="gaussian")
lx.eval()
fixed = dict(max_new_tokens=16, min_new_tokens=16)
real_add = layers.ops.multi_lora_add_


def ours():
    with lora_ext.use_adapter(lx, names):
        return llm.generate(lx, tok, prompts, **fixed)


def base():
    return llm.generate(lm, tok, prompts, **fixed)


def with_op(replacement, fn):
    layers.ops.multi_lora_add_ = replacement
    try:
        return fn()
    finally:
        layers.ops.multi_lora_add_ = real_add


with torch.no_grad():
    if mode == "prof":
        ours()
        profile = cProfile.Profile()
        profile.runcall(ours)
        pstats.Stats(profile).sort_stats("tottime").print_stats(25)
        sys.exit()
    fns = [("ours", ours), ("base", base)]
    if mode == "split":
        calls = []
        with_op(lambda y, x, *a: calls.append(x.shape[0]) or real_add(y, x, *a), ours)
        print("op calls", len(calls), "rows of prefill calls", max(calls),
              "decode calls", sum(1 for c in calls if c == 8))
        fns.insert(1, ("python_only", lambda: with_op(lambda *a: None, ours)))
    for _, f in fns:  # warm-up
        f()
    t = {k: [] for k, _ in fns}
    for i in range(rounds):
        for k, f in (fns if i % 2 == 0 else fns[::-1]):
            t0 = time.perf_counter()
            f()
            t[k].append(time.perf_counter() - t0)
    for k, v in t.items():
        print(k, "s", [round(s, 3) for s in v])
    medians = {k: statistics.median(v) for k, v in t.items()}
    for k in t:
        if k != "base":
            paired = [b / o for b, o in zip(t["base"], t[k])]
            print(f"{k}: speed vs base per round", [round(r, 3) for r in paired],
                  "median", round(statistics.median(paired), 3),
                  "ratio of medians", round(medians["base"] / medians[k], 3))

"""W9 of benchmarks/run.py: many adapters in one model (SmolLM2-135M). The mixed
generate and one forward with 3, 100 and 1000 loaded, memory per adapter, load / delete
/ replace times (load + delete cycles of a ``save_adapter`` folder; every load while
1000 are loaded one after another), and a Zipf serving trace through an AdapterPool."""

from __future__ import annotations

import copy
import gc
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

import lora_ext
from harness import quantile, rss_bytes, summary
from workloads_model import load_llm


def _lora_bytes(model) -> tuple[int, int]:
    """(bytes of the adapters' parameters, bytes of the slot stacks) over all LoRA layers."""
    params = stacks = 0
    for _, layer in lora_ext.lora_layers(model):
        params += sum(p.numel() * p.element_size() for d in (layer.lora_A, layer.lora_B) for p in d.values())
        stacks += sum(t.numel() * t.element_size() for t in layer.stacks()[:2])
    return params, stacks


def w9_many_adapters(args) -> dict:
    """Thousands of adapters on SmolLM2-135M: per-step cost, memory, load/replace, a pool."""
    import random

    from safetensors.torch import load_file
    from lora_ext.apps import llm, tasks
    from lora_ext.apps.cli import SHIPPED_ADAPTERS

    counts = (3, 10, 40) if args.tiny else (3, 100, 1000)
    new_tokens = 4 if args.tiny else args.gen_tokens
    cycles = 10 if args.tiny else 50
    desc = (f"{counts[-1]} adapters on SmolLM2-135M (the 3 shipped r=8 q/k/v/o adapters + random ones of "
            f"the same shape, fp32): W7's 8-row mixed batch over the 3 shipped adapters, "
            f"{new_tokens} new tokens, with {counts[0]}, {counts[1]} and {counts[2]} loaded; loads: "
            f"{cycles} load_adapter + delete_adapter cycles of a save_adapter folder with 3 loaded, and each "
            f"load from a state dict while {counts[2]} are loaded one after another (no reserve_adapters)")
    started = time.perf_counter()

    def progress(what):
        print(f"  W9 {time.perf_counter() - started:6.1f} s: {what}", file=sys.stderr)

    lm, tok = load_llm()
    lm.eval()
    shipped = {name: SHIPPED_ADAPTERS / name for name in tasks.TASKS}
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
    # A PEFT folder as lora_ext writes it: the 120-layer q/k/v/o adapter, in the model's fp32.
    saved = Path(tempfile.mkdtemp(prefix="lora_ext_w9_")) / "upper"
    lora_ext.save_adapter(few, str(saved), "upper")
    rss0 = rss_bytes()
    lora_ext.reserve_adapters(mid, counts[1])  # the room is part of the growth measured
    for i in range(counts[1] - 3):
        lora_ext.load_adapter(mid, synthetic(i), f"s{i}", config=config)
    rss_mid = rss_bytes() - rss0
    load_ms = []  # per load from a state dict, in order: N = 3 .. counts[-1] - 1 loaded, no room reserved
    gc_ms = []  # of which Python's cyclic garbage collector (its pauses grow with all live objects)
    gc_clock = {"ms": 0.0}

    def on_gc(phase, info):
        if phase == "start":
            gc_clock["t0"] = time.perf_counter()
        else:
            gc_clock["ms"] += (time.perf_counter() - gc_clock.pop("t0", time.perf_counter())) * 1e3

    gc.callbacks.append(on_gc)
    rss0 = rss_bytes()
    try:
        for i in range(counts[2] - 3):
            state = synthetic(i)
            gc_clock["ms"] = 0.0
            t0 = time.perf_counter()
            lora_ext.load_adapter(many, state, f"s{i}", config=config)
            load_ms.append((time.perf_counter() - t0) * 1e3)
            gc_ms.append(gc_clock["ms"])
    finally:
        gc.callbacks.remove(on_gc)
    rss_many = rss_bytes() - rss0
    worst = max(range(len(load_ms)), key=load_ms.__getitem__)
    without_gc = [t - g for t, g in zip(load_ms, gc_ms)]
    progress(f"loaded {counts[1]} and {counts[2]} adapters")
    one_adapter = _lora_bytes(few)[0] / 3
    mid_params, mid_stacks = _lora_bytes(mid)
    many_params, many_stacks = _lora_bytes(many)

    def generate(model):
        with lora_ext.use_adapter(model, names):
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
        paired = {k: quantile([a / b for a, b in zip(ms[keys[0]], ms[k])], 0.5) for k in keys[1:]}
        return [summary(k, t) for k, t in ms.items()], paired

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
        with torch.no_grad(), lora_ext.use_adapter(model, names):
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
            ops_ms[f"{op}_ms_{label}"] = quantile(t, 0.5)
    # Load + delete cycles of the save_adapter folder with 3 loaded: every load and delete timed.
    cycle_load_ms, cycle_delete_ms = [], []
    for i in range(cycles):
        t0 = time.perf_counter()
        lora_ext.load_adapter(few, saved, "cycle")
        t1 = time.perf_counter()
        lora_ext.delete_adapter(few, "cycle")
        cycle_load_ms.append((t1 - t0) * 1e3)
        cycle_delete_ms.append((time.perf_counter() - t1) * 1e3)
    shutil.rmtree(saved.parent, ignore_errors=True)
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
        "load_state_dict_ms_first10": quantile(load_ms[:10], 0.5),
        "load_state_dict_ms_last10": quantile(load_ms[-10:], 0.5),
        "load_state_dict_ms_median_while_growing": quantile(load_ms, 0.5),
        "load_state_dict_ms_worst_while_growing": max(load_ms),
        "load_state_dict_worst_at_loaded": worst + 3,
        "load_state_dict_worst_gc_ms": gc_ms[worst],
        "load_state_dict_ms_p99_while_growing": quantile(load_ms, 0.99),
        "load_state_dict_ms_worst_without_gc": max(without_gc),
        "loads_over_100ms": sum(t > 100 for t in load_ms),
        "load_cycles": cycles,
        "load_saved_folder_ms_median": quantile(cycle_load_ms, 0.5),
        "load_saved_folder_ms_worst": max(cycle_load_ms),
        "delete_after_saved_folder_ms_median": quantile(cycle_delete_ms, 0.5),
        "delete_after_saved_folder_ms_worst": max(cycle_delete_ms),
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

"""The end-to-end workloads of benchmarks/run.py on SmolLM2-135M: W7 (mixed-adapter
generation), W8 (a LoRA training step), W10 (vLLM with lora_ext's plugin, run by
benchmarks/vllm_w10.py) and W11 (W8's step on 2 ranks, benchmarks/train_w11.py)."""

from __future__ import annotations

import copy
import json
import tempfile
from pathlib import Path
from typing import Optional

import torch

import lora_ext
from harness import NOT_YET, ROOT, measure, not_yet, quantile, summary

LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def load_llm():
    from lora_ext.apps import llm
    return llm.load_model()


# ---------------------------------------------------------------------------
# W7, W8


def w7_generation(args) -> dict:
    """Mixed-adapter generation: lora_ext's one-call mixed batch vs PEFT adapter_names vs base."""
    desc = "`lora-ext demo`'s mixed batch on SmolLM2-135M: generated tokens/s"
    try:
        from lora_ext.apps import cli  # noqa: F401
    except ImportError:
        cli = None
    try:
        from lora_ext.apps import llm, tasks
        import peft
    except ImportError as e:
        return not_yet("W7", desc, ["lora_ext", "peft_adapter_names", "base"], f"{NOT_YET}: {e}")

    lm, tok = load_llm()
    rng_seed = 0
    rows: list[tuple[Optional[str], str]] = []
    for name, task in tasks.TASKS.items():
        rows += [(name, p) for p, _ in task.examples(2, seed=rng_seed)]
    rows += [(None, q) for q, _ in tasks.BASE_QUESTIONS]
    names = [n for n, _ in rows]
    prompts = [p for _, p in rows]
    new_tokens = args.gen_tokens

    # The shipped adapters when present (the demo's), else random ones of the same shape.
    # ROOT / "adapters" has never existed (they are in lora_ext/apps/adapters): W7 has always
    # run, and is documented (BENCHMARKS.md) with, random r=8 adapters on all seven projections.
    shipped = ROOT / "adapters"
    tmp = Path(tempfile.mkdtemp(prefix="lora_ext_w7_"))
    lx = copy.deepcopy(lm)
    adapter_dirs = {}
    for name in tasks.TASKS:
        d = shipped / name
        if (d / "adapter_config.json").is_file():
            lora_ext.load_adapter(lx, str(d), name)
            adapter_dirs[name] = d
        else:
            torch.manual_seed(hash(name) % 1000)
            lora_ext.inject_lora(lx, LLAMA_TARGETS, r=8, alpha=16, adapter_name=name, init="gaussian")
            lora_ext.save_adapter(lx, str(tmp / name), name)
            adapter_dirs[name] = tmp / name
    lx.eval()
    pm = None
    for name, d in adapter_dirs.items():
        if pm is None:
            pm = peft.PeftModel.from_pretrained(copy.deepcopy(lm), str(d), adapter_name=name)
        else:
            pm.load_adapter(str(d), adapter_name=name)
    pm.eval()
    peft_names = [n if n is not None else "__base__" for n in names]
    fixed = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens)  # same steps for all

    def ours():
        with lora_ext.use_adapter(lx, names):
            return llm.generate(lx, tok, prompts, **fixed)

    variants = measure(torch.device("cpu"), {
        "lora_ext": ours,
        "peft_adapter_names": lambda: llm.generate(pm, tok, prompts, adapter_names=peft_names, **fixed),
        "base": lambda: llm.generate(lm, tok, prompts, **fixed),
    }, args, reps=args.model_reps, warmup=1)
    tokens = len(prompts) * new_tokens
    for v in variants:
        v["tokens_per_s"] = tokens / (v["median_ms"] * 1e-3)
    source = "shipped adapters" if all(d.parent == shipped for d in adapter_dirs.values()) else \
        "random adapters (r=8 on q,k,v,o,gate,up,down; shipped adapters not yet available)"
    return {"workload": "W7", "description": f"{desc}; {len(prompts)} rows ({sum(n is None for n in names)} base), "
            f"{new_tokens} new tokens each, {source}", "device": "cpu", "variants": variants,
            "extra": {"rows": len(prompts), "new_tokens": new_tokens,
                      "demo_cli": "present" if cli is not None else NOT_YET},
            "check_ok": True}


def w8_training(args) -> dict:
    """One LoRA training step (forward, loss, backward, AdamW) vs the frozen base's fwd+bwd."""
    desc = "training step on SmolLM2-135M, r=16 on q,k,v,o,gate,up,down, batch 8x128: tokens/s"
    try:
        import peft
        lm, _ = load_llm()
    except Exception as e:  # noqa: BLE001 (any missing piece makes this a TODO, not a failure)
        return not_yet("W8", desc, ["lora_ext", "peft", "frozen_base"], f"{NOT_YET}: {e}")
    batch, seq = (2, 16) if args.tiny else (8, 128)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, lm.config.vocab_size, (batch, seq), generator=gen)

    base = copy.deepcopy(lm)
    for p in base.parameters():
        p.requires_grad_(False)
    base.enable_input_require_grads()  # so backward runs through every layer
    base.train()

    lx = lora_ext.inject_lora(copy.deepcopy(lm), LLAMA_TARGETS, r=16, alpha=32)
    lx.train()
    pm = peft.get_peft_model(copy.deepcopy(lm), peft.LoraConfig(
        r=16, lora_alpha=32, lora_dropout=0.0, target_modules=LLAMA_TARGETS))
    pm.train()
    del lm

    def train_step(model):
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-4)

        def step():
            opt.zero_grad(set_to_none=True)
            model(input_ids=ids, labels=ids).loss.backward()
            opt.step()
        return step, sum(p.numel() for p in params)

    ours, n_ours = train_step(lx)
    theirs, n_theirs = train_step(pm)
    variants = measure(torch.device("cpu"), {
        "lora_ext": ours,
        "peft": theirs,
        "frozen_base": lambda: base(input_ids=ids, labels=ids).loss.backward(),
    }, args, reps=args.model_reps, warmup=1)
    for v in variants:
        v["tokens_per_s"] = batch * seq / (v["median_ms"] * 1e-3)
    t = {v["name"]: v["median_ms"] for v in variants}
    return {"workload": "W8", "description": desc.replace("8x128", f"{batch}x{seq}"), "device": "cpu",
            "variants": variants, "check_ok": n_ours == n_theirs,
            "extra": {"trainable_params_lora_ext": n_ours, "trainable_params_peft": n_theirs,
                      "lora_ext_overhead_over_base": t["lora_ext"] / t["frozen_base"] - 1,
                      "peft_overhead_over_base": t["peft"] / t["frozen_base"] - 1}}


# ---------------------------------------------------------------------------
# W10: vLLM with lora_ext's plugin (benchmarks/vllm_w10.py)


def w10_vllm(args) -> dict:
    """vLLM offline throughput: no LoRA, vLLM's own LoRA path, lora_ext's plugin."""
    import importlib.util
    import shutil

    import vllm_w10 as w10  # benchmarks/, next to this file

    desc = (f"vLLM {w10.REQUESTS} requests x {w10.NEW_TOKENS} generated tokens on SmolLM2-135M, "
            f"max_loras={w10.MAX_LORAS}, r={w10.RANK} on q,k,v,o; mix3: the 3 shipped adapters + base rows "
            f"(8 each), mix16: 31 rows over 16 adapters + 1 base row; per dtype one process holds the four engines "
            f"(lora_skipped: LoRA on, linear-layer LoRA math skipped, a floor), timed in turn, "
            f"repetition after repetition")
    names = [f"{v} {d} {m}" for d in w10.DTYPES for m in w10.MIXES for v in w10.VARIANTS]
    if importlib.util.find_spec("vllm") is None:
        return not_yet("W10", desc, names, f"{NOT_YET}: vLLM is not installed (scripts/setup_vllm.sh)")
    if args.w10_json:  # per-dtype results vllm_w10.py wrote earlier (DIR/float32.json, ...)
        res = {d: json.loads((Path(args.w10_json) / f"{d}.json").read_text()) for d in w10.DTYPES
               if (Path(args.w10_json) / f"{d}.json").is_file()}
    else:
        work = Path(tempfile.mkdtemp(prefix="lora_ext_w10_"))  # kept on failure, for the raw results
        res = w10.run_all(args.model_reps, work, dtypes=args.w10_dtypes.split(","))
        shutil.rmtree(work, ignore_errors=True)
    desc += f"; dtypes: {', '.join(res)}"
    tokens = w10.REQUESTS * w10.NEW_TOKENS
    variants, extra, check_ok = [], {}, True
    for d in res:
        for m in w10.MIXES:
            for v in w10.VARIANTS:
                ms = [s * 1e3 for s in res[d][v][m]["seconds"]]
                variants.append(summary(f"{v} {d} {m}", ms))
                variants[-1]["tokens_per_s"] = tokens / (variants[-1]["median_ms"] * 1e-3)
            tps = {v: tokens / (quantile(res[d][v][m]["seconds"], 0.5)) for v in w10.VARIANTS}
            if all("cpu_seconds" in res[d][v][m] for v in w10.VARIANTS):
                cpu = {v: quantile(res[d][v][m]["cpu_seconds"], 0.5) for v in w10.VARIANTS}
                for v in ("lora_ext", "vllm_lora", "lora_skipped"):
                    extra[f"cpu_time_{v}_over_no_lora_{d}_{m}"] = cpu[v] / cpu["no_lora"]
            extra[f"lora_ext_over_no_lora_{d}_{m}"] = tps["lora_ext"] / tps["no_lora"]
            extra[f"vllm_lora_over_no_lora_{d}_{m}"] = tps["vllm_lora"] / tps["no_lora"]
            extra[f"lora_skipped_over_no_lora_{d}_{m}"] = tps["lora_skipped"] / tps["no_lora"]
            rows = res[d]["rows"][m]
            extra[f"greedy_tokens_same_every_rep_{d}_{m}"] = all(
                res[d][v][m]["same_tokens_every_rep"] for v in w10.VARIANTS)
            ours, theirs, plain = (res[d][v][m]["tokens"] for v in ("lora_ext", "vllm_lora", "no_lora"))
            lora_rows = [i for i, a in enumerate(rows) if a is not None]
            base_rows = [i for i, a in enumerate(rows) if a is None]
            same_lora = sum(ours[i] == theirs[i] for i in lora_rows)
            extra[f"same_tokens_as_vllm_lora_{d}_{m}"] = f"{same_lora}/{len(lora_rows)} adapter rows"
            extra[f"base_rows_same_as_no_lora_{d}_{m}"] = (
                f"lora_ext {sum(ours[i] == plain[i] for i in base_rows)}/{len(base_rows)}, "
                f"vllm_lora {sum(theirs[i] == plain[i] for i in base_rows)}/{len(base_rows)}")
            if d == "float32":  # bf16 rounding may flip a late greedy token; fp32 must agree
                check_ok &= same_lora == len(lora_rows) and all(ours[i] == plain[i] for i in base_rows)
    return {"workload": "W10", "description": desc, "device": "cpu", "variants": variants, "extra": extra,
            "check_ok": check_ok}


# ---------------------------------------------------------------------------
# W11: W8's step on 2 ranks (benchmarks/train_w11.py)


def w11_distributed(args) -> dict:
    import train_w11  # benchmarks/, next to this file

    return train_w11.result(args)

#!/usr/bin/env python
"""W10: vLLM offline throughput on SmolLM2-135M, with and without lora_ext's plugin.

Variants (one engine process each, per dtype): ``no_lora`` (vLLM, LoRA off),
``vllm_lora`` (vLLM's own LoRA path, LORA_EXT_VLLM=0), ``lora_ext`` (the plugin).
Two mixes of 32 requests x 64 generated tokens (EOS ignored, so every variant makes
the same number of tokens): the 3 shipped adapters + base rows, and 16 distinct
adapters (the 3 shipped + 13 random ones of the same shape) + base rows, with
``max_loras=16``. Inside a process the mixes are timed in turn, repetition after
repetition. ``benchmarks/run.py --workloads W10`` runs this; alone:

    python benchmarks/vllm_w10.py VARIANT DTYPE REPS OUT.json ADAPTERS_DIR
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = ("no_lora", "vllm_lora", "lora_ext")
DTYPES = ("float32", "bfloat16")
REQUESTS, NEW_TOKENS, MAX_LORAS, RANK = 32, 64, 16, 8
MIXES = ("mix3", "mix16")


def make_adapters(folder: Path, count: int = MAX_LORAS, seed: int = 0) -> list[Path]:
    """The 3 shipped adapters and count - 3 random ones of their shape (r=8, q/k/v/o)."""
    import torch
    from safetensors.torch import load_file, save_file

    shipped = [ROOT / "lora_ext" / "adapters" / n for n in ("upper", "reverse", "arith")]
    config = json.loads((shipped[0] / "adapter_config.json").read_text())
    template = load_file(str(shipped[0] / "adapter_model.safetensors"))
    gen = torch.Generator().manual_seed(seed)
    paths = list(shipped)
    for i in range(count - len(shipped)):
        d = folder / f"random{i:02d}"
        d.mkdir(parents=True, exist_ok=True)
        weights = {k: torch.randn(t.shape, generator=gen) * t.float().std() for k, t in template.items()}
        save_file(weights, str(d / "adapter_model.safetensors"))
        (d / "adapter_config.json").write_text(json.dumps(config))
        paths.append(d)
    return paths


def _mixes(adapters: list[Path]) -> dict[str, list[tuple[str, int | None]]]:
    """Per mix, (prompt, adapter number or None) for each request; same prompts in both."""
    from lora_ext import tasks

    rng = random.Random(0)
    names = list(tasks.TASKS)
    prompts = [tasks.get_task(names[i % 3]).example(rng)[0] for i in range(REQUESTS)]
    # mix3: upper, reverse, arith, base, ...; mix16: adapters 0..15 then base, cycling.
    mix3 = [(p, i % 4 if i % 4 < 3 else None) for i, p in enumerate(prompts)]
    mix16 = [(p, i % 17 if i % 17 < len(adapters) else None) for i, p in enumerate(prompts)]
    return {"mix3": mix3, "mix16": mix16}


def _worker(variant: str, dtype: str, reps: int, out: str, adapter_dir: str) -> None:
    from transformers import AutoTokenizer
    from vllm import LLM, SamplingParams
    from vllm.lora.request import LoRARequest

    from lora_ext import llm

    adapters = sorted(Path(adapter_dir).iterdir(), key=lambda p: p.name)
    shipped = [ROOT / "lora_ext" / "adapters" / n for n in ("upper", "reverse", "arith")]
    adapters = shipped + [p for p in adapters if p.name.startswith("random")]
    folder = str(llm._converted_default_model())
    tokenizer = AutoTokenizer.from_pretrained(folder)
    lora = variant != "no_lora"
    engine = LLM(model=folder, dtype=dtype, max_model_len=512, enforce_eager=True, seed=0,
                 enable_lora=lora, max_loras=MAX_LORAS, max_lora_rank=RANK)
    requests = [LoRARequest(f"a{i}", i + 1, str(p)) for i, p in enumerate(adapters)]
    params = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, min_tokens=NEW_TOKENS, ignore_eos=True)

    def run(mix):
        rows = _mixes(adapters)[mix]
        prompts = [{"prompt_token_ids": tokenizer(llm.format_prompt(tokenizer, p), add_special_tokens=False).input_ids}
                   for p, _ in rows]
        loras = [requests[a] if (lora and a is not None) else None for _, a in rows]
        start = time.perf_counter()
        outs = engine.generate(prompts, params, lora_request=loras, use_tqdm=False)
        seconds = time.perf_counter() - start
        return seconds, [list(o.outputs[0].token_ids) for o in outs]

    result = {m: {"seconds": [], "tokens": None} for m in MIXES}
    for m in MIXES:  # warm-up: loads the adapters into their slots
        result[m]["tokens"] = run(m)[1]
    for _ in range(reps):
        for m in MIXES:
            seconds, tokens = run(m)
            result[m]["seconds"].append(seconds)
            assert tokens == result[m]["tokens"], "greedy outputs changed between repetitions"
    result["rows"] = {m: [a for _, a in rows] for m, rows in _mixes(adapters).items()}
    Path(out).write_text(json.dumps(result))


def run_all(reps: int, work: Path, python: str = sys.executable, log=sys.stderr) -> dict:
    """Every (dtype, variant) in its own process; returns their results by dtype and variant."""
    adapter_dir = work / "adapters"
    make_adapters(adapter_dir)
    env = dict(os.environ)
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    results: dict = {}
    for dtype in DTYPES:
        for variant in VARIANTS:
            out = work / f"{dtype}-{variant}.json"
            env["LORA_EXT_VLLM"] = "1" if variant == "lora_ext" else "0"
            print(f"W10: {dtype} {variant} ...", file=log, flush=True)
            proc = subprocess.run([python, __file__, variant, dtype, str(reps), str(out), str(adapter_dir)],
                                  env=env, capture_output=True, text=True)
            if proc.returncode != 0:
                raise RuntimeError(f"W10 {dtype} {variant} failed:\n{(proc.stdout + proc.stderr)[-4000:]}")
            logs = proc.stdout + proc.stderr
            expected = "Using LoRAExtPunicaWrapper." if variant == "lora_ext" else "Using PunicaWrapperCPU."
            if variant != "no_lora" and expected not in logs:
                raise RuntimeError(f"W10 {dtype} {variant}: vLLM did not log '{expected}'")
            results.setdefault(dtype, {})[variant] = json.loads(out.read_text())
    return results


if __name__ == "__main__":
    _worker(sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4], sys.argv[5])

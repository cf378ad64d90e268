#!/usr/bin/env python
"""W10: vLLM offline throughput on SmolLM2-135M, with and without lora_ext's plugin.

Variants: ``no_lora`` (vLLM, LoRA off), ``vllm_lora`` (vLLM's own LoRA path, the
plugin switched off), ``lora_ext`` (the plugin) and ``lora_skipped`` (a floor: LoRA
on, the linear layers' LoRA math skipped), as four engines in one process per dtype,
timed in turn, repetition after repetition. Two mixes of 32 requests x 64
generated tokens (EOS ignored, so every variant makes the same number of tokens): the
3 shipped adapters + base rows, and 16 distinct adapters (the 3 shipped + 13 random
ones of the same shape) + base rows, with ``max_loras=16``.
``benchmarks/run.py --workloads W10`` runs this; alone:

    python benchmarks/vllm_w10.py DTYPE REPS OUT.json ADAPTERS_DIR
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
SHIPPED = ROOT / "lora_ext" / "apps" / "adapters"  # lora_ext.apps.cli.SHIPPED_ADAPTERS, without importing it
VARIANTS = ("no_lora", "vllm_lora", "lora_ext", "lora_skipped")
# lora_skipped: LoRA on and adapters loaded, but the wrapper's add_lora_linear does
# nothing (wrong outputs): what vLLM's own LoRA bookkeeping costs, a floor for any kernel.
DTYPES = ("float32", "bfloat16")
REQUESTS, NEW_TOKENS, MAX_LORAS, RANK = 32, 64, 16, 8
MIXES = ("mix3", "mix16")


def make_adapters(folder: Path, count: int = MAX_LORAS, seed: int = 0) -> list[Path]:
    """The 3 shipped adapters and count - 3 random ones of their shape (r=8, q/k/v/o)."""
    import torch
    from safetensors.torch import load_file, save_file

    shipped = [SHIPPED / n for n in ("upper", "reverse", "arith")]
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
    from lora_ext.apps import tasks

    rng = random.Random(0)
    names = list(tasks.TASKS)
    prompts = [tasks.get_task(names[i % 3]).example(rng)[0] for i in range(REQUESTS)]
    # mix3: upper, reverse, arith, base, ...; mix16: adapters 0..15 then base, cycling.
    mix3 = [(p, i % 4 if i % 4 < 3 else None) for i, p in enumerate(prompts)]
    mix16 = [(p, i % 17 if i % 17 < len(adapters) else None) for i, p in enumerate(prompts)]
    return {"mix3": mix3, "mix16": mix16}


def _worker(dtype: str, reps: int, out: str, adapter_dir: str) -> None:
    # All three engines live in this process (no engine or worker subprocesses), so
    # their repetitions interleave and drift on a shared machine hits all alike.
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    from transformers import AutoTokenizer
    from vllm import LLM, SamplingParams
    from vllm.lora.punica_wrapper.punica_cpu import PunicaWrapperCPU
    from vllm.lora.request import LoRARequest
    from vllm.platforms import current_platform

    from lora_ext.apps import llm
    from lora_ext.integrations import vllm as plugin

    shipped = [SHIPPED / n for n in ("upper", "reverse", "arith")]
    adapters = shipped + sorted((p for p in Path(adapter_dir).iterdir() if p.name.startswith("random")),
                                key=lambda p: p.name)
    folder = str(llm.converted_default_model())
    tokenizer = AutoTokenizer.from_pretrained(folder)
    # Prefix caching off: a repetition that hit the cache would compute differently.
    common = dict(model=folder, dtype=dtype, max_model_len=512, enforce_eager=True, seed=0,
                  enable_prefix_caching=False, distributed_executor_backend="uni")
    lora_args = dict(enable_lora=True, max_loras=MAX_LORAS, max_lora_rank=RANK)

    engines = {}
    os.environ[plugin.ENV_SWITCH] = "0"  # vLLM loads the plugin (switched off) with the first engine
    engines["vllm_lora"] = LLM(**common, **lora_args)
    os.environ[plugin.ENV_SWITCH] = "1"
    plugin.register()  # what vLLM's plugin loader calls in a fresh process
    engines["lora_ext"] = LLM(**common, **lora_args)
    engines["no_lora"] = LLM(**common, enable_lora=False)
    platform = type(current_platform)
    named = platform.get_punica_wrapper
    globals()["SkippedLinearLoRA"] = type("SkippedLinearLoRA", (PunicaWrapperCPU,), {
        "__module__": "__main__", "add_lora_linear": lambda self, *args, **kwargs: None})
    platform.get_punica_wrapper = classmethod(lambda cls: "__main__.SkippedLinearLoRA")
    engines["lora_skipped"] = LLM(**common, **lora_args)
    platform.get_punica_wrapper = named

    requests = [LoRARequest(f"a{i}", i + 1, str(p)) for i, p in enumerate(adapters)]
    params = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, min_tokens=NEW_TOKENS, ignore_eos=True)
    mixes = _mixes(adapters)

    def run(variant, mix):
        rows = mixes[mix]
        prompts = [{"prompt_token_ids": tokenizer(llm.format_prompt(tokenizer, p), add_special_tokens=False).input_ids}
                   for p, _ in rows]
        use_lora = variant != "no_lora"
        loras = [requests[a] if (use_lora and a is not None) else None for _, a in rows]
        start, cpu_start = time.perf_counter(), time.process_time()
        outs = engines[variant].generate(prompts, params, lora_request=loras, use_tqdm=False)
        seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
        return seconds, cpu_seconds, [list(o.outputs[0].token_ids) for o in outs]

    # cpu_seconds: CPU time of this process (all threads; the engines run in it), which a
    # busy shared machine inflates far less than wall time.
    result = {v: {m: {"seconds": [], "cpu_seconds": [], "tokens": None} for m in MIXES} for v in VARIANTS}
    for m in MIXES:  # warm-up: loads the adapters into their slots
        for v in VARIANTS:
            result[v][m]["tokens"] = run(v, m)[2]
    for _ in range(reps):
        for m in MIXES:
            for v in VARIANTS:
                seconds, cpu_seconds, tokens = run(v, m)
                result[v][m]["seconds"].append(seconds)
                result[v][m]["cpu_seconds"].append(cpu_seconds)
                result[v][m]["same_tokens_every_rep"] = result[v][m].get("same_tokens_every_rep", True) and \
                    tokens == result[v][m]["tokens"]
    result["rows"] = {m: [a for _, a in rows] for m, rows in mixes.items()}
    Path(out).write_text(json.dumps(result))


def run_all(reps: int, work: Path, dtypes=DTYPES, python: str = sys.executable, log=sys.stderr) -> dict:
    """One process per dtype (four engines each); returns results by dtype, then variant."""
    adapter_dir = work / "adapters"
    make_adapters(adapter_dir)
    env = dict(os.environ)
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    results: dict = {}
    for dtype in dtypes:
        out = work / f"{dtype}.json"
        print(f"W10: {dtype} ...", file=log, flush=True)
        proc = subprocess.run([python, __file__, dtype, str(reps), str(out), str(adapter_dir)],
                              env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"W10 {dtype} failed:\n{(proc.stdout + proc.stderr)[-4000:]}")
        # vLLM logs the wrapper each LoRA engine uses; vllm_lora's engine is built first.
        logs = proc.stdout + proc.stderr
        used = [line.split("Using ", 1)[1].strip() for line in logs.splitlines()
                if "punica_selector" in line and "Using " in line]
        if used != ["PunicaWrapperCPU.", "LoRAExtPunicaWrapper.", "SkippedLinearLoRA."]:
            raise RuntimeError(f"W10 {dtype}: unexpected punica wrappers {used}")
        results[dtype] = json.loads(out.read_text())
    return results


if __name__ == "__main__":
    _worker(sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4])

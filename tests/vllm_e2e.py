"""Shared pieces of the vLLM end-to-end tests, and the offline run they start.

``python tests/vllm_e2e.py OUT.json [BAD_ADAPTERS_DIR]`` builds one ``vllm.LLM`` on the
default model with the three shipped adapters, generates a batch that mixes them with
base rows (greedy), tries each bad adapter in BAD_ADAPTERS_DIR (one error expected
each), generates the batch again, and writes everything to OUT.json. It runs in its
own process (vLLM starts an engine process with spawn), with the plugin on or off as
``LORA_EXT_VLLM`` says.
"""

from __future__ import annotations

import json
import os
import random
import sys
from pathlib import Path

from lora_ext.apps import llm, tasks
from lora_ext.apps.cli import SHIPPED_ADAPTERS as ADAPTER_DIR

ADAPTERS = ("upper", "reverse", "arith")
MAX_LORA_RANK = 8
# Small enough for 2 cores; one engine start is 20-60 s there.
ENGINE_ARGS = dict(max_model_len=512, enforce_eager=True, max_lora_rank=MAX_LORA_RANK)
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")


def model_folder() -> str:
    """The default model as a Hugging Face folder (converted from its GGUF once, cached)."""
    return str(llm.converted_default_model())


def batch(rows_per_adapter: int = 3, seed: int = 0) -> list[dict]:
    """Rows of each shipped adapter's task and the base model's questions, interleaved."""
    rng = random.Random(seed)
    rows = []
    for _ in range(rows_per_adapter):
        for name in ADAPTERS:
            prompt, answer = tasks.get_task(name).example(rng)
            rows.append(dict(adapter=name, prompt=prompt, answer=answer))
    for question, _ in tasks.BASE_QUESTIONS:
        rows.insert(rng.randrange(len(rows) + 1), dict(adapter=None, prompt=question))
    return rows


def check(row: dict, text: str) -> bool:
    """The row's task check (the base model's check for rows without an adapter)."""
    if row["adapter"] is None:
        return tasks.check_base(row["prompt"], text)
    return tasks.get_task(row["adapter"]).check(row["prompt"], text)


# Bad adapters vLLM must refuse, each with its own error, while other requests go on.
BAD_CASES = ("rank_too_large", "missing_folder", "wrong_model")


def make_bad_adapters(folder: Path) -> None:
    """Writes the bad adapters into folder (missing_folder is, by design, not written)."""
    import torch
    from safetensors.torch import load_file

    source = ADAPTER_DIR / "upper"
    config = json.loads((source / "adapter_config.json").read_text())
    weights = load_file(str(source / "adapter_model.safetensors"))

    # A real adapter zero-padded to rank 16 (> max_lora_rank 8): same model, too wide.
    wide = {}
    for key, t in weights.items():
        pad = [0, 0, 0, 8] if "lora_A" in key else [0, 8]  # A: [r, in] -> rows; B: [out, r] -> columns
        wide[key] = torch.nn.functional.pad(t, pad).contiguous()
    _write_adapter(folder / "rank_too_large", dict(config, r=16, lora_alpha=32.0), wide)

    # An adapter for a wider model (hidden size 1024, not 576). (vLLM 0.32 quietly
    # accepts one for a narrower model: it copies the weights into a corner of its slots.)
    g = torch.Generator().manual_seed(0)
    other = {}
    for layer in range(2):
        for proj in ("q_proj", "v_proj"):
            prefix = f"base_model.model.model.layers.{layer}.self_attn.{proj}"
            other[f"{prefix}.lora_A.weight"] = torch.randn(8, 1024, generator=g)
            other[f"{prefix}.lora_B.weight"] = torch.randn(1024, 8, generator=g)
    wrong = dict(config, base_model_name_or_path="some/other-1024-wide-model", target_modules=["q_proj", "v_proj"])
    _write_adapter(folder / "wrong_model", wrong, other)


def _write_adapter(folder: Path, config: dict, weights: dict) -> None:
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "adapter_config.json").write_text(json.dumps(config))
    save_file(weights, str(folder / "adapter_model.safetensors"))


def _run(out_path: str, bad_dir: str | None) -> None:
    from transformers import AutoTokenizer
    from vllm import LLM, SamplingParams
    from vllm.lora.request import LoRARequest

    folder = model_folder()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    engine = LLM(model=folder, enable_lora=True, max_loras=4, dtype="float32", seed=0, **ENGINE_ARGS)
    requests = {name: LoRARequest(name, i + 1, str(ADAPTER_DIR / name)) for i, name in enumerate(ADAPTERS)}
    rows = batch()

    def prompt(text):
        ids = tokenizer(llm.format_prompt(tokenizer, text), add_special_tokens=False).input_ids
        return {"prompt_token_ids": ids}

    def generate():
        params = [
            SamplingParams(temperature=0.0, max_tokens=tasks.get_task(r["adapter"]).max_new_tokens if r["adapter"] else 16)
            for r in rows
        ]
        outs = engine.generate(
            [prompt(r["prompt"]) for r in rows],
            params,
            lora_request=[requests[r["adapter"]] if r["adapter"] else None for r in rows],
            use_tqdm=False,
        )
        return [o.outputs[0].text for o in outs]

    result = dict(rows=rows, texts=generate(), errors={})
    if bad_dir:
        for i, case in enumerate(BAD_CASES):
            bad = LoRARequest(f"bad-{case}", 100 + i, os.path.join(bad_dir, case))
            # Loaded through the engine's add_lora: an adapter that fails inside a
            # generate() call takes vLLM 0.32's offline engine down with it.
            try:
                engine.llm_engine.add_lora(bad)
                result["errors"][case] = None
            except Exception as exc:  # vLLM's error for this adapter; the engine lives on
                result["errors"][case] = f"{type(exc).__name__}: {exc}"
        result["texts_after_errors"] = generate()
    Path(out_path).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    _run(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else None)

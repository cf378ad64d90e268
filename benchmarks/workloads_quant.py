"""W14 of benchmarks/run.py: serving LoRA adapters over a quantized SmolLM2-135M.

The demo's mixed 8-row batch (the three shipped adapters and two base rows), generated
greedily over an NF4 base (bitsandbytes) and an int8 weight-only base (torchao):
lora_ext's one-call mixed batch against the same quantized base alone and against
PEFT (``adapter_names``) on the same base; also the full-precision model's tokens/s and
the bytes of each base's weights."""

from __future__ import annotations

import copy
import io

import torch

import lora_ext
from harness import NOT_YET, measure, not_yet

BASES = {"nf4": "bitsandbytes NF4 (float32 compute)", "int8": "torchao int8 weight-only"}


def state_bytes(model: torch.nn.Module) -> int:
    """Bytes of the model's weights as stored (packed and quantized tensors as they are)."""
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return buffer.getbuffer().nbytes


def w14_quantized(args) -> dict:
    desc = "the demo's mixed batch over a quantized SmolLM2-135M: generated tokens/s"
    names = ["lora_ext", "peft_adapter_names", "quantized_base"]
    try:
        import peft
        from lora_ext.apps import cli, llm
        import bitsandbytes  # noqa: F401
        import torchao  # noqa: F401
    except ImportError as e:
        return not_yet("W14", desc, names, f"{NOT_YET}: {e} (pip install lora_ext[quant])")

    full, tokenizer = llm.load_model()
    rows = cli.demo_rows()
    prompts = [p for p, _ in rows]
    per_row = [a for _, a in rows]
    adapters = sorted({a for a in per_row if a is not None})
    peft_names = [a if a is not None else "__base__" for a in per_row]
    fixed = dict(max_new_tokens=args.gen_tokens, min_new_tokens=args.gen_tokens)  # same steps for all
    variants, extra = [], {"rows": len(rows), "new_tokens": args.gen_tokens, "full_state_bytes": state_bytes(full)}
    same_rows = {}
    for method, label in BASES.items():
        base = llm.quantize_model(copy.deepcopy(full), method)
        ours = copy.deepcopy(base)
        for name in adapters:
            lora_ext.load_adapter(ours, cli.SHIPPED_ADAPTERS / name, name)
        reference = peft.PeftModel.from_pretrained(
            copy.deepcopy(base), str(cli.SHIPPED_ADAPTERS / adapters[0]), adapter_name=adapters[0]
        )
        for name in adapters[1:]:
            reference.load_adapter(str(cli.SHIPPED_ADAPTERS / name), adapter_name=name)
        reference.eval()

        def run_ours(model=ours):
            with lora_ext.use_adapter(model, per_row):
                return llm.generate(model, tokenizer, prompts, **fixed)

        runs = {
            f"lora_ext {method}": run_ours,
            f"peft_adapter_names {method}": lambda r=reference: llm.generate(r, tokenizer, prompts, adapter_names=peft_names, **fixed),
            f"quantized_base {method}": lambda b=base: llm.generate(b, tokenizer, prompts, **fixed),
        }
        if method == "nf4":  # the full-precision model once, for scale
            runs["full_precision_base"] = lambda: llm.generate(full, tokenizer, prompts, **fixed)
        outputs = {k: fn() for k, fn in runs.items()}  # also the warm-up
        same_rows[method] = sum(a == b for a, b in zip(outputs[f"lora_ext {method}"].texts,
                                                       outputs[f"peft_adapter_names {method}"].texts))
        measured = measure(torch.device("cpu"), runs, args, reps=args.model_reps, warmup=0)
        tokens = len(prompts) * args.gen_tokens
        for v in measured:
            v["tokens_per_s"] = tokens / (v["median_ms"] * 1e-3)
        variants += measured
        tps = {v["name"]: v["tokens_per_s"] for v in measured}
        extra[f"{method}_lora_ext_over_quantized_base"] = tps[f"lora_ext {method}"] / tps[f"quantized_base {method}"]
        extra[f"{method}_lora_ext_over_peft"] = tps[f"lora_ext {method}"] / tps[f"peft_adapter_names {method}"]
        extra[f"{method}_state_bytes"] = state_bytes(base)
        extra[f"{method}_rows_identical_to_peft"] = same_rows[method]
        del ours, reference, base
    return {"workload": "W14", "description": f"{desc}; {len(rows)} rows ({per_row.count(None)} base), "
            f"{args.gen_tokens} new tokens each, shipped adapters ({', '.join(adapters)}); bases: "
            + "; ".join(f"{m}: {label}" for m, label in BASES.items()),
            "device": "cpu", "variants": variants, "extra": extra, "check_ok": True}

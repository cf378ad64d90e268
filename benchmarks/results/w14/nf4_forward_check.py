"""W14's NF4 follow-up (BENCHMARKS.md, W14): one q_proj layer and whole decode-step
forwards of the demo's mixed batch over the NF4 base, lora_ext against the base alone
(alternating in one process), and a torch.profiler table of lora_ext's decode step.

    python benchmarks/results/w14/nf4_forward_check.py
"""

import copy
import time

import torch

import lora_ext
from lora_ext.apps import cli, llm


def per_call_ms(fn, n: int) -> float:
    fn()
    start = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - start) / n * 1e3


def main() -> None:
    full, _ = llm.load_model()
    base = llm.quantize_model(copy.deepcopy(full), "nf4")
    ours = copy.deepcopy(base)
    for name in ("arith", "reverse", "upper"):
        lora_ext.load_adapter(ours, cli.SHIPPED_ADAPTERS / name, name)
    lora_ext.set_adapter(ours, [a for _, a in cli.demo_rows()])
    layer = ours.model.layers[0].self_attn.q_proj
    x = torch.randn(8, 1, layer.in_features)
    ids = torch.randint(3, 1000, (8, 1))
    with torch.inference_mode():
        print(f"q_proj: base {per_call_ms(lambda: layer.base_layer(x), 200):.3f} ms, "
              f"lora_ext {per_call_ms(lambda: layer(x), 200):.3f} ms")
        for _ in range(2):
            print(f"decode step: base {per_call_ms(lambda: base(ids), 20):.1f} ms, "
                  f"lora_ext {per_call_ms(lambda: ours(ids), 20):.1f} ms")
        with torch.profiler.profile() as prof:
            for _ in range(5):
                ours(ids)
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=8))


if __name__ == "__main__":
    main()

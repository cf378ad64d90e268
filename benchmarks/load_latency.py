"""Adapter load latency (issue 24): a SmolLM2-135M-shaped model, its 120-layer q/k/v/o adapter.

Two measures, each in one process:
- ``folder``: ``load_adapter`` from a ``save_adapter`` folder then ``delete_adapter``,
  repeated with 3 adapters loaded: median and worst load;
- ``many``: N adapters loaded one after another from state dicts, without
  ``reserve_adapters`` (the stacks grow as they go): median, p99 and worst load, the
  worst without the time Python's cyclic garbage collector spent inside it, and the
  RSS growth over the adapters' bytes. ``--freeze`` calls ``gc.freeze()`` first, as a
  server does after start-up, so that full collections skip the objects of the model
  and libraries (their pauses otherwise grow with every live object in the process).

The model is random (same shapes as SmolLM2-135M: 30 layers, hidden 576, 3 KV heads),
so no download or GGUF conversion is needed; W9 in ``run.py`` measures the real model.

    python benchmarks/load_latency.py [--adapters 1000] [--cycles 50] [--freeze] [--threads 2]

``--package DIR`` imports ``lora_ext`` from ``DIR`` instead (an older commit's Python
package next to today's ``_C``, for a before/after on one machine), e.g.::

    mkdir -p /tmp/old && git archive 74adcd2 lora_ext | tar -x -C /tmp/old
    cp "$(python -c 'import lora_ext, os; print(os.path.dirname(lora_ext.__file__))')"/{_C*.so,_build_info.py} /tmp/old/lora_ext/
    python benchmarks/load_latency.py --package /tmp/old
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import tempfile
import time

import sys

import torch

if "--package" in sys.argv:  # before lora_ext is imported (its editable-install finder bypassed)
    sys.path.insert(0, sys.argv[sys.argv.index("--package") + 1])
    sys.meta_path = [f for f in sys.meta_path if "editable" not in type(f).__module__]
import lora_ext  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


def _model():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=1000, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3)
    return LlamaForCausalLM(config).eval()


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class _GcClock:
    """Milliseconds the garbage collector ran since the last reset."""

    def __init__(self) -> None:
        self.ms, self._t0 = 0.0, None
        gc.callbacks.append(self._on_gc)

    def _on_gc(self, phase, info) -> None:
        if phase == "start":
            self._t0 = time.perf_counter()
        elif self._t0 is not None:
            self.ms += (time.perf_counter() - self._t0) * 1e3

    def close(self) -> None:
        gc.callbacks.remove(self._on_gc)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--adapters", type=int, default=1000)
    p.add_argument("--cycles", type=int, default=50)
    p.add_argument("--freeze", action="store_true", help="gc.freeze() before the loads")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--package", metavar="DIR", help="import lora_ext from DIR (see above)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    model = _model()
    lora_ext.inject_lora(model, TARGETS, r=8, alpha=16, adapter_name="template", init="gaussian")
    folder = tempfile.mkdtemp(prefix="lora_ext_load_")
    lora_ext.save_adapter(model, folder, "template")
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, lora_ext.LoRALinear)]
    template = {f"base_model.model.{path}.lora_{w}.weight": getattr(layer, f"lora_{w}")["template"].detach().clone()
                for path, layer in layers for w in "AB"}
    config = {"r": 8, "lora_alpha": 16, "target_modules": TARGETS}
    adapter_bytes = sum(t.numel() * t.element_size() for t in template.values())
    for name in ("x", "y"):  # 3 loaded
        lora_ext.load_adapter(model, template, name, config=config)
    if args.freeze:
        gc.collect()
        gc.freeze()
    clock = _GcClock()

    folder_ms = []
    for i in range(args.cycles + 3):  # the first 3 warm up
        t0 = time.perf_counter()
        lora_ext.load_adapter(model, folder, "cycle")
        if i >= 3:
            folder_ms.append((time.perf_counter() - t0) * 1e3)
        lora_ext.delete_adapter(model, "cycle")
    for name in ("template", "x", "y"):
        lora_ext.delete_adapter(model, name)

    result = {
        "lora_ext": os.path.dirname(lora_ext.__file__),
        "threads": args.threads,
        "gc_frozen": args.freeze,
        "adapter_bytes": adapter_bytes,
        "folder_load_ms_median": statistics.median(folder_ms),
        "folder_load_ms_worst": max(folder_ms),
    }
    if args.adapters > 0:
        result.update(_many_loads(args.adapters, template, config, adapter_bytes, model, clock))
    clock.close()
    print(json.dumps(result, indent=1))


def _many_loads(count, template, config, adapter_bytes, model, clock) -> dict:
    gen = torch.Generator().manual_seed(1)
    load_ms, gc_ms = [], []
    rss0 = _rss()
    for i in range(count):
        state = {k: torch.randn(v.shape, generator=gen) * 0.02 for k, v in template.items()}
        clock.ms = 0.0
        t0 = time.perf_counter()
        lora_ext.load_adapter(model, state, f"a{i}", config=config)
        load_ms.append((time.perf_counter() - t0) * 1e3)
        gc_ms.append(clock.ms)
    growth = _rss() - rss0
    worst = max(range(len(load_ms)), key=load_ms.__getitem__)
    return {
        "many_adapters": count,
        "many_load_ms_median": statistics.median(load_ms),
        "many_load_ms_p99": sorted(load_ms)[int(0.99 * (len(load_ms) - 1))],
        "many_load_ms_worst": load_ms[worst],
        "many_worst_at_loaded": worst,
        "many_worst_gc_ms": gc_ms[worst],
        "many_load_ms_worst_without_gc": max(t - g for t, g in zip(load_ms, gc_ms)),
        "many_loads_over_100ms": sum(t > 100 for t in load_ms),
        "many_rss_growth_over_adapter_bytes": growth / (count * adapter_bytes),
    }

if __name__ == "__main__":
    main()

#!/usr/bin/env python
"""The Python benchmark suite: lora_ext's public API against PEFT-style baselines.

W1-W6 are the C++ harness's workloads (benchmarks/cpp) run through ``lora_ext.*``
and real autograd; W7 (mixed-adapter generation) and W8 (a LoRA training step)
run SmolLM2-135M; W12 times the prefill shrink and expand kernels against ATen's GEMM
on the same shapes. Writes ``latest.json``, ``latest.md`` and ``latest.png`` to
``--out`` (default benchmarks/results). Timings: median and p10..p90 over repeats
after warm-up, variants interleaved round-robin; CUDA events on the GPU. Floors:
bytes over the copy bandwidth and FLOPs over the GEMM rate, both measured in the
same run. See BENCHMARKS.md. The pieces: harness.py (timing, ceilings, result records,
the W1-W6 shapes of shapes.txt), workloads_ops.py (W1-W6, W12), workloads_model.py (W7,
W8, W10, W11), workloads_adapters.py (W9), workloads_moe.py (W13: MoE experts),
workloads_quant.py (W14: quantized bases), report.py (targets, markdown, plot).

    python benchmarks/run.py                       # everything, CPU (and CUDA if present)
    python benchmarks/run.py --workloads W1,W3 --hidden 2048 --reps 5
    python benchmarks/run.py --tiny --workloads W1,W2,W3,W4,W5,W6   # smoke test
    python benchmarks/run.py --cpp build/bench/lora_ext_bench       # also embed the C++ harness
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from harness import ROOT, Ceilings, median, preset
from report import cpu_name, markdown, plot, targets
from workloads_adapters import w9_many_adapters
from workloads_model import w7_generation, w8_training, w10_vllm, w11_distributed
from workloads_dora import w15_generation, w15_training, w15_workloads
from workloads_ops import lora_linear_workloads, merge_workloads, multi_lora_workloads, prefill_rate_workloads
from workloads_quant import w14_quantized

ALL_WORKLOADS = ["W1", "W2", "W3", "W4", "W5", "W6", "W7", "W8", "W9"]
ALL_WORKLOADS.append("W10")  # vLLM with the lora_ext plugin: benchmarks/vllm_w10.py
ALL_WORKLOADS.append("W11")  # W8's step on 2 ranks (DDP, FSDP2): benchmarks/train_w11.py
ALL_WORKLOADS.append("W12")  # the prefill shrink/expand kernels' rate, fp32 and bf16
ALL_WORKLOADS.append("W13")  # LoRA on a mixture of experts' layer: benchmarks/workloads_moe.py
ALL_WORKLOADS.append("W14")  # serving adapters over quantized bases (NF4, int8): workloads_quant.py
ALL_WORKLOADS.append("W15")  # DoRA vs LoRA vs PEFT's DoRA: benchmarks/workloads_dora.py
W15_PARTS = ["W15-ops", "W15-gen", "W15-train"]  # W15 is all three; each can be run alone


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workloads", default=",".join(ALL_WORKLOADS), help="comma list of W1..W15 (W15-ops, W15-gen, W15-train: parts of W15)")
    p.add_argument("--device", choices=["cpu", "cuda", "all"], default="all")
    p.add_argument("--hidden", type=int)
    p.add_argument("--rank", type=int)
    p.add_argument("--tokens-decode", type=int)
    p.add_argument("--tokens-prefill", type=int)
    p.add_argument("--adapters", type=int)
    p.add_argument("--warmup", type=int)
    p.add_argument("--reps", type=int)
    p.add_argument("--model-reps", type=int, default=3, help="repeats of W7/W8 (default 3)")
    p.add_argument("--gen-tokens", type=int, default=16, help="new tokens per row in W7 (default 16)")
    p.add_argument("--max-seconds", type=float, default=30.0, help="measuring cap per workload")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tiny", action="store_true", help="small sizes, for a smoke test")
    p.add_argument("--cpp", metavar="BIN", help="also run the C++ harness BIN and embed its results")
    p.add_argument("--cpp-json", metavar="FILE", help="embed results the C++ harness wrote earlier (--json)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    p.add_argument("--isa", metavar="BUILDS", help="'all' or a comma list of CPU kernel builds (default, avx2, "
                   "avx512, avx512bf16): W1, W3, W6, W12 once per build, each in its own process with its own "
                   "floors -> isa.{json,md} in --out (benchmarks/isa_runs.py)")
    p.add_argument("--w10-json", metavar="DIR", help="W10 from the per-dtype results vllm_w10.py wrote in DIR")
    p.add_argument("--w10-dtypes", default="float32,bfloat16", help="W10's dtypes (default float32,bfloat16)")
    args = p.parse_args(argv)
    if args.isa:
        return per_isa(args, sys.argv[1:] if argv is None else argv)
    defaults = preset("tiny" if args.tiny else "default")  # benchmarks/shapes.txt, shared with the C++ harness
    for k, v in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    selected = [w.strip() for w in args.workloads.split(",") if w.strip()]
    bad = [w for w in selected if w not in ALL_WORKLOADS + W15_PARTS]
    if "W15" in selected:
        selected += W15_PARTS
    if bad:
        p.error(f"unknown workload(s) {bad}; expected some of {ALL_WORKLOADS}")
    if args.threads:
        torch.set_num_threads(args.threads)

    devices = [torch.device("cpu")] if args.device != "cuda" else []
    if args.device != "cpu":
        if torch.cuda.is_available():
            devices.append(torch.device("cuda"))
        elif args.device == "cuda":
            p.error("no CUDA device")

    results, ceilings = [], {}
    for device in devices:
        torch.manual_seed(args.seed)
        ceil = Ceilings(device, args)
        main_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        ceil.gemm(main_dtype)
        print(f"{device}: copy {ceil.copy_gbps:.1f} GB/s, GEMM {ceil.gemm_gflops}", file=sys.stderr)
        results += multi_lora_workloads(device, main_dtype, args, ceil, selected)
        if "W5" in selected:
            results += lora_linear_workloads(device, main_dtype, args, ceil)
        if "W6" in selected:
            results += merge_workloads(device, args, ceil)
        if "W12" in selected:
            results += prefill_rate_workloads(device, args, ceil)
        if "W13" in selected:
            from workloads_moe import w13_moe

            results += w13_moe(device, args, ceil)
        if "W15-ops" in selected:
            results += w15_workloads(device, main_dtype, args, ceil)
        ceilings[str(device)] = {"copy_gbps": ceil.copy_gbps, "gemm_gflops": ceil.gemm_gflops}
        for r in results:
            print(f"  {r['workload']:<11} {r['device']:<5} lora_ext {median(r, 'lora_ext'):.3f} ms", file=sys.stderr)
    if "W7" in selected:
        results.append(w7_generation(args))
    if "W8" in selected:
        results.append(w8_training(args))
    if "W9" in selected:
        results.append(w9_many_adapters(args))

    if "W10" in selected:
        results.append(w10_vllm(args))
    if "W11" in selected:
        results.append(w11_distributed(args))
    if "W14" in selected:
        results.append(w14_quantized(args))
    if "W15-gen" in selected:
        results.append(w15_generation(args))
    if "W15-train" in selected:
        results.append(w15_training(args))

    report = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": "python " + " ".join([os.path.relpath(__file__, ROOT)] + (argv if argv is not None else sys.argv[1:])),
        "machine": {"cpu": cpu_name(), "threads": torch.get_num_threads(), "torch": torch.__version__,
                    "python": platform.python_version()},
        "devices": [str(d) for d in devices],
        "config": {k: getattr(args, k) for k in defaults},
        "ceilings": ceilings,
        "results": results,
        "targets": targets(results),
    }
    if args.cpp_json:
        report["cpp"] = json.loads(Path(args.cpp_json).read_text())
    if args.cpp:
        with tempfile.TemporaryDirectory() as tmp:
            cmd = [args.cpp, "--json", f"{tmp}/cpp.json", "--device", args.device]
            cmd += ["--tiny"] if args.tiny else []
            cwl = [w for w in selected if w in ALL_WORKLOADS[:6]]
            if cwl:
                subprocess.run(cmd + ["--workloads", ",".join(cwl)], check=True)
                report["cpp"] = json.loads(Path(f"{tmp}/cpp.json").read_text())
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "latest.json").write_text(json.dumps(report, indent=1) + "\n")
    (out / "latest.md").write_text(markdown(report))
    plot(report, out / "latest.png")
    print((out / "latest.md").read_text())
    failed = [r["workload"] for r in results if r.get("check_ok") is False]
    if failed:
        print(f"lora_ext disagrees with its baseline in {failed}", file=sys.stderr)
        return 1
    return 0


def per_isa(args, argv: list[str]) -> int:
    from isa_runs import markdown as isa_markdown, rows, run_isas

    runs = run_isas(args.isa, argv)
    report = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": "python " + " ".join([os.path.relpath(__file__, ROOT)] + argv),
        "machine": {"cpu": cpu_name(), "threads": args.threads or torch.get_num_threads(),
                    "torch": torch.__version__, "python": platform.python_version()},
        "runs": runs,
        "rows": rows(runs),
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "isa.json").write_text(json.dumps(report, indent=1) + "\n")
    md = isa_markdown(runs, report["command"], report["machine"], report["date"])
    (out / "isa.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())

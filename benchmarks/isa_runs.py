"""W1, W3, W6 and W12 once per CPU kernel build (issue 22), each build in a process of
its own (LORA_EXT_CPU_ISA picks the build once per process) with its own floors measured
in that process, then one table of ratios. ``run.py --isa all`` (or a comma list) calls
this; builds the CPU or the extension lacks are listed as skipped.

The targets: each ISA build's W1 (``lora_ext``) within 1.3x its floor, W3 in place
(``lora_ext_add_``) within 1.5x, W6 within 1.3x, W12's shrink/expand at 0.8 or more of
ATen's rate on the same shape; the portable ``default`` build within 3x of the floors.
The floors: the workload's bytes over the copy bandwidth, its FLOPs over ATen's fp32
GEMM rate (16-bit dtypes: the higher of their GEMM's and fp32's), both measured in the
build's own process; the table lists them next to each ratio.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from harness import median

ISAS = ["default", "avx2", "avx512", "avx512bf16"]
WORKLOADS = ["W1", "W3", "W6", "W12"]
UNSUPPORTED = "is not supported by this CPU or build"


def strip_option(argv: list[str], name: str) -> list[str]:
    """argv without `name VALUE` / `name=VALUE`."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == name:
            skip = True
        elif not a.startswith(name + "="):
            out.append(a)
    return out


def run_isas(isas: str, argv: list[str]) -> dict:
    """Runs run.py once per build in `isas` ('all' or a comma list) with argv (minus
    --isa, --workloads, --device, --out); returns {build: report, or {'skipped': why}}."""
    names = ISAS if isas == "all" else [i.strip() for i in isas.split(",") if i.strip()]
    bad = [i for i in names if i not in ISAS]
    if bad:
        raise SystemExit(f"--isa: unknown build(s) {bad}; expected 'all' or some of {ISAS}")
    base = argv
    for opt in ("--isa", "--workloads", "--device", "--out"):
        base = strip_option(base, opt)
    runs = {}
    for isa in names:
        with tempfile.TemporaryDirectory() as tmp:
            cmd = [sys.executable, str(Path(__file__).with_name("run.py")), *base,
                   "--workloads", ",".join(WORKLOADS), "--device", "cpu", "--out", tmp]
            print(f"[isa] {isa}: {' '.join(cmd[1:])}", file=sys.stderr)
            proc = subprocess.run(cmd, env={**os.environ, "LORA_EXT_CPU_ISA": isa},
                                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            if proc.returncode != 0 and UNSUPPORTED in proc.stderr:
                runs[isa] = {"skipped": f"LORA_EXT_CPU_ISA={isa} {UNSUPPORTED}"}
                continue
            if proc.returncode != 0:
                sys.stderr.write(proc.stderr)
                raise SystemExit(f"[isa] the {isa} run failed (exit {proc.returncode})")
            runs[isa] = json.loads((Path(tmp) / "latest.json").read_text())
    return runs


def rows(runs: dict) -> list[dict]:
    """One row per (build, workload, dtype[, rank]): the ratio the target reads, the
    floors and ceilings it was taken against, and the target."""
    out = []
    for isa, rep in runs.items():
        if "skipped" in rep:
            continue
        ceil = rep["ceilings"]["cpu"]
        for r in rep["results"]:
            w = r["workload"]
            floor = max(r["memory_floor_ms"], r["compute_floor_ms"])
            bound = "memory" if r["memory_floor_ms"] >= r["compute_floor_ms"] else "compute"
            row = {"isa": isa, "workload": w, "dtype": r["dtype"], "floor_ms": floor, "bound": bound,
                   "copy_gbps": ceil["copy_gbps"], "gemm_gflops": ceil["gemm_gflops"].get("float32"),
                   "rank": r["extra"].get("rank")}
            if w.startswith("W12"):
                ours = median(r, "lora_ext")
                row.update(variant="lora_ext", ms=ours, ratio=median(r, "aten") / ours,
                           ratio_name="ATen's time / ours (same shape)", target=0.8, higher=True,
                           x_floor=ours / floor)
            else:
                v = "lora_ext_add_" if w == "W3" else "lora_ext"
                ours = median(r, v)
                row.update(variant=v, ms=ours, ratio=ours / floor, ratio_name="time / floor",
                           target=1.5 if w == "W3" else 1.3, higher=False, x_floor=ours / floor)
            if isa == "default" and not w.startswith("W12"):
                row["target"] = 3.0
            if isa == "default" and w.startswith("W12"):
                row.update(ratio=row["x_floor"], ratio_name="time / floor", target=3.0, higher=False)
            row["met"] = row["ratio"] >= row["target"] if row["higher"] else row["ratio"] <= row["target"]
            out.append(row)
    return out


def markdown(runs: dict, command: str, machine: dict, date: str) -> str:
    lines = [
        "# lora_ext: the CPU kernel builds, one process each (issue 22)", "",
        f"- date: {date}",
        f"- machine: {machine['cpu']}, {machine['threads']} torch threads; torch {machine['torch']}",
        f"- command: `{command}`", "",
        "Ratios against floors measured in the same build's process: `floor` = max(bytes / copy "
        "bandwidth, FLOPs / fp32 GEMM rate); `copy` and `GEMM` are those ceilings. W3 is the in-place "
        "form (`multi_lora_add_`). W12: ATen's GEMM time on the same shape over ours (>= 0.8); for "
        "`default`, time / floor (<= 3).", "",
        "| build | workload | dtype | r | median ms | floor ms (bound) | ratio | target | copy GB/s | GEMM GFLOP/s |",
        "|---|---|---|---:|---:|---:|---:|---|---:|---:|",
    ]
    for row in rows(runs):
        target = f"{'>=' if row['higher'] else '<='} {row['target']:g}: {'met' if row['met'] else '**not met**'}"
        lines.append(
            f"| {row['isa']} | {row['workload']} | {row['dtype']} | {row['rank'] or ''} | {row['ms']:.3f} | "
            f"{row['floor_ms']:.3f} ({row['bound']}) | {row['ratio']:.2f} | {target} | "
            f"{row['copy_gbps']:.1f} | {row['gemm_gflops']:.0f} |")
    for isa, rep in runs.items():
        if "skipped" in rep:
            lines.append(f"\n- {isa}: skipped ({rep['skipped']})")
    return "\n".join(lines) + "\n"

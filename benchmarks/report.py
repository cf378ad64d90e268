"""The report of benchmarks/run.py: the targets each result is held to, the markdown
tables (latest.md) and the plot (latest.png)."""

from __future__ import annotations

import math
import os
import platform
from pathlib import Path

from harness import NOT_YET, median


def targets(results: list[dict]) -> list[dict]:
    out = []

    def add(r, what, value, limit, at_least):
        met = value is not None and (value >= limit if at_least else value <= limit)
        out.append({"workload": r["workload"], "device": r["device"], "what": what,
                    "value": value, "limit": limit, "at_least": at_least, "met": met})

    for r in results:
        if r.get("status") == NOT_YET:
            continue
        w, e = r["workload"], r.get("extra", {})
        if w in ("W1", "W3", "W4", "W6-fp32", "W6-bf16"):
            ours = median(r, "lora_ext")
        if w == "W1":
            add(r, "speedup vs peft_loop", median(r, "peft_loop") / ours, 3.0, True)
            add(r, "time / memory floor", ours / r["memory_floor_ms"], 2.0, False)
        if w in ("W2", "W3"):  # issue 10: x floor, for the op and its in-place form
            floor = max(r["memory_floor_ms"], r["compute_floor_ms"])
            for v in ("lora_ext", "lora_ext_add_"):
                add(r, f"{v} time / floor", median(r, v) / floor, 1.5 if w == "W2" else 2.0, False)
        if w == "W3":
            add(r, "speedup vs peft_loop", median(r, "peft_loop") / ours, 5.0, True)
        elif w == "W4":
            add(r, "time / W1 at mean rank", e["time_over_w1_at_mean_rank"], 1.3, False)
        elif w == "W5-fwd+bwd":
            add(r, "overhead / LoRA FLOP share", e["overhead_over_flop_share"], 2.0, False)
            add(r, "saved bytes: lora_ext / PEFT", e["saved_bytes_lora_ext"] / e["saved_bytes_peft_compose"], 1.0, False)
        elif w.startswith("W13"):  # issue 20: the experts' LoRA part against its floor; PEFT at decode
            floor = max(r["memory_floor_ms"], r["compute_floor_ms"])
            decode = w == "W13-decode"
            add(r, f"{e['model']}: lora_part / floor", median(r, "lora_part") / floor, 1.5 if decode else 2.0, False)
            if decode:
                add(r, f"{e['model']}: peft / lora_ext", e["peft_over_lora_ext"], 5.0, True)
        elif w.startswith("W12"):  # issue 10: >= 80% of the rate the machine allows
            floor = max(r["memory_floor_ms"], r["compute_floor_ms"])
            add(r, f"{r['dtype']} r={e['rank']}: floor / time", floor / median(r, "lora_ext"), 0.8, True)
        elif w.startswith("W6"):
            add(r, "time / read+write of weight", ours / r["memory_floor_ms"], 1.3, False)
            add(r, "speedup vs peft_merge", median(r, "peft_merge") / ours, 5.0, True)
            if e.get("peak_extra_bytes_lora_ext") is not None:
                add(r, "peak extra / weight bytes", e["peak_extra_bytes_lora_ext"] / e["weight_bytes"], 0.5, False)
        elif w in ("W15-W1", "W15-W3"):  # issue 25: DoRA at LoRA's cost, faster than PEFT's DoRA
            add(r, "DoRA layer time / LoRA layer time", e["dora_over_lora"], 1.1, False)
            if "peft_dora_over_dora" in e:
                add(r, "speedup vs PEFT's DoRA", e["peft_dora_over_dora"], 1.0, True)
        elif w == "W15-gen":
            add(r, "DoRA batch time / LoRA batch time", e["dora_over_lora"], 1.1, False)
            add(r, "speedup vs PEFT's DoRA (per adapter)", e["peft_dora_over_dora"], 1.0, True)
        elif w == "W15-train":
            add(r, "DoRA step time / LoRA step time", e["dora_over_lora"], 1.3, False)
            add(r, "speedup vs PEFT's DoRA step", e["peft_dora_over_dora"], 1.0, True)
        elif w == "W7":
            tps = {v["name"]: v["tokens_per_s"] for v in r["variants"]}
            add(r, "tokens/s vs PEFT adapter_names", tps["lora_ext"] / tps["peft_adapter_names"], 1.5, True)
            add(r, "tokens/s vs the base model", tps["lora_ext"] / tps["base"], 0.97, True)
        elif w == "W8":
            peft_over = e["peft_overhead_over_base"]
            ratio = e["lora_ext_overhead_over_base"] / peft_over if peft_over > 0 else None
            add(r, "overhead over base / PEFT's", ratio, 1 / 3, False)
        elif w == "W10":
            for key, value in e.items():
                if key.startswith("lora_ext_over_no_lora_"):
                    add(r, "tokens/s vs vLLM without LoRA, " + key[len("lora_ext_over_no_lora_"):], value, 0.9, True)
        elif w == "W9":
            add(r, "tokens/s, many loaded / 3 loaded (paired rounds)", e["tokens_per_s_many_over_few_paired"], 0.95, True)
            add(r, "forward speed, many loaded / 3 loaded (paired rounds)", e["forward_speed_many_over_few_paired"], 0.95, True)
            add(r, "stack bytes / adapter bytes, default growth", e["stacks_over_adapter_bytes_many_default_growth"], 1.1, False)
            add(r, "RSS growth / adapter bytes, default growth", e["rss_growth_over_adapter_bytes_many_default_growth"], 1.1, False)
            add(r, "load ms (state dict), many loaded / 3 loaded", e["load_state_dict_ms_many"] / e["load_state_dict_ms_few"], 1.5, False)
            add(r, "load ms (folder), many loaded / 3 loaded", e["load_folder_ms_many"] / e["load_folder_ms_few"], 1.5, False)
            add(r, "replace ms, many loaded / 3 loaded", e["replace_ms_many"] / e["replace_ms_few"], 1.5, False)
            # Issue 24: loads (the RSS growth above is their memory target).
            n = e["load_cycles"]
            add(r, f"load ms, save_adapter folder, 3 loaded: median of {n} load+delete cycles",
                e["load_saved_folder_ms_median"], 10.0, False)
            add(r, f"load ms, save_adapter folder, 3 loaded: worst of {n} load+delete cycles",
                e["load_saved_folder_ms_worst"], 100.0, False)
            add(r, "load ms, state dicts, worst while loading all one after another (no reserve_adapters)",
                e["load_state_dict_ms_worst_while_growing"], 100.0, False)
        elif w == "W14":
            for method in ("nf4", "int8"):
                add(r, f"{method}: tokens/s vs the quantized base alone", e[f"{method}_lora_ext_over_quantized_base"], 0.95, True)
                add(r, f"{method}: tokens/s vs PEFT on the same base", e[f"{method}_lora_ext_over_peft"], 1.0, True)
    return out


def _fmt(v, digits=3):
    if v is None:
        return "n/a"
    if isinstance(v, float):
        return f"{v:.{digits}g}" if abs(v) < 1e4 else f"{v:.3e}"
    return str(v)


def markdown(report: dict) -> str:
    m = report["machine"]
    lines = [
        "# lora_ext benchmarks: latest run",
        "",
        f"- date: {report['date']}",
        f"- machine: {m['cpu']}, {m['threads']} torch threads; torch {m['torch']}; device(s): "
        + ", ".join(report["devices"]),
        f"- command: `{report['command']}`",
        "- ceilings measured in this run: " + "; ".join(
            f"{d}: copy {c['copy_gbps']:.1f} GB/s (read+write), "
            + ", ".join(f"{k} GEMM {v:.0f} GFLOP/s" for k, v in c["gemm_gflops"].items())
            for d, c in report["ceilings"].items()),
        "",
        "## Kernels (W1-W6, W12; Python runner through the public API)",
        "",
        "`lora x`: the variant's median over lora_ext's (> 1: lora_ext is faster). "
        "`x floor`: median over max(bytes / copy bandwidth, FLOPs / GEMM rate).",
        "",
        "| workload | dev | dtype | variant | median ms | p10..p90 ms | lora x | GB/s | GFLOP/s | x floor |",
        "|---|---|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in report["results"]:
        if "bytes" not in r:
            continue
        ours = median(r, "lora_ext")
        floor = max(r["memory_floor_ms"], r["compute_floor_ms"])
        for v in r["variants"]:
            ms = v["median_ms"]
            lines.append(
                f"| {r['workload']} | {r['device']} | {r['dtype']} | {v['name']} | {ms:.3f} | "
                f"{v['p10_ms']:.3f}..{v['p90_ms']:.3f} | {ms / ours:.2f} | {r['bytes'] / ms / 1e6:.1f} | "
                f"{r['flops'] / ms / 1e6:.1f} | {ms / floor:.2f} |")
    lines += ["", "Workloads and extra measurements:", ""]
    for r in report["results"]:
        extra = "; ".join(f"{k} {_fmt(v)}" for k, v in r.get("extra", {}).items())
        floors = (f" floors: memory {r['memory_floor_ms']:.3f} ms, compute {r['compute_floor_ms']:.3f} ms;"
                  if "memory_floor_ms" in r else "")
        check = "" if "check_ok" not in r else f" check {'ok' if r['check_ok'] else 'FAILED'};"
        lines.append(f"- **{r['workload']}** ({r['device']}): {r['description']}.{floors}{check} {extra}")
    lines += ["", "## End to end (W7, W8)", "", "| workload | variant | median s | p10..p90 s | tokens/s |",
              "|---|---|---:|---:|---:|"]
    for r in report["results"]:
        if r["workload"] not in ("W7", "W8", "W9", "W14", "W15-gen", "W15-train"):
            continue
        for v in r["variants"]:
            if v.get("status") == NOT_YET:
                lines.append(f"| {r['workload']} | {v['name']} | TODO: {NOT_YET} | | |")
            else:
                lines.append(f"| {r['workload']} | {v['name']} | {v['median_ms'] / 1e3:.2f} | "
                             f"{v['p10_ms'] / 1e3:.2f}..{v['p90_ms'] / 1e3:.2f} | {v['tokens_per_s']:.1f} |")
    for r in report["results"]:
        if r["workload"] == "W10" and r.get("status") != NOT_YET:
            lines += ["", "## vLLM (W10)", "", "| variant dtype mix | median s | p10..p90 s | tokens/s |",
                      "|---|---:|---:|---:|"]
            lines += [f"| {v['name']} | {v['median_ms'] / 1e3:.2f} | {v['p10_ms'] / 1e3:.2f}..{v['p90_ms'] / 1e3:.2f} | "
                      f"{v['tokens_per_s']:.1f} |" for v in r["variants"]]
    lines += ["", "## Targets (issues 4, 10, 21 and 24; stated for the 2-core CPU)", "",
              "| workload | dev | measure | value | target | met |", "|---|---|---|---:|---:|---|"]
    for t in report["targets"]:
        lines.append(f"| {t['workload']} | {t['device']} | {t['what']} | {_fmt(t['value'])} | "
                     f"{'>=' if t['at_least'] else '<='} {_fmt(t['limit'])} | {'met' if t['met'] else '**not met**'} |")
    for r in report["results"]:
        if r.get("status") == NOT_YET:
            lines.append(f"| {r['workload']} | | {r['todo']} | | | TODO |")
    if report.get("cpp"):
        lines += ["", "## C++ harness (build/bench/lora_ext_bench), same run", "",
                  "| workload | dev | dtype | variant | median ms | p10..p90 ms | lora x | x floor |",
                  "|---|---|---|---|---:|---:|---:|---:|"]
        for r in report["cpp"]["results"]:
            ours = next(v["median_ms"] for v in r["variants"] if v["name"] == "lora_ext")
            floor = max(r["memory_floor_ms"], r["compute_floor_ms"])
            for v in r["variants"]:
                lines.append(f"| {r['workload']} | {r['device']} | {r['dtype']} | {v['name']} | "
                             f"{v['median_ms']:.3f} | {v['p10_ms']:.3f}..{v['p90_ms']:.3f} | "
                             f"{v['median_ms'] / ours:.2f} | {v['median_ms'] / floor:.2f} |")
        lines += ["", "| workload | dev | measure | value | target | met |", "|---|---|---|---:|---:|---|"]
        for t in report["cpp"]["targets"]:
            lines.append(f"| {t['workload']} | {t['device']} | {t['what']} | {_fmt(t['value'])} | "
                         f"{'>=' if t['at_least'] else '<='} {_fmt(t['limit'])} | {'met' if t['met'] else '**not met**'} |")
    return "\n".join(lines) + "\n"


def plot(report: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # W12's sixteen rate problems are in the tables only.
    panels = [r for r in report["results"] if r.get("status") != NOT_YET and not r["workload"].startswith("W12")]
    if not panels:
        return
    cols = min(4, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.4 * rows), squeeze=False)
    colors = {"lora_ext": "tab:blue"}
    for ax, r in zip(axes.flat, panels):
        names = [v["name"] for v in r["variants"]]
        med = [v["median_ms"] for v in r["variants"]]
        err = [[m - v["p10_ms"] for m, v in zip(med, r["variants"])],
               [v["p90_ms"] - m for m, v in zip(med, r["variants"])]]
        ax.bar(range(len(names)), med, yerr=err, capsize=3,
               color=[colors.get(n, "tab:gray") for n in names])
        ax.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=8)
        ax.set_ylabel("ms (median, p10..p90)", fontsize=8)
        ax.set_title(f"{r['workload']} ({r['device']}{', ' + r['dtype'] if 'dtype' in r else ''})", fontsize=9)
        if "memory_floor_ms" in r:
            ax.axhline(r["memory_floor_ms"], color="tab:red", ls="--", lw=1, label="memory floor")
            ax.axhline(r["compute_floor_ms"], color="tab:green", ls=":", lw=1.2, label="compute floor")
            ax.legend(fontsize=7)
        if max(med) / max(min(med), 1e-9) > 30:
            ax.set_yscale("log")
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.suptitle(f"lora_ext vs baselines, {report['machine']['cpu']} ({report['date']})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            name = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        name = platform.processor() or platform.machine()
    return f"{name}, {os.cpu_count()} cores"

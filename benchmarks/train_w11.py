#!/usr/bin/env python
"""W11: W8's LoRA training step on several processes (DDP, FSDP2) against one.

    python benchmarks/train_w11.py                     # SmolLM2-135M, batch 8x128, 2 ranks
    python benchmarks/train_w11.py --tiny --steps 2    # a tiny random Llama: seconds

Three configurations, each in fresh processes, in ``--rounds`` rounds (every other one in
reverse order; step times pooled): one process with ``--world`` threads,
then ``--world`` ranks x 1 thread over gloo with DistributedDataParallel and with FSDP2
(``lora_ext.parallel.fully_shard`` per decoder layer and the root). The global batch
is W8's (random ids, seed 0); each rank takes its share. A step is W8's: forward with
the loss, backward, AdamW on the LoRA parameters. Reported: tokens/s of the global
batch (median step time; the ranks start every step together, after a barrier, and a
step lasts until the slowest rank ends it), and bytes communicated per step and rank,
*measured*: DDP through a comm hook that adds up the buckets it all-reduces; FSDP2 by
wrapping ``torch.distributed``'s collectives (all-gather, reduce-scatter, all-reduce)
and adding up their full tensors. The same counters run one forward+backward with
*every* parameter trainable (full fine-tuning), for the whole model's traffic.

``run.py --workloads W11`` calls :func:`run` and puts the result in its report.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist

LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
MODES = ("single", "ddp", "fsdp")
_COLLECTIVES = ("all_gather_single", "reduce_scatter_single", "all_gather_into_tensor",
                "reduce_scatter_tensor", "all_reduce")


def _load(tiny: bool):
    if not tiny:
        from lora_ext.apps import llm

        return llm.load_model()[0]
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)).eval()


class _Counter:
    """Bytes of every collective FSDP2 (or anything else) issues through torch.distributed."""

    def __init__(self) -> None:
        self.by_kind: dict[str, int] = {}  # all_gather / reduce_scatter / all_reduce -> bytes
        self._saved = {}

    def __enter__(self):
        for name in _COLLECTIVES:
            fn = self._saved[name] = getattr(dist, name)
            setattr(dist, name, self._wrap(name, fn))
        return self

    def __exit__(self, *exc):
        for name, fn in self._saved.items():
            setattr(dist, name, fn)

    def _wrap(self, name, fn):
        def counted(*args, **kwargs):
            if name.startswith("all_gather"):
                t = kwargs.get("output_tensor", args[0] if args else None)  # the gathered whole
            elif name.startswith("reduce_scatter"):
                t = kwargs.get("input", args[1] if len(args) > 1 else None)  # the reduced whole
            else:
                t = args[0] if args else kwargs["tensor"]
            kind = name.replace("_single", "").replace("_into_tensor", "").replace("_tensor", "")
            self.by_kind[kind] = self.by_kind.get(kind, 0) + t.numel() * t.element_size()
            return fn(*args, **kwargs)

        return counted


def _ddp_counting_hook(state: dict, bucket):
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

    buf = bucket.buffer()
    state["bytes"] += buf.numel() * buf.element_size()
    return default_hooks.allreduce_hook(None, bucket)


def _wrap(mode: str, model, mesh):
    """(model to call, byte counter) for ``mode``."""
    if mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        state = {"bytes": 0}
        ddp = DistributedDataParallel(model, forward_sync_buffers=False)
        ddp.register_comm_hook(state, _ddp_counting_hook)
        return ddp, lambda: state["bytes"]
    if mode == "fsdp":
        from lora_ext.parallel import fully_shard

        for layer in model.model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
    return model, None


def worker(mode: str, rank: int, world: int, init: str, out: str, steps: int, batch: int, seq: int,
           tiny: bool) -> None:
    import lora_ext

    multi = mode != "single"
    torch.set_num_threads(1 if multi else world)
    mesh = None
    if multi:
        dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world,
                                timeout=datetime.timedelta(minutes=20))
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh("cpu", (world,))
    lm = _load(tiny)
    ids = torch.randint(0, lm.config.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(0))
    if multi:
        ids = ids[rank * batch // world : (rank + 1) * batch // world]
    full = copy.deepcopy(lm) if multi else None
    model = lora_ext.inject_lora(lm, LLAMA_TARGETS, r=16, alpha=32)
    model.train()
    lora_bytes = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    step_model, ddp_bytes = _wrap(mode, model, mesh)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step():
        opt.zero_grad(set_to_none=True)
        step_model(input_ids=ids, labels=ids).loss.backward()
        opt.step()

    def comm_bytes(fn) -> dict[str, int]:
        if mode == "ddp":
            before = ddp_bytes()
            fn()
            return {"all_reduce": ddp_bytes() - before}
        with _Counter() as c:
            fn()
        return c.by_kind

    times, sent = [], []
    for i in range(steps + 1):  # the first is warm-up
        if multi:
            dist.barrier()
        start = time.perf_counter()
        if multi:
            sent.append(comm_bytes(step))
        else:
            step()
        if multi:
            dist.barrier()  # the step ends when the slowest rank's does
        if i:
            times.append(time.perf_counter() - start)
    res = {"mode": mode, "world": world if multi else 1, "threads": torch.get_num_threads(),
           "step_seconds": times, "tokens_per_step": batch * seq, "lora_param_bytes": lora_bytes,
           "model_param_bytes": model_bytes}
    if multi:
        res["comm_bytes_by_kind"] = sent[-1]  # the same every step
        res["comm_bytes_per_step"] = sum(sent[-1].values())
        # The whole model's traffic: one forward+backward with every parameter trainable.
        for p in full.parameters():
            p.requires_grad_(True)
        full.train()
        del step_model, model, opt
        full_model, ddp_bytes = _wrap(mode, full, mesh)
        res["full_finetune_comm_bytes_by_kind"] = comm_bytes(
            lambda: full_model(input_ids=ids, labels=ids).loss.backward())
        res["full_finetune_comm_bytes"] = sum(res["full_finetune_comm_bytes_by_kind"].values())
        dist.barrier()
    if rank == 0:
        Path(out).write_text(json.dumps(res))
    if multi:
        dist.destroy_process_group()


def run(steps: int = 3, batch: int = 8, seq: int = 128, world: int = 2, tiny: bool = False,
        timeout: float = 3600, rounds: int = 1) -> dict:
    """Every configuration in fresh processes, one after the other, ``rounds`` times (every
    other round in reverse order, so that a shared machine's drift hits all alike); step
    times of all rounds pooled."""
    results = {}
    order = [m for i in range(rounds) for m in (MODES if i % 2 == 0 else MODES[::-1])]
    with tempfile.TemporaryDirectory(prefix="lora_ext_w11_") as tmp:
        for i, mode in enumerate(order):
            ranks = 1 if mode == "single" else world
            out = Path(tmp) / f"{mode}-{i}.json"
            cmd = lambda r: [sys.executable, __file__, "--worker", mode, str(r), str(world),  # noqa: E731
                             str(Path(tmp) / f"{mode}-{i}.store"), str(out), "--steps", str(steps),
                             "--batch", str(batch), "--seq", str(seq)] + (["--tiny"] if tiny else [])
            env = dict(os.environ, OMP_NUM_THREADS="1" if ranks > 1 else str(world))
            load = os.getloadavg()[0]  # a shared machine: shows whether others were running
            procs = [subprocess.Popen(cmd(r), env=env) for r in range(ranks)]
            deadline = time.monotonic() + timeout
            for p in procs:
                try:
                    p.wait(timeout=max(1.0, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    for q in procs:
                        q.kill()
                    raise RuntimeError(f"W11 {mode}: did not finish within {timeout} s") from None
            if any(p.returncode for p in procs):
                raise RuntimeError(f"W11 {mode}: a process failed (exit codes {[p.returncode for p in procs]})")
            r = json.loads(out.read_text())
            r["load_average"] = [round(load, 2), round(os.getloadavg()[0], 2)]
            if mode in results:  # a later round: pool the step times
                r["step_seconds"] = results[mode]["step_seconds"] + r["step_seconds"]
                r["load_average"] = results[mode]["load_average"] + r["load_average"]
            results[mode] = r
            med = statistics.median(r["step_seconds"])
            r["tokens_per_s"] = r["tokens_per_step"] / med
            print(f"W11 {mode}: {r['tokens_per_s']:.1f} tokens/s (median step {med:.2f} s)"
                  + (f", {r['comm_bytes_per_step'] / 2**20:.2f} MiB communicated per step and rank, "
                     f"full fine-tuning {r['full_finetune_comm_bytes'] / 2**20:.1f} MiB" if ranks > 1 else ""),
                  file=sys.stderr, flush=True)
    return results


def _quantile(values: list[float], q: float) -> float:
    values = sorted(values)
    pos = q * (len(values) - 1)
    lo = int(pos)
    return values[lo] + (values[min(lo + 1, len(values) - 1)] - values[lo]) * (pos - lo)


def result(args) -> dict:
    """W11 as one entry of run.py's report (``args``: run.py's; ``--model-reps`` timed steps)."""
    batch, seq = (2, 16) if args.tiny else (8, 128)
    res = run(steps=args.model_reps, batch=batch, seq=seq, tiny=args.tiny, rounds=2)
    variants, extra = [], {}
    for mode, r in res.items():
        ms = [s * 1e3 for s in r["step_seconds"]]
        name = "1 process x 2 threads" if mode == "single" else f"{mode} {r['world']} ranks x 1 thread"
        variants.append({"name": name, "median_ms": _quantile(ms, 0.5), "p10_ms": _quantile(ms, 0.1),
                         "p90_ms": _quantile(ms, 0.9), "min_ms": min(ms), "n": len(ms),
                         "tokens_per_s": r["tokens_per_s"]})
        if mode != "single":
            extra[f"{mode}_over_single_tokens_per_s"] = r["tokens_per_s"] / res["single"]["tokens_per_s"]
            extra[f"{mode}_comm_bytes_per_step"] = r["comm_bytes_by_kind"]
            extra[f"{mode}_full_finetune_comm_bytes"] = r["full_finetune_comm_bytes_by_kind"]
        extra[f"{mode}_load_average_before_after_each_round"] = r["load_average"]
    extra["lora_param_bytes"] = res["single"]["lora_param_bytes"]
    extra["model_param_bytes"] = res["single"]["model_param_bytes"]
    desc = (f"W8's training step ({'tiny random Llama' if args.tiny else 'SmolLM2-135M'}, r=16 on q,k,v,o,gate,up,"
            f"down, global batch {batch}x{seq}) on 2 ranks x 1 thread (gloo; DDP, FSDP2) vs 1 process x 2 threads: "
            "tokens/s and bytes communicated per step and rank, measured (comm hook / wrapped collectives)")
    return {"workload": "W11", "description": desc, "device": "cpu", "variants": variants, "extra": extra,
            "check_ok": res["ddp"]["comm_bytes_per_step"] == res["ddp"]["lora_param_bytes"]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=3, help="timed steps per configuration (after 1 warm-up)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--world", type=int, default=2, help="ranks (and the single process's threads)")
    p.add_argument("--rounds", type=int, default=2, help="rounds over the configurations (default 2)")
    p.add_argument("--tiny", action="store_true", help="a tiny random Llama instead of SmolLM2-135M")
    p.add_argument("--json", help="also write the results here")
    p.add_argument("--worker", nargs=5, metavar=("MODE", "RANK", "WORLD", "INIT", "OUT"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        mode, rank, world, init, out = args.worker
        worker(mode, int(rank), int(world), init, out, args.steps, args.batch, args.seq, args.tiny)
        return 0
    res = run(args.steps, args.batch, args.seq, args.world, args.tiny, rounds=args.rounds)
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1) + "\n")
    print(json.dumps({m: {k: v for k, v in r.items() if k != "step_seconds"} for m, r in res.items()}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

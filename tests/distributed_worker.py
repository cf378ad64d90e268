"""One rank of the multi-process tests in test_distributed.py (also the one-process references).

    python tests/distributed_worker.py JOB RANK WORLD INIT_FILE OUT_DIR

JOB is ``ddp``, ``fsdp`` or ``tp``: it trains / runs the tiny models of this file on the
rank's share (DDP, FSDP2) or on shards (tensor parallel), saves adapters with
``save_adapter`` into OUT_DIR and rank 0 writes ``OUT_DIR/JOB.pt`` with what the test
compares against :func:`reference`, computed in one process. Ranks meet through a
``file://`` store (no ports) with a short gloo timeout, so a stuck collective fails.
"""

from __future__ import annotations

import datetime
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

import lora_ext
from lora_ext import lora_layers

STEPS = 3
LR = 0.05
TIMEOUT = datetime.timedelta(seconds=60)  # any collective stuck longer fails the rank
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# Global batch rows -> adapter; every rank's half uses both adapters (DDP needs every
# trainable parameter used on every rank) and the MLP's has base rows too.
MIXED = {"mlp": ["a", "b", None, "a", "b", "a", None, "b"], "llama": ["a", "b", "b", "a"]}
LLAMA_PLAN = {
    "self_attn.q_proj": "col", "self_attn.k_proj": "col", "self_attn.v_proj": "col",
    "self_attn.o_proj": "row", "mlp.gate_proj": "col", "mlp.up_proj": "col", "mlp.down_proj": "row",
}


# ------------------------------------------------------------------ models and data


def tiny_llama_base(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        pad_token_id=0, eos_token_id=1, bos_token_id=2,
    )
    return LlamaForCausalLM(config).eval()


def mlp_base(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 16))


def build(kind: str, mode: str) -> nn.Module:
    """The base model with adapter ``a`` (r=4), and ``b`` (r=2) when ``mode`` is mixed;
    random A and B (seeded), both trainable."""
    model, targets = (mlp_base(), ["0", "2"]) if kind == "mlp" else (tiny_llama_base(), TARGETS)
    lora_ext.inject_lora(model, targets, r=4, alpha=8, adapter_name="a")
    if mode == "mixed":
        lora_ext.inject_lora(model, targets, r=2, alpha=4, adapter_name="b")
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _, layer in lora_layers(model):
            for name in layer.specs:
                for p in (layer.lora_A[name], layer.lora_B[name]):
                    p.copy_(torch.randn(p.shape, generator=g) * 0.1)
                    p.requires_grad_(True)
    return model


def data(kind: str):
    g = torch.Generator().manual_seed(2)
    if kind == "mlp":
        return torch.randn(8, 5, 16, generator=g), torch.randn(8, 5, 16, generator=g)
    ids = torch.randint(3, 128, (4, 8), generator=g)
    return ids, ids


def selection(kind: str, mode: str):
    return "a" if mode == "single" else MIXED[kind]


def loss_of(kind: str, model, x, y) -> torch.Tensor:
    if kind == "mlp":
        return ((model(x) - y) ** 2).mean()
    return model(input_ids=x, labels=y).loss


def output_of(kind: str, model, x) -> torch.Tensor:
    with torch.no_grad():
        out = model(x) if kind == "mlp" else model(input_ids=x).logits
    return out.detach().clone()


def share(t, rank: int, world: int):
    """This rank's rows of a batch (or of a per-row list of adapter names)."""
    if isinstance(t, str):
        return t
    n = len(t) // world
    return t[rank * n : (rank + 1) * n]


def lora_params(model) -> list[nn.Parameter]:
    return [p for n, p in model.named_parameters() if "lora_" in n]


def train(kind, model, step_model, x, y, steps=STEPS, momentum=0.9, reduce=None):
    """SGD steps; returns the loss of each step (averaged over ranks with ``reduce``)."""
    opt = torch.optim.SGD(lora_params(model), lr=LR, momentum=momentum)
    losses = []
    model.train()
    for _ in range(steps):
        loss = loss_of(kind, step_model, x, y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=False)
        value = loss.detach().clone()
        if reduce is not None:
            dist.all_reduce(value)
            value /= reduce
        losses.append(value.item())
    model.eval()
    return losses, opt


def eval_outputs(kind, model, x) -> dict:
    out = {}
    for label, names in (("uniform", "a"), ("mixed", MIXED[kind])):
        if label == "mixed" and "b" not in lora_ext.list_adapters(model):
            continue
        lora_ext.set_adapter(model, names)
        out[label] = output_of(kind, model, x)
    return out


def reference(out_dir: Path) -> dict:
    """Everything the jobs compute, in one process on the global batch."""
    res = {}
    for kind in ("mlp", "llama"):
        x, y = data(kind)
        for mode in ("single", "mixed"):
            model = build(kind, mode)
            lora_ext.set_adapter(model, selection(kind, mode))
            losses, _ = train(kind, model, model, x, y)
            res[f"{kind}-{mode}"] = {"losses": losses, "eval": eval_outputs(kind, model, x)}
            for name in lora_ext.list_adapters(model):
                lora_ext.save_adapter(model, str(out_dir / f"ref-{kind}-{mode}-{name}"), name)
        # Tensor parallel: outputs before and after one plain SGD step on the mixed batch.
        model = build(kind, "mixed")
        lora_ext.set_adapter(model, MIXED[kind])
        before = output_of(kind, model, x)
        losses, _ = train(kind, model, model, x, y, steps=1, momentum=0.0)
        lora_ext.set_adapter(model, MIXED[kind])
        res[f"tp-{kind}"] = {"before": before, "losses": losses, "after": output_of(kind, model, x)}
        for name in ("a", "b"):
            lora_ext.save_adapter(model, str(out_dir / f"ref-tp-{kind}-{name}"), name)
    return res


# ------------------------------------------------------------------------- jobs


def _counting_hook(state: dict, bucket):
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

    buf = bucket.buffer()
    state["bytes"] += buf.numel() * buf.element_size()
    return default_hooks.allreduce_hook(None, bucket)


def job_ddp(rank: int, world: int, out_dir: Path) -> dict:
    from torch.nn.parallel import DistributedDataParallel as DDP

    res = {}
    for kind in ("mlp", "llama"):
        x, y = (share(t, rank, world) for t in data(kind))
        for mode in ("single", "mixed"):
            model = build(kind, mode)
            lora_ext.set_adapter(model, share(selection(kind, mode), rank, world))
            ddp = DDP(model, forward_sync_buffers=False)
            stats = {"bytes": 0}
            ddp.register_comm_hook(stats, _counting_hook)
            losses, _ = train(kind, model, ddp, x, y, reduce=world)
            lora_ext.set_adapter(model, selection(kind, mode))  # eval: the full batch
            full_x = data(kind)[0]
            res[f"{kind}-{mode}"] = {
                "losses": losses,
                "eval": eval_outputs(kind, model, full_x),
                "comm_bytes_per_step": stats["bytes"] / STEPS,
                "lora_grad_bytes": sum(p.numel() * p.element_size() for p in lora_params(model)),
                "model_bytes": sum(p.numel() * p.element_size() for p in model.parameters()),
                "frozen_with_grad": [n for n, p in model.named_parameters() if "lora_" not in n and p.grad is not None],
            }
            for name in lora_ext.list_adapters(model):
                lora_ext.save_adapter(ddp, str(out_dir / f"ddp-{kind}-{mode}-{name}"), name)
    return res


def job_fsdp(rank: int, world: int, out_dir: Path) -> dict:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard as torch_fully_shard
    from torch.distributed.tensor import DTensor
    from lora_ext.parallel import fully_shard as lora_fully_shard

    mesh = init_device_mesh("cpu", (world,))
    res = {}
    for kind in ("mlp", "llama"):
        x, y = (share(t, rank, world) for t in data(kind))
        for mode in ("single", "mixed"):
            model = build(kind, mode)
            units = [model[0], model[2]] if kind == "mlp" else list(model.model.layers)
            # torch's own with one adapter; lora_ext's (contiguous parameters) for ranks 4 and 2
            fully_shard = torch_fully_shard if mode == "single" else lora_fully_shard
            for unit in units:
                fully_shard(unit, mesh=mesh)
            fully_shard(model, mesh=mesh)
            lora_ext.set_adapter(model, share(selection(kind, mode), rank, world))
            losses, opt = train(kind, model, model, x, y, reduce=world)
            lora_ext.set_adapter(model, selection(kind, mode))
            full_x = data(kind)[0]
            frozen = {n: p for n, p in model.named_parameters() if "lora_" not in n}
            state_params = {id(p) for p in opt.state}
            res[f"{kind}-{mode}"] = {
                "losses": losses,
                "eval": eval_outputs(kind, model, full_x),  # no-grad forwards under FSDP2
                "frozen_not_sharded": [
                    n for n, p in frozen.items()
                    if not (isinstance(p, DTensor) and (p.shape[0] < world or p.to_local().shape[0] < p.shape[0]))
                ],
                "frozen_with_grad": [n for n, p in frozen.items() if p.grad is not None],
                "frozen_in_optimizer": [n for n, p in frozen.items() if id(p) in state_params],
                "lora_in_optimizer": sum(id(p) in state_params for p in lora_params(model)),
                "lora_count": len(lora_params(model)),
            }
            for name in lora_ext.list_adapters(model):
                lora_ext.save_adapter(model, str(out_dir / f"fsdp-{kind}-{mode}-{name}"), name)
    # An adapter loaded (frozen) before sharding serves as in one process.
    loaded = lora_ext.load_adapter(mlp_base(), str(out_dir / "fsdp-mlp-single-a"), "a")
    for unit in (loaded[0], loaded[2], loaded):
        torch_fully_shard(unit, mesh=mesh)
    res["mlp-single"]["loaded_then_sharded"] = output_of("mlp", loaded, data("mlp")[0])
    return res


def tp_plan(kind: str):
    from lora_ext.parallel import ColwiseParallel, RowwiseParallel

    styles = {"col": ColwiseParallel, "row": RowwiseParallel}
    if kind == "mlp":
        return {"0": ColwiseParallel(), "2": RowwiseParallel()}
    return {f"model.layers.*.{k}": styles[v]() for k, v in LLAMA_PLAN.items()}


def job_tp(rank: int, world: int, out_dir: Path) -> dict:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import parallelize_module
    from lora_ext.parallel import ColwiseParallel, RowwiseParallel

    mesh = init_device_mesh("cpu", (world,))
    res = {}
    for kind in ("mlp", "llama"):
        x, y = data(kind)  # every rank sees the whole batch
        model = build(kind, "mixed")
        parallelize_module(model, mesh, tp_plan(kind))
        lora_ext.set_adapter(model, MIXED[kind])
        before = output_of(kind, model, x)
        losses, _ = train(kind, model, model, x, y, steps=1, momentum=0.0)
        lora_ext.set_adapter(model, MIXED[kind])
        layer = model[0] if kind == "mlp" else model.model.layers[0].self_attn.q_proj
        res[f"tp-{kind}"] = {
            "before": before, "losses": losses, "after": output_of(kind, model, x),
            "local_b_rows": layer.lora_B["a"].shape[0], "stack_rows": layer.b_stack.shape[1],
        }
        for name in ("a", "b"):
            lora_ext.save_adapter(model, str(out_dir / f"tp-{kind}-{name}"), name)

    # Adapters loaded from files (frozen, as for serving) shard and serve the same, and
    # one unfrozen afterwards trains like the one-process model.
    trained = build("llama", "mixed")
    for name in ("a", "b"):
        lora_ext.save_adapter(trained, str(out_dir / f"tp-src-{name}"), name)  # a collective
    x, y = data("llama")
    outputs = {}
    for sharded in (False, True):
        served = tiny_llama_base()
        for name in ("a", "b"):
            lora_ext.load_adapter(served, str(out_dir / f"tp-src-{name}"), name)
        if sharded:
            parallelize_module(served, mesh, tp_plan("llama"))
        lora_ext.set_adapter(served, MIXED["llama"])
        before = output_of("llama", served, x)
        for _, layer in lora_layers(served):
            layer.lora_A["a"].requires_grad_(True)
            layer.lora_B["a"].requires_grad_(True)
        train("llama", served, served, x, y, steps=1, momentum=0.0)
        outputs[sharded] = (before, output_of("llama", served, x))
    res["tp-loaded"] = {
        "before_max_diff": (outputs[True][0] - outputs[False][0]).abs().max().item(),
        "after_max_diff": (outputs[True][1] - outputs[False][1]).abs().max().item(),
        "trained_moved": (outputs[False][1] - outputs[False][0]).abs().max().item(),
    }

    # Plain nn.Linear modules go to PyTorch's own styles.
    plain, sharded = mlp_base(3), mlp_base(3)
    parallelize_module(sharded, mesh, {"0": ColwiseParallel(), "2": RowwiseParallel()})
    x = data("mlp")[0]
    with torch.no_grad():
        res["plain_linear_max_diff"] = (plain(x) - sharded(x)).abs().max().item()

    # Bad input.
    errors = {}

    def error_of(fn) -> str:
        try:
            fn()
        except (ValueError, RuntimeError) as e:
            return f"{type(e).__name__}: {e}"
        return "no error"

    odd = lora_ext.inject_lora(nn.Sequential(nn.Linear(7, 5)), ["0"], r=2)
    errors["colwise_odd"] = error_of(lambda: parallelize_module(odd, mesh, {"0": ColwiseParallel()}))
    errors["rowwise_odd"] = error_of(lambda: parallelize_module(odd, mesh, {"0": RowwiseParallel()}))
    errors["load_after_sharding"] = error_of(
        lambda: lora_ext.load_adapter(model, str(out_dir / "tp-llama-a"), "c"))
    errors["inject_after_sharding"] = error_of(lambda: lora_ext.inject_lora(model, ["q_proj"], adapter_name="c"))
    errors["layouts"] = error_of(lambda: parallelize_module(
        lora_ext.inject_lora(mlp_base(), ["0"]), mesh, {"0": ColwiseParallel(use_local_output=True,
                                                                             output_layouts=torch.distributed.tensor.Replicate())}))
    # save_adapter on rank 0 only (the usual `if rank == 0: save`): an error, not a hang.
    store = dist.distributed_c10d._get_default_store()
    if rank == 0:
        start = time.monotonic()
        errors["save_on_one_rank"] = error_of(
            lambda: lora_ext.save_adapter(model, str(out_dir / "one-rank"), "a", timeout=3))
        errors["save_on_one_rank_seconds"] = time.monotonic() - start
        store.set("save_test_done", "1")
    else:
        store.wait(["save_test_done"], datetime.timedelta(seconds=60))
    res["errors"] = errors
    return res


JOBS = {"ddp": job_ddp, "fsdp": job_fsdp, "tp": job_tp}


def main(argv: list[str]) -> int:
    job, rank, world, init_file, out_dir = argv
    rank, world, out_dir = int(rank), int(world), Path(out_dir)
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world, timeout=TIMEOUT
    )
    try:
        res = JOBS[job](rank, world, out_dir)
        if rank == 0:
            torch.save(res, out_dir / f"{job}.pt")
    finally:
        if job != "tp":  # tp's last check leaves rank 0's barrier unmatched on purpose
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""W13: LoRA on a mixture of experts' layer (issue 20).

One experts module of realistic shape (Qwen3-30B-A3B: hidden 2048, expert width 768, 128
experts, top-8; GPT-OSS-20B: hidden 2880, width 2880, 32 experts, top-4, with biases),
random routing, rank 16, fp32, at decode (64 tokens, 8 adapters, a random one per row) and
prefill (2,048 tokens, 8 adapters). Timed, interleaved:

- ``lora_ext``: the whole layer (``LoRAExperts``, the mixed batch);
- ``base``: transformers' experts forward without adapters (what the layer costs anyway);
- ``peft``: PEFT 0.21's ``target_parameters`` forward with one adapter (its only mode: it
  has no per-row adapters here), which forms ``W + s B A`` for every expert per call;
- the LoRA part alone: ``lora_part`` (two ``moe_lora_add_`` calls, the pairs as the layer
  builds them) against ``per_expert_loop`` (a Python loop over the (adapter, expert)
  groups, two GEMMs each) and against its floor: the used blocks' bytes read once at the
  measured copy rate (decode), or the rank-r FLOPs at the measured GEMM rate (prefill).
"""

from __future__ import annotations

import gc

import torch
from torch import nn

import lora_ext
from harness import measure, median, rel_err, result
from lora_ext import ops

SHAPES = {  # name: (hidden, expert width, experts, top-k, biases)
    "qwen3-30b-a3b": (2048, 768, 128, 8, False),
    "gpt-oss-20b": (2880, 2880, 32, 4, True),
}
TINY = {"qwen3-30b-a3b": (64, 32, 8, 2, False), "gpt-oss-20b": (64, 64, 4, 2, True)}


class _Holder(nn.Module):
    def __init__(self, experts):
        super().__init__()
        self.experts = experts


def _experts(name, hidden, width, num, biases):
    from transformers import GptOssConfig, Qwen3MoeConfig
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssExperts
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeExperts

    if biases:
        cfg = GptOssConfig(hidden_size=hidden, intermediate_size=width, num_local_experts=num)
        module = GptOssExperts(cfg)
    else:
        cfg = Qwen3MoeConfig(hidden_size=hidden, moe_intermediate_size=width, num_experts=num)
        module = Qwen3MoeExperts(cfg)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape) / p.shape[-1] ** 0.5)
    return module.eval()


def _peft_tensors(module, r, seed):
    """One random adapter in PEFT's target_parameters layout (gate_up inner, down outer)."""
    g = torch.Generator().manual_seed(seed)
    layout = lora_ext.moe.experts_layout(module)
    out = {}
    for prefix, parameter in (("experts.base_layer", "gate_up_proj"), ("experts", "down_proj")):
        fan_in, fan_out = layout.features(parameter)
        e = layout.num_experts
        out[f"base_model.model.{prefix}.lora_A.weight"] = torch.randn(r * e, fan_in, generator=g) / fan_in**0.5
        out[f"base_model.model.{prefix}.lora_B.weight"] = torch.randn(fan_out, r * e, generator=g) / r**0.5
    return out


def _loop_lora(y, x, experts, adapters, a, b, scales, num_experts):
    """The LoRA part as a per-(adapter, expert) Python loop: two GEMMs per group."""
    key = torch.where(adapters >= 0, adapters.long() * num_experts + experts, -1)
    order = torch.argsort(key, stable=True)
    counts = torch.bincount(key + 1, minlength=a.shape[0] * num_experts + 1).tolist()
    start = counts[0]
    for k, n in enumerate(counts[1:]):
        if n == 0:
            continue
        rows = order[start : start + n]
        c, e = divmod(k, num_experts)
        y.index_add_(0, rows, (x[rows] @ a[c, e].T) @ b[c, e].T, alpha=float(scales[c]))
        start += n


def w13_moe(device, args, ceil) -> list[dict]:
    from peft import LoraConfig, get_peft_model

    if device.type != "cpu":
        return []
    rank, num_adapters = 16, 8
    out = []
    for name, (hidden, width, num, top_k, biases) in (TINY if args.tiny else SHAPES).items():
        module = _experts(name, hidden, width, num, biases)
        ours = _Holder(module)
        config = {"r": rank, "lora_alpha": 2 * rank, "target_parameters": ["experts.gate_up_proj", "experts.down_proj"]}
        adapters = [f"a{i}" for i in range(num_adapters)]
        for i, adapter in enumerate(adapters):
            lora_ext.load_adapter(ours, _peft_tensors(module, rank, i), adapter, config=config)
        layer = ours.experts
        theirs = get_peft_model(_Holder(module), LoraConfig(r=rank, lora_alpha=2 * rank,
                                                            target_parameters=config["target_parameters"]))
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(theirs, _peft_tensors(module, rank, 0))
        theirs.eval()
        for phase, tokens in (("decode", 8 if args.tiny else 64), ("prefill", 64 if args.tiny else 2048)):
            g = torch.Generator().manual_seed(args.seed)
            x = torch.randn(tokens, hidden, generator=g)
            logits = torch.randn(tokens, num, generator=g)
            weights, index = logits.softmax(-1).topk(top_k, dim=-1)
            rows = [adapters[i % num_adapters] for i in range(tokens)]
            lora_ext.set_adapter(ours, rows)

            # The pairs as LoRAExperts builds them, for the LoRA part alone.
            flat = index.reshape(-1)
            order = torch.argsort(flat, stable=True)
            experts = flat[order]
            tokens_of = order // top_k
            slots = torch.tensor([layer.gate_up_proj.slot(n) for n in rows], dtype=torch.int32)[tokens_of]
            parts = []
            for proj in (layer.gate_up_proj, layer.down_proj):
                xin = torch.randn(experts.shape[0], proj.in_features, generator=g)
                a, b, scales, ranks = proj.stacks()
                parts.append((proj, xin, torch.zeros(experts.shape[0], proj.out_features), a, b, scales, ranks))

            def lora_part():
                for proj, xin, y, a, b, scales, ranks in parts:
                    ops.moe_lora_add_(y, xin, a, b, experts, slots, scales, ranks)

            def loop_part():
                for proj, xin, y, a, b, scales, ranks in parts:
                    _loop_lora(y, xin, experts, slots, a, b, scales, num)

            with torch.inference_mode():
                got = layer(x, index, weights)
                lora_ext.set_adapter(ours, "a0")
                err = rel_err(layer(x, index, weights), theirs.base_model.model.experts(x, index, weights))
                lora_ext.set_adapter(ours, rows)
                # the LoRA part against the loop, from zero
                for _, _, y, *_ in parts:
                    y.zero_()
                lora_part()
                mine = [p[2].clone() for p in parts]
                for _, _, y, *_ in parts:
                    y.zero_()
                loop_part()
                err = max(err, *(rel_err(m, p[2]) for m, p in zip(mine, parts)))
                variants = measure(device, {
                    "lora_ext": lambda: layer(x, index, weights),
                    "base": lambda: module(x, index, weights),
                    "peft": lambda: theirs.base_model.model.experts(x, index, weights),
                    "lora_part": lora_part,
                    "per_expert_loop": loop_part,
                }, args, reps=min(args.reps, 5) if phase == "prefill" else args.reps)
            del got
            pairs = experts.shape[0]
            used = torch.unique(slots.long() * num + experts).numel()
            block_bytes = 4 * rank * sum(p.in_features + p.out_features for p in (layer.gate_up_proj, layer.down_proj))
            io_bytes = 4 * pairs * sum(p.in_features + 2 * p.out_features for p in (layer.gate_up_proj, layer.down_proj))
            flops = 2.0 * pairs * rank * sum(p.in_features + p.out_features for p in (layer.gate_up_proj, layer.down_proj))
            res = result(f"W13-{phase}", f"{name} experts layer, {phase}: {tokens} tokens x top-{top_k} = {pairs} pairs, "
                         f"{num} experts, {num_adapters} adapters (r={rank}, a different one per row), fp32",
                         device, torch.float32, flops, used * block_bytes + io_bytes, variants, err,
                         {"model": name, "used_blocks": used})
            ceil.floors(res, torch.float32)
            floor = max(res["memory_floor_ms"], res["compute_floor_ms"])
            part = median(res, "lora_part")
            res["extra"].update(
                lora_part_over_floor=part / floor,
                loop_over_lora_part=median(res, "per_expert_loop") / part,
                peft_over_lora_ext=median(res, "peft") / median(res, "lora_ext"),
                lora_ext_over_base=median(res, "lora_ext") / median(res, "base"),
            )
            out.append(res)
        del ours, theirs, layer, module, parts
        gc.collect()
    return out

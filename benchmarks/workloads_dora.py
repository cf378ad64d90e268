"""W15 of benchmarks/run.py: DoRA adapters (issue 25) against LoRA adapters of the same
ranks, and against PEFT's DoRA.

- W15-W1 / W15-W3: one layer's inference forward on the W1 (decode, every row its own
  adapter) and W3 (prefill, Zipf over 8 adapters) shapes. ``lora_layer`` is what
  LoRALinear runs (the base GEMM with bias, then ``multi_lora_add_``), ``dora_layer`` what
  DoRALinear runs (the bias-free base GEMM, then ``multi_dora_add_`` with the cached row
  scales), ``peft_dora`` PEFT's own ``DoraLinearLayer.forward`` on each adapter's rows
  (PEFT refuses mixed batches with DoRA, so a mixed batch is one call per adapter; each
  forms ``B @ A`` and the weight norm again).
- W15-norm: ``dora_weight_norm`` (one pass over W) against PEFT's norm (forms ``B @ A``).
- W15-gen: W7's mixed batch on SmolLM2-135M with DoRA adapters against the same batch
  with LoRA adapters, and against PEFT's DoRA (one generate per adapter's rows).
- W15-train: W8's training step (SmolLM2-135M, r=16 on the seven projections, 8x128)
  with DoRA adapters against LoRA adapters, and against PEFT's DoRA.
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import nn

import lora_ext
from harness import NOT_YET, Fixed, measure, median, not_yet, rel_err, result
from workloads_ops import distinct_indices

LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


class DoraLayerCase:
    """One [H, H] layer with bias and N adapters of rank r; DoRA magnitudes near the norm."""

    def __init__(self, device, dtype, tokens, hidden, rank, n, indices):
        self.x = torch.randn(tokens, hidden, device=device, dtype=dtype)
        self.weight = torch.randn(hidden, hidden, device=device, dtype=dtype) / math.sqrt(hidden)
        self.bias = torch.randn(hidden, device=device, dtype=dtype)
        self.a = torch.randn(n, rank, hidden, device=device, dtype=dtype) / math.sqrt(hidden)
        self.b = torch.randn(n, hidden, rank, device=device, dtype=dtype) / math.sqrt(rank)
        self.scales = (torch.rand(n) + 0.5).to(device)
        self.ranks = torch.full((n,), rank, device=device)
        self.indices = indices.to(device=device, dtype=torch.int32)
        self.host_indices = indices.tolist()
        norms = torch.stack([lora_ext.ops.dora_weight_norm(self.weight, self.a[i], self.b[i], float(self.scales[i]))
                             for i in range(n)])
        self.magnitude = (norms * (1 + 0.2 * torch.rand_like(norms))).to(dtype)
        self.row_scale = self.magnitude.float() / norms  # what DoRALinear caches per slot

    def lora_layer(self):
        y = F.linear(self.x, self.weight, self.bias)
        lora_ext.ops.multi_lora_add_(y, self.x, self.a, self.b, self.indices, self.scales, self.ranks)
        return y

    def dora_layer(self):
        y = F.linear(self.x, self.weight)
        lora_ext.ops.multi_dora_add_(y, self.x, self.a, self.b, self.indices, self.scales, self.ranks,
                                     self.row_scale, self.bias)
        return y

    def peft_modules(self):
        """PEFT's per-adapter modules: lora_A/lora_B nn.Linear and a DoraLinearLayer."""
        from peft.tuners.lora.dora import DoraLinearLayer

        base = nn.Linear(*self.weight.shape[::-1], device=self.x.device, dtype=self.x.dtype)
        with torch.no_grad():
            base.weight.copy_(self.weight), base.bias.copy_(self.bias)
        mods = []
        for i in range(self.a.shape[0]):
            lora_a = nn.Linear(self.a.shape[2], self.a.shape[1], bias=False, device=self.x.device, dtype=self.x.dtype)
            lora_b = nn.Linear(self.b.shape[2], self.b.shape[1], bias=False, device=self.x.device, dtype=self.x.dtype)
            dora = DoraLinearLayer(fan_in_fan_out=False)
            with torch.no_grad():
                lora_a.weight.copy_(self.a[i]), lora_b.weight.copy_(self.b[i])
            dora.weight = nn.Parameter(self.magnitude[i].clone(), requires_grad=False)
            mods.append((lora_a, lora_b, dora, float(self.scales[i])))
        self.peft_base, self.peft = base, mods

    def peft_dora(self):
        """PEFT's Linear.forward with DoRA, adapter by adapter over its rows."""
        rows: dict[int, list[int]] = {}
        for t, i in enumerate(self.host_indices):
            if i >= 0:
                rows.setdefault(i, []).append(t)
        result_ = self.peft_base(self.x)
        for i, r in rows.items():
            idx = torch.tensor(r, device=self.x.device)
            x = self.x.index_select(0, idx)
            lora_a, lora_b, dora, scaling = self.peft[i]
            part = result_.index_select(0, idx)
            part = part + dora(x, lora_A=lora_a, lora_B=lora_b, scaling=scaling, base_layer=self.peft_base,
                               base_result=part)
            result_.index_copy_(0, idx, part)
        return result_


def _layer_workload(name, description, device, dtype, case: DoraLayerCase, args, ceil, with_peft: bool):
    ref = case.dora_layer()
    fns = {"lora_ext": case.dora_layer, "lora_layer": case.lora_layer,
           "base_linear": lambda: F.linear(case.x, case.weight, case.bias)}
    err = 0.0
    if with_peft:
        case.peft_modules()
        with torch.no_grad():
            err = rel_err(ref, case.peft_dora())
        fns["peft_dora"] = case.peft_dora
    with torch.inference_mode():
        variants = measure(device, fns, args)
    (T, H), esz, r = case.x.shape, case.x.element_size(), case.a.shape[1]
    flops = 2.0 * T * H * (H + 2 * r)
    bytes_ = esz * (H * H + 2 * T * H + len(set(case.host_indices)) * 2 * r * H)
    res = result(name, description, device, dtype, flops, bytes_, variants, err)
    ceil.floors(res, dtype)
    res["extra"]["dora_over_lora"] = median(res, "lora_ext") / median(res, "lora_layer")
    if with_peft:
        res["extra"]["peft_dora_over_dora"] = median(res, "peft_dora") / median(res, "lora_ext")
    return res


def w15_ops(device, dtype, args, ceil) -> list[dict]:
    H, r, Td, Tp, N = args.hidden, args.rank, args.tokens_decode, args.tokens_prefill, args.adapters
    fixed = Fixed()
    out = []
    case = DoraLayerCase(device, dtype, Td, H, r, N, distinct_indices(Td, N))
    out.append(_layer_workload("W15-W1", f"DoRA layer forward, W1's shape: T={Td}, {N} adapters, every row its "
                               f"own, r={r}, in=out={H}", device, dtype, case, args, ceil, with_peft=True))
    n3 = fixed.w3_adapters
    p = torch.arange(1, n3 + 1, dtype=torch.float64).pow(-fixed.w3_zipf)
    case = DoraLayerCase(device, dtype, Tp, H, r, n3, torch.multinomial(p, Tp, replacement=True))
    out.append(_layer_workload("W15-W3", f"DoRA layer forward, W3's shape: T={Tp} over {n3} adapters, "
                               f"Zipf({fixed.w3_zipf:g}), r={r}, in=out={H}", device, dtype, case, args, ceil, with_peft=True))
    # The norm alone: one pass over W vs PEFT's (B @ A formed through an identity, then the norm).
    from peft.tuners.lora.dora import DoraLinearLayer

    w = case.weight
    a, b, s = case.a[0], case.b[0], float(case.scales[0])
    peft_layer = DoraLinearLayer(fan_in_fan_out=False)
    lin_a = nn.Linear(H, r, bias=False, device=device, dtype=dtype)
    lin_b = nn.Linear(r, H, bias=False, device=device, dtype=dtype)
    with torch.no_grad():
        lin_a.weight.copy_(a), lin_b.weight.copy_(b)

    def peft_norm():
        lora_weight = peft_layer.get_lora_weight(lin_a, lin_b)
        return peft_layer.get_weight_norm(w, lora_weight, s)

    with torch.inference_mode():
        err = rel_err(lora_ext.ops.dora_weight_norm(w, a, b, s), peft_norm())
        variants = measure(device, {"lora_ext": lambda: lora_ext.ops.dora_weight_norm(w, a, b, s),
                                    "peft": peft_norm}, args)
    res = result("W15-norm", f"||W + s B A|| per row, {H}x{H}, r={r}", device, dtype, 2.0 * H * H * r,
                 w.numel() * w.element_size(), variants, err)
    ceil.floors(res, dtype)
    res["extra"]["peft_over_lora_ext"] = median(res, "peft") / median(res, "lora_ext")
    out.append(res)
    return out


def w15_training(args) -> dict:
    """W8's training step with DoRA adapters vs LoRA adapters (lora_ext) vs PEFT's DoRA."""
    desc = "training step on SmolLM2-135M, r=16 on q,k,v,o,gate,up,down, batch 8x128, DoRA vs LoRA: tokens/s"
    try:
        import peft
        from workloads_model import load_llm

        lm, _ = load_llm()
    except Exception as e:  # noqa: BLE001
        return not_yet("W15-train", desc, ["lora_ext_dora", "lora_ext_lora", "peft_dora"], f"{NOT_YET}: {e}")
    batch, seq = (2, 16) if args.tiny else (8, 128)
    ids = torch.randint(0, lm.config.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(0))
    dora = lora_ext.inject_lora(copy.deepcopy(lm), LLAMA_TARGETS, r=16, alpha=32, use_dora=True).train()
    lora = lora_ext.inject_lora(copy.deepcopy(lm), LLAMA_TARGETS, r=16, alpha=32).train()
    pm = peft.get_peft_model(copy.deepcopy(lm), peft.LoraConfig(
        r=16, lora_alpha=32, lora_dropout=0.0, target_modules=LLAMA_TARGETS, use_dora=True)).train()
    del lm
    # Same adapter weights in both DoRA models (B random, so the norm depends on it).
    gen = torch.Generator().manual_seed(1)
    peft_params = dict(pm.named_parameters())
    with torch.no_grad():
        for path, layer in lora_ext.lora_layers(dora):
            prefix = f"base_model.model.{path}."
            layer.lora_B["default"].copy_(torch.randn(layer.lora_B["default"].shape, generator=gen) * 0.01)
            peft_params[prefix + "lora_A.default.weight"].copy_(layer.lora_A["default"])
            peft_params[prefix + "lora_B.default.weight"].copy_(layer.lora_B["default"])
        for path, layer in lora_ext.lora_layers(dora):
            peft_params[f"base_model.model.{path}.lora_magnitude_vector.default.weight"].copy_(
                layer.lora_magnitude_vector["default"])

    def train_step(model):
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-4)

        def step():
            opt.zero_grad(set_to_none=True)
            model(input_ids=ids, labels=ids).loss.backward()
            opt.step()
        return step, sum(p.numel() for p in params)

    with torch.no_grad():
        loss_ours = dora(input_ids=ids, labels=ids).loss
        loss_peft = pm(input_ids=ids, labels=ids).loss
    steps = {"lora_ext_dora": train_step(dora), "lora_ext_lora": train_step(lora), "peft_dora": train_step(pm)}
    variants = measure(torch.device("cpu"), {k: v[0] for k, v in steps.items()}, args,
                       reps=args.model_reps, warmup=1)
    for v in variants:
        v["tokens_per_s"] = batch * seq / (v["median_ms"] * 1e-3)
    t = {v["name"]: v["median_ms"] for v in variants}
    return {"workload": "W15-train", "description": desc.replace("8x128", f"{batch}x{seq}"), "device": "cpu",
            "variants": variants,
            "check_ok": steps["lora_ext_dora"][1] == steps["peft_dora"][1]
            and abs(float(loss_ours) - float(loss_peft)) <= 1e-4 * abs(float(loss_peft)),
            "extra": {"trainable_params_dora": steps["lora_ext_dora"][1],
                      "trainable_params_peft_dora": steps["peft_dora"][1],
                      "loss_lora_ext": float(loss_ours), "loss_peft": float(loss_peft),
                      "dora_over_lora": t["lora_ext_dora"] / t["lora_ext_lora"],
                      "peft_dora_over_dora": t["peft_dora"] / t["lora_ext_dora"]}}


def w15_workloads(device, dtype, args, ceil) -> list[dict]:
    return w15_ops(device, dtype, args, ceil)


def w15_generation(args) -> dict:
    """W7's mixed batch on SmolLM2 with DoRA adapters (lora_ext's one call per layer) against
    the same batch with LoRA adapters of the same ranks, and against PEFT's DoRA, which
    refuses mixed batches: one generate per adapter's rows (and one for the base rows)."""
    desc = "W7's mixed batch on SmolLM2-135M with DoRA adapters (r=8, 7 projections): generated tokens/s"
    try:
        import peft
        from lora_ext.apps import llm, tasks
        from workloads_model import load_llm

        lm, tok = load_llm()
    except Exception as e:  # noqa: BLE001
        return not_yet("W15-gen", desc, ["lora_ext_dora", "lora_ext_lora", "peft_dora_per_adapter"], f"{NOT_YET}: {e}")
    rows = []
    for name, task in tasks.TASKS.items():
        rows += [(name, p) for p, _ in task.examples(2, seed=0)]
    rows += [(None, q) for q, _ in tasks.BASE_QUESTIONS]
    names, prompts = [n for n, _ in rows], [p for _, p in rows]
    fixed = dict(max_new_tokens=args.gen_tokens, min_new_tokens=args.gen_tokens)
    dora, lora = copy.deepcopy(lm), copy.deepcopy(lm)
    gen = torch.Generator().manual_seed(0)
    folders = {}
    tmp = __import__("tempfile").mkdtemp(prefix="lora_ext_w15_")
    for name in tasks.TASKS:
        lora_ext.inject_lora(dora, LLAMA_TARGETS, r=8, alpha=16, adapter_name=name, init="gaussian", use_dora=True)
        lora_ext.inject_lora(lora, LLAMA_TARGETS, r=8, alpha=16, adapter_name=name, init="gaussian")
        with torch.no_grad():
            for (_, d), (_, l) in zip(lora_ext.lora_layers(dora), lora_ext.lora_layers(lora)):
                d.lora_B[name].copy_(torch.randn(d.lora_B[name].shape, generator=gen) * 0.01)
                d.lora_magnitude_vector[name].mul_(1 + 0.05 * torch.randn(d.out_features, generator=gen))
                l.lora_A[name].copy_(d.lora_A[name]), l.lora_B[name].copy_(d.lora_B[name])
        lora_ext.save_adapter(dora, f"{tmp}/{name}", name)
        folders[name] = f"{tmp}/{name}"
    for model in (dora, lora):
        model.eval()
        for p in model.parameters():
            p.requires_grad_(False)
    pm = None
    for name, folder in folders.items():
        if pm is None:
            pm = peft.PeftModel.from_pretrained(copy.deepcopy(lm), folder, adapter_name=name)
        else:
            pm.load_adapter(folder, adapter_name=name)
    pm.eval()
    groups: dict = {}
    for n, p in zip(names, prompts):
        groups.setdefault(n, []).append(p)

    def ours(model):
        def run():
            with lora_ext.use_adapter(model, names):
                return llm.generate(model, tok, prompts, **fixed)
        return run

    def peft_per_adapter():
        out = []
        for name, group in groups.items():
            if name is None:
                with pm.disable_adapter():
                    out.append(llm.generate(pm, tok, group, **fixed))
            else:
                pm.set_adapter(name)
                out.append(llm.generate(pm, tok, group, **fixed))
        return out

    with torch.no_grad():
        with lora_ext.use_adapter(dora, names):
            ours_text = llm.generate(dora, tok, prompts, **fixed).texts
        theirs = {}
        for name, group in groups.items():
            if name is None:
                with pm.disable_adapter():
                    texts = llm.generate(pm, tok, group, **fixed).texts
            else:
                pm.set_adapter(name)
                texts = llm.generate(pm, tok, group, **fixed).texts
            theirs[name] = iter(texts)
        same = sum(t == next(theirs[n]) for n, t in zip(names, ours_text))
        variants = measure(torch.device("cpu"), {
            "lora_ext_dora": ours(dora), "lora_ext_lora": ours(lora), "peft_dora_per_adapter": peft_per_adapter,
        }, args, reps=args.model_reps, warmup=1)
    tokens = len(prompts) * args.gen_tokens
    for v in variants:
        v["tokens_per_s"] = tokens / (v["median_ms"] * 1e-3)
    t = {v["name"]: v["median_ms"] for v in variants}
    return {"workload": "W15-gen", "description": f"{desc}; {len(prompts)} rows ({names.count(None)} base), "
            f"{args.gen_tokens} new tokens each, random adapters", "device": "cpu", "variants": variants,
            "check_ok": same >= len(prompts) - 1,  # greedy text; a near-tie may flip one row
            "extra": {"rows_same_text_as_peft": same, "rows": len(prompts),
                      "dora_over_lora": t["lora_ext_dora"] / t["lora_ext_lora"],
                      "peft_dora_over_dora": t["peft_dora_per_adapter"] / t["lora_ext_dora"]}}

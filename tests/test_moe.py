"""LoRA on mixture-of-experts layers: the moe_lora op (float64 reference, opcheck,
gradcheck) and the experts layer kind against PEFT's ``target_parameters`` on tiny random
Qwen3-MoE and GPT-OSS models."""

import pytest
import torch

import lora_ext
from lora_ext import ops

TOL = {torch.float32: 2e-5, torch.bfloat16: 3e-2, torch.float16: 5e-3, torch.float64: 1e-10}


def moe_problem(P=37, C=3, E=5, R=4, in_=24, out=20, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(P, in_, generator=g).to(dtype)
    a = torch.randn(C, E, R, in_, generator=g).to(dtype)
    b = torch.randn(C, E, out, R, generator=g).to(dtype)
    experts = torch.randint(0, E, (P,), generator=g)
    adapters = torch.randint(-1, C, (P,), generator=g)
    scales = torch.rand(C, generator=g) + 0.5
    ranks = torch.randint(1, R + 1, (C,), generator=g)
    base = torch.randn(P, out, generator=g).to(dtype)
    return x, a, b, experts, adapters, scales, ranks, base


def reference(x, a, b, experts, adapters, scales, ranks, base):
    """Row by row in float64."""
    y = base.double().clone()
    for p in range(x.shape[0]):
        c, e = int(adapters[p]), int(experts[p])
        if c < 0:
            continue
        r = int(ranks[c])
        y[p] += float(scales[c]) * (b[c, e, :, :r].double() @ (a[c, e, :r].double() @ x[p].double()))
    return y


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("P", [1, 37, 300])
@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64], ids=str)
def test_moe_lora_matches_float64(dtype, P, index_dtype):
    x, a, b, experts, adapters, scales, ranks, base = moe_problem(P=P, dtype=dtype, seed=P)
    experts, adapters = experts.to(index_dtype), adapters.to(index_dtype)
    want = reference(x, a, b, experts, adapters, scales, ranks, base)
    got = ops.moe_lora(x, a, b, experts, adapters, scales, ranks, base)
    scale = want.abs().max().item()
    assert (got.double() - want).abs().max().item() <= TOL[dtype] * scale
    y = base.clone()
    ops.moe_lora_add_(y, x, a, b, experts, adapters, scales, ranks)
    assert torch.equal(y, got)
    # Without base: the update alone; without ranks: every adapter at full rank R.
    zero = torch.zeros_like(base)
    full = torch.full_like(ranks, a.shape[2])
    want0 = reference(x, a, b, experts, adapters, scales, full, zero)
    got0 = ops.moe_lora(x, a, b, experts, adapters, scales)
    assert (got0.double() - want0).abs().max().item() <= TOL[dtype] * want0.abs().max().item()


def test_moe_lora_rows_without_adapter_keep_base():
    x, a, b, experts, adapters, scales, ranks, base = moe_problem()
    adapters[:] = -1
    assert torch.equal(ops.moe_lora(x, a, b, experts, adapters, scales, ranks, base), base)


def test_moe_lora_backward_matches_float64():
    x, a, b, experts, adapters, scales, ranks, base = moe_problem(P=50)
    leaves = [t.double().requires_grad_() for t in (x, a, b, base)]
    want = reference(leaves[0], leaves[1], leaves[2], experts, adapters, scales, ranks, leaves[3])
    g = torch.randn_like(want)
    want_grads = torch.autograd.grad(want, leaves, g)
    got_leaves = [t.clone().requires_grad_() for t in (x, a, b, base)]
    got = ops.moe_lora(got_leaves[0], got_leaves[1], got_leaves[2], experts, adapters, scales, ranks, got_leaves[3])
    got_grads = torch.autograd.grad(got, got_leaves, g.float())
    for w, gg in zip(want_grads, got_grads):
        assert (gg.double() - w).abs().max().item() <= 1e-4 * max(w.abs().max().item(), 1.0)


def test_moe_lora_gradcheck():
    x, a, b, experts, adapters, scales, ranks, base = moe_problem(P=9, C=2, E=3, R=3, in_=5, out=4, dtype=torch.float64)
    args = [t.requires_grad_() for t in (x, a, b)]
    base.requires_grad_()
    fn = lambda x, a, b, base: ops.moe_lora(x, a, b, experts, adapters, scales, ranks, base)
    assert torch.autograd.gradcheck(fn, (*args, base))


def test_moe_lora_opcheck():
    x, a, b, experts, adapters, scales, ranks, base = moe_problem(P=11)
    for t in (x, a, b, base):
        t.requires_grad_()
    torch.library.opcheck(torch.ops.lora_ext.moe_lora.default, (x, a, b, experts, adapters, scales, ranks, base))
    torch.library.opcheck(torch.ops.lora_ext.moe_lora.default, (x, a, b, experts, adapters, scales, None, None))
    y = base.detach().clone()
    torch.library.opcheck(
        torch.ops.lora_ext.moe_lora_add_.default, (y, x.detach(), a.detach(), b.detach(), experts, adapters, scales, ranks)
    )
    g = torch.randn(x.shape[0], b.shape[2])
    torch.library.opcheck(
        torch.ops.lora_ext.moe_lora_backward.default,
        (g, x.detach(), a.detach(), b.detach(), experts, adapters, scales, ranks, [True, True, True]),
    )


def test_moe_lora_compiles():
    x, a, b, experts, adapters, scales, ranks, base = moe_problem()
    fn = torch.compile(ops.moe_lora, fullgraph=True)
    assert torch.equal(fn(x, a, b, experts, adapters, scales, ranks, base), ops.moe_lora(x, a, b, experts, adapters, scales, ranks, base))


def _set(position, value):
    def change(args):
        args[position] = value(args[position])
    return change


def _set_row(position, row, value):
    def change(args):
        t = args[position].clone()
        t[row] = value
        args[position] = t
    return change


@pytest.mark.parametrize(
    "change, message",
    [
        (_set_row(3, 3, 5), "experts\\[3\\] = 5 is out of range"),
        (_set_row(4, 4, -2), "adapters\\[4\\] = -2 is out of range"),
        (_set_row(6, 2, 9), "ranks\\[2\\] = 9 is out of range"),
        (_set(2, lambda t: t[:, :4]), "b_stack.size\\(1\\)"),
        (_set(1, lambda t: t[0]), "a_stack must be 4-D"),
        (_set(2, lambda t: t.double()), "b_stack has dtype"),
        (_set(3, lambda t: t.float()), "experts must be int32 or int64"),
    ],
)
def test_moe_lora_bad_input_leaves_y_unchanged(change, message):
    args = list(moe_problem())
    base = args.pop()
    change(args)
    y = base.clone()
    with pytest.raises(RuntimeError, match=message):
        ops.moe_lora_add_(y, *args)
    assert torch.equal(y, base)


# ---------------------------------------------------------------------------
# The experts layer kind against PEFT's target_parameters, on tiny random models.

import copy  # noqa: E402

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from lora_ext.moe import ExpertsProjection, LoRAExperts  # noqa: E402

TARGET_PARAMETERS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]


def tiny_model(family: str, seed: int = 0, num_experts: int = 4):
    torch.manual_seed(seed)
    common = dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=8, num_experts_per_tok=2, max_position_embeddings=64)
    if family == "qwen3_moe":
        config = transformers.Qwen3MoeConfig(intermediate_size=48, moe_intermediate_size=24,
                                             num_experts=num_experts, **common)
    elif family == "olmoe":
        common.pop("head_dim")
        config = transformers.OlmoeConfig(intermediate_size=24, num_experts=num_experts, **common)
    else:
        config = transformers.GptOssConfig(intermediate_size=24, num_local_experts=num_experts,
                                           layer_types=["full_attention"] * 2, **common)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():  # GPT-OSS's biases start at zero: make them matter
        for name, p in model.named_parameters():
            if name.endswith("_bias"):
                p.copy_(torch.randn_like(p) * 0.1)
    return model


def peft_adapter(model, folder, seed, r=4, alpha=8, targets=("q_proj",), parameters=TARGET_PARAMETERS):
    """A PEFT model on a copy of ``model`` with random (non-zero) weights, saved to ``folder``."""
    config = peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=list(targets) or None,
                             target_parameters=list(parameters))
    pm = peft.get_peft_model(copy.deepcopy(model), config).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    pm.save_pretrained(folder)
    return pm


FAMILIES = ["qwen3_moe", "gpt_oss"]


def close(got, want, tol=2e-5):
    return (got - want).abs().max().item() <= tol * max(want.abs().max().item(), 1.0)


@pytest.mark.parametrize("family", FAMILIES + ["olmoe"])
def test_one_adapter_matches_peft(family, tmp_path):
    model = tiny_model(family)
    pm = peft_adapter(model, tmp_path / "a", seed=1)
    ids = torch.randint(0, 64, (3, 9))
    with torch.no_grad():
        want, base = pm(ids).logits, model(ids).logits
    lora_ext.load_adapter(model, tmp_path / "a", "a")
    experts = model.model.layers[0].mlp.experts
    assert isinstance(experts, LoRAExperts) and isinstance(experts.gate_up_proj, ExpertsProjection)
    with torch.no_grad():
        got = model(ids).logits
    assert not close(base, want)  # the adapter changes the output
    assert close(got, want)
    lora_ext.set_adapter(model, None)  # no adapter: the base model again
    with torch.no_grad():
        assert torch.equal(model(ids).logits, base)


@pytest.mark.parametrize("family", FAMILIES)
def test_mixed_rows_match_each_row_alone(family, tmp_path):
    model = tiny_model(family)
    peft_adapter(model, tmp_path / "a", seed=1)
    peft_adapter(model, tmp_path / "b", seed=2, r=2, alpha=6, targets=())
    peft_adapter(model, tmp_path / "c", seed=3, r=3, alpha=5, parameters=["mlp.experts.gate_up_proj"])
    for name in "abc":
        lora_ext.load_adapter(model, tmp_path / name, name)
    ids = torch.randint(0, 64, (4, 9))
    names = ["b", None, "a", "c"]
    with torch.no_grad():
        lora_ext.set_adapter(model, names)
        mixed = model(ids).logits
        for row, name in enumerate(names):
            lora_ext.set_adapter(model, name)
            alone = model(ids[row : row + 1]).logits
            assert close(mixed[row : row + 1], alone, 1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_gradients_match_peft(family, tmp_path):
    model = tiny_model(family)
    pm = peft_adapter(model, tmp_path / "a", seed=1)
    pm.train()
    ids = torch.randint(0, 64, (2, 8))
    pm(ids, labels=ids).loss.backward()
    lora_ext.load_adapter(model, tmp_path / "a", "a")
    params = {}
    for name, p in model.named_parameters():
        if "lora_" in name:
            p.requires_grad_(True)
            params[name] = p
    model.train()
    model(ids, labels=ids).loss.backward()
    peft_params = dict(pm.named_parameters())
    for layer in (0, 1):
        host = f"model.layers.{layer}.mlp.experts"
        for depth, parameter in ((1, "gate_up_proj"), (0, "down_proj")):
            prefix = f"base_model.model.{host}" + ".base_layer" * depth
            ga = peft_params[f"{prefix}.lora_A.default.weight"].grad
            gb = peft_params[f"{prefix}.lora_B.default.weight"].grad
            ours_a = params[f"{host}.{parameter}.lora_A.a"].grad
            ours_b = params[f"{host}.{parameter}.lora_B.a"].grad
            e, r = ours_a.shape[:2]
            assert close(ours_a, ga.reshape(e, r, -1), 1e-4)
            assert close(ours_b, gb.reshape(gb.shape[0], r, e).permute(2, 0, 1), 1e-4)
        q = f"model.layers.{layer}.self_attn.q_proj"
        assert close(params[f"{q}.lora_A.a"].grad, peft_params[f"base_model.model.{q}.lora_A.default.weight"].grad, 1e-4)


@pytest.mark.parametrize("family", FAMILIES)
def test_save_round_trip_with_peft(family, tmp_path):
    model = tiny_model(family)
    peft_adapter(model, tmp_path / "a", seed=3)
    clean = copy.deepcopy(model)
    lora_ext.load_adapter(model, tmp_path / "a", "a")
    lora_ext.save_adapter(model, tmp_path / "saved", "a")
    ids = torch.randint(0, 64, (2, 7))
    with torch.no_grad():
        ours = model(ids).logits
        reloaded = peft.PeftModel.from_pretrained(copy.deepcopy(clean), tmp_path / "saved").eval()
        assert close(reloaded(ids).logits, ours)
    again = copy.deepcopy(clean)
    lora_ext.load_adapter(again, tmp_path / "saved", "a")
    with torch.no_grad():
        assert torch.equal(again(ids).logits, ours)


def test_wrong_expert_count_is_refused_unchanged(tmp_path):
    peft_adapter(tiny_model("qwen3_moe", num_experts=4), tmp_path / "a", seed=1, targets=())
    model = tiny_model("qwen3_moe", num_experts=6)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="6 experts"):
        lora_ext.load_adapter(model, tmp_path / "a", "a")
    assert not any(isinstance(m, LoRAExperts) for m in model.modules())
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("family", FAMILIES)
def test_merge_and_exact_unmerge(family, tmp_path):
    model = tiny_model(family)
    peft_adapter(model, tmp_path / "a", seed=4)
    lora_ext.load_adapter(model, tmp_path / "a", "a")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ids = torch.randint(0, 64, (2, 7))
    with torch.no_grad():
        want = model(ids).logits
        lora_ext.merge_adapter(model, "a")
        experts = model.model.layers[0].mlp.experts.base_layer
        assert not torch.equal(experts.gate_up_proj, before["model.layers.0.mlp.experts.base_layer.gate_up_proj"])
        assert close(model(ids).logits, want, 1e-4)
        lora_ext.set_adapter(model, ["a", None])
        with pytest.raises(RuntimeError, match="merged"):
            model(ids)
        lora_ext.set_adapter(model, "a")
        lora_ext.unmerge_adapter(model)
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("names", [("gate_proj", "up_proj", "down_proj"), ("w1", "w3", "w2")], ids=["hf", "mixtral"])
def test_per_expert_layout_matches_merged_weights(family, names, tmp_path):
    """Adapters stored per expert (vLLM / Mixtral style) against the weights merged by hand."""
    model = tiny_model(family)
    layout = lora_ext.moe.experts_layout(model.model.layers[0].mlp.experts)
    e, h, i, r, alpha = layout.num_experts, layout.hidden, layout.intermediate, 3, 6.0
    g = torch.Generator().manual_seed(5)
    tensors, merged = {}, copy.deepcopy(model)
    for layer in range(2):
        host = f"model.layers.{layer}.mlp.experts"
        w = merged.get_submodule(host)
        for x in range(e):
            deltas = {}
            for role, (fan_in, fan_out) in zip(names, ((h, i), (h, i), (i, h))):
                a = torch.randn(r, fan_in, generator=g) * 0.3
                b = torch.randn(fan_out, r, generator=g) * 0.3
                tensors[f"base_model.model.{host}.{x}.{role}.lora_A.weight"] = a
                tensors[f"base_model.model.{host}.{x}.{role}.lora_B.weight"] = b
                deltas[role] = alpha / r * b @ a  # [out, in]
            gate, up, down = (deltas[n] for n in names)
            with torch.no_grad():
                if layout.transposed:  # GPT-OSS: [H, 2I] with gate and up interleaved
                    w.gate_up_proj[x][:, 0::2] += gate.T
                    w.gate_up_proj[x][:, 1::2] += up.T
                    w.down_proj[x] += down.T
                else:
                    w.gate_up_proj[x][:i] += gate
                    w.gate_up_proj[x][i:] += up
                    w.down_proj[x] += down
    config = {"r": r, "lora_alpha": alpha, "target_modules": list(names)}
    lora_ext.load_adapter(model, tensors, "a", config=config)
    ids = torch.randint(0, 64, (2, 7))
    with torch.no_grad():
        assert close(model(ids).logits, merged(ids).logits, 1e-4)
    # An expert missing from the file: refused, the model unchanged.
    other = tiny_model(family)
    del tensors[f"base_model.model.model.layers.1.mlp.experts.{e - 1}.{names[2]}.lora_A.weight"]
    del tensors[f"base_model.model.model.layers.1.mlp.experts.{e - 1}.{names[2]}.lora_B.weight"]
    with pytest.raises(ValueError, match=f"has {e} experts"):
        lora_ext.load_adapter(other, tensors, "a", config=config)
    assert not any(isinstance(m, LoRAExperts) for m in other.modules())


def test_pool_and_generate_with_expert_adapters(tmp_path):
    model = tiny_model("qwen3_moe")
    for seed, name in enumerate("abc"):
        peft_adapter(model, tmp_path / name, seed=seed + 10)
    reference = copy.deepcopy(model)
    for name in "abc":
        lora_ext.load_adapter(reference, tmp_path / name, name)
    pool = lora_ext.AdapterPool(model, max_resident=2)
    for name in "abc":
        pool.add(name, tmp_path / name)
    ids = torch.randint(0, 64, (3, 6))
    with torch.no_grad():
        for names in (["a", "b", None], ["c", "a", "c"], ["b", "c", "b"]):
            pool.set_adapter(names)
            lora_ext.set_adapter(reference, names)
            assert torch.equal(model(ids).logits, reference(ids).logits)
        # generate: each row of a mixed batch as if it ran alone
        names = ["b", None, "c"]
        pool.set_adapter(names)
        mixed = model.generate(ids, max_new_tokens=4, do_sample=False)
        for row, name in enumerate(names):
            lora_ext.set_adapter(reference, name)
            alone = reference.generate(ids[row : row + 1], max_new_tokens=4, do_sample=False)
            assert torch.equal(mixed[row : row + 1], alone)


def test_bf16_model_matches_peft(tmp_path):
    model = tiny_model("qwen3_moe")
    pm = peft_adapter(model, tmp_path / "a", seed=6)
    model, pm = model.to(torch.bfloat16), pm.to(torch.bfloat16)
    lora_ext.load_adapter(model, tmp_path / "a", "a")
    assert model.model.layers[0].mlp.experts.gate_up_proj.a_stack.dtype == torch.bfloat16
    ids = torch.randint(0, 64, (2, 7))
    with torch.no_grad():
        assert close(model(ids).logits.float(), pm(ids).logits.float(), 3e-2)


def test_deepcopy_and_pickle_keep_expert_adapters(tmp_path):
    import pickle

    model = tiny_model("gpt_oss")
    peft_adapter(model, tmp_path / "a", seed=7)
    lora_ext.load_adapter(model, tmp_path / "a", "a")
    ids = torch.randint(0, 64, (2, 5))
    with torch.no_grad():
        want = model(ids).logits
        for copied in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
            experts = copied.model.layers[1].mlp.experts
            assert experts.gate_up_proj.weight is experts.base_layer.gate_up_proj  # the copy's own base
            assert experts.gate_up_proj.shares_storage()
            assert torch.equal(copied(ids).logits, want)


def test_merge_and_unload_restores_plain_experts(tmp_path):
    model = tiny_model("gpt_oss")
    experts_type = type(model.model.layers[0].mlp.experts)
    peft_adapter(model, tmp_path / "a", seed=8)
    lora_ext.load_adapter(model, tmp_path / "a", "a")
    ids = torch.randint(0, 64, (2, 6))
    with torch.no_grad():
        want = model(ids).logits
        plain = lora_ext.merge_and_unload(model, "a")
        assert type(plain.model.layers[0].mlp.experts) is experts_type
        assert not lora_ext.lora_layers(plain)
        assert close(plain(ids).logits, want, 1e-4)

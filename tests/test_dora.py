"""DoRA: the ops against float64 references, the layer kind against PEFT on a tiny Llama."""

import copy
import json

import pytest
import torch
from torch import nn

import lora_ext
from lora_ext import lora_layers, ops
from lora_ext.dora import DoRALinear
from lora_ext.lifecycle import register_layer_kind

from conftest import DTYPES, assert_close_to_ref, id_formatter

peft = pytest.importorskip("peft")
from safetensors.torch import load_file  # noqa: E402

TARGETS = ["q_proj", "v_proj", "down_proj"]


# -- ops ------------------------------------------------------------------------------------


def _norm_ref(w, a, b, scale):
    return (w.double() + scale * b.double() @ a.double()).norm(dim=1)


@pytest.mark.parametrize("dtype", DTYPES, ids=id_formatter("dtype"))
@pytest.mark.parametrize("shape", [(37, 53, 3), (64, 300, 16), (5, 1, 1)], ids=str)
def test_weight_norm_matches_reference(dtype, shape):
    out, inp, r = shape
    g = torch.Generator().manual_seed(out + inp)
    w = torch.randn(out, inp, generator=g).to(dtype)
    a = torch.randn(r, inp, generator=g).to(dtype)
    b = torch.randn(out, r, generator=g).to(dtype)
    norm = ops.dora_weight_norm(w, a, b, 0.7)
    assert norm.dtype == torch.float32 and norm.shape == (out,)
    # The merged tile is rounded to the weight's dtype (as a merged weight is): a relative
    # error of a few ulps of that dtype per element.
    rel = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}[dtype]
    torch.testing.assert_close(norm.double(), _norm_ref(w, a, b, 0.7), rtol=rel, atol=0)


def test_weight_norm_of_a_column_slice_and_double():
    g = torch.Generator().manual_seed(3)
    wide = torch.randn(40, 100, generator=g, dtype=torch.float64)
    w = wide[:, 10:70]  # row stride 100
    a, b = torch.randn(4, 60, generator=g, dtype=torch.float64), torch.randn(40, 4, generator=g, dtype=torch.float64)
    norm = ops.dora_weight_norm(w, a, b, -1.3)
    assert norm.dtype == torch.float64
    torch.testing.assert_close(norm, _norm_ref(w, a, b, -1.3), rtol=1e-12, atol=0)


def test_weight_norm_opcheck_and_errors():
    g = torch.Generator().manual_seed(4)
    w, a, b = torch.randn(12, 20, generator=g), torch.randn(3, 20, generator=g), torch.randn(12, 3, generator=g)
    torch.library.opcheck(torch.ops.lora_ext.dora_weight_norm.default, (w, a, b, 0.5))
    with pytest.raises(RuntimeError, match="lora_b.size\\(0\\)"):
        ops.dora_weight_norm(w, a, b[:5], 0.5)
    with pytest.raises(RuntimeError, match="dtype"):
        ops.dora_weight_norm(w, a.double(), b, 0.5)
    with pytest.raises(RuntimeError, match="unit column stride"):
        ops.dora_weight_norm(torch.randn(20, 12).t(), a, b, 0.5)  # [12, 20], column stride 12


def _dora_rows_problem(dtype, seed=0, T=23, N=5, R=6, inp=40, out=33, bias=True):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, inp, generator=g).to(dtype)
    a = torch.randn(N, R, inp, generator=g).to(dtype) * 0.3
    b = torch.randn(N, out, R, generator=g).to(dtype) * 0.3
    idx = torch.randint(-1, N, (T,), generator=g, dtype=torch.int32)
    idx[:3] = torch.tensor([-1, 0, N - 1])
    scales = torch.rand(N, generator=g) + 0.5
    ranks = torch.randint(1, R + 1, (N,), generator=g)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    row_scale = (torch.rand(N, out, generator=g) + 0.5).to(acc)
    row_scale[1] = 1.0  # a plain LoRA slot
    y0 = torch.randn(T, out, generator=g).to(dtype)
    bias_t = torch.randn(out, generator=g).to(dtype) if bias else None
    return y0, x, a, b, idx, scales, ranks, row_scale, bias_t


def _dora_rows_ref(y0, x, a, b, idx, scales, ranks, row_scale, bias):
    y = y0.double().clone()
    for t, i in enumerate(idx.tolist()):
        if i >= 0:
            r = int(ranks[i])
            upd = scales[i].double() * (b[i, :, :r].double() @ (a[i, :r].double() @ x[t].double()))
            y[t] = row_scale[i].double() * (y[t] + upd)
        if bias is not None:
            y[t] += bias.double()
    return y


@pytest.mark.parametrize("dtype", DTYPES + [torch.float64], ids=id_formatter("dtype"))
@pytest.mark.parametrize("bias", [True, False], ids=id_formatter("bias"))
def test_multi_dora_add_matches_reference(dtype, bias):
    y0, x, a, b, idx, scales, ranks, row_scale, bias_t = _dora_rows_problem(dtype, bias=bias)
    y = y0.clone()
    ops.multi_dora_add_(y, x, a, b, idx, scales, ranks, row_scale, bias_t)
    # Rounded twice (after the update, after the scale): two ulps of the output.
    tol = {torch.float64: 1e-10, torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 3.2e-2}[dtype]
    ref = _dora_rows_ref(y0, x, a, b, idx, scales, ranks, row_scale, bias_t)
    assert (y.double() - ref).abs().max() <= tol * max(ref.abs().max().item(), 1.0)


def test_multi_dora_add_opcheck_slice_and_errors():
    y0, x, a, b, idx, scales, ranks, row_scale, bias = _dora_rows_problem(torch.float32, seed=5)
    torch.library.opcheck(
        torch.ops.lora_ext.multi_dora_add_.default, (y0.clone(), x, a, b, idx, scales, ranks, row_scale, bias)
    )
    # A column slice of a wider output is updated where it lies.
    wide = torch.randn(y0.shape[0], y0.shape[1] + 7)
    wide[:, 3 : 3 + y0.shape[1]] = y0
    before = wide.clone()
    ops.multi_dora_add_(wide[:, 3 : 3 + y0.shape[1]], x, a, b, idx, scales, ranks, row_scale, bias)
    ref = _dora_rows_ref(y0, x, a, b, idx, scales, ranks, row_scale, bias)
    assert_close_to_ref(wide[:, 3 : 3 + y0.shape[1]], ref, torch.float32)
    assert torch.equal(wide[:, :3], before[:, :3]) and torch.equal(wide[:, 3 + y0.shape[1] :], before[:, 3 + y0.shape[1] :])
    # Bad input: an exception naming the argument, y unchanged.
    for bad, match in [
        (dict(row_scale=row_scale[:, :-1]), "row_scale must have shape"),
        (dict(row_scale=row_scale.double()), "row_scale must be"),
        (dict(bias=bias[:-1]), "bias must have shape"),
        (dict(idx=torch.full_like(idx, a.shape[0])), "out of range"),
    ]:
        args = dict(x=x, a=a, b=b, idx=idx, scales=scales, ranks=ranks, row_scale=row_scale, bias=bias)
        args.update(bad)
        y = y0.clone()
        with pytest.raises(RuntimeError, match=match):
            ops.multi_dora_add_(y, args["x"], args["a"], args["b"], args["idx"], args["scales"], args["ranks"],
                                args["row_scale"], args["bias"])
        assert torch.equal(y, y0)


def test_dora_rows_gradcheck():
    """The autograd of the mixed-batch training route (multi_lora times each row's g), float64."""
    base = nn.Linear(9, 7).double()
    layer = DoRALinear(base)
    y0, x, a, b, idx, scales, ranks, row_scale, _ = _dora_rows_problem(
        torch.float64, seed=9, T=6, N=3, R=3, inp=9, out=7
    )
    dropout = torch.zeros(3)
    x, a, b, row_scale = (t.clone().requires_grad_() for t in (x, a, b, row_scale))

    def f(x, a, b, g):
        return layer.forward_dora_rows(x, idx, a, b, scales, ranks, dropout, g)

    torch.autograd.gradcheck(f, (x, a, b, row_scale))


def test_ops_compile_fullgraph():
    y0, x, a, b, idx, scales, ranks, row_scale, bias = _dora_rows_problem(torch.float32, seed=11)
    w = torch.randn(b.shape[1], x.shape[1])

    def f(y, w):
        y = y.clone()
        ops.multi_dora_add_(y, x, a, b, idx, scales, ranks, row_scale, bias)
        return y, ops.dora_weight_norm(w, a[0], b[0], 0.5)

    expected = f(y0, w)
    got = torch.compile(f, fullgraph=True, backend="aot_eager")(y0, w)
    torch.testing.assert_close(got, expected)


# -- the layer kind against PEFT -----------------------------------------------------------------


def _peft_dora(base, seed, r=4, alpha=8, targets=TARGETS, use_dora=True, rslora=False, dropout=0.0, **patterns):
    """A PEFT model over a copy of ``base`` with random A, B and magnitudes; its files' content."""
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict

    config = LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, use_dora=use_dora,
                        use_rslora=rslora, lora_dropout=dropout, init_lora_weights=False, **patterns)
    torch.manual_seed(seed)
    pm = get_peft_model(copy.deepcopy(base), config)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_A" in n or "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
            elif "lora_magnitude_vector" in n:
                p.mul_(1.0 + 0.3 * torch.rand(p.shape, generator=g))
    pm.eval()
    return pm, get_peft_model_state_dict(pm), config.to_dict()


def _logits(model, ids, names=None):
    with torch.no_grad():
        if names is None:
            return model(ids).logits
        with lora_ext.use_adapter(model, names):
            return model(ids).logits


@pytest.fixture
def ids():
    return torch.randint(3, 128, (4, 7), generator=torch.Generator().manual_seed(0))


def test_one_dora_adapter_matches_peft(tiny_llama, ids):
    model, base = tiny_llama(), tiny_llama()
    pm, state, config = _peft_dora(base, seed=1, rslora=True, rank_pattern={"down_proj": 2},
                                   alpha_pattern={"v_proj": 3})
    lora_ext.load_adapter(model, state, "d", config=config)
    assert all(isinstance(m, DoRALinear) for _, m in lora_layers(model))
    layers = dict(lora_layers(model))
    assert layers["model.layers.1.mlp.down_proj"].specs["d"].r == 2
    assert layers["model.layers.0.self_attn.v_proj"].specs["d"].alpha == 3
    torch.testing.assert_close(_logits(model, ids), _logits(pm, ids), rtol=1e-5, atol=1e-5)


def test_mixed_batch_matches_each_row_alone_in_peft(tiny_llama, ids):
    model, base = tiny_llama(), tiny_llama()
    reference = base
    runs = {}
    # A LoRA adapter first (layers become LoRALinear, then are converted in place), then
    # two DoRA adapters of other ranks (one with a rank pattern), one on fewer layers.
    pm_l, state, config = _peft_dora(base, seed=2, r=8, alpha=16, use_dora=False)
    lora_ext.load_adapter(model, state, "l", config=config)
    runs["l"] = pm_l
    a_before = [m.lora_A["l"] for _, m in lora_layers(model)]
    pm_1, state, config = _peft_dora(base, seed=3, r=4)
    lora_ext.load_adapter(model, state, "d1", config=config)
    runs["d1"] = pm_1
    assert [m.lora_A["l"] for _, m in lora_layers(model)] == a_before  # the same Parameter objects
    pm_2, state, config = _peft_dora(base, seed=4, r=2, targets=["q_proj", "down_proj"])
    lora_ext.load_adapter(model, state, "d2", config=config)
    runs["d2"] = pm_2
    names = ["d1", None, "l", "d2"]
    got = _logits(model, ids, names)
    for row, name in enumerate(names):
        alone = _logits(runs[name] if name else reference, ids[row : row + 1])
        torch.testing.assert_close(got[row : row + 1], alone, rtol=1e-5, atol=1e-5)
    # The inference op and the autograd route agree.
    for _, m in lora_layers(model):
        for p in m.parameters():
            p.requires_grad_(m.lora_A.get("d1") is p or m.lora_magnitude_vector.get("d1") is p)
    with lora_ext.use_adapter(model, names):
        torch.testing.assert_close(model(ids).logits, got, rtol=1e-5, atol=1e-5)


def test_training_step_matches_peft(tiny_llama, ids):
    model, base = tiny_llama(), tiny_llama()
    pm, state, config = _peft_dora(base, seed=5)
    lora_ext.load_adapter(model, state, "d", config=config)
    for _, m in lora_layers(model):
        for p in m.adapter_parameters("d"):
            p.requires_grad_(True)
    model.train(), pm.train()
    labels = ids.clone()
    loss = model(ids, labels=labels).loss
    loss.backward()
    ref_loss = pm(ids, labels=labels).loss
    ref_loss.backward()
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    ref_grads = {n: p.grad for n, p in pm.named_parameters() if p.grad is not None}
    checked = 0
    for path, m in lora_layers(model):
        for which, p in (("lora_A", m.lora_A["d"]), ("lora_B", m.lora_B["d"]),
                         ("lora_magnitude_vector", m.lora_magnitude_vector["d"])):
            suffix = f"{path}.{which}.default.weight"
            (ref,) = [g for n, g in ref_grads.items() if n.endswith(suffix)]
            torch.testing.assert_close(p.grad, ref, rtol=1e-4, atol=1e-6)
            checked += 1
    assert checked == 3 * len(lora_layers(model))


def test_training_with_dropout_matches_peft(tiny_llama, ids):
    """PEFT's dropout form (W x + bias + (g - 1) W d(x) + g s B A d(x)): the same dropout
    masks on both sides (one draw per adapted layer, in module order, from one seed)."""
    model, base = tiny_llama(), tiny_llama()
    pm, state, config = _peft_dora(base, seed=13, dropout=0.3)
    lora_ext.load_adapter(model, state, "d", config=config)
    for _, m in lora_layers(model):
        for p in m.adapter_parameters("d"):
            p.requires_grad_(True)
    model.train(), pm.train()
    torch.manual_seed(123)
    loss = model(ids, labels=ids).loss
    torch.manual_seed(123)
    ref_loss = pm(ids, labels=ids).loss
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    loss.backward(), ref_loss.backward()
    layer = dict(lora_layers(model))["model.layers.0.mlp.down_proj"]
    ref = dict(pm.named_parameters())["base_model.model.model.layers.0.mlp.down_proj.lora_magnitude_vector.default.weight"]
    torch.testing.assert_close(layer.lora_magnitude_vector["d"].grad, ref.grad, rtol=1e-4, atol=1e-6)
    torch.manual_seed(124)
    assert not torch.equal(model(ids, labels=ids).loss, loss)  # the masks do change


def test_training_mixed_batch_gradients_match_rows_alone(tiny_llama, ids):
    """A mixed DoRA/LoRA batch with autograd: each adapter's gradient equals PEFT's for its rows."""
    model, base = tiny_llama(), tiny_llama()
    pm_1, state, config = _peft_dora(base, seed=6)
    lora_ext.load_adapter(model, state, "d1", config=config)
    pm_l, state, config = _peft_dora(base, seed=7, use_dora=False)
    lora_ext.load_adapter(model, state, "l", config=config)
    for _, m in lora_layers(model):
        for name in ("d1", "l"):
            for p in m.adapter_parameters(name):
                p.requires_grad_(True)
    names = ["d1", "l", None, "d1"]
    with lora_ext.use_adapter(model, names):
        logits = model(ids).logits
    logits.sum().backward()
    pm_1(ids[[0, 3]]).logits.sum().backward()
    layer = dict(lora_layers(model))["model.layers.1.self_attn.q_proj"]
    ref = dict(pm_1.named_parameters())
    prefix = "base_model.model.model.layers.1.self_attn.q_proj."
    torch.testing.assert_close(layer.lora_magnitude_vector["d1"].grad,
                               ref[prefix + "lora_magnitude_vector.default.weight"].grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(layer.lora_A["d1"].grad, ref[prefix + "lora_A.default.weight"].grad,
                               rtol=1e-4, atol=1e-6)


def test_merge_matches_peft_and_unmerges_exactly(tiny_llama, ids):
    model, base = tiny_llama(), tiny_llama()
    pm, state, config = _peft_dora(base, seed=8)
    lora_ext.load_adapter(model, state, "d", config=config)
    pm_l, state, config = _peft_dora(base, seed=9, use_dora=False)
    lora_ext.load_adapter(model, state, "l", config=config, select=False)
    weights = {n: m.weight.detach().clone() for n, m in lora_layers(model)}
    expected = _logits(model, ids)
    lora_ext.merge_adapter(model, "d")
    merged = pm.merge_and_unload()
    torch.testing.assert_close(_logits(model, ids), _logits(merged, ids), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(_logits(model, ids), expected, rtol=1e-5, atol=1e-5)
    lora_ext.unmerge_adapter(model)
    for n, m in lora_layers(model):
        assert torch.equal(m.weight, weights[n]), n
    torch.testing.assert_close(_logits(model, ids, "l"), _logits(pm_l, ids), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(_logits(model, ids), expected, rtol=0, atol=0)
    # Merging the LoRA adapter changes W: the DoRA row scales follow after the unmerge.
    lora_ext.merge_adapter(model, "l")
    lora_ext.unmerge_adapter(model)
    torch.testing.assert_close(_logits(model, ids, "d"), expected, rtol=0, atol=0)


def test_base_weight_change_refreshes_row_scales(tiny_llama, ids):
    model, base = tiny_llama(), tiny_llama()
    pm, state, config = _peft_dora(base, seed=10)
    lora_ext.load_adapter(model, state, "d", config=config)
    layer = dict(lora_layers(model))["model.layers.0.self_attn.q_proj"]
    ref_layer = pm.get_submodule("base_model.model.model.layers.0.self_attn.q_proj").base_layer
    with torch.no_grad():
        layer.weight.mul_(1.5)
        ref_layer.weight.mul_(1.5)
    torch.testing.assert_close(_logits(model, ids), _logits(pm, ids), rtol=1e-5, atol=1e-5)


def test_save_load_round_trip_with_peft(tiny_llama, tmp_path, ids):
    from peft import PeftModel

    model, base = tiny_llama(), tiny_llama()
    lora_ext.inject_lora(model, TARGETS, r=4, alpha=8, adapter_name="t", use_dora=True, init="gaussian")
    assert all(m.lora_magnitude_vector["t"].requires_grad for _, m in lora_layers(model))
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for _, m in lora_layers(model):
            for p in m.adapter_parameters("t"):
                p.add_(torch.randn(p.shape, generator=g) * 0.2)
    lora_ext.save_adapter(model, tmp_path, "t")
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["use_dora"] is True
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    assert tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector"].shape == (32,)
    expected = _logits(model, ids)
    # PEFT reads what lora_ext writes...
    pm = PeftModel.from_pretrained(tiny_llama(), tmp_path).eval()
    torch.testing.assert_close(_logits(pm, ids), expected, rtol=1e-5, atol=1e-5)
    # ... and lora_ext reads what PEFT writes.
    pm.save_pretrained(tmp_path / "peft")
    fresh = tiny_llama()
    lora_ext.load_adapter(fresh, tmp_path / "peft", "p")
    torch.testing.assert_close(_logits(fresh, ids), expected, rtol=1e-5, atol=1e-5)
    # Replacing it with other DoRA weights: the new outputs (as if loaded fresh).
    pm2, state, cfg = _peft_dora(tiny_llama(), seed=12)
    lora_ext.load_adapter(fresh, state, "p", config=cfg, replace=True)
    torch.testing.assert_close(_logits(fresh, ids), _logits(pm2, ids), rtol=1e-5, atol=1e-5)


def test_many_adapters_pool_and_delete(tiny_llama, ids):
    model, base = tiny_llama(), tiny_llama()
    runs = {}
    for i in range(6):
        pm, state, config = _peft_dora(base, seed=20 + i, use_dora=i % 2 == 0)
        lora_ext.load_adapter(model, state, f"a{i}", config=config)
        runs[f"a{i}"] = pm
    lora_ext.delete_adapter(model, "a2")
    pm, state, config = _peft_dora(base, seed=40)
    lora_ext.load_adapter(model, state, "late", config=config)  # reuses a2's slot
    runs["late"] = pm
    names = ["a0", "late", "a3", "a4"]
    got = _logits(model, ids, names)
    for row, name in enumerate(names):
        torch.testing.assert_close(got[row : row + 1], _logits(runs[name], ids[row : row + 1]), rtol=1e-5, atol=1e-5)
    # Copies and moves rebuild the stacks from the parameters.
    clone = copy.deepcopy(model)
    torch.testing.assert_close(_logits(clone, ids, names), got, rtol=0, atol=0)
    doubled = copy.deepcopy(model).double()
    torch.testing.assert_close(_logits(doubled, ids, names).float(), got, rtol=1e-5, atol=1e-5)


def test_pool_serves_dora_and_lora(tiny_llama, ids):
    model, base = tiny_llama(), tiny_llama()
    pool = lora_ext.AdapterPool(model, max_resident=2)
    runs = {}
    for i in range(3):
        pm, state, config = _peft_dora(base, seed=80 + i, use_dora=i != 1)
        pool.add(f"p{i}", state, config=config)
        runs[f"p{i}"] = pm
    for names in (["p0", "p1", None, "p0"], ["p2", "p2", "p1", None], ["p0", "p2", "p0", "p2"]):
        pool.set_adapter(names)
        got = _logits(model, ids)
        for row, name in enumerate(names):
            ref = _logits(runs[name] if name else base, ids[row : row + 1])
            torch.testing.assert_close(got[row : row + 1], ref, rtol=1e-5, atol=1e-5)


def test_compiled_model_does_not_recompile(tiny_llama, ids):
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    model, base = tiny_llama(), tiny_llama()
    for i, dora in enumerate([True, False, True]):
        _, state, config = _peft_dora(base, seed=50 + i, use_dora=dora)
        lora_ext.load_adapter(model, state, f"a{i}", config=config)
    lora_ext.reserve_adapters(model, 8, max_rank=8)
    counter = CompileCounter()
    compiled = torch.compile(model, backend=counter)
    with torch.no_grad():
        for names in (["a0", "a1", None, "a2"], ["a2", "a2", "a0", None], ["a1"] * 4):
            lora_ext.set_adapter(model, names)
            torch.testing.assert_close(compiled(ids).logits, model(ids).logits, rtol=1e-5, atol=1e-5)
        _, state, config = _peft_dora(base, seed=60)
        lora_ext.load_adapter(model, state, "a0", config=config, replace=True)
        lora_ext.load_adapter(model, state, "new", config=config)
        lora_ext.set_adapter(model, ["new", "a1", "a0", None])
        torch.testing.assert_close(compiled(ids).logits, model(ids).logits, rtol=1e-5, atol=1e-5)
    assert counter.frame_count == 1, counter.frame_count


class _OtherLinear(nn.Linear):
    """A module type whose layer kind carries no DoRA adapters."""


class _OtherKind(lora_ext.LoRALinear):
    pass


register_layer_kind(_OtherLinear, _OtherKind)


def _snapshot(model):
    return ({k: v.detach().clone() for k, v in model.state_dict().items()},
            [type(m).__name__ for m in model.modules()], lora_ext.list_adapters(model))


def test_bad_dora_input_changes_nothing(tiny_llama):
    model, base = tiny_llama(), tiny_llama()
    _, state, config = _peft_dora(base, seed=70, use_dora=False)
    lora_ext.load_adapter(model, state, "l", config=config)
    _, state, config = _peft_dora(base, seed=71)
    before = _snapshot(model)

    def unchanged():
        now = _snapshot(model)
        assert now[1:] == before[1:]
        assert now[0].keys() == before[0].keys() and all(torch.equal(now[0][k], v) for k, v in before[0].items())

    key = "base_model.model.model.layers.1.mlp.down_proj.lora_magnitude_vector"
    for bad, match in [
        ({key: state[key][:-1]}, "lora_magnitude_vector of shape \\[32\\]"),
        ({key: state[key].clone().fill_(float("nan"))}, "non-finite"),
    ]:
        with pytest.raises(ValueError, match=match):
            lora_ext.load_adapter(model, {**state, **bad}, "d", config=config)
        unchanged()
    missing = {k: v for k, v in state.items() if k != key}
    with pytest.raises(ValueError, match="has no lora_magnitude_vector"):
        lora_ext.load_adapter(model, missing, "d", config=config)
    with pytest.raises(ValueError, match="does not set use_dora"):
        lora_ext.load_adapter(model, state, "d", config={**config, "use_dora": False})
    unchanged()
    # A DoRA replacement of a LoRA adapter is refused.
    with pytest.raises(ValueError, match="between LoRA and DoRA"):
        lora_ext.load_adapter(model, state, "l", config=config, replace=True)
    unchanged()
    # A layer kind that cannot carry DoRA.
    other = nn.Sequential(_OtherLinear(8, 8))
    with pytest.raises(ValueError, match="cannot carry dora adapters"):
        lora_ext.inject_lora(other, ["0"], r=2, use_dora=True)
    assert type(other[0]) is _OtherLinear


@pytest.mark.slow
def test_w15_benchmark_tiny(tmp_path):
    """benchmarks/run.py's W15 kernel part runs at tiny sizes and agrees with PEFT's DoRA."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run(
        [sys.executable, str(root / "benchmarks" / "run.py"), "--tiny", "--device", "cpu",
         "--workloads", "W15-ops", "--out", str(tmp_path)], capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    results = json.loads((tmp_path / "latest.json").read_text())["results"]
    assert {r["workload"] for r in results} == {"W15-W1", "W15-W3", "W15-norm"}
    assert all(r["check_ok"] for r in results)

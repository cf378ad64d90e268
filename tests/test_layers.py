"""LoRALinear on its own: forward against float64 references, stacks, gradients, dropout."""

import gc
import math
import weakref

import pytest
import torch
from torch import nn

import lora_ext
from lora_ext import LoRALinear

from conftest import assert_close_to_ref


def _layer(dtype=torch.float32, in_f=24, out_f=20, bias=True, seed=0, device="cpu"):
    torch.manual_seed(seed)
    return LoRALinear(nn.Linear(in_f, out_f, bias=bias).to(device, dtype))


def _add(layer, name, r, alpha, **kw):
    """Add an adapter with random (non-zero) B, so its contribution shows."""
    layer.add_adapter(name, r=r, alpha=alpha, **kw)
    with torch.no_grad():
        layer.lora_B[name].normal_()
    return layer


def _ref(layer, x, name):
    """float64 reference of one row set through one adapter (None: base)."""
    w = layer.base_layer.weight.double()
    y = x.double() @ w.T
    if layer.base_layer.bias is not None:
        y = y + layer.base_layer.bias.double()
    if name is not None:
        a, b = layer.lora_A[name].double(), layer.lora_B[name].double()
        y = y + layer.specs[name].scale * (x.double() @ a.T) @ b.T
    return y


@pytest.mark.parametrize("use_rslora", [False, True], ids=["plain", "rslora"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_single_adapter_matches_reference(device, dtype, use_rslora, bias):
    layer = _add(_layer(dtype, bias=bias, device=device), "a", r=6, alpha=12, use_rslora=use_rslora)
    expected = 12 / math.sqrt(6) if use_rslora else 12 / 6
    assert layer.specs["a"].scale == pytest.approx(expected)
    x = torch.randn(3, 5, 24).to(device, dtype)
    with torch.no_grad(), lora_ext.use_adapter(layer, "a"):
        y = layer(x)
    assert y.dtype == dtype
    assert_close_to_ref(y, _ref(layer, x, "a"), dtype, "lora_linear path")
    with torch.no_grad(), lora_ext.use_adapter(layer, None):
        assert_close_to_ref(layer(x), _ref(layer, x, None), dtype, "base path")


def test_peft_initialisation():
    layer = _layer(in_f=400, out_f=30)
    layer.add_adapter("a", r=16, alpha=16)
    layer.add_adapter("g", r=16, alpha=16, init="gaussian")
    assert torch.count_nonzero(layer.lora_B["a"]) == 0
    assert torch.count_nonzero(layer.lora_B["g"]) == 0
    bound = 1 / math.sqrt(400)  # kaiming_uniform_(a=sqrt(5)) on fan_in 400
    a = layer.lora_A["a"]
    assert a.abs().max() <= bound and a.abs().max() > 0.9 * bound
    assert layer.lora_A["g"].std().item() == pytest.approx(1 / 16, rel=0.1)
    with pytest.raises(ValueError, match="init"):
        layer.add_adapter("z", init="orthogonal")
    with pytest.raises(ValueError, match="adapter name"):
        layer.add_adapter("has.dot")
    with pytest.raises(ValueError, match="reserved"):
        layer.add_adapter("half")
    with pytest.raises(ValueError, match="already exists"):
        layer.add_adapter("a")
    with pytest.raises(TypeError):
        LoRALinear(nn.Conv1d(3, 3, 1))


def test_mixed_batch_matches_per_row(device, dtype):
    layer = _layer(dtype, device=device)
    for name, r, alpha in (("a", 2, 4), ("b", 8, 8), ("c", 5, 20)):
        _add(layer, name, r, alpha)
    a_stack, b_stack, scales, ranks = layer.stacks()
    slots = [layer.slot(n) for n in "abc"]
    assert a_stack.shape[1:] == (8, 24) and b_stack.shape[1:] == (20, 8) and a_stack.shape[0] >= 3
    assert ranks[slots].tolist() == [2, 8, 5] and scales[slots].tolist() == pytest.approx([2.0, 1.0, 4.0])
    assert torch.count_nonzero(a_stack[slots[0], 2:]) == 0  # zero padded beyond each rank
    names = ["c", None, "a", "b", "a"]
    x = torch.randn(len(names), 4, 24).to(device, dtype)
    with torch.no_grad(), lora_ext.use_adapter(layer, names):
        y = layer(x)
    for i, name in enumerate(names):
        assert_close_to_ref(y[i], _ref(layer, x[i], name), dtype, f"row {i} ({name})")


def test_parameters_are_views_of_the_slot_stacks():
    layer = _add(_add(_layer(), "a", 4, 8), "b", 2, 2)
    a_stack, b_stack, scales, ranks = layer.stacks()
    sa, sb = layer.slot("a"), layer.slot("b")
    # one copy: the parameters live inside the stacks the kernels read
    assert layer.lora_A["b"].data_ptr() == a_stack[sb].data_ptr()
    assert layer.lora_B["b"].untyped_storage().data_ptr() == b_stack.untyped_storage().data_ptr()
    with torch.no_grad():
        layer.lora_B["b"].mul_(2)  # an in-place update is what the next forward reads
    torch.testing.assert_close(b_stack[sb, :, :2], layer.lora_B["b"])
    assert torch.count_nonzero(b_stack[sb, :, 2:]) == 0
    before = {n: (layer.lora_A[n].detach().clone(), layer.lora_B[n].detach().clone()) for n in "ab"}
    params = (layer.lora_A["a"], layer.lora_B["a"])
    layer.add_adapter("c", r=7)  # a larger rank re-allocates: same Parameter objects, re-pointed
    a_stack = layer.stacks()[0]
    assert a_stack.shape[1] == 7 and layer.lora_A["a"] is params[0] and layer.lora_B["a"] is params[1]
    assert layer.lora_A["a"].data_ptr() == a_stack[sa].data_ptr()
    for n, (a, b) in before.items():
        assert torch.equal(layer.lora_A[n], a) and torch.equal(layer.lora_B[n], b)
    # to(), deepcopy: the parameters are converted one by one, the stacks rebuilt from them
    import copy
    twin = copy.deepcopy(layer).double()
    assert twin.stacks()[0].dtype == torch.float64
    assert twin.lora_A["a"].data_ptr() == twin.stacks()[0][twin.slot("a")].data_ptr()
    x = torch.randn(3, 24, dtype=torch.float64)
    with torch.no_grad(), lora_ext.use_adapter(twin, ["a", "b", "c"]):
        y = twin(x)
    for i, n in enumerate("abc"):
        torch.testing.assert_close(y[i], _ref(twin, x[i], n))


@pytest.mark.parametrize("mixed", [False, True], ids=["one_adapter", "mixed_batch"])
def test_gradients_reach_adapter_parameters(mixed):
    torch.manual_seed(1)
    layer = _add(_add(_layer(), "a", 3, 6), "b", 5, 5)
    names = ["a", "b", None, "a"] if mixed else "a"
    x = torch.randn(4, 3, 24, requires_grad=True)
    target = torch.randn(4, 3, 20)
    with lora_ext.use_adapter(layer, names):
        ((layer(x) - target) ** 2).sum().backward()
    # float64 reference through plain autograd
    params = {k: p.detach().double().requires_grad_(True) for k, p in layer.named_parameters()}
    xr = x.detach().double().requires_grad_(True)
    rows = names if mixed else ["a"] * 4
    outs = []
    for i, name in enumerate(rows):
        y = xr[i] @ params["base_layer.weight"].T + params["base_layer.bias"]
        if name is not None:
            a, b = params[f"lora_A.{name}"], params[f"lora_B.{name}"]
            y = y + layer.specs[name].scale * (xr[i] @ a.T) @ b.T
        outs.append(y)
    ((torch.stack(outs) - target.double()) ** 2).sum().backward()
    assert layer.base_layer.weight.grad is None  # frozen
    for key, p in layer.named_parameters():
        if key.startswith("lora_"):
            ref = params[key].grad
            if not mixed and ".b" in key:
                assert p.grad is None or torch.count_nonzero(p.grad) == 0
                continue
            assert p.grad is not None, key
            torch.testing.assert_close(p.grad.double(), ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(x.grad.double(), xr.grad, rtol=1e-4, atol=1e-4)


def test_dropout_applies_to_lora_path_only():
    layer = _add(_layer(), "a", 4, 8, dropout=0.5)
    x = torch.randn(6, 24)
    lora_ext.set_adapter(layer, "a")
    layer.train()
    torch.manual_seed(7)
    y = layer(x)
    torch.manual_seed(7)
    xd = torch.nn.functional.dropout(x, 0.5, training=True)
    a, b = layer.lora_A["a"].detach(), layer.lora_B["a"].detach()
    expected = layer.base_layer(x) + 2.0 * (xd @ a.T) @ b.T
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)
    # Mixed batch in training: still a dropout on the LoRA path, base untouched.
    layer.add_adapter("b", r=2)  # B zero: rows on "b" give exactly the base output
    with lora_ext.use_adapter(layer, ["b", "a", None]):
        y = layer(x[:3])
    torch.testing.assert_close(y[0], layer.base_layer(x[0]), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(y[2], layer.base_layer(x[2]), rtol=1e-6, atol=1e-6)
    layer.eval()  # no dropout in eval: same as the reference
    with torch.no_grad():
        assert_close_to_ref(layer(x), _ref(layer, x, "a"), torch.float32)


def test_delete_adapter_frees_memory():
    layer = _add(_add(_layer(), "a", 4, 8), "b", 4, 8)
    lora_ext.set_adapter(layer, ["a", "b"])
    with torch.no_grad():
        layer(torch.randn(2, 24))  # builds the stacks
    refs = [weakref.ref(layer.lora_A["a"]), weakref.ref(layer.lora_B["a"])]
    slot = layer.slot("a")
    lora_ext.delete_adapter(layer, "a")
    gc.collect()
    assert all(r() is None for r in refs)
    a_stack, b_stack, scales, ranks = layer.stacks()  # the slot is empty, and reused next
    assert torch.count_nonzero(a_stack[slot]) == 0 and scales[slot] == 0 and ranks[slot] == 1
    layer.add_adapter("a2", r=4)
    assert layer.slot("a2") == slot
    lora_ext.delete_adapter(layer, "a2")
    assert layer.adapter_names == ["b"] and lora_ext.list_adapters(layer) == ["b"]
    with torch.no_grad():  # the row that used "a" now gets the base model
        x = torch.randn(2, 24)
        assert_close_to_ref(layer(x)[0], _ref(layer, x[0], None), torch.float32)
        assert_close_to_ref(layer(x)[1], _ref(layer, x[1], "b"), torch.float32)
    with pytest.raises(ValueError, match="no adapter"):
        lora_ext.delete_adapter(layer, "a")


def test_load_state_dict_keeps_one_copy():
    layer = _add(_add(_layer(), "a", 4, 8), "b", 2, 2)
    state = {k: torch.randn_like(v) for k, v in layer.state_dict().items()}
    x = torch.randn(2, 24)
    for assign in (False, True):
        layer.load_state_dict(state, assign=assign)
        assert layer.shares_storage(), assign
        torch.testing.assert_close(layer.lora_B["b"], state["lora_B.b"])
        with torch.no_grad(), lora_ext.use_adapter(layer, ["a", "b"]):
            y = layer(x)
        torch.testing.assert_close(y[1], _ref(layer, x[1], "b").float())

"""Merging in place cannot corrupt silently: exact unmerge verifies before it writes,
arguments that share memory with the weight are refused, and weights whose rows are
strided (a column slice of a wider matrix) are merged where they lie."""

from __future__ import annotations

import copy
import os
import subprocess
import sys

import pytest
import torch

from conftest import DTYPES, assert_close_to_ref
import lora_ext
from lora_ext import ops
from test_ops import make_merge


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view({1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def _merged(device, dtype, out=40, d_in=70, r=6, tiny_rows=0):
    w, a, b = make_merge(out, d_in, r, device, dtype)
    w[:tiny_rows] *= 1e-6  # |w| far below |d|: corrections that do not fit in int8
    original = w.clone()
    residual = torch.empty(w.shape, dtype=torch.int8, device=device)
    overflow = ops.merge_exact_(w, a, b, 0.75, residual)
    return original, w, a, b, residual, overflow


def _refused(w, a, b, scale, residual, overflow, match="not what merge_exact_ produced"):
    before = w.clone()
    with pytest.raises(RuntimeError, match=match):
        ops.unmerge_exact_(w, a, b, scale, residual, *overflow)
    assert torch.equal(_bits(w), _bits(before)), "weight changed by a refused unmerge"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_exact_unmerge_refuses_a_weight_changed_since_the_merge(device, dtype):
    """The check is per element: a changed value is caught when undoing and redoing the
    merge does not give it back, which a change to a row (an optimizer step, a load)
    all but certainly hits; a lone element changed to a value that happens to be
    consistent with its correction is not caught."""
    original, w, a, b, residual, overflow = _merged(device, dtype)
    w[3] += torch.linspace(0.01, 0.7, w.shape[1], device=device).to(dtype)  # an optimizer step
    _refused(w, a, b, 0.75, residual, overflow)
    original2, w2, a2, b2, residual2, overflow2 = _merged(device, dtype)
    ops.merge_(w2, a2, b2, 0.1)  # a second merge on top
    _refused(w2, a2, b2, 0.75, residual2, overflow2)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_exact_unmerge_refuses_other_factors_scale_or_residual(device, dtype):
    original, w, a, b, residual, overflow = _merged(device, dtype)
    _refused(w, a, b * 1.5, 0.75, residual, overflow)
    _refused(w, a, b, 0.5, residual, overflow)
    other = residual.clone()
    other[0, :4] += 1
    _refused(w, a, b, 0.75, other, overflow)
    ops.unmerge_exact_(w, a, b, 0.75, residual, *overflow)  # the right record still works
    assert torch.equal(_bits(w), _bits(original))


def test_exact_unmerge_checks_the_overflow_elements_too(device):
    original, w, a, b, residual, (index, values) = _merged(device, torch.bfloat16, tiny_rows=4)
    assert index.numel() > 0, "the case needs overflow elements"
    flat = w.view(-1)
    kept = flat[index[0]].clone()
    flat[index[0]] = kept * 2 + 1
    _refused(w, a, b, 0.75, residual, (index, values))
    flat[index[0]] = kept
    _refused(w, a, b, 0.75, residual, (index[1:], values[1:]))  # a lost overflow entry
    # Order of the overflow list does not matter.
    perm = torch.randperm(index.numel(), device=index.device)
    ops.unmerge_exact_(w, a, b, 0.75, residual, index[perm], values[perm])
    assert torch.equal(_bits(w), _bits(original))


_ACROSS_ISAS = """
import sys, torch, lora_ext
from lora_ext import ops
step, path = sys.argv[1], sys.argv[2]
if step == "merge":
    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, 96, generator=g).bfloat16()
    a, b = torch.randn(8, 96, generator=g).bfloat16(), torch.randn(64, 8, generator=g).bfloat16()
    original = w.clone()
    residual = torch.empty(w.shape, dtype=torch.int8)
    overflow = ops.merge_exact_(w, a, b, 0.75, residual)
    torch.save((original, w, a, b, residual, overflow), path)
else:
    original, w, a, b, residual, overflow = torch.load(path)
    before = w.clone()
    try:
        ops.unmerge_exact_(w, a, b, 0.75, residual, *overflow)
    except RuntimeError as e:
        assert "not what merge_exact_ produced" in str(e), e
        assert torch.equal(w.view(torch.int16), before.view(torch.int16))
        print("refused")
    else:
        assert torch.equal(w.view(torch.int16), original.view(torch.int16))
        print("exact")
"""


@pytest.mark.parametrize("merge_isa, unmerge_isa", [("avx512bf16", "default"), ("default", "avx512bf16")])
def test_exact_unmerge_on_another_kernel_variant_is_exact_or_refused(tmp_path, merge_isa, unmerge_isa):
    """The bf16 dot-product merge rounds d differently from the plain one: undoing a
    merge with the other variant must restore every bit or refuse, never corrupt."""
    path = str(tmp_path / "merged.pt")
    outcomes = []
    for step, isa in (("merge", merge_isa), ("unmerge", unmerge_isa)):
        env = dict(os.environ, LORA_EXT_CPU_ISA=isa)
        proc = subprocess.run([sys.executable, "-c", _ACROSS_ISAS, step, path], env=env,
                              capture_output=True, text=True, timeout=300)
        if "is not supported by this CPU or build" in proc.stderr:
            pytest.skip(f"this CPU lacks {isa}")
        assert proc.returncode == 0, proc.stderr[-3000:]
        outcomes.append(proc.stdout.strip())
    assert outcomes[1] in ("exact", "refused"), outcomes
    print(f"merge on {merge_isa}, unmerge on {unmerge_isa}: {outcomes[1]}")


# ------------------------------------------------------------------ shared memory


def test_merge_refuses_factors_that_share_memory_with_the_weight(device):
    buffer = torch.randn(40 * 32 + 40 * 4, device=device)
    w = buffer[: 40 * 32].view(40, 32)
    before = w.clone()
    a_inside = buffer[10 : 10 + 4 * 32].view(4, 32)  # overlaps w's rows
    b = torch.randn(40, 4, device=device)
    for op in (ops.merge_, ops.unmerge_):
        with pytest.raises(RuntimeError, match=r"lora_a shares memory with weight.*lora_a\.clone\(\)"):
            op(w, a_inside, b, 1.0)
        with pytest.raises(RuntimeError, match="lora_b shares memory with weight"):
            op(w, torch.randn(4, 32, device=device), w[:, :4], 1.0)
    residual = w.view(torch.int8)[:, : 32].contiguous()  # a copy: fine
    shared_residual = buffer.view(torch.int8)[: 40 * 32].view(40, 32)
    with pytest.raises(RuntimeError, match="residual shares memory with weight"):
        ops.merge_exact_(w, torch.randn(4, 32, device=device), b, 1.0, shared_residual)
    assert torch.equal(w, before)
    # Disjoint parts of one buffer (a flat parameter store) are fine.
    b_after = buffer[40 * 32 :].view(40, 4)
    ops.merge_(w, torch.randn(4, 32, device=device), b_after, 1.0)
    del residual


# ------------------------------------------------------------------ strided rows


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_merge_into_a_column_slice_of_a_wider_weight(device, dtype):
    """Packed weights (fused QKV): merge into the columns one adapter covers, in place."""
    out, d_in, r, left, right = 33, 50, 5, 7, 11
    full = torch.randn(out, left + d_in + right, device=device).to(dtype)
    _, a, b = make_merge(out, d_in, r, device, dtype)
    before = full.clone()
    w = full[:, left : left + d_in]
    assert not w.is_contiguous()
    ops.merge_(w, a, b, 0.5)
    assert_close_to_ref(w, before[:, left : left + d_in].double() + 0.5 * (b.double() @ a.double()), dtype, "merge_")
    assert torch.equal(_bits(full[:, :left]), _bits(before[:, :left]))
    assert torch.equal(_bits(full[:, left + d_in :]), _bits(before[:, left + d_in :]))
    ops.unmerge_(w, a, b, 0.5)
    assert_close_to_ref(w, before[:, left : left + d_in].double(), dtype, "unmerge_")

    full = before.clone()
    w = full[:, left : left + d_in]
    w[:3] *= 1e-6  # some overflow elements, restored through the strided path
    snapshot = full.clone()
    residual = torch.empty(w.shape, dtype=torch.int8, device=device)
    overflow = ops.merge_exact_(w, a, b, 0.5, residual)
    ops.unmerge_exact_(w, a, b, 0.5, residual, *overflow)
    assert torch.equal(_bits(full), _bits(snapshot))


# ------------------------------------------------------------------ what a layer records


def _merged_layer(dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    layer = lora_ext.LoRALinear(torch.nn.Linear(48, 40).to(dtype))
    layer.add_adapter("a", r=4, alpha=8)
    layer.lora_B["a"].data.normal_()
    original = layer.weight.detach().clone()
    layer.merge("a")
    assert not torch.equal(_bits(layer.weight.detach()), _bits(original))
    return layer, original


def _unmerge_refused(layer, match):
    before = layer.weight.detach().clone()
    with pytest.raises(RuntimeError, match=match):
        layer.unmerge()
    assert torch.equal(_bits(layer.weight.detach()), _bits(before)), "weight changed by a refused unmerge"
    assert layer.merged_adapter == "a"


def _write_same_bits(layer):
    with torch.no_grad():
        layer.weight.add_(0.0)


def _load_own_state(layer):
    layer.load_state_dict(layer.state_dict())


def _optimizer_step_on_the_base(layer):
    layer.weight.requires_grad_(True)
    opt = torch.optim.SGD([layer.weight], lr=1e-3)
    layer(torch.randn(3, 48)).sum().backward()
    opt.step()
    layer.weight.requires_grad_(False)


@pytest.mark.parametrize("write", [_write_same_bits, _load_own_state, _optimizer_step_on_the_base],
                         ids=["same-bits", "load_state_dict", "optimizer-step"])
def test_layer_refuses_to_unmerge_a_weight_written_since_the_merge(write):
    """Even a write that keeps every bit is refused: the layer tracks the weight's version."""
    layer, _ = _merged_layer()
    write(layer)
    _unmerge_refused(layer, "written in place since the merge")
    layer.forget_merge()  # the way out: keep the weight as the new base
    assert layer.merged_adapter is None


def test_layer_refuses_to_unmerge_after_a_dtype_change():
    layer, _ = _merged_layer()
    layer.to(torch.float64)
    _unmerge_refused(layer, r"by cpu float32 \(cpu/.*\), but the weight is now on cpu float64")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_layer_refuses_to_unmerge_on_another_device():
    layer, _ = _merged_layer()
    layer.cuda()
    _unmerge_refused(layer, r"by cpu float32 .* now on cuda:0 float32 \(cuda\)")


def test_a_copied_merged_layer_unmerges_exactly():
    layer, original = _merged_layer(torch.bfloat16)
    twin = copy.deepcopy(layer)
    twin.unmerge()
    assert torch.equal(_bits(twin.weight.detach()), _bits(original))


_LAYER_ACROSS_ISAS = """
import sys, torch, lora_ext
torch.manual_seed(0)
layer = lora_ext.LoRALinear(torch.nn.Linear(48, 40).bfloat16())
layer.add_adapter("a", r=4, alpha=8)
layer.lora_B["a"].data.normal_()
layer.merge("a")
torch.save(layer, sys.argv[1])
"""


def test_layer_refuses_to_unmerge_a_merge_made_by_another_kernel_variant(tmp_path):
    here = ops.merge_variant(torch.zeros(1, dtype=torch.bfloat16))
    if here == "cpu/DEFAULT":
        pytest.skip("this CPU runs the default kernels only: no other variant to compare")
    path = str(tmp_path / "layer.pt")
    env = dict(os.environ, LORA_EXT_CPU_ISA="default")
    proc = subprocess.run([sys.executable, "-c", _LAYER_ACROSS_ISAS, path], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    layer = torch.load(path, weights_only=False)
    _unmerge_refused(layer, rf"by cpu bfloat16 \(cpu/DEFAULT\), but the weight is now on cpu bfloat16 \({here}\)")


def _merged_model(tiny_llama):
    """A tiny Llama with adapter "a" (q, v; random B) merged into every target."""
    model = tiny_llama()
    lora_ext.inject_lora(model, ["q_proj", "v_proj"], r=4, adapter_name="a", init="gaussian")
    for m in model.modules():
        if isinstance(m, lora_ext.LoRALinear):
            m.lora_B["a"].data.normal_()
    lora_ext.merge_adapter(model, "a")
    return model


def test_model_unmerge_refuses_before_any_layer_is_restored(tiny_llama):
    model = _merged_model(tiny_llama)
    merged = {k: v.clone() for k, v in model.state_dict().items()}
    last = model.model.layers[-1].self_attn.v_proj
    _write_same_bits(last)
    with pytest.raises(RuntimeError, match="written in place"):
        lora_ext.unmerge_adapter(model)
    for k, v in model.state_dict().items():
        assert torch.equal(_bits(v), _bits(merged[k])), k


def test_merge_variant_names_the_kernel(device):
    for dtype in DTYPES:
        w = torch.randn(3, 5, device=device, dtype=dtype)
        variant = ops.merge_variant(w)
        assert variant == "cuda" if device == "cuda" else variant.startswith("cpu/"), variant
        # test_aot_dispatch_* compare outputs with assert_close, which takes no str
        torch.library.opcheck(torch.ops.lora_ext.merge_variant.default, (w,),
                              test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


def test_model_unmerge_is_all_or_nothing_when_an_element_check_refuses(tiny_llama):
    """A write through .data bypasses the version check; the element check of the last
    layer refuses after earlier layers were restored: they are merged again."""
    model = _merged_model(tiny_llama)
    last = model.model.layers[-1].self_attn.v_proj
    last.weight.data[0, :] += 1.0
    merged = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(RuntimeError, match="not what merge_exact_ produced"):
        lora_ext.unmerge_adapter(model)
    for k, v in model.state_dict().items():
        assert torch.equal(_bits(v), _bits(merged[k])), k
    assert all(m.merged_adapter == "a" for m in model.modules() if isinstance(m, lora_ext.LoRALinear))


# ------------------------------------------------------------------ version counters


def test_in_place_ops_bump_the_version_autograd_checks():
    """A tensor saved for backward and then written by an in-place op: backward refuses."""
    g = torch.Generator().manual_seed(3)
    w, a, b = (torch.randn(*s, generator=g) for s in ((6, 5), (2, 5), (6, 2)))
    x = torch.randn(3, 5, generator=g, requires_grad=True)
    y = ops.lora_linear(x, w, None, a, b, 0.5)  # saves w for grad_x
    ops.merge_(w, a, b, 0.5)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()

    out = torch.randn(3, 6, generator=g)
    z = x.sum(1, keepdim=True) * out  # saves out
    ops.multi_lora_add_(out, x.detach(), a[None], b[None], torch.zeros(3, dtype=torch.int32), torch.ones(1))
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        z.sum().backward()


def test_layer_sees_a_direct_op_call_on_its_merged_weight():
    layer, _ = _merged_layer()
    a, b = layer.lora_A["a"].detach(), layer.lora_B["a"].detach()
    ops.merge_(layer.weight.detach(), a, b, 1.0)  # .detach() shares the version counter
    _unmerge_refused(layer, "written in place since the merge")

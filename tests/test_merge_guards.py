"""Merging in place cannot corrupt silently: exact unmerge verifies before it writes,
arguments that share memory with the weight are refused, and weights whose rows are
strided (a column slice of a wider matrix) are merged where they lie."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from conftest import DTYPES, assert_close_to_ref
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

"""Bad input: a clear error that names the problem, and nothing modified."""

import re

import pytest
import torch

from lora_ext import ops

from conftest import available_devices


def _multi_args(device="cpu", T=6, d_in=8, d_out=5, N=3, R=4):
    g = torch.Generator().manual_seed(0)
    return dict(
        x=torch.randn(T, d_in, generator=g).to(device),
        a_stack=torch.randn(N, R, d_in, generator=g).to(device),
        b_stack=torch.randn(N, d_out, R, generator=g).to(device),
        indices=torch.tensor([0, 1, 2, -1, 0, 1][:T], device=device),
        scales=torch.ones(N, device=device),
        ranks=torch.tensor([1, 4, 2], device=device),
        base=torch.randn(T, d_out, generator=g).to(device),
    )


MULTI_BAD = {
    # case: (changes to the arguments, text the error must contain)
    "x_not_2d": (dict(x=torch.randn(6, 8, 1)), "x must be 2-D"),
    "a_stack_in_mismatch": (dict(a_stack=torch.randn(3, 4, 9)), "a_stack.size(2)"),
    "b_stack_rank_mismatch": (dict(b_stack=torch.randn(3, 5, 3)), "b_stack.size(2)"),
    "b_stack_adapters_mismatch": (dict(b_stack=torch.randn(2, 5, 4)), "b_stack.size(0)"),
    "dtype_mismatch": (dict(a_stack=torch.randn(3, 4, 8, dtype=torch.float16)), "a_stack has dtype Half"),
    "integer_x": (dict(x=torch.ones(6, 8, dtype=torch.int32)), "x must be float32"),
    "index_too_large": (dict(indices=torch.tensor([0, 1, 3, -1, 0, 1])), "indices[2] = 3 is out of range"),
    "index_below_minus_one": (dict(indices=torch.tensor([0, -2, 0, 0, 0, 0])), "indices[1] = -2 is out of range"),
    "index_float": (dict(indices=torch.zeros(6)), "indices must be int32 or int64"),
    "indices_length": (dict(indices=torch.zeros(5, dtype=torch.long)), "indices.size(0)"),
    "rank_zero": (dict(ranks=torch.tensor([0, 4, 2])), "ranks[0] = 0 is out of range"),
    "rank_above_R": (dict(ranks=torch.tensor([1, 5, 2])), "ranks[1] = 5 is out of range"),
    "ranks_length": (dict(ranks=torch.tensor([1, 2])), "ranks.size(0)"),
    "scales_length": (dict(scales=torch.ones(4)), "scales.size(0)"),
    "scales_integer": (dict(scales=torch.ones(3, dtype=torch.long)), "scales must be a floating-point"),
    "base_shape": (dict(base=torch.randn(6, 4)), "base.size(1)"),
    "base_dtype": (dict(base=torch.randn(6, 5, dtype=torch.float64)), "base has dtype Double"),
}


@pytest.mark.parametrize("case", list(MULTI_BAD))
def test_multi_lora_rejects(case):
    changes, message = MULTI_BAD[case]
    args = {**_multi_args(), **changes}
    with pytest.raises(RuntimeError, match=re.escape(message)):
        ops.multi_lora(**args)


ADD_BAD = {
    # case: (changes to the arguments, text the error must contain)
    "y_rows": (dict(y=torch.randn(5, 5)), "multi_lora_add_: y.size(0)"),
    "y_cols": (dict(y=torch.randn(6, 4)), "multi_lora_add_: y.size(1)"),
    "y_dtype": (dict(y=torch.randn(6, 5, dtype=torch.float64)), "y has dtype Double"),
    "y_transposed": (dict(y=torch.randn(5, 6).t()), "y must have unit column stride"),
    "y_broadcast_rows": (dict(y=torch.randn(5).expand(6, 5)), "rows must not overlap"),
    "y_rows_overlap": (dict(y=torch.randn(20).as_strided((6, 5), (2, 1))), "rows must not overlap"),
    "index_too_large": (dict(indices=torch.tensor([0, 1, 3, -1, 0, 1])), "indices[2] = 3 is out of range"),
    "rank_above_R": (dict(ranks=torch.tensor([1, 5, 2])), "ranks[1] = 5 is out of range"),
    "a_stack_in_mismatch": (dict(a_stack=torch.randn(3, 4, 9)), "a_stack.size(2)"),
}


@pytest.mark.parametrize("case", list(ADD_BAD))
def test_multi_lora_add_rejects_and_leaves_y_untouched(case):
    changes, message = ADD_BAD[case]
    args = _multi_args()
    args["y"] = args.pop("base")
    args.update(changes)
    before = args["y"].clone()
    with pytest.raises(RuntimeError, match=re.escape(message)):
        ops.multi_lora_add_(**args)
    assert torch.equal(args["y"], before)


LINEAR_BAD = {
    "x_in_mismatch": (dict(x=torch.randn(4, 9)), "x.size(-1) (in) must equal weight.size(1)"),
    "lora_a_in_mismatch": (dict(lora_a=torch.randn(2, 9)), "lora_a.size(1)"),
    "lora_b_out_mismatch": (dict(lora_b=torch.randn(6, 2)), "lora_b.size(0)"),
    "lora_b_rank_mismatch": (dict(lora_b=torch.randn(5, 3)), "lora_b.size(1)"),
    "weight_not_2d": (dict(weight=torch.randn(5, 8, 1)), "weight must be 2-D"),
    "bias_shape": (dict(bias=torch.randn(4)), "bias.size(0)"),
    "dtype_mismatch": (dict(lora_b=torch.randn(5, 2, dtype=torch.bfloat16)), "lora_b has dtype BFloat16"),
    "scalar_x": (dict(x=torch.tensor(1.0)), "x must have shape"),
}


@pytest.mark.parametrize("case", list(LINEAR_BAD))
def test_lora_linear_rejects(case):
    changes, message = LINEAR_BAD[case]
    args = dict(x=torch.randn(4, 8), weight=torch.randn(5, 8), bias=torch.randn(5), lora_a=torch.randn(2, 8), lora_b=torch.randn(5, 2))
    args.update(changes)
    with pytest.raises(RuntimeError) as err:
        ops.lora_linear(args["x"], args["weight"], args["bias"], args["lora_a"], args["lora_b"], 1.0)
    assert message in str(err.value)


MERGE_BAD = {
    "lora_a_in_mismatch": (dict(lora_a=torch.randn(2, 9)), "lora_a.size(1)"),
    "lora_b_out_mismatch": (dict(lora_b=torch.randn(6, 2)), "lora_b.size(0)"),
    "rank_mismatch": (dict(lora_b=torch.randn(5, 3)), "lora_b.size(1)"),
    "dtype_mismatch": (dict(lora_a=torch.randn(2, 8, dtype=torch.float16)), "lora_a has dtype Half"),
    "lora_a_not_2d": (dict(lora_a=torch.randn(8)), "lora_a must be 2-D"),
}


@pytest.mark.parametrize("op", ["merge_", "unmerge_"])
@pytest.mark.parametrize("case", list(MERGE_BAD))
def test_merge_rejects_and_leaves_weight_untouched(op, case):
    changes, message = MERGE_BAD[case]
    args = dict(weight=torch.randn(5, 8), lora_a=torch.randn(2, 8), lora_b=torch.randn(5, 2))
    args.update(changes)
    before = args["weight"].clone()
    with pytest.raises(RuntimeError) as err:
        getattr(ops, op)(args["weight"], args["lora_a"], args["lora_b"], 1.0)
    assert message in str(err.value)
    assert torch.equal(args["weight"], before)


def test_merge_rejects_weight_without_unit_column_stride():
    weight = torch.randn(8, 5).t()  # columns 8 apart (strided rows are fine: test_merge_guards)
    before = weight.clone()
    with pytest.raises(RuntimeError, match="weight must have unit column stride"):
        ops.merge_(weight, torch.randn(2, 8), torch.randn(5, 2), 1.0)
    assert torch.equal(weight, before)


def test_exact_merge_rejects_bad_residual_and_overflow_list():
    weight, a, b = torch.randn(5, 8, dtype=torch.bfloat16), torch.randn(2, 8, dtype=torch.bfloat16), torch.randn(5, 2, dtype=torch.bfloat16)
    before = weight.clone()
    with pytest.raises(RuntimeError, match="residual must be int8"):
        ops.merge_exact_(weight, a, b, 1.0, torch.empty(5, 8, dtype=torch.uint8))
    with pytest.raises(RuntimeError, match="residual must have weight's shape"):
        ops.merge_exact_(weight, a, b, 1.0, torch.empty(5, 7, dtype=torch.int8))
    residual = torch.zeros(5, 8, dtype=torch.int8)
    with pytest.raises(RuntimeError, match="overflow_index values must be in"):
        ops.unmerge_exact_(weight, a, b, 1.0, residual, torch.tensor([40]), torch.zeros(1, dtype=torch.bfloat16))
    with pytest.raises(RuntimeError, match="overflow_values must be BFloat16"):
        ops.unmerge_exact_(weight, a, b, 1.0, residual, torch.tensor([3]), torch.zeros(1))
    assert torch.equal(weight, before)


@pytest.mark.skipif(len(available_devices()) < 2, reason="needs a second device (CUDA)")
def test_device_mismatch_is_named():
    args = _multi_args("cuda")
    args["scales"] = args["scales"].cpu()
    with pytest.raises(RuntimeError, match="scales is on cpu"):
        ops.multi_lora(**args)
    weight = torch.randn(5, 8, device="cuda")
    before = weight.clone()
    with pytest.raises(RuntimeError, match="lora_a is on cpu"):
        ops.merge_(weight, torch.randn(2, 8), torch.randn(5, 2, device="cuda"), 1.0)
    assert torch.equal(weight, before)

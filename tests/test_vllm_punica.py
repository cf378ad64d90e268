"""lora_ext's punica wrapper for vLLM against vLLM's own reference ops.

Needs vLLM (scripts/setup_vllm.sh); skipped where it is not installed.
"""

import os
import random

import pytest
import torch

pytest.importorskip("vllm", reason="vLLM not installed (run scripts/setup_vllm.sh)")

from vllm.lora.layers import LoRAMapping  # noqa: E402
from vllm.lora.ops import torch_ops  # noqa: E402
from vllm.lora.punica_wrapper.punica_cpu import PunicaWrapperCPU  # noqa: E402

from lora_ext.integrations import vllm as plugin  # noqa: E402

from conftest import assert_close_to_ref, id_formatter  # noqa: E402

VOCAB = 32000

# (hidden, rank, slots, output slices): plain, packed q/k/v and gate/up layers,
# ranks 1..256, 1..16 slots, odd sizes.
CASES = [
    (64, 1, 1, (48,)),
    (576, 8, 4, (576, 192, 192)),
    (576, 8, 4, (1536, 1536)),
    (1536, 8, 4, (576,)),
    (1000, 16, 16, (700, 300, 300)),
    (2048, 64, 8, (2048,)),
    (96, 256, 2, (80, 40)),
    (4096, 32, 16, (512,)),
    (33, 3, 5, (17, 9, 9)),
]


def _mapping(num_seqs, slots, prefill, rng, free_slot=None):
    """A batch where each sequence uses one of up to `slots` active LoRA ids, or none (0)."""
    ids = list(range(1, slots + 1))
    lora_index_to_id = [None] * slots
    for slot, lora_id in zip(rng.sample(range(slots), len(ids)), ids):
        lora_index_to_id[slot] = lora_id
    if slots > 1:  # a free slot, as in a live engine
        lora_index_to_id[rng.randrange(slots) if free_slot is None else free_slot] = None
    live = [i for i in lora_index_to_id if i is not None] + [0, 0]
    seq_ids = [0] + [rng.choice(live) for _ in range(num_seqs - 1)]  # at least one base row
    rng.shuffle(seq_ids)
    lengths = [rng.randint(1, 9) if prefill else 1 for _ in range(num_seqs)]
    index_mapping = [i for i, n in zip(seq_ids, lengths) for _ in range(n)]
    prompt_mapping = seq_ids if prefill else index_mapping
    return LoRAMapping(index_mapping, prompt_mapping, is_prefill=prefill), lora_index_to_id


def _stacks(hidden, rank, slots, output_slices, dtype, gen):
    a = tuple((torch.randn(slots, 1, rank, hidden, generator=gen) / hidden**0.5).to(dtype) for _ in output_slices)
    b = tuple((torch.randn(slots, 1, w, rank, generator=gen) / rank**0.5).to(dtype) for w in output_slices)
    return a, b


def _reference(wrapper, y, x, lora_a, lora_b, scale, output_slices):
    """float64 result of vLLM's torch ops over vLLM's own metadata.

    Those ops index the slot tensors with the row's slot, and Python reads slot -1 as
    the last slot; the reference appends an all-zero slot and points -1 rows at it, so
    rows without LoRA get nothing, as vLLM's GPU kernels and lora_ext do.
    """
    y64, x64 = y.double().clone(), x.double()

    def zero_slot(t):
        t = t.double()
        return torch.cat([t, torch.zeros_like(t[:1])])

    def to_zero_slot(idx, slots):
        return torch.where(idx < 0, torch.full_like(idx, slots), idx)

    offset = 0
    for a, b, width in zip(lora_a, lora_b, output_slices):
        slots = a.size(0)
        h = torch.zeros(x.size(0), a.size(2), dtype=torch.float64)
        if wrapper.is_prefill:  # vLLM's prefill metadata: runs of tokens sharing a slot
            starts, lengths, run_slots, batches, max_len, tokens = wrapper.prefill_metadata
            run_slots = to_zero_slot(run_slots, slots)
            torch_ops.sgmv_shrink(x64, zero_slot(a), h, starts, lengths, run_slots, batches, max_len, tokens, scale)
            torch_ops.sgmv_expand_slice(
                h, zero_slot(b), y64, starts, lengths, run_slots, batches, max_len, tokens, offset, width, True
            )
        else:
            idx = to_zero_slot(wrapper.token_lora_indices, slots)
            torch_ops.bgmv_shrink(x64, zero_slot(a), h, idx, scale)
            torch_ops.bgmv_expand_slice(h, zero_slot(b), y64, idx, offset, width, True)
        offset += width
    return y64


@pytest.mark.parametrize("case", CASES, ids=lambda c: "h{}_r{}_slots{}_out{}".format(c[0], c[1], c[2], "+".join(map(str, c[3]))))
@pytest.mark.parametrize("prefill", [False, True], ids=["decode", "prefill"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=id_formatter("dtype"))
def test_add_lora_linear_matches_vllm_reference(case, prefill, dtype):
    hidden, rank, slots, output_slices = case
    rng = random.Random(hash((case, prefill)) % 1000)
    gen = torch.Generator().manual_seed(rng.randrange(1 << 30))
    mapping, lora_index_to_id = _mapping(num_seqs=11, slots=slots, prefill=prefill, rng=rng)
    wrapper = plugin.LoRAExtPunicaWrapper(256, 32, "cpu")
    wrapper.update_metadata(mapping, lora_index_to_id, slots, VOCAB)
    num_tokens = len(mapping.index_mapping)
    assert wrapper.token_lora_indices.size(0) == num_tokens and (wrapper.token_lora_indices == -1).any()

    lora_a, lora_b = _stacks(hidden, rank, slots, output_slices, dtype, gen)
    x = torch.randn(num_tokens, hidden, generator=gen).to(dtype)
    y = torch.randn(num_tokens, sum(output_slices), generator=gen).to(dtype)
    expected = _reference(wrapper, y, x, lora_a, lora_b, 1.0, output_slices)
    before = y.clone()

    assert wrapper.add_lora_linear(y, x, lora_a, lora_b, 1.0, output_slices) is None
    assert_close_to_ref(y, expected, dtype, "add_lora_linear")
    no_lora = wrapper.token_lora_indices == -1
    assert torch.equal(y[no_lora], before[no_lora])


def test_matches_vllms_own_wrapper_and_scale():
    """Same answer as vLLM's PunicaWrapperCPU (when its last slot is free), scale included."""
    rng = random.Random(7)
    gen = torch.Generator().manual_seed(7)
    slots, output_slices = 6, (96, 32, 32)
    # The last slot free: vLLM's torch ops read slot -1 for rows without LoRA.
    mapping, lora_index_to_id = _mapping(num_seqs=9, slots=slots, prefill=True, rng=rng, free_slot=slots - 1)
    ours, theirs = plugin.LoRAExtPunicaWrapper(256, 32, "cpu"), PunicaWrapperCPU(256, 32, "cpu")
    for w in (ours, theirs):
        w.update_metadata(mapping, lora_index_to_id, slots, VOCAB)
    lora_a, lora_b = _stacks(80, 16, slots, output_slices, torch.float32, gen)
    for s in range(len(output_slices)):
        lora_a[s][-1].zero_()
        lora_b[s][-1].zero_()
    x = torch.randn(len(mapping.index_mapping), 80, generator=gen)
    y_ours = torch.randn(x.size(0), sum(output_slices), generator=gen)
    y_theirs = y_ours.clone()
    ours.add_lora_linear(y_ours, x, lora_a, lora_b, 0.5, output_slices)
    theirs.add_lora_linear(y_theirs, x, lora_a, lora_b, 0.5, output_slices)
    assert_close_to_ref(y_ours, y_theirs.double(), torch.float32)
    assert not torch.equal(y_ours, x.new_zeros(y_ours.shape))


def test_wrapper_is_the_platform_wrapper_subclass():
    assert issubclass(plugin.LoRAExtPunicaWrapper, PunicaWrapperCPU)
    assert plugin.LoRAExtPunicaWrapper.__qualname__ == "LoRAExtPunicaWrapper"


@pytest.mark.parametrize("value, expected", [(None, True), ("1", True), ("yes", True), ("0", False), (" 0 ", False)])
def test_env_switch(monkeypatch, value, expected):
    if value is None:
        monkeypatch.delenv(plugin.ENV_SWITCH, raising=False)
    else:
        monkeypatch.setenv(plugin.ENV_SWITCH, value)
    assert plugin.enabled() is expected


def test_register_names_our_wrapper_unless_switched_off(monkeypatch):
    from vllm.platforms import current_platform
    from vllm.lora.punica_wrapper.punica_selector import get_punica_wrapper

    # Start from the platform as vLLM ships it (an engine in this process may have
    # loaded the plugin already); monkeypatch restores everything afterwards.
    cpu_wrapper = "vllm.lora.punica_wrapper.punica_cpu.PunicaWrapperCPU"
    monkeypatch.setattr(type(current_platform), "get_punica_wrapper", classmethod(lambda cls: cpu_wrapper))
    monkeypatch.setattr(plugin, "_base_wrapper_qualname", None)

    monkeypatch.setenv(plugin.ENV_SWITCH, "0")
    plugin.register()
    assert current_platform.get_punica_wrapper() == cpu_wrapper
    assert type(get_punica_wrapper(64, 8, "cpu")) is PunicaWrapperCPU

    monkeypatch.delenv(plugin.ENV_SWITCH)
    plugin.register()
    plugin.register()  # vLLM may load plugins more than once per process
    assert current_platform.get_punica_wrapper() == "lora_ext.integrations.vllm.LoRAExtPunicaWrapper"
    assert type(get_punica_wrapper(64, 8, "cpu")) is plugin.LoRAExtPunicaWrapper


def test_import_lora_ext_does_not_import_vllm():
    import subprocess
    import sys

    code = "import sys, lora_ext; assert 'vllm' not in sys.modules, 'vllm imported'; print('ok')"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=dict(os.environ))
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr[-2000:]


def test_add_inputs_false_overwrites_and_other_dtypes_fall_back():
    """vLLM's dual-stream path passes add_inputs=False; LoRA weights in another dtype than
    the activations (vLLM's lora_dtype) take vLLM's own ops, with the same result."""
    rng = random.Random(3)
    gen = torch.Generator().manual_seed(3)
    slots, output_slices = 4, (64, 32)
    mapping, lora_index_to_id = _mapping(num_seqs=7, slots=slots, prefill=False, rng=rng, free_slot=slots - 1)
    wrapper = plugin.LoRAExtPunicaWrapper(256, 32, "cpu")
    wrapper.update_metadata(mapping, lora_index_to_id, slots, VOCAB)
    lora_a, lora_b = _stacks(48, 8, slots, output_slices, torch.float32, gen)
    x = torch.randn(len(mapping.index_mapping), 48, generator=gen)

    y = torch.randn(x.size(0), sum(output_slices), generator=gen)
    wrapper.add_lora_linear(y, x, lora_a, lora_b, 1.0, output_slices, add_inputs=False)
    assert_close_to_ref(y, _reference(wrapper, torch.zeros_like(y), x, lora_a, lora_b, 1.0, output_slices), torch.float32)

    a16 = tuple(t.to(torch.bfloat16) for t in lora_a)
    b16 = tuple(t.to(torch.bfloat16) for t in lora_b)
    for t in a16 + b16:  # the free slot vLLM's torch ops read for rows without LoRA
        t[-1].zero_()
    y = torch.randn(x.size(0), sum(output_slices), generator=gen)
    expected = _reference(wrapper, y, x, a16, b16, 1.0, output_slices)
    wrapper.add_lora_linear(y, x, a16, b16, 1.0, output_slices)
    assert_close_to_ref(y, expected, torch.float32)

"""LoRA over quantized bases (bitsandbytes NF4 and int8, torchao int8 weight-only),
against PEFT on the same bases: outputs, mixed rows, a training step, merge refusal,
the dequantized merge, bad adapters. Skipped with a reason when the quantization
libraries are absent (``pip install lora_ext[quant]``; the README's setup installs them)."""

import copy

import pytest
import torch
from torch import nn

import lora_ext
from lora_ext import AdapterPool, QuantizedLoRALinear, lora_layers
from lora_ext.apps.llm import quantize_model

from conftest import tiny_llama_model

peft = pytest.importorskip("peft", reason="PEFT is the reference")

TARGETS = ["q_proj", "v_proj", "o_proj", "down_proj"]
KINDS = ["bnb-nf4", "bnb-int8", "torchao-int8"]


# Test names of the bases -> lora_ext.apps.llm.quantize_model's methods, and their library.
METHOD = {"bnb-nf4": "nf4", "bnb-int8": "bnb-int8", "torchao-int8": "int8"}
LIBRARY = {"bnb-nf4": "bitsandbytes", "bnb-int8": "bitsandbytes", "torchao-int8": "torchao"}


def quantized_llama(kind: str, seed: int = 0) -> nn.Module:
    """A tiny random Llama whose decoder linears are quantized (embeddings and head stay float)."""
    pytest.importorskip(LIBRARY[kind], reason=f"{LIBRARY[kind]} not installed (pip install lora_ext[quant])")
    return quantize_model(tiny_llama_model(seed=seed), METHOD[kind])


def peft_pair(kind: str, tmp_path, names=("one", "two")):
    """PEFT over a quantized model with random adapters ``names`` saved to ``tmp_path``;
    lora_ext's own quantized copy with the same adapters loaded from those files."""
    torch.manual_seed(10)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=False)
    reference = peft.get_peft_model(quantized_llama(kind), config, adapter_name=names[0])
    for name in names[1:]:
        reference.add_adapter(name, peft.LoraConfig(r=2, lora_alpha=6, target_modules=TARGETS, init_lora_weights=False))
    reference.save_pretrained(tmp_path, selected_adapters=list(names))
    ours = quantized_llama(kind)
    for name in names:
        lora_ext.load_adapter(ours, tmp_path / name, name)
    return reference.eval(), ours.eval()


def _ids(rows=4, seq=6, seed=3):
    return torch.randint(3, 128, (rows, seq), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("kind", KINDS)
def test_layers_are_quantized_kind_and_no_float_copy(kind, tmp_path):
    _, ours = peft_pair(kind, tmp_path)
    layers = lora_layers(ours)
    assert len(layers) == 4 * 2 and all(isinstance(m, QuantizedLoRALinear) for _, m in layers)
    for _, m in layers:  # the base is the quantized module itself, not a dequantized copy
        assert type(m.base_layer) is not nn.Linear or type(m.base_layer.weight) is not nn.Parameter
        assert m.lora_A["one"].dtype == torch.float32
    assert "base=" in repr(layers[0][1])
    assert LIBRARY[kind] in layers[0][1].quantization


@pytest.mark.parametrize("kind", KINDS)
def test_one_adapter_and_mixed_rows_equal_peft(kind, tmp_path):
    reference, ours = peft_pair(kind, tmp_path)
    ids = _ids()
    with torch.no_grad():
        expected = {}
        for name in ("one", "two"):
            reference.set_adapter(name)
            expected[name] = reference(ids).logits
        with reference.disable_adapter():
            expected[None] = reference(ids).logits
        for name in ("one", "two", None):
            lora_ext.set_adapter(ours, name)
            torch.testing.assert_close(ours(ids).logits, expected[name], rtol=1e-4, atol=1e-4)
        rows = ["two", None, "one", "two"]
        lora_ext.set_adapter(ours, rows)
        mixed = ours(ids).logits
    for i, name in enumerate(rows):
        torch.testing.assert_close(mixed[i], expected[name][i], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "checkpointing"])
def test_training_step_equals_peft(kind, checkpointing, tmp_path):
    reference, ours = peft_pair(kind, tmp_path)
    ids = _ids(seed=5)
    reference.set_adapter("one")
    lora_ext.set_adapter(ours, "one")
    for _, m in lora_layers(ours):
        m.lora_A["one"].requires_grad_(True)
        m.lora_B["one"].requires_grad_(True)
    for model in (reference, ours):
        model.train()
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    loss_ref = reference(ids, labels=ids).loss
    loss_ref.backward()
    loss = ours(ids, labels=ids).loss
    loss.backward()
    torch.testing.assert_close(loss, loss_ref, rtol=1e-5, atol=1e-5)
    peft_layers = dict(reference.base_model.model.named_modules())
    for path, m in lora_layers(ours):
        theirs = peft_layers[path]
        for ours_p, their_p in ((m.lora_A["one"], theirs.lora_A["one"].weight), (m.lora_B["one"], theirs.lora_B["one"].weight)):
            assert ours_p.grad is not None and ours_p.grad.abs().max() > 0, path
            torch.testing.assert_close(ours_p.grad, their_p.grad, rtol=1e-4, atol=1e-6)
        assert m.lora_A["two"].grad is None


@pytest.mark.parametrize("kind", KINDS)
def test_merge_refused_naming_quantization_and_nothing_changes(kind, tmp_path):
    _, ours = peft_pair(kind, tmp_path)
    ids = _ids()
    lora_ext.set_adapter(ours, "one")
    state = {k: v.clone() for k, v in ours.state_dict().items() if isinstance(v, torch.Tensor)}
    with torch.no_grad():
        before = ours(ids).logits
    for merge in (lambda: lora_ext.merge_adapter(ours, "one"), lambda: lora_ext.merge_and_unload(ours, "one")):
        with pytest.raises(ValueError, match="quantized .*" + LIBRARY[kind]):
            merge()
    after_state = ours.state_dict()
    assert state.keys() == after_state.keys()
    for key, value in state.items():  # torchao's int8 tensors compare as their values
        plain = (lambda t: t.dequantize()) if type(value) not in (torch.Tensor, nn.Parameter) else (lambda t: t)
        assert torch.equal(plain(value), plain(after_state[key])), key
    assert all(isinstance(m, QuantizedLoRALinear) and m.merged_adapter is None for _, m in lora_layers(ours))
    with torch.no_grad():
        assert torch.equal(ours(ids).logits, before)


@pytest.mark.parametrize("kind", KINDS)
def test_dequantized_merge_gives_full_precision_model(kind, tmp_path):
    _, ours = peft_pair(kind, tmp_path)
    ids = _ids()
    lora_ext.set_adapter(ours, "one")
    with torch.no_grad():
        expected = ours(ids).logits
    merged = lora_ext.merge_and_unload(ours, "one", dequantize=True)
    assert not lora_layers(merged)
    linears = [m for m in merged.model.layers.modules() if isinstance(m, nn.Linear)]
    assert len(linears) == 14 and all(type(m) is nn.Linear and type(m.weight) is nn.Parameter for m in linears)
    assert all(m.weight.dtype == torch.float32 and not m.weight.requires_grad for m in linears)
    # bitsandbytes' int8 layers round their input to float16 (LLM.int8); the float model does not.
    tolerance = 5e-3 if kind == "bnb-int8" else 1e-4
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, expected, rtol=tolerance, atol=tolerance)


def test_dequantized_merge_refused_changes_nothing(tmp_path):
    _, ours = peft_pair("bnb-nf4", tmp_path)
    layer = lora_layers(ours)[0][1]
    with torch.no_grad():
        layer.lora_B["one"][0, 0] = float("inf")  # the merge would give non-finite weights
    bases = [m.base_layer for _, m in lora_layers(ours)]
    with pytest.raises(ValueError, match="non-finite"):
        lora_ext.merge_and_unload(ours, "one", dequantize=True)
    assert [m.base_layer for _, m in lora_layers(ours)] == bases  # quantized bases put back


def test_dequantize_linear_matches_each_quantization():
    torch.manual_seed(0)
    x = torch.randn(5, 32)
    for kind in KINDS:
        model = quantized_llama(kind)
        module = model.model.layers[0].self_attn.q_proj
        dense = lora_ext.dequantize_linear(module)
        torch.testing.assert_close(dense(x), module(x), rtol=1e-5, atol=1e-5)


def test_generic_linear_subclass_is_probed_and_served():
    class ScaledLinear(nn.Linear):  # a forward of its own: lora_ext must call it
        def forward(self, x):
            return super().forward(x) * 2.0

    torch.manual_seed(0)
    base = ScaledLinear(16, 12)
    model = nn.Sequential(base)
    a, b = torch.randn(3, 16), torch.randn(12, 3)
    tensors = {"base_model.model.0.lora_A.weight": a, "base_model.model.0.lora_B.weight": b}
    config = {"r": 3, "lora_alpha": 3, "target_modules": ["0"], "peft_type": "LORA"}
    lora_ext.load_adapter(model, tensors, "x", config=config)
    assert isinstance(model[0], QuantizedLoRALinear)
    x = torch.randn(4, 16, dtype=torch.float64).float()
    expected = (2 * (x.double() @ base.weight.double().T + base.bias.double()) + x.double() @ a.double().T @ b.double().T)
    with torch.no_grad():
        torch.testing.assert_close(model(x).double(), expected, rtol=1e-5, atol=1e-5)
    dense = lora_ext.dequantize_linear(base)  # the identity probe
    torch.testing.assert_close(dense(x), base(x), rtol=1e-5, atol=1e-5)


def test_plain_linear_is_not_quantized_kind():
    model = tiny_llama_model()
    lora_ext.inject_lora(model, ["q_proj"], r=2)
    assert all(type(m) is lora_ext.LoRALinear for _, m in lora_layers(model))


@pytest.mark.parametrize("kind", ["bnb-nf4", "torchao-int8"])
def test_bad_adapter_shapes_refused_model_unchanged(kind):
    model = quantized_llama(kind)
    before = {n: type(m) for n, m in model.named_modules()}
    tensors = {
        "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.randn(4, 32),
        "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": torch.randn(16, 4),  # q_proj has 32 outputs
    }
    config = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj"], "peft_type": "LORA"}
    with pytest.raises(ValueError, match="q_proj"):
        lora_ext.load_adapter(model, tensors, "bad", config=config)
    assert {n: type(m) for n, m in model.named_modules()} == before
    assert not lora_layers(model)


def test_generate_mixed_over_nf4_equals_each_row_alone(tmp_path):
    _, ours = peft_pair("bnb-nf4", tmp_path)
    ids = _ids(rows=3, seq=4)
    rows = ["one", None, "two"]
    kwargs = dict(max_new_tokens=5, do_sample=False, pad_token_id=0)
    lora_ext.set_adapter(ours, rows)
    mixed = ours.generate(ids, **kwargs)
    for i, name in enumerate(rows):
        lora_ext.set_adapter(ours, name)
        alone = ours.generate(ids[i : i + 1], **kwargs)
        assert torch.equal(mixed[i : i + 1], alone), (i, name)


def test_pool_over_nf4_base(tmp_path):
    reference, _ = peft_pair("bnb-nf4", tmp_path, names=("one", "two", "three"))
    model = quantized_llama("bnb-nf4")
    pool = AdapterPool(model, max_resident=2, max_rank=4)
    for name in ("one", "two", "three"):
        pool.add(name, tmp_path / name)
    ids = _ids(rows=3)
    rows = ["three", "one", "two"]
    with torch.no_grad():
        pool.set_adapter(rows[:2])
        first = model(ids[:2]).logits
        pool.set_adapter(rows[1:])  # evicts one
        second = model(ids[1:]).logits
        for i, name in enumerate(rows):
            reference.set_adapter(name)
            expected = reference(ids[i : i + 1]).logits[0]
            got = first[i] if i < 2 else second[i - 1]
            torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    assert pool.evictions >= 1


# ------------------------------------------------------------------- real model


@pytest.fixture(scope="module")
def smollm2_nf4():
    pytest.importorskip("gguf")
    from lora_ext.apps import llm

    pytest.importorskip("bitsandbytes", reason="bitsandbytes not installed (pip install lora_ext[quant])")
    try:
        full, tokenizer = llm.load_model()
    except llm.ModelUnavailable as e:
        pytest.skip(str(e))
    return llm.quantize_model(full, "nf4"), tokenizer


@pytest.mark.slow
def test_demo_batch_over_nf4_smollm2_equals_peft(smollm2_nf4):
    """The demo's mixed batch with the shipped adapters over an NF4 SmolLM2: row for row
    PEFT's text on the same base. The task checks: 6 of 8 passed on our machine; the 2 that fail
    (one adapter row, one base row) fail because NF4 rounds the small model's weights
    (the base alone answers the base question wrongly too); BENCHMARKS.md, W14."""
    from lora_ext.apps import cli, llm
    from lora_ext.apps.tasks import TASKS, check_base

    base, tokenizer = smollm2_nf4
    rows = cli.demo_rows()
    prompts, per_row = [p for p, _ in rows], [a for _, a in rows]
    adapters = sorted({a for a in per_row if a is not None})
    ours = copy.deepcopy(base)
    for name in adapters:
        lora_ext.load_adapter(ours, cli.SHIPPED_ADAPTERS / name, name)
    assert all(isinstance(m, QuantizedLoRALinear) for _, m in lora_layers(ours))
    reference = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(cli.SHIPPED_ADAPTERS / adapters[0]), adapter_name=adapters[0])
    for name in adapters[1:]:
        reference.load_adapter(str(cli.SHIPPED_ADAPTERS / name), adapter_name=name)
    reference.eval()
    new_tokens = 16  # enough for every check; NF4 generation is slow on the CPU
    with lora_ext.use_adapter(ours, per_row):
        got = llm.generate(ours, tokenizer, prompts, new_tokens).texts
    peft_rows = [a or "__base__" for a in per_row]
    assert got == llm.generate(reference, tokenizer, prompts, new_tokens, adapter_names=peft_rows).texts
    passed = [check_base(p, g) if a is None else TASKS[a].check(p, g) for p, a, g in zip(prompts, per_row, got)]
    assert sum(passed) >= 5, list(zip(per_row, got))


@pytest.mark.slow
def test_qlora_training_over_nf4_smollm2_lowers_loss(smollm2_nf4):
    """QLoRA as users run it: a fresh adapter over the NF4 base, gradient checkpointing on."""
    from lora_ext.apps import llm

    base, tokenizer = smollm2_nf4
    model = copy.deepcopy(base)
    lora_ext.inject_lora(model, ["q_proj", "v_proj"], r=8, alpha=16, adapter_name="qlora")
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    batch = llm.encode_for_training(tokenizer, [("spell cat backwards", "tac"), ("spell dog backwards", "god")])
    params = [p for p in model.parameters() if p.requires_grad]
    assert params and all(p.dtype == torch.float32 for p in params)
    optimizer = torch.optim.AdamW(params, lr=3e-3)
    losses = []
    for _ in range(6):
        loss = llm.answer_loss(model, batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0], losses

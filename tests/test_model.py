"""Whole models: injection, mixed batches and generate, exact merging, training."""

import pytest
import torch
from torch import nn

import lora_ext
from lora_ext import LoRALinear
from lora_ext import lora_layers

from conftest import TOLERANCE, id_formatter

ATTN_MLP = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _randomize_b(model, name, std=0.3, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in lora_layers(model):
            if name in layer.specs:
                b = layer.lora_B[name]
                b.copy_(torch.randn(b.shape, generator=g) * std)


def _two_adapters(model):
    """'a' on q/v with r=4, 'b' on attention + gate with r=8: different sets per layer."""
    lora_ext.inject_lora(model, ["q_proj", "v_proj"], r=4, alpha=8, adapter_name="a")
    lora_ext.inject_lora(model, ["q_proj", "k_proj", "o_proj", "gate_proj"], r=8, alpha=4, adapter_name="b")
    _randomize_b(model, "a", seed=1)
    _randomize_b(model, "b", seed=2)
    return model


def _weights(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _assert_bitwise_equal(before, model):
    after = model.state_dict()
    assert before.keys() == after.keys()
    for k, v in before.items():
        assert torch.equal(v.view(torch.uint8) if v.is_floating_point() else v,
                           after[k].view(torch.uint8) if v.is_floating_point() else after[k]), k


def test_inject_replaces_targets_and_freezes_base(tiny_llama):
    model = tiny_llama()
    _, total_before = lora_ext.trainable_parameters(model)
    ids = torch.randint(3, 128, (2, 6))
    with torch.no_grad():
        ref = model(ids).logits
    assert lora_ext.inject_lora(model, ATTN_MLP, r=4, alpha=8) is model
    layers = lora_layers(model)
    assert len(layers) == 2 * 7
    assert {n.rpartition(".")[2] for n, _ in layers} == set(ATTN_MLP)
    assert isinstance(model.lm_head, nn.Linear) and not isinstance(model.lm_head, LoRALinear)
    trainable, total = lora_ext.trainable_parameters(model)
    expected = sum(4 * (m.in_features + m.out_features) for _, m in layers)
    assert trainable == expected and total == total_before + expected
    assert all(p.requires_grad == ("lora_" in n) for n, p in model.named_parameters())
    with torch.no_grad():  # B starts at zero: same outputs as the base model
        torch.testing.assert_close(model(ids).logits, ref)
    # Adding to existing LoRA layers adds an adapter; a regex selects by full name.
    lora_ext.inject_lora(model, r"model\.layers\.0\.self_attn\.(q|v)_proj", r=2, adapter_name="second")
    assert lora_ext.list_adapters(model) == ["default", "second"]
    assert len(lora_layers(model)) == 14
    assert model.model.layers[0].self_attn.q_proj.adapter_names == ["default", "second"]
    assert model.model.layers[1].self_attn.q_proj.adapter_names == ["default"]
    assert not model.model.layers[0].self_attn.q_proj.lora_A["default"].requires_grad
    q, v = model.model.layers[0].self_attn.q_proj, model.model.layers[0].self_attn.v_proj
    expected = 2 * (q.in_features + q.out_features + v.in_features + v.out_features)
    assert lora_ext.trainable_parameters(model)[0] == expected


def test_inject_errors_change_nothing(tiny_llama):
    model = tiny_llama()
    with pytest.raises(ValueError, match="matched no nn.Linear"):
        lora_ext.inject_lora(model, ["nonexistent"])
    with pytest.raises(TypeError, match="Embedding"):
        lora_ext.inject_lora(model, ["embed_tokens", "q_proj"])
    assert not lora_layers(model)
    lora_ext.inject_lora(model, "all-linear", adapter_name="x")
    assert len(lora_layers(model)) == 14  # all-linear leaves the output layer alone
    with pytest.raises(ValueError, match="already loaded"):
        lora_ext.inject_lora(model, ["q_proj"], adapter_name="x")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=id_formatter("dtype"))
def test_mixed_batch_equals_per_row(tiny_llama, dtype):
    model = _two_adapters(tiny_llama(dtype))
    names = ["b", None, "a", "a", "b"]
    ids = torch.randint(3, 128, (len(names), 9))
    with torch.no_grad():
        with lora_ext.use_adapter(model, names):
            mixed = model(ids).logits
        for i, name in enumerate(names):
            with lora_ext.use_adapter(model, name):
                alone = model(ids[i : i + 1]).logits[0]
            scale = max(alone.abs().max().item(), 1.0)
            assert (mixed[i] - alone).abs().max().item() <= 4 * TOLERANCE[dtype] * scale, (i, name)
        # the adapters do change the output (so the comparison above means something)
        with lora_ext.use_adapter(model, [None, "a", "b"]):
            out = model(ids[:1].expand(3, -1)).logits
        assert (out[0] - out[1]).abs().max() > 1e-2 and (out[0] - out[2]).abs().max() > 1e-2


def test_set_adapter_context_manager_and_errors(tiny_llama):
    model = _two_adapters(tiny_llama())
    lora_ext.set_adapter(model, "a")
    with lora_ext.use_adapter(model, ["a", "b"]):
        assert lora_ext.active_adapters(model) == ["a", "b"]
        with pytest.raises(ValueError, match="batch has 3 rows"):
            model(torch.randint(3, 128, (3, 4)))
    assert lora_ext.active_adapters(model) == "a"
    with pytest.raises(ValueError, match="unknown adapter"):
        lora_ext.set_adapter(model, ["a", "zzz"])
    with pytest.raises(ValueError, match="no LoRA layers"):
        lora_ext.set_adapter(nn.Sequential(nn.Linear(2, 2)), "a")


def test_row_indices_computed_once_for_all_layers(tiny_llama, monkeypatch):
    model = _two_adapters(tiny_llama())
    built = []
    original = torch.Tensor.repeat_interleave
    monkeypatch.setattr(torch.Tensor, "repeat_interleave", lambda *a, **k: built.append(1) or original(*a, **k))
    lora_ext.set_adapter(model, ["a", "b", None])
    with torch.no_grad():
        model(torch.randint(3, 128, (3, 5)))
        # slots are the same in every layer: one index tensor for all of them
        assert len(built) == 1
        model(torch.randint(3, 128, (3, 5)))  # same shape: reused
        assert len(built) == 1


def test_generate_with_mixed_adapters_equals_per_row(tiny_llama):
    model = _two_adapters(tiny_llama())
    names = ["a", None, "b", "b"]
    ids = torch.randint(3, 128, (len(names), 6))
    mask = torch.ones_like(ids)
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        with lora_ext.use_adapter(model, names):
            greedy = model.generate(ids, attention_mask=mask, **kw)
            beams = model.generate(ids, attention_mask=mask, num_beams=2, **kw)
            torch.manual_seed(0)
            sampled = model.generate(ids, attention_mask=mask, **{**kw, "do_sample": True},
                                     num_return_sequences=2)
        assert sampled.shape == (2 * len(names), 12)
        for i, name in enumerate(names):
            with lora_ext.use_adapter(model, name):
                one = model.generate(ids[i : i + 1], attention_mask=mask[i : i + 1], **kw)
                one_beam = model.generate(ids[i : i + 1], attention_mask=mask[i : i + 1], num_beams=2, **kw)
            assert greedy[i].tolist() == one[0].tolist(), (i, name)
            assert beams[i].tolist() == one_beam[0].tolist(), (i, name)
    # different adapters do give different continuations
    assert len({tuple(greedy[i].tolist()) for i in range(3)}) > 1


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=id_formatter("dtype"))
def test_merge_unmerge_bit_exact_over_many_cycles(tiny_llama, dtype):
    model = _two_adapters(tiny_llama(dtype))
    _randomize_b(model, "b", std=2.0, seed=5)  # large updates: many rounding residuals
    before = _weights(model)
    ids = torch.randint(3, 128, (2, 5))
    with torch.no_grad():
        with lora_ext.use_adapter(model, "b"):
            adapter_out = model(ids).logits.float()
        for cycle in range(200):
            name = "ab"[cycle % 2]
            lora_ext.merge_adapter(model, name)
            if cycle < 2:
                q = model.model.layers[0].self_attn.q_proj
                assert q.merged_adapter == name
                assert not torch.equal(q.weight, before["model.layers.0.self_attn.q_proj.base_layer.weight"])
                if name == "b":
                    with lora_ext.use_adapter(model, "b"):
                        merged_out = model(ids).logits.float()
                    err = (merged_out - adapter_out).abs().max().item()
                    assert err <= 8 * TOLERANCE[dtype] * max(adapter_out.abs().max().item(), 1.0)
                    with pytest.raises(RuntimeError, match="merged"), lora_ext.use_adapter(model, ["a", "b"]):
                        model(ids)
            lora_ext.unmerge_adapter(model)
    _assert_bitwise_equal(before, model)
    # Side information: one int8 per weight element, plus the rare elements whose
    # correction does not fit (|w| far below |delta|); rare for a realistic update.
    _randomize_b(model, "a", std=0.02, seed=3)
    before = _weights(model)
    lora_ext.merge_adapter(model, "a")
    layers = [m for _, m in lora_layers(model) if m.merged_adapter == "a"]
    assert all(m.merge_record.residual.dtype == torch.int8 for m in layers)
    overflow = sum(m.merge_record.overflow_index.numel() for m in layers)
    assert overflow <= sum(m.weight.numel() for m in layers) // 100
    lora_ext.unmerge_adapter(model)
    _assert_bitwise_equal(before, model)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=id_formatter("dtype"))
def test_safe_merge_refuses_non_finite(tiny_llama, dtype):
    model = _two_adapters(tiny_llama(dtype))
    big = torch.finfo(dtype).max
    # only the last layer's o_proj overflows: the layers before it must stay untouched too
    with torch.no_grad():
        o_proj = model.model.layers[1].self_attn.o_proj
        o_proj.lora_A["b"].fill_(1.0)
        o_proj.lora_B["b"].fill_(big / 2)  # every element of delta is 2 * big
    before = _weights(model)
    with pytest.raises(ValueError, match="non-finite"):
        lora_ext.merge_adapter(model, "b")
    _assert_bitwise_equal(before, model)
    assert all(m.merged_adapter is None for _, m in lora_layers(model))
    with pytest.raises(ValueError, match="non-finite"):
        lora_ext.merge_and_unload(model, "b")
    _assert_bitwise_equal(before, model)
    lora_ext.merge_adapter(model, "a")  # a finite adapter still merges
    lora_ext.unmerge_adapter(model)
    _assert_bitwise_equal(before, model)


def test_merge_and_unload_gives_plain_model(tiny_llama):
    model = _two_adapters(tiny_llama())
    ids = torch.randint(3, 128, (2, 7))
    with torch.no_grad():
        with lora_ext.use_adapter(model, "b"):
            ref = model(ids).logits
        plain = lora_ext.merge_and_unload(model, "b")
        assert not lora_layers(plain)
        assert all(type(m) is not LoRALinear for m in plain.modules())
        assert not any("lora" in k or "base_layer" in k for k in plain.state_dict())
        torch.testing.assert_close(plain(ids).logits, ref, rtol=1e-4, atol=1e-4)


def test_delete_adapter_frees_and_falls_back_to_base(tiny_llama):
    model = _two_adapters(tiny_llama())
    ids = torch.randint(3, 128, (2, 5))
    lora_ext.set_adapter(model, ["a", "b"])
    with torch.no_grad():
        with lora_ext.use_adapter(model, "b"):
            b_out = model(ids[1:]).logits
        with lora_ext.use_adapter(model, None):
            base_out = model(ids[:1]).logits
        model(ids)
    n_params = sum(p.numel() for p in model.parameters())
    n_a = sum(p.numel() for n, p in model.named_parameters() if n.endswith((".lora_A.a", ".lora_B.a")))
    assert n_a > 0
    lora_ext.delete_adapter(model, "a")
    assert lora_ext.list_adapters(model) == ["b"]
    assert not any(n.endswith((".lora_A.a", ".lora_B.a")) for n, _ in model.named_parameters())
    assert sum(p.numel() for p in model.parameters()) == n_params - n_a
    with torch.no_grad():
        out = model(ids).logits  # row 0 had 'a': now the base model
    torch.testing.assert_close(out[:1], base_out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out[1:], b_out, rtol=1e-5, atol=1e-5)
    lora_ext.merge_adapter(model, "b")
    with pytest.raises(ValueError, match="merged"):
        lora_ext.delete_adapter(model, "b")
    lora_ext.unmerge_adapter(model)
    lora_ext.delete_adapter(model, "b")
    assert lora_ext.list_adapters(model) == []


def _pattern_batch():
    """Rows repeating a short cycle of tokens: learnable by a small adapter."""
    return torch.stack([(torch.arange(16) * (k + 1)) % 5 + 10 + k for k in range(4)])


def _train(model, ids, steps, names):
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=2e-2)
    losses = []
    model.train()
    with lora_ext.use_adapter(model, names):
        for _ in range(steps):
            loss = model(ids, labels=ids).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
    model.eval()
    return losses


def test_short_training_run_lowers_loss(tiny_llama):
    model = tiny_llama()
    # lm_head too: the random model's small weights cap what the other layers can move
    lora_ext.inject_lora(model, ATTN_MLP + ["lm_head"], r=8, alpha=16, dropout=0.05)
    base = {k: v.clone() for k, v in model.state_dict().items() if "lora_" not in k}
    ids = _pattern_batch()
    losses = _train(model, ids, 25, "default")
    assert losses[-1] < 0.8 * losses[0], losses
    for k, v in base.items():  # the base model stayed frozen
        assert torch.equal(model.state_dict()[k], v), k
    # After training, inference sees the new weights (the stacks are refreshed).
    lora_ext.inject_lora(model, ["q_proj"], r=2, adapter_name="other")
    with torch.no_grad():
        with lora_ext.use_adapter(model, "default"):
            one = model(ids[:1]).logits
        with lora_ext.use_adapter(model, ["default", "other"]):
            mixed = model(ids[:2]).logits
    torch.testing.assert_close(mixed[:1], one, rtol=1e-4, atol=1e-4)


def test_training_two_adapters_in_one_mixed_batch(tiny_llama):
    model = tiny_llama()
    lora_ext.inject_lora(model, ATTN_MLP + ["lm_head"], r=4, alpha=8, adapter_name="x")
    lora_ext.inject_lora(model, ATTN_MLP + ["lm_head"], r=8, alpha=8, adapter_name="y")
    for _, layer in lora_layers(model):
        for n in ("x", "y"):
            layer.lora_A[n].requires_grad_(True)
            layer.lora_B[n].requires_grad_(True)
    ids = _pattern_batch()
    losses = _train(model, ids, 25, ["x", "y", "x", "y"])
    assert losses[-1] < 0.8 * losses[0], losses
    q = model.model.layers[0].self_attn.q_proj
    assert torch.count_nonzero(q.lora_B["x"]) > 0 and torch.count_nonzero(q.lora_B["y"]) > 0

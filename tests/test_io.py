"""PEFT-format adapter files: round trip, PEFT interop both ways, bad files change nothing."""

import json
import os

import pytest
import torch

import lora_ext
from lora_ext import lora_layers

peft = pytest.importorskip("peft")
from safetensors.torch import load_file, save_file  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _randomize(model, name, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in lora_layers(model):
            if name in layer.specs:
                for p in (layer.lora_A[name], layer.lora_B[name]):
                    p.copy_(torch.randn(p.shape, generator=g) * 0.2)


def _snapshot(model):
    return (
        {k: v.detach().clone() for k, v in model.state_dict().items()},
        [type(m).__name__ for m in model.modules()],
        lora_ext.list_adapters(model),
    )


def _assert_unchanged(snapshot, model):
    state, types, adapters = snapshot
    assert [type(m).__name__ for m in model.modules()] == types
    assert lora_ext.list_adapters(model) == adapters
    now = model.state_dict()
    assert now.keys() == state.keys()
    for k, v in state.items():
        assert torch.equal(now[k], v), k


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


@pytest.fixture
def ids():
    return torch.randint(3, 128, (3, 8))


def test_save_load_round_trip(tiny_llama, tmp_path, ids):
    model = tiny_llama()
    lora_ext.inject_lora(model, ["q_proj", "v_proj"], r=4, alpha=8, use_rslora=True, adapter_name="t")
    _randomize(model, "t", seed=1)
    expected = _logits(model, ids)
    lora_ext.save_adapter(model, tmp_path, "t")
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["lora_alpha"] == 8
    assert config["use_rslora"] is True and sorted(config["target_modules"]) == ["q_proj", "v_proj"]
    assert config["task_type"] == "CAUSAL_LM"
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    assert tensors["base_model.model.model.layers.1.self_attn.v_proj.lora_A.weight"].shape == (4, 32)
    assert tensors["base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"].shape == (16, 4)
    assert len(tensors) == 2 * 2 * 2

    fresh = tiny_llama()
    lora_ext.load_adapter(fresh, tmp_path, "loaded")
    assert lora_ext.list_adapters(fresh) == ["loaded"]
    assert not any(p.requires_grad for _, m in lora_layers(fresh) for p in m.parameters())
    torch.testing.assert_close(_logits(fresh, ids), expected)
    # Several adapters at once; bf16 storage is honoured and reloads.
    lora_ext.save_adapter(model, tmp_path / "bf16", "t", dtype=torch.bfloat16)
    assert load_file(tmp_path / "bf16" / "adapter_model.safetensors")[
        "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    ].dtype == torch.bfloat16
    lora_ext.load_adapter(fresh, tmp_path / "bf16", "bf16")
    with lora_ext.use_adapter(fresh, ["loaded", "bf16", None]):
        out = _logits(fresh, ids)
    torch.testing.assert_close(out[0], expected[0])
    torch.testing.assert_close(out[1], expected[1], rtol=2e-2, atol=2e-2)


def test_subset_of_layers_saved_with_full_paths(tiny_llama, tmp_path, ids):
    model = tiny_llama()
    lora_ext.inject_lora(model, r"model\.layers\.1\.mlp\.down_proj", r=2, adapter_name="d")
    _randomize(model, "d", seed=2)
    lora_ext.save_adapter(model, tmp_path, "d")
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["target_modules"] == ["model.layers.1.mlp.down_proj"]
    # PEFT reads it and injects into that layer only
    peft_model = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path)
    torch.testing.assert_close(_logits(peft_model, ids), _logits(model, ids), rtol=1e-5, atol=1e-5)


def _peft_adapter(tiny_llama, tmp_path, **config):
    base = tiny_llama()
    cfg = peft.LoraConfig(task_type="CAUSAL_LM", init_lora_weights=False, **config)
    peft_model = peft.get_peft_model(base, cfg)
    peft_model.save_pretrained(tmp_path)
    return peft_model.eval()


@pytest.mark.parametrize("use_rslora", [False, True], ids=["plain", "rslora"])
def test_peft_saved_adapter_gives_peft_outputs(tiny_llama, tmp_path, ids, use_rslora):
    peft_model = _peft_adapter(
        tiny_llama, tmp_path, r=8, lora_alpha=16, target_modules=TARGETS, use_rslora=use_rslora,
        rank_pattern={"v_proj": 4, "model.layers.1.mlp.down_proj": 2},
        alpha_pattern={"o_proj": 3},
    )
    model = tiny_llama()
    lora_ext.load_adapter(model, tmp_path, "p")
    v = model.model.layers[0].self_attn.v_proj
    assert v.specs["p"].r == 4 and model.model.layers[1].mlp.down_proj.specs["p"].r == 2
    assert model.model.layers[0].self_attn.o_proj.specs["p"].alpha == 3
    expected = _logits(peft_model, ids)
    assert (expected - _logits(tiny_llama(), ids)).abs().max() > 1e-3  # the adapter matters
    torch.testing.assert_close(_logits(model, ids), expected, rtol=1e-5, atol=1e-5)


def test_peft_loads_what_lora_ext_saves(tiny_llama, tmp_path, ids):
    # an adapter whose layers differ in rank and alpha: saved with rank/alpha patterns
    model = tiny_llama()
    peft_dir = tmp_path / "peft"
    _peft_adapter(tiny_llama, peft_dir, r=8, lora_alpha=16, target_modules=TARGETS,
                  rank_pattern={"k_proj": 2}, alpha_pattern={"up_proj": 5})
    lora_ext.load_adapter(model, peft_dir, "p")
    _randomize(model, "p", seed=3)  # new values, same layout
    ours = tmp_path / "ours"
    lora_ext.save_adapter(model, ours, "p")
    config = json.loads((ours / "adapter_config.json").read_text())
    assert set(config["rank_pattern"].values()) == {2} and set(config["alpha_pattern"].values()) == {5}
    peft_model = peft.PeftModel.from_pretrained(tiny_llama(), ours).eval()
    torch.testing.assert_close(_logits(peft_model, ids), _logits(model, ids), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------
# Bad files: a clear error, and the model is exactly as before.


@pytest.fixture
def saved(tiny_llama, tmp_path):
    model = tiny_llama()
    lora_ext.inject_lora(model, ["q_proj", "v_proj"], r=4, alpha=8, adapter_name="good")
    _randomize(model, "good", seed=4)
    lora_ext.save_adapter(model, tmp_path / "good", "good")
    return tmp_path / "good"


def _copy(src, dst, config_update=None, tensors_update=None, drop=()):
    dst.mkdir()
    config = json.loads((src / "adapter_config.json").read_text())
    config.update(config_update or {})
    (dst / "adapter_config.json").write_text(json.dumps(config))
    tensors = load_file(src / "adapter_model.safetensors")
    tensors.update(tensors_update or {})
    for k in drop:
        del tensors[k]
    save_file(tensors, dst / "adapter_model.safetensors")
    return dst


Q0 = "base_model.model.model.layers.0.self_attn.q_proj"


def _bad_cases(saved, tmp_path):
    yield "missing folder", tmp_path / "nope", FileNotFoundError, "adapter_config.json"
    d = _copy(saved, tmp_path / "noweights")
    os.remove(d / "adapter_model.safetensors")
    yield "missing weights", d, FileNotFoundError, "adapter_model.safetensors"
    d = _copy(saved, tmp_path / "truncated")
    data = (d / "adapter_model.safetensors").read_bytes()
    (d / "adapter_model.safetensors").write_bytes(data[: len(data) // 2])
    yield "truncated", d, ValueError, "truncated"
    d = _copy(saved, tmp_path / "badjson")
    (d / "adapter_config.json").write_text("{not json")
    yield "bad json", d, ValueError, "cannot read"
    yield "wrong shape", _copy(saved, tmp_path / "shape", tensors_update={
        f"{Q0}.lora_B.weight": torch.randn(31, 4)}), ValueError, "expects lora_A"
    yield "rank vs config", _copy(saved, tmp_path / "rank", config_update={"r": 8}), ValueError, "expects"
    yield "dora", _copy(saved, tmp_path / "dora", config_update={"use_dora": True}), ValueError, "DoRA"
    yield "dora key", _copy(saved, tmp_path / "dorakey", tensors_update={
        f"{Q0}.lora_magnitude_vector": torch.randn(32)}), ValueError, "DoRA"
    yield "bias", _copy(saved, tmp_path / "bias", config_update={"bias": "all"}), ValueError, "bias"
    yield "embedding", _copy(saved, tmp_path / "emb", tensors_update={
        "base_model.model.model.embed_tokens.lora_A.weight": torch.randn(4, 128),
        "base_model.model.model.embed_tokens.lora_B.weight": torch.randn(32, 4),
    }), ValueError, "Embedding"
    yield "unknown module", _copy(saved, tmp_path / "unknown", tensors_update={
        "base_model.model.model.layers.7.self_attn.q_proj.lora_A.weight": torch.randn(4, 32),
        "base_model.model.model.layers.7.self_attn.q_proj.lora_B.weight": torch.randn(32, 4),
    }), ValueError, "no module"
    yield "half a pair", _copy(saved, tmp_path / "bf16", drop=[f"{Q0}.lora_B.weight"]), ValueError, "no lora_B"
    yield "not lora", _copy(saved, tmp_path / "ia3", config_update={"peft_type": "IA3"}), ValueError, "IA3"
    nan_b = load_file(saved / "adapter_model.safetensors")[f"{Q0}.lora_B.weight"].clone()
    nan_b[3, 1] = float("nan")
    yield "non-finite", _copy(saved, tmp_path / "nan", tensors_update={f"{Q0}.lora_B.weight": nan_b}), \
        ValueError, "non-finite"


def test_bad_adapter_files_change_nothing(tiny_llama, saved, tmp_path, ids):
    model = tiny_llama()
    lora_ext.inject_lora(model, ["q_proj"], r=2, adapter_name="existing")
    _randomize(model, "existing", seed=5)
    before = _snapshot(model)
    out_before = _logits(model, ids)
    for what, path, error, message in _bad_cases(saved, tmp_path):
        with pytest.raises(error, match=message):
            lora_ext.load_adapter(model, path, "new")
        _assert_unchanged(before, model)
    with pytest.raises(ValueError, match="already loaded"):
        lora_ext.load_adapter(model, saved, "existing")
    _assert_unchanged(before, model)
    torch.testing.assert_close(_logits(model, ids), out_before)
    # and a good file still loads afterwards, into the existing and new layers alike
    lora_ext.load_adapter(model, saved, "new")
    assert lora_ext.list_adapters(model) == ["existing", "new"]
    assert model.model.layers[0].self_attn.q_proj.adapter_names == ["existing", "new"]
    assert model.model.layers[0].self_attn.v_proj.adapter_names == ["new"]


def test_delete_then_reload(tiny_llama, saved, ids):
    model = tiny_llama()
    lora_ext.load_adapter(model, saved, "x")
    out = _logits(model, ids)
    lora_ext.delete_adapter(model, "x")
    assert lora_ext.list_adapters(model) == []
    torch.testing.assert_close(_logits(model, ids), _logits(tiny_llama(), ids))
    lora_ext.load_adapter(model, saved, "x")
    torch.testing.assert_close(_logits(model, ids), out)

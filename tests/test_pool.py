"""AdapterPool: at most max_resident adapters loaded, LRU eviction, prefetch, errors."""

import pytest
import torch

import lora_ext
from lora_ext import lora_layers

from test_many_adapters import adapter_state_dict, peft_config

pytest.importorskip("peft")

NAMES = [f"p{i}" for i in range(6)]


@pytest.fixture
def setup(tiny_llama, tmp_path):
    """A pool of 6 adapters (one of them on disk) and a model with all 6 loaded."""
    cfg = peft_config(targets=["q_proj", "v_proj", "down_proj"])
    reference = tiny_llama()
    states = {n: adapter_state_dict(reference, cfg, seed=i) for i, n in enumerate(NAMES)}
    for n in NAMES:
        lora_ext.load_adapter(reference, states[n], n, config=cfg)
    lora_ext.save_adapter(reference, tmp_path / "p5", "p5")
    model = tiny_llama()
    pool = lora_ext.AdapterPool(model, max_resident=3)
    for n in NAMES[:5]:
        pool.add(n, states[n], config=cfg)
    pool.add("p5", tmp_path / "p5")  # stays on disk until needed
    assert lora_ext.list_adapters(model) == [] and pool.names == NAMES
    return pool, model, reference


def _check_outputs(model, reference, names):
    ids = torch.randint(3, 128, (len(names), 5), generator=torch.Generator().manual_seed(len(names)))
    with torch.no_grad():
        out = model(ids).logits
        with lora_ext.use_adapter(reference, names):
            ref = reference(ids).logits
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_lru_eviction_order_and_outputs(setup):
    pool, model, reference = setup
    steps = [
        (["p0", "p1"], ["p0", "p1"]),
        (["p2", None], ["p0", "p1", "p2"]),
        (["p0", "p0"], ["p1", "p2", "p0"]),  # p0 used again: most recent
        (["p5", "p2"], ["p0", "p5", "p2"]),  # p1 was least recently used; p5 from disk
        (["p3", "p4", "p3"], ["p2", "p3", "p4"]),  # two evicted: p0, then p5
    ]
    for names, resident in steps:
        pool.set_adapter(names)
        assert pool.resident == resident, names
        assert sorted(lora_ext.list_adapters(model)) == sorted(resident)
        _check_outputs(model, reference, names)
    # never more than max_resident slots in the stacks
    for _, layer in lora_layers(model):
        assert layer.stacks()[0].shape[0] == 3


def test_prefetch_loads_ahead_without_changing_the_selection(setup):
    pool, model, reference = setup
    pool.set_adapter(["p2", "p0", "p1"])
    pool.set_adapter(["p1", "p2"])
    pool.prefetch(["p3", None])
    assert pool.resident == ["p1", "p2", "p3"]  # p0 was the least recently used
    # the selection is still the last set_adapter's, not the prefetched adapter
    assert lora_ext.active_adapters(model) == ["p1", "p2"]
    pool.prefetch(["p4"])  # evicts p1, which the current selection uses: its rows get the base
    assert pool.resident == ["p2", "p3", "p4"]
    assert lora_ext.active_adapters(model) == [None, "p2"]
    q = model.model.layers[0].self_attn.q_proj
    slots = {n: q.slot(n) for n in ("p3", "p4")}
    pool.set_adapter(["p4", "p3"])  # already resident: nothing loaded
    assert {n: q.slot(n) for n in ("p3", "p4")} == slots and pool.resident == ["p2", "p4", "p3"]
    _check_outputs(model, reference, ["p4", "p3"])


def test_too_many_distinct_adapters_is_an_error(setup):
    pool, model, reference = setup
    pool.set_adapter(["p0", "p1"])
    with pytest.raises(ValueError, match="needs 4 distinct adapters but max_resident is 3"):
        pool.set_adapter(["p0", "p1", "p2", "p3"])
    with pytest.raises(ValueError, match="not registered"):
        pool.prefetch(["p0", "zz"])
    assert pool.resident == ["p0", "p1"]
    _check_outputs(model, reference, ["p0", "p1"])


def test_bad_adapters_are_refused_at_registration(setup, tmp_path):
    pool, model, _ = setup
    cfg = peft_config(targets=["q_proj", "v_proj", "down_proj"])
    good = adapter_state_dict(model, cfg, seed=0)
    broken = {k: v for k, v in good.items() if "layers.1.mlp" not in k}
    with pytest.raises(ValueError, match="missing"):
        pool.add("broken", broken, config=cfg)
    with pytest.raises(FileNotFoundError):
        pool.add("nowhere", tmp_path / "nowhere")
    with pytest.raises(ValueError, match="already registered"):
        pool.add("p0", good, config=cfg)
    ranked = lora_ext.AdapterPool(model, max_resident=2, max_rank=2)
    with pytest.raises(ValueError, match="max_rank 2"):
        ranked.add("big", good, config=cfg)
    assert pool.names == NAMES
    pool.remove("p0")
    assert "p0" not in pool.names

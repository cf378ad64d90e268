"""Many adapters in one model: slots, loading from memory, atomic replacement, compile."""

import copy
import threading
import time

import pytest
import torch
from torch import nn

import lora_ext
from lora_ext import lora_layers

peft = pytest.importorskip("peft")

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def peft_config(r=4, alpha=8, targets=("q_proj", "v_proj"), **extra):
    return {"peft_type": "LORA", "r": r, "lora_alpha": alpha, "target_modules": list(targets), **extra}


def adapter_state_dict(model, config, seed, std=0.3):
    """Random weights in PEFT's key layout for the modules ``config`` targets."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, module in model.named_modules():
        if name.rpartition(".")[2] in config["target_modules"]:
            r = config["r"]
            prefix = f"base_model.model.{name}"
            out[f"{prefix}.lora_A.weight"] = torch.randn(r, module.in_features, generator=g) * std
            out[f"{prefix}.lora_B.weight"] = torch.randn(module.out_features, r, generator=g) * std
    return out


def _logits(model, ids, names=None):
    with torch.no_grad():
        if names is None:
            return model(ids).logits
        with lora_ext.use_adapter(model, names):
            return model(ids).logits


def _snapshot(model):
    return (
        {k: v.detach().clone() for k, v in model.state_dict().items()},
        lora_ext.list_adapters(model),
        [type(m).__name__ for m in model.modules()],
    )


def _assert_unchanged(snapshot, model):
    state, adapters, types = snapshot
    assert lora_ext.list_adapters(model) == adapters
    assert [type(m).__name__ for m in model.modules()] == types
    now = model.state_dict()
    assert now.keys() == state.keys()
    for k, v in state.items():
        assert torch.equal(now[k], v), k


def test_load_from_state_dict_equals_peft(tiny_llama, tmp_path):
    base = tiny_llama()
    cfg = peft.LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS, init_lora_weights=False,
                          rank_pattern={"v_proj": 4}, alpha_pattern={"o_proj": 3})
    peft_model = peft.get_peft_model(base, cfg).eval()
    state = peft.get_peft_model_state_dict(peft_model)
    ids = torch.randint(3, 128, (2, 7))
    expected = _logits(peft_model, ids)
    model = tiny_llama()
    lora_ext.load_adapter(model, state, "mem", config=cfg)  # a LoraConfig ...
    torch.testing.assert_close(_logits(model, ids), expected, rtol=1e-5, atol=1e-5)
    lora_ext.load_adapter(model, state, "mem2", config=cfg.to_dict())  # ... or its dict
    torch.testing.assert_close(_logits(model, ids, "mem2"), expected, rtol=1e-5, atol=1e-5)
    assert model.model.layers[0].self_attn.v_proj.specs["mem"].r == 4
    with pytest.raises(ValueError, match="needs its config"):
        lora_ext.load_adapter(model, state, "nocfg")


def test_replace_in_place_keeps_parameters_and_order(tiny_llama):
    model = tiny_llama()
    cfg = peft_config()
    for i, name in enumerate(["x", "y", "z"]):
        lora_ext.load_adapter(model, adapter_state_dict(model, cfg, seed=i), name, config=cfg)
    ids = torch.randint(3, 128, (3, 6))
    names = ["x", "y", "z"]
    before = _logits(model, ids, names)
    q = model.model.layers[0].self_attn.q_proj
    params = (q.lora_A["y"], q.lora_B["y"])
    new_state = adapter_state_dict(model, cfg, seed=10)
    lora_ext.load_adapter(model, new_state, "y", config=cfg, replace=True)
    capacity = q.stacks()[0].shape[0]  # 4: a replacement needs one free slot while it runs
    assert capacity == 4
    for step in range(3 * capacity):  # churn: old slots are freed and reused
        lora_ext.load_adapter(model, adapter_state_dict(model, cfg, seed=20 + step), "y", config=cfg, replace=True)
    lora_ext.load_adapter(model, new_state, "y", config=peft_config(alpha=2), replace=True)
    assert lora_ext.list_adapters(model) == ["x", "y", "z"]
    assert q.lora_A["y"] is params[0] and q.lora_B["y"] is params[1]  # optimizers keep them
    assert q.stacks()[0].shape[0] == capacity
    assert q.specs["y"].alpha == 2
    fresh = tiny_llama()
    lora_ext.load_adapter(fresh, new_state, "y", config=peft_config(alpha=2))
    after = _logits(model, ids, names)
    torch.testing.assert_close(after[1], _logits(fresh, ids[1:2])[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(after[[0, 2]], before[[0, 2]])  # the others untouched
    assert (after[1] - before[1]).abs().max() > 1e-2


def test_bad_input_changes_nothing(tiny_llama):
    model = tiny_llama()
    cfg = peft_config()
    good = adapter_state_dict(model, cfg, seed=1)
    lora_ext.load_adapter(model, good, "x", config=cfg)
    lora_ext.reserve_adapters(model, 8, max_rank=6)
    snapshot = _snapshot(model)
    q0 = "base_model.model.model.layers.0.self_attn.q_proj"
    k0 = "base_model.model.model.layers.0.self_attn.k_proj"
    missing = {k: v for k, v in good.items() if not k.startswith(q0)}
    extra = {**good, f"{k0}.lora_A.weight": torch.randn(4, 32), f"{k0}.lora_B.weight": torch.randn(16, 4)}
    shape = {**good, f"{q0}.lora_B.weight": torch.randn(31, 4)}
    cfg8 = peft_config(r=8)
    cases = [
        ("missing keys", missing, cfg, False, "missing"),
        ("extra keys", extra, cfg, False, "extra"),
        ("wrong shape", shape, cfg, False, "expects lora_A"),
        ("rank over capacity", adapter_state_dict(model, cfg8, seed=2), cfg8, False, "rank capacity"),
        ("not a tensor", {**good, f"{q0}.lora_A.weight": [1.0]}, cfg, False, "expected a tensor"),
        ("replace: other rank", adapter_state_dict(model, peft_config(r=2), seed=3), peft_config(r=2), True, "rank"),
        ("replace: missing keys", missing, cfg, True, "missing"),
        ("replace: unknown name", good, cfg, "w", "no adapter 'w'"),
        ("exists", good, cfg, None, "already loaded"),
    ]
    for what, state, config, replace, message in cases:
        name = "w" if replace == "w" else ("x" if replace in (True, None) else "new")
        with pytest.raises(ValueError, match=message):
            lora_ext.load_adapter(model, state, name, config=config, replace=bool(replace))
        _assert_unchanged(snapshot, model)
    lora_ext.merge_adapter(model, "x")
    with pytest.raises(ValueError, match="merged"):
        lora_ext.load_adapter(model, good, "x", config=cfg, replace=True)
    lora_ext.unmerge_adapter(model)
    _assert_unchanged(snapshot, model)
    with pytest.raises(ValueError, match="max_rank"):
        lora_ext.reserve_adapters(model, 8, max_rank=2)  # below a loaded rank


@pytest.mark.parametrize("selection", ["model-wide", "thread-local"])
def test_replace_while_another_thread_runs_forwards(tiny_llama, selection):
    """Every concurrent forward sees the old or the new adapter, never a mix of layers,
    whether it selected the adapter model-wide or in its own ``with`` block."""
    model = tiny_llama()
    cfg = peft_config(targets=TARGETS)
    versions = [adapter_state_dict(model, cfg, seed=s, std=0.5) for s in (1, 2)]
    lora_ext.load_adapter(model, versions[0], "hot", config=cfg)
    lora_ext.load_adapter(model, adapter_state_dict(model, cfg, seed=3), "cold", config=cfg)
    ids = torch.randint(3, 128, (2, 16))
    names = ["hot", "cold"]
    expected = []
    for v in versions:
        lora_ext.load_adapter(model, v, "hot", config=cfg, replace=True)
        expected.append(_logits(model, ids, names))
    assert (expected[0][0] - expected[1][0]).abs().max() > 1e-2  # a mix would show
    lora_ext.set_adapter(model, names if selection == "model-wide" else None)
    outputs, stop, errors = [], threading.Event(), []

    def run():
        while not stop.is_set():
            with torch.no_grad():
                outputs.append(model(ids).logits)

    def forwards():
        try:
            if selection == "thread-local":
                with lora_ext.use_adapter(model, names):
                    run()
            else:
                run()
        except Exception as e:  # noqa: BLE001  (reported by the main thread)
            errors.append(e)

    worker = threading.Thread(target=forwards)
    worker.start()
    try:
        for step in range(40):
            lora_ext.load_adapter(model, versions[step % 2], "hot", config=cfg, replace=True)
            time.sleep(0.001)
    finally:
        stop.set()
        worker.join()
    assert not errors, errors
    assert len(outputs) > 5
    for out in outputs:
        closest = min(range(2), key=lambda i: (out - expected[i]).abs().max().item())
        torch.testing.assert_close(out, expected[closest], rtol=1e-5, atol=1e-5)


def test_one_copy_and_memory_accounting(tiny_llama):
    model = tiny_llama()
    cfg = peft_config(targets=TARGETS)
    lora_ext.load_adapter(model, adapter_state_dict(model, cfg, seed=0), "a0", config=cfg)
    count = 40
    lora_ext.reserve_adapters(model, count)
    for i in range(1, count):
        lora_ext.load_adapter(model, adapter_state_dict(model, cfg, seed=i), f"a{i}", config=cfg)
    layers = [m for _, m in lora_layers(model)]
    adapter_bytes = sum(p.numel() * p.element_size() for m in layers for p in m.parameters() if p is not m.base_layer.weight and p is not m.base_layer.bias)
    stack_bytes = sum(t.numel() * t.element_size() for m in layers for t in m.stacks()[:2])
    # Reserved to exactly the number loaded, one rank: the stacks are the adapters' bytes.
    assert stack_bytes == adapter_bytes
    # Every adapter parameter is a view into its layer's stack (no second copy).
    for m in layers:
        storages = {m.stacks()[0].untyped_storage().data_ptr(), m.stacks()[1].untyped_storage().data_ptr()}
        for name in m.specs:
            assert m.lora_A[name].untyped_storage().data_ptr() in storages
            assert m.lora_B[name].untyped_storage().data_ptr() in storages
    # Deleting and loading again reuses the slots: no growth.
    for i in range(0, count, 2):
        lora_ext.delete_adapter(model, f"a{i}")
    for i in range(0, count, 2):
        lora_ext.load_adapter(model, adapter_state_dict(model, cfg, seed=100 + i), f"b{i}", config=cfg)
    assert sum(t.numel() * t.element_size() for m in layers for t in m.stacks()[:2]) == stack_bytes


def test_compiled_model_does_not_recompile(tiny_llama):
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    model = tiny_llama()
    cfg = peft_config()
    for i in range(3):
        lora_ext.load_adapter(model, adapter_state_dict(model, cfg, seed=i), f"a{i}", config=cfg)
    lora_ext.reserve_adapters(model, 8, max_rank=8)
    counter = CompileCounter()
    compiled = torch.compile(model, backend=counter)
    ids = torch.randint(3, 128, (4, 6))
    # Per-row lists of the batch's length (one name instead of a list would be a second
    # graph: the row tensor's length is part of the graph's shape).
    selections = [["a0", "a1", None, "a2"], ["a2", "a2", "a0", None], ["a1"] * 4]
    with torch.no_grad():
        for names in selections:  # a new selection: no recompile
            lora_ext.set_adapter(model, names)
            torch.testing.assert_close(compiled(ids).logits, model(ids).logits, rtol=1e-5, atol=1e-5)
        lora_ext.load_adapter(model, adapter_state_dict(model, cfg, seed=7), "a1", config=cfg, replace=True)
        lora_ext.load_adapter(model, adapter_state_dict(model, peft_config(r=8), seed=8), "new", config=peft_config(r=8))
        lora_ext.set_adapter(model, ["new", "a1", "a0", None])
        torch.testing.assert_close(compiled(ids).logits, model(ids).logits, rtol=1e-5, atol=1e-5)
    assert counter.frame_count == 1, counter.frame_count


def test_forward_cost_with_hundreds_loaded(tiny_llama):
    """300 more adapters loaded: same outputs; per-forward time reported as a ratio.

    The assertion is loose (a shared machine is noisy); BENCHMARKS.md W9 has the
    measured number on the real model.
    """
    torch.manual_seed(0)
    model = tiny_llama()
    cfg = peft_config(targets=TARGETS)
    for i in range(3):
        lora_ext.load_adapter(model, adapter_state_dict(model, cfg, seed=i), f"u{i}", config=cfg)
    ids = torch.randint(3, 128, (8, 4))
    names = ["u0", "u1", None, "u2", "u0", "u1", "u2", "u0"]
    few = copy.deepcopy(model)  # 3 loaded
    for i in range(300):
        lora_ext.load_adapter(model, adapter_state_dict(model, cfg, seed=100 + i), f"x{i}", config=cfg)
    torch.testing.assert_close(_logits(model, ids, names), _logits(few, ids, names))
    times = {"few": [], "many": []}
    with torch.no_grad():
        lora_ext.set_adapter(few, names), lora_ext.set_adapter(model, names)
        for _ in range(30):  # interleaved, so load changes hit both alike
            for key, m in (("few", few), ("many", model)):
                t0 = time.perf_counter()
                m(ids)
                times[key].append(time.perf_counter() - t0)
    ratio = sorted(times["many"])[15] / sorted(times["few"])[15]
    print(f"median forward time, 303 vs 3 adapters loaded: {ratio:.2f}x")
    assert ratio < 3.0


def test_compiled_training_reaches_the_adapter_parameters(tiny_llama):
    torch._dynamo.reset()
    model = tiny_llama()
    lora_ext.inject_lora(model, ["q_proj", "v_proj"], r=4, adapter_name="t", init="gaussian")
    lora_ext.inject_lora(model, ["q_proj", "v_proj"], r=2, adapter_name="u", init="gaussian")
    for _, layer in lora_layers(model):
        for n in ("t", "u"):
            layer.lora_B[n].data.normal_()
            layer.lora_B[n].requires_grad_(True)
    ids = torch.randint(3, 128, (2, 5))
    compiled = torch.compile(model, backend="aot_eager")
    grads = []
    for m in (model, compiled):
        model.zero_grad(set_to_none=True)
        with lora_ext.use_adapter(model, ["t", "u"]):
            m(ids, labels=ids).loss.backward()
        q = model.model.layers[0].self_attn.q_proj
        grads.append([q.lora_B["t"].grad.clone(), q.lora_B["u"].grad.clone()])
    for eager, comp in zip(*grads):
        assert torch.count_nonzero(eager) > 0
        torch.testing.assert_close(comp, eager, rtol=1e-4, atol=1e-5)


def test_cpu_stacks_grow_without_moving_adapters():
    """Without reserve_adapters the slot capacity grows as adapters load; on the CPU the
    stacks grow in reserved address space, so loaded adapters stay where they are."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 48), nn.ReLU(), nn.Linear(48, 16))
    lora_ext.inject_lora(model, ["0", "2"], r=4, adapter_name="first", init="gaussian")
    layer = model[0]
    where = layer.lora_A["first"].data_ptr(), layer.lora_B["first"].data_ptr()
    before = layer.lora_A["first"].detach().clone()
    capacities = {layer.a_stack.shape[0]}
    for i in range(40):
        lora_ext.inject_lora(model, ["0", "2"], r=4, adapter_name=f"a{i}", init="gaussian")
        capacities.add(layer.a_stack.shape[0])
    assert len(capacities) > 5  # it grew several times
    assert (layer.lora_A["first"].data_ptr(), layer.lora_B["first"].data_ptr()) == where
    assert torch.equal(layer.lora_A["first"], before)
    assert layer.shares_storage()
    x = torch.randn(3, 32)
    lora_ext.set_adapter(model, ["first", "a39", None])
    with torch.no_grad():
        mixed = model(x)
    for row, name in enumerate(["first", "a39", None]):
        lora_ext.set_adapter(model, name)
        with torch.no_grad():
            torch.testing.assert_close(mixed[row], model(x[row : row + 1])[0], rtol=1e-5, atol=1e-5)

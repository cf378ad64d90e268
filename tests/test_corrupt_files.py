"""Randomly damaged adapter files: every variant either loads or raises a ValueError that
names the file, and a refused load leaves the model bit for bit as it was.

The variants are drawn from a seeded generator (the same ones every run); the count per
kind is what RELIABILITY.md reports."""

import json
import random

import pytest
import torch

import lora_ext

pytest.importorskip("safetensors")

WEIGHTS, CONFIG = "adapter_model.safetensors", "adapter_config.json"
VARIANTS = {"truncated": 40, "header byte": 60, "data byte": 30, "config byte": 30}


@pytest.fixture(scope="module")
def good_files(tmp_path_factory):
    from conftest import tiny_llama_model

    model = tiny_llama_model()
    lora_ext.inject_lora(model, ["q_proj", "v_proj"], r=4, alpha=8, adapter_name="good", init="gaussian")
    folder = tmp_path_factory.mktemp("good")
    lora_ext.save_adapter(model, folder, "good")
    return (folder / CONFIG).read_bytes(), (folder / WEIGHTS).read_bytes()


def _variants(config: bytes, weights: bytes):
    rng = random.Random(1234)
    header_end = 8 + int.from_bytes(weights[:8], "little")
    for _ in range(VARIANTS["truncated"]):
        yield "truncated", config, weights[: rng.randrange(len(weights))]
    for kind, data, lo, hi in (("header byte", weights, 0, header_end), ("data byte", weights, header_end, len(weights)),
                               ("config byte", config, 0, len(config))):
        for _ in range(VARIANTS[kind]):
            damaged = bytearray(data)
            i = rng.randrange(lo, hi)
            damaged[i] = (damaged[i] + rng.randrange(1, 256)) % 256
            yield (kind, bytes(damaged), weights) if kind == "config byte" else (kind, config, bytes(damaged))


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_damaged_adapter_files_load_or_fail_cleanly(good_files, tmp_path, tiny_llama):
    model = tiny_llama()
    lora_ext.inject_lora(model, ["q_proj"], r=2, adapter_name="existing", init="gaussian")
    before = _state(model)
    outcomes = {kind: {"refused": 0, "loaded": 0} for kind in VARIANTS}
    for n, (kind, config, weights) in enumerate(_variants(*good_files)):
        folder = tmp_path / f"v{n}"
        folder.mkdir()
        (folder / CONFIG).write_bytes(config)
        (folder / WEIGHTS).write_bytes(weights)
        try:
            lora_ext.load_adapter(model, folder, "new")
        except ValueError as e:
            assert str(folder) in str(e), f"{kind}: the error does not name the file: {e}"
            outcomes[kind]["refused"] += 1
        else:  # a byte of weight data, or one the format does not check: a valid file
            outcomes[kind]["loaded"] += 1
            lora_ext.delete_adapter(model, "new")
            before = _state(model)  # v_proj stays wrapped (without adapters)
            continue
        assert lora_ext.list_adapters(model) == ["existing"], kind
        now = model.state_dict()
        assert now.keys() == before.keys(), f"{kind}: modules changed"
        for k, v in before.items():
            assert torch.equal(now[k], v), f"{kind}: {k} changed"
    print(outcomes)
    assert outcomes["truncated"]["loaded"] == 0, "a truncated file loaded"
    assert sum(o["refused"] for o in outcomes.values()) > 0

"""Adapters on disk in PEFT's format: ``adapter_config.json`` + ``adapter_model.safetensors``."""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from typing import Optional

import torch
from torch import nn

from .layers import AdapterSpec, LoRALinear
from .model import _attach, _context, _lora_layers, _resolve_targets, list_adapters

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
_PREFIX = "base_model.model."

# Config fields naming PEFT features lora_ext cannot honour: each must be unset/false.
_UNSUPPORTED = {
    "use_dora": "DoRA adapters",
    "fan_in_fan_out": "fan_in_fan_out (Conv1D layers)",
    "modules_to_save": "modules_to_save (fully trained extra modules)",
    "layer_replication": "layer_replication",
    "lora_bias": "trained LoRA biases",
    "trainable_token_indices": "trainable tokens",
    "alora_invocation_tokens": "activated LoRA",
    "target_parameters": "LoRA on parameters (target_parameters)",
    "use_qalora": "QA-LoRA",
}


def _pattern_value(pattern: dict, path: str, default):
    """PEFT's rank_pattern/alpha_pattern lookup: first key matching a suffix of the path."""
    for key, value in pattern.items():
        if re.match(rf"(.*\.)?({key})$", path):
            return value
    return default


def save_adapter(
    model: nn.Module, path: str, adapter_name: str = "default", dtype: Optional[torch.dtype] = None
) -> None:
    """Write ``adapter_name`` to the folder ``path`` in PEFT's layout.

    Keys are ``base_model.model.<module path>.lora_A.weight`` (``[r, in]``) and
    ``.lora_B.weight`` (``[out, r]``); layers whose rank or alpha differ from the most
    common one are listed in ``rank_pattern``/``alpha_pattern``. ``dtype``: storage
    dtype (default: the adapter's own).
    """
    from safetensors.torch import save_file

    layers = [(n, m) for n, m in _lora_layers(model) if adapter_name in m.specs]
    if not layers:
        raise ValueError(f"no adapter {adapter_name!r}; loaded adapters: {list_adapters(model)}")
    specs = {n: m.specs[adapter_name] for n, m in layers}
    rslora = {s.use_rslora for s in specs.values()}
    if len(rslora) > 1:
        raise ValueError(f"adapter {adapter_name!r} mixes rsLoRA and plain layers; PEFT's format has one flag")
    r = Counter(s.r for s in specs.values()).most_common(1)[0][0]
    alpha = Counter(s.alpha for s in specs.values()).most_common(1)[0][0]
    dropout = Counter(s.dropout for s in specs.values()).most_common(1)[0][0]
    # Short target names when they select exactly these layers, full paths otherwise.
    short = sorted({n.rpartition(".")[2] for n in specs})
    try:
        exact = set(_resolve_targets(model, short)) == set(specs)
    except (ValueError, TypeError):
        exact = False
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM" if type(model).__name__.endswith("ForCausalLM") else None,
        "base_model_name_or_path": getattr(getattr(model, "config", None), "_name_or_path", None) or None,
        "r": r,
        "lora_alpha": alpha,
        "lora_dropout": dropout,
        "use_rslora": rslora.pop(),
        "target_modules": short if exact else sorted(specs),
        "rank_pattern": {n: s.r for n, s in specs.items() if s.r != r},
        "alpha_pattern": {n: s.alpha for n, s in specs.items() if s.alpha != alpha},
        "bias": "none",
        "use_dora": False,
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "modules_to_save": None,
        "inference_mode": True,
    }
    tensors = {}
    for n, m in layers:
        for key, params in (("lora_A", m.lora_A), ("lora_B", m.lora_B)):
            t = params[adapter_name].detach()
            tensors[f"{_PREFIX}{n}.{key}.weight"] = t.to(dtype or t.dtype).cpu().contiguous()
    os.makedirs(path, exist_ok=True)
    save_file(tensors, os.path.join(path, WEIGHTS_NAME), metadata={"format": "pt"})
    with open(os.path.join(path, CONFIG_NAME), "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)


def _read_config(path: str) -> dict:
    file = os.path.join(path, CONFIG_NAME)
    if not os.path.isfile(file):
        raise FileNotFoundError(f"no adapter config: expected {file}")
    try:
        with open(file) as f:
            config = json.load(f)
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read {file}: {e}") from None
    if not isinstance(config, dict):
        raise ValueError(f"{file}: expected a JSON object")
    if config.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"{file}: peft_type {config.get('peft_type')!r} is not supported (only LORA)")
    for key, what in _UNSUPPORTED.items():
        if config.get(key):
            raise ValueError(f"{file}: {what} are not supported ({key}={config[key]!r})")
    if config.get("bias", "none") != "none":
        raise ValueError(f"{file}: trained biases are not supported (bias={config['bias']!r})")
    return config


def _read_weights(path: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    file = os.path.join(path, WEIGHTS_NAME)
    if not os.path.isfile(file):
        raise FileNotFoundError(f"no adapter weights: expected {file}")
    try:
        return load_file(file)
    except Exception as e:  # safetensors raises its own error types for bad files
        raise ValueError(f"cannot read {file} (truncated or not safetensors?): {e}") from None


def _split_key(key: str, file: str) -> tuple[str, str]:
    """``base_model.model.<path>.lora_A.weight`` -> (path, "lora_A")."""
    body = key[len(_PREFIX):] if key.startswith(_PREFIX) else key
    m = re.fullmatch(r"(.+)\.(lora_A|lora_B)\.weight", body)
    if m:
        return m.group(1), m.group(2)
    if "lora_magnitude_vector" in key:
        raise ValueError(f"{file}: {key!r} belongs to a DoRA adapter, which is not supported")
    if "lora_embedding" in key:
        raise ValueError(f"{file}: {key!r} is an embedding LoRA; only nn.Linear layers are supported")
    if key.endswith(".bias"):
        raise ValueError(f"{file}: {key!r} is a trained bias, which is not supported")
    raise ValueError(f"{file}: unexpected key {key!r} (expected <module>.lora_A.weight / lora_B.weight)")


def load_adapter(model: nn.Module, path: str, adapter_name: str = "default") -> nn.Module:
    """Load a PEFT-format LoRA adapter from the folder ``path`` as ``adapter_name``.

    Wraps the named ``nn.Linear`` modules where they have no LoRA layer yet, honours
    ``rank_pattern``/``alpha_pattern``, and keeps the adapter frozen. Everything is
    checked before the model is touched: a missing or unreadable file, a feature
    lora_ext cannot honour (DoRA, biases, other layer types) or a shape that does not
    fit raises and changes nothing. The first adapter loaded becomes the active one.
    Returns ``model``.
    """
    config = _read_config(path)
    tensors = _read_weights(path)
    file = os.path.join(path, WEIGHTS_NAME)
    if adapter_name in list_adapters(model):
        raise ValueError(f"adapter {adapter_name!r} is already loaded; delete_adapter it first")
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        module_path, which = _split_key(key, file)
        pairs.setdefault(module_path, {})[which] = tensor
    if not pairs:
        raise ValueError(f"{file} holds no LoRA weights")
    r_default, alpha_default = config.get("r", 8), config.get("lora_alpha", 8)
    rank_pattern, alpha_pattern = config.get("rank_pattern") or {}, config.get("alpha_pattern") or {}
    plan: dict[str, AdapterSpec] = {}
    for module_path, pair in pairs.items():
        if set(pair) != {"lora_A", "lora_B"}:
            missing = ({"lora_A", "lora_B"} - set(pair)).pop()
            raise ValueError(f"{file}: {module_path} has no {missing}.weight")
        try:
            module = model.get_submodule(module_path)
        except AttributeError:
            raise ValueError(f"{file}: the model has no module {module_path!r}") from None
        if not isinstance(module, (nn.Linear, LoRALinear)):
            raise ValueError(
                f"{file}: {module_path} is a {type(module).__name__}; only nn.Linear layers are supported"
            )
        a, b = pair["lora_A"], pair["lora_B"]
        r = _pattern_value(rank_pattern, module_path, r_default)
        expected_a, expected_b = (r, module.in_features), (module.out_features, r)
        if tuple(a.shape) != expected_a or tuple(b.shape) != expected_b:
            raise ValueError(
                f"{file}: {module_path} expects lora_A {list(expected_a)} and lora_B "
                f"{list(expected_b)}, got {list(a.shape)} and {list(b.shape)}"
            )
        if not (a.is_floating_point() and b.is_floating_point()):
            raise ValueError(f"{file}: {module_path} weights must be floating point, got {a.dtype}")
        alpha = _pattern_value(alpha_pattern, module_path, alpha_default)
        plan[module_path] = AdapterSpec(
            int(r), float(alpha), float(config.get("lora_dropout", 0.0) or 0.0), bool(config.get("use_rslora", False))
        )
    layers = _attach(model, plan, adapter_name)
    with torch.no_grad():
        for module_path, layer in zip(plan, layers):
            layer.lora_A[adapter_name].copy_(pairs[module_path]["lora_A"])
            layer.lora_B[adapter_name].copy_(pairs[module_path]["lora_B"])
            layer.lora_A[adapter_name].requires_grad_(False)
            layer.lora_B[adapter_name].requires_grad_(False)
    ctx = _context(model)
    if ctx.selection is None:
        ctx.select(adapter_name)
    return model

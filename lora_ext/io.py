"""Adapters on disk in PEFT's format: ``adapter_config.json`` + ``adapter_model.safetensors``."""

from __future__ import annotations

import datetime
import functools
import json
import math
import os
import re
import sys
from collections import Counter
from collections.abc import Mapping
from typing import Any, Optional, Union

import torch
from torch import nn

from .lifecycle import AdapterPlan, LayerPlan, cannot_add_reason, kind_for, layer_kind, lora_layers, manager_of, named_modules, supported_kinds
from .lifecycle import parameter_target
from . import moe
from .model import list_adapters, resolve_targets
from .storage import AdapterSpec

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
_PREFIX = "base_model.model."

# Config fields naming PEFT features lora_ext cannot honour: each must be unset/false.
_UNSUPPORTED = {
    "fan_in_fan_out": "fan_in_fan_out (Conv1D layers)",
    "modules_to_save": "modules_to_save (fully trained extra modules)",
    "layer_replication": "layer_replication",
    "lora_bias": "trained LoRA biases",
    "trainable_token_indices": "trainable tokens",
    "alora_invocation_tokens": "activated LoRA",
    "use_qalora": "QA-LoRA",
}


# Layers (and adapters) with the same hyper-parameters share one frozen spec: a thousand
# loaded adapters are then 120k fewer objects for Python's garbage collector to walk.
_shared_spec = functools.lru_cache(maxsize=1024)(AdapterSpec)


def _pattern_value(pattern: dict, path: str, default):
    """PEFT's rank_pattern/alpha_pattern lookup: first key matching a suffix of the path."""
    for key, value in pattern.items():
        if re.match(rf"(.*\.)?({key})$", path):
            return value
    return default


def save_adapter(
    model: nn.Module,
    path: str,
    adapter_name: str = "default",
    dtype: Optional[torch.dtype] = None,
    timeout: float = 300.0,
) -> None:
    """Write ``adapter_name`` to the folder ``path`` in PEFT's layout.

    Keys are ``base_model.model.<module path>.lora_A.weight`` (``[r, in]``) and
    ``.lora_B.weight`` (``[out, r]``), plus ``.lora_magnitude_vector`` (``[out]``) for a
    DoRA adapter (``use_dora`` in the config); layers whose rank or alpha differ from the most
    common one are listed in ``rank_pattern``/``alpha_pattern``. ``dtype``: storage
    dtype (default: the adapter's own).

    In a ``torch.distributed`` job of several ranks this is a collective: call it on
    every rank (of a plain, DDP-, FSDP2- or tensor-parallel model). Sharded adapters are
    gathered, rank 0 writes the full adapter (what one process would write), and every
    rank returns once the files are complete. A rank whose peers do not join within
    ``timeout`` seconds raises ``RuntimeError`` instead of waiting forever.
    """
    from safetensors.torch import save_file

    model = _unwrap(model)
    distributed = _world_size() > 1
    if distributed:
        _rendezvous(timeout, f"save_adapter({adapter_name!r}) was not called on every rank")
    layers = [(n, m) for n, m in lora_layers(model) if adapter_name in m.specs]
    if not layers:
        raise ValueError(f"no adapter {adapter_name!r}; loaded adapters: {list_adapters(model)}")
    specs = {n: m.specs[adapter_name] for n, m in layers}
    rslora = {s.use_rslora for s in specs.values()}
    if len(rslora) > 1:
        raise ValueError(f"adapter {adapter_name!r} mixes rsLoRA and plain layers; PEFT's format has one flag")
    dora = {s.use_dora for s in specs.values()}
    if len(dora) > 1:
        raise ValueError(f"adapter {adapter_name!r} mixes DoRA and plain LoRA layers; PEFT's format has one flag")
    r = Counter(s.r for s in specs.values()).most_common(1)[0][0]
    alpha = Counter(s.alpha for s in specs.values()).most_common(1)[0][0]
    dropout = Counter(s.dropout for s in specs.values()).most_common(1)[0][0]
    # Expert parameters are PEFT's target_parameters; the rest its target_modules.
    expert_paths = sorted(n for n, m in layers if isinstance(m, moe.ExpertsProjection))
    module_paths = [n for n in specs if n not in expert_paths]
    # Short target names when they select exactly these layers, full paths otherwise.
    short = sorted({n.rpartition(".")[2] for n in module_paths})
    try:
        exact = set(resolve_targets(model, short)) == set(module_paths)
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
        "target_modules": (short if exact else sorted(module_paths)) if module_paths else None,
        "target_parameters": expert_paths or None,
        "rank_pattern": {n: s.r for n, s in specs.items() if s.r != r},
        "alpha_pattern": {n: s.alpha for n, s in specs.items() if s.alpha != alpha},
        "bias": "none",
        "use_dora": dora.pop(),
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "modules_to_save": None,
        "inference_mode": True,
    }
    tensors = {}
    for n, m in layers:
        if isinstance(m, moe.ExpertsProjection):
            adapted = [p.rpartition(".")[2] for p in expert_paths if p.rpartition(".")[0] == n.rpartition(".")[0]]
            peft = moe.to_peft(n, m, *m.full_weights(adapter_name), adapted)
            for key, t in peft.items():
                tensors[_PREFIX + key] = t.to(dtype or t.dtype).cpu().clone(memory_format=torch.contiguous_format)
            continue
        for key, t in zip(("lora_A", "lora_B"), m.full_weights(adapter_name)):
            # a copy of its own: the parameter is a view into the layer's slot stack
            tensors[f"{_PREFIX}{n}.{key}.weight"] = t.to(dtype or t.dtype).cpu().clone(
                memory_format=torch.contiguous_format
            )
        for key, t in m.extra_weights(adapter_name).items():  # DoRA: lora_magnitude_vector
            tensors[f"{_PREFIX}{n}.{key}"] = t.to(dtype or t.dtype).cpu().clone(memory_format=torch.contiguous_format)
    if not distributed or torch.distributed.get_rank() == 0:
        os.makedirs(path, exist_ok=True)
        save_file(tensors, os.path.join(path, WEIGHTS_NAME), metadata={"format": "pt"})
        with open(os.path.join(path, CONFIG_NAME), "w") as f:
            json.dump(config, f, indent=2, sort_keys=True)
    if distributed:
        _rendezvous(timeout, f"save_adapter({adapter_name!r}): rank 0 did not finish writing {path}")


def _unwrap(model: nn.Module) -> nn.Module:
    """The model inside a (Distributed)DataParallel wrapper, whose names lack ``module.``."""
    while isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
        model = model.module
    return model


def _world_size() -> int:
    dist = torch.distributed
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _rendezvous(timeout: float, what: str) -> None:
    """A barrier of all ranks that raises after ``timeout`` seconds instead of hanging."""
    dist = torch.distributed
    limit = datetime.timedelta(seconds=timeout)
    try:
        if dist.get_backend() == "gloo":
            dist.monitored_barrier(timeout=limit, wait_all_ranks=True)  # names the missing ranks
        else:
            dist.barrier(async_op=True).wait(timeout=limit)
    except RuntimeError as e:
        cause = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise RuntimeError(
            f"rank {dist.get_rank()}: {what} within {timeout:g} s (it is a collective: call it "
            f"on every rank): {cause}"
        ) from None


def _is_dtensor(t: torch.Tensor) -> bool:
    if "torch.distributed.tensor" not in sys.modules:  # no DTensor can exist yet
        return False
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def _read_config(path: str) -> dict:
    file = os.path.join(path, CONFIG_NAME)
    if not os.path.isfile(file):
        raise FileNotFoundError(f"no adapter config: expected {file}")
    try:
        with open(file) as f:
            config = json.load(f)
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read {file}: {e}") from None
    return _check_config(config, file)


def _check_config(config: Any, where: str) -> dict:
    """``config`` as a dict (from JSON, a dict or a ``peft.LoraConfig``), checked."""
    if hasattr(config, "to_dict") and not isinstance(config, Mapping):
        config = config.to_dict()
    if not isinstance(config, Mapping):
        raise ValueError(f"{where}: expected a JSON object / dict, got {type(config).__name__}")
    config = dict(config)
    file = where
    peft_type = config.get("peft_type", "LORA")
    peft_type = getattr(peft_type, "value", peft_type)  # peft's PeftType enum
    if peft_type != "LORA":
        raise ValueError(f"{file}: peft_type {peft_type!r} is not supported (only LORA)")
    for key, what in _UNSUPPORTED.items():
        if config.get(key):
            raise ValueError(f"{file}: {what} are not supported ({key}={config[key]!r})")
    if config.get("bias", "none") != "none":
        raise ValueError(f"{file}: trained biases are not supported (bias={config['bias']!r})")
    return config


# safetensors dtype names -> torch dtypes (the ones a LoRA file can sensibly hold; any
# other name is refused as unreadable).
_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
_MAX_HEADER = 100_000_000  # safetensors' own limit


def _read_weights(path: str) -> dict[str, torch.Tensor]:
    file = os.path.join(path, WEIGHTS_NAME)
    if not os.path.isfile(file):
        raise FileNotFoundError(f"no adapter weights: expected {file}")
    try:
        return _read_safetensors(file)
    except (OSError, ValueError, KeyError, TypeError, OverflowError, RuntimeError) as e:
        raise ValueError(f"cannot read {file} (truncated or not safetensors?): {e}") from None


def _read_safetensors(file: str) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file, as views of one buffer read in a single call.

    safetensors' own loader makes a tensor per key through Python storage slicing, which
    costs more than the rest of a small adapter's load. The checks are the format's:
    a header that fits the file, known dtypes, and data offsets that tile the data
    section exactly (no gap, no overlap) with each tensor's size matching its shape.
    """
    with open(file, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size < 8:
            raise ValueError("shorter than the 8-byte header length")
        buffer = bytearray(size)
        if f.readinto(buffer) != size:
            raise ValueError("the file changed while it was read")
    header_len = int.from_bytes(buffer[:8], "little")
    if header_len > min(_MAX_HEADER, size - 8):
        raise ValueError(f"header length {header_len} does not fit the file ({size} bytes)")
    header = json.loads(buffer[8 : 8 + header_len].decode("utf-8"))
    if not isinstance(header, dict):
        raise ValueError("the header is not a JSON object")
    header.pop("__metadata__", None)
    start, data_len = 8 + header_len, size - 8 - header_len
    entries = []
    for key, info in header.items():
        dtype = _SAFETENSORS_DTYPES.get(info["dtype"])
        if dtype is None:
            raise ValueError(f"{key!r}: dtype {info['dtype']!r} is not one an adapter holds")
        shape, (begin, end) = info["shape"], info["data_offsets"]
        if not all(isinstance(d, int) and d >= 0 for d in shape) or not all(isinstance(o, int) for o in (begin, end)):
            raise ValueError(f"{key!r}: bad shape or data offsets")
        count = math.prod(shape)
        if end - begin != count * dtype.itemsize:
            raise ValueError(f"{key!r}: {end - begin} bytes for shape {shape} of {info['dtype']}")
        entries.append((begin, end, key, dtype, shape, count))
    entries.sort(key=lambda e: (e[0], e[1]))
    position = 0
    for begin, end, key, *_ in entries:
        if begin != position:
            raise ValueError(f"{key!r}: data offsets leave a gap or overlap at byte {position}")
        position = end
    if position != data_len:
        raise ValueError(f"the tensors cover {position} of {data_len} data bytes")
    tensors, flat = {}, {}  # flat: per dtype, the whole data section as one tensor to slice
    for begin, end, key, dtype, shape, count in entries:
        offset = start + begin
        if count == 0:
            tensors[key] = torch.empty(shape, dtype=dtype)
        elif offset % dtype.itemsize:  # unaligned for its dtype: a copy of its own
            tensors[key] = torch.frombuffer(bytearray(buffer[offset : start + end]), dtype=dtype).view(shape)
        else:
            if dtype not in flat:
                first = start % dtype.itemsize and dtype.itemsize - start % dtype.itemsize
                flat[dtype] = (start + first, torch.frombuffer(
                    buffer, dtype=dtype, count=(size - start - first) // dtype.itemsize, offset=start + first))
            base, whole = flat[dtype]
            i = (offset - base) // dtype.itemsize
            tensors[key] = whole[i : i + count].view(shape)
    return tensors


def _split_key(key: str, file: str) -> tuple[str, str]:
    """``base_model.model.<path>.lora_A.weight`` -> (path, "lora_A")."""
    body = key[len(_PREFIX):] if key.startswith(_PREFIX) else key
    for which in ("lora_A", "lora_B"):  # str.endswith: a regex per key costs more than the rest
        suffix = f".{which}.weight"
        if body.endswith(suffix) and len(body) > len(suffix):
            return body[: -len(suffix)], which
    for suffix in (".lora_magnitude_vector", ".lora_magnitude_vector.weight"):  # DoRA (PEFT saves the first)
        if body.endswith(suffix) and len(body) > len(suffix):
            return body[: -len(suffix)], "magnitude"
    if "lora_embedding" in key:
        raise ValueError(f"{file}: {key!r} is an embedding LoRA; only nn.Linear layers are supported")
    if key.endswith(".bias"):
        raise ValueError(f"{file}: {key!r} is a trained bias, which is not supported")
    raise ValueError(f"{file}: unexpected key {key!r} (expected <module>.lora_A.weight / lora_B.weight)")


def plan_adapter(
    model: nn.Module,
    source: Union[str, os.PathLike, Mapping[str, torch.Tensor]],
    config: Optional[Any] = None,
) -> AdapterPlan:
    """Read and check an adapter against ``model`` without changing anything.

    ``source`` and ``config`` as for :func:`load_adapter`. The result can be given to
    :func:`load_adapter` (as ``source``) any number of times, e.g. by a pool that checks
    adapters when they are registered and loads them later.
    """
    return _plan(model, *_read_source(source, config), named_modules(model))


def load_adapter(
    model: nn.Module,
    source: Union[str, os.PathLike, Mapping[str, torch.Tensor], AdapterPlan],
    adapter_name: str = "default",
    config: Optional[Any] = None,
    replace: bool = False,
    select: Optional[bool] = None,
) -> nn.Module:
    """Load a PEFT-format LoRA adapter as ``adapter_name``, from a folder or from memory.

    ``source``: a folder with ``adapter_config.json`` + ``adapter_model.safetensors``, a
    state dict in PEFT's key layout (``base_model.model.<module>.lora_A.weight``
    ``[r, in]`` / ``.lora_B.weight`` ``[out, r]``, what ``peft.get_peft_model_state_dict``
    returns) with its ``config`` (the ``adapter_config.json`` content as a dict, or a
    ``peft.LoraConfig``), or a plan from :func:`plan_adapter`. Wraps the named
    ``nn.Linear`` modules where they have no LoRA layer yet, honours
    ``rank_pattern``/``alpha_pattern``, and keeps the adapter frozen.

    ``select``: True makes the adapter the model-wide selection, False leaves the
    selection alone; None (default) selects it only when nothing is selected yet (the
    first adapter loaded becomes the active one).

    ``replace=True``: swap the weights of the loaded adapter ``adapter_name`` for the
    new ones, atomically (a forward running in another thread sees the old or the new
    adapter, never a mix), keeping its Parameter objects and every shape: the new
    weights must cover the same layers with the same ranks (alpha may change). In a
    compiled model this triggers no recompilation.

    Everything is checked before the model is touched: a missing or unreadable file, a
    feature lora_ext cannot honour (biases, other layer types, DoRA on a layer kind without it), missing or extra
    keys, a shape that does not fit, a rank above the capacity set with
    :func:`~lora_ext.reserve_adapters` raises and changes nothing. Returns ``model``.
    """
    modules = named_modules(model)  # one walk for the whole load
    if isinstance(source, AdapterPlan):
        if config is not None:
            raise ValueError("config is only for state dicts; a plan is already checked")
        plan = source
    else:
        plan = _plan(model, *_read_source(source, config), modules)
    manager = manager_of(model, modules=modules)
    if replace:
        held = {n: m for n, m in lora_layers(model) if adapter_name in m.specs}
        if not held:
            raise ValueError(f"no adapter {adapter_name!r} to replace; loaded adapters: {list_adapters(model)}")
        manager.replace(adapter_name, held, plan)
    else:
        manager.attach(model, adapter_name, plan, requires_grad=False, modules=modules)
    if select or (select is None and manager.selection.model_wide is None):
        manager.select(adapter_name)
    return model


def _read_source(source, config: Optional[Any]) -> tuple[dict, Mapping, str]:
    """``(config, tensors, where)`` of a folder or of a state dict with its config."""
    if isinstance(source, Mapping):
        if config is None:
            raise ValueError(
                "load_adapter from a state dict needs its config: the adapter_config.json "
                "content as a dict, or a peft.LoraConfig"
            )
        return _check_config(config, "config"), source, "state dict"
    if config is not None:
        raise ValueError("config is only for state dicts; a folder carries adapter_config.json")
    path = os.fspath(source)
    return _read_config(path), _read_weights(path), os.path.join(path, WEIGHTS_NAME)


def _plan(model: nn.Module, config: dict, tensors: Mapping, where: str, modules: list) -> AdapterPlan:
    """Check ``tensors`` against ``config`` and ``model`` (``modules``: its named modules)."""
    by_path = dict(modules)
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        if not isinstance(tensor, torch.Tensor):
            raise ValueError(f"{where}: {key!r} is a {type(tensor).__name__}, expected a tensor")
        module_path, which = _split_key(key, where)
        pairs.setdefault(module_path, {})[which] = tensor
    if not pairs:
        raise ValueError(f"{where} holds no LoRA weights")
    pairs, expert_specs = moe.from_peft_pairs(pairs, config, by_path, where)  # experts: our names and shapes
    r_default, alpha_default = config.get("r", 8), config.get("lora_alpha", 8)
    rank_pattern, alpha_pattern = config.get("rank_pattern") or {}, config.get("alpha_pattern") or {}
    dropout = float(config.get("lora_dropout", 0.0) or 0.0)
    rslora = bool(config.get("use_rslora", False))
    dora = bool(config.get("use_dora", False))
    plan = AdapterPlan()
    for module_path, pair in pairs.items():
        extras = {"magnitude": pair.pop("magnitude")} if "magnitude" in pair else {}
        if set(pair) != {"lora_A", "lora_B"}:
            missing = ({"lora_A", "lora_B"} - set(pair)).pop()
            raise ValueError(f"{where}: {module_path} has no {missing}.weight")
        if dora != bool(extras):
            raise ValueError(
                f"{where}: {module_path} has no lora_magnitude_vector, which a DoRA adapter (use_dora) needs"
                if dora else f"{where}: {module_path}.lora_magnitude_vector belongs to a DoRA adapter, "
                "but the config does not set use_dora"
            )
        module = by_path.get(module_path) if module_path else None
        a, b = pair["lora_A"], pair["lora_B"]
        r = _pattern_value(rank_pattern, module_path, r_default)
        alpha = _pattern_value(alpha_pattern, module_path, alpha_default)
        r, alpha = expert_specs.get(module_path, (r, alpha))  # experts' gate + up: rank 2r
        target = parameter_target(by_path, module_path) if module is None else None
        if target is not None:  # a parameter a wrapper will adapt (a mixture's experts)
            if dora:
                raise ValueError(f"{where}: {module_path}: expert parameters cannot carry dora adapters")
            problem = target.weights_problem(a, b, r)
            if problem is not None:
                raise ValueError(f"{where}: {module_path} {problem}")
            plan.layers[module_path] = LayerPlan(_shared_spec(int(r), float(alpha), 0.0, rslora), a, b)
            continue
        if module is None:
            raise ValueError(f"{where}: the model has no module {module_path!r}")
        kind = layer_kind(module)
        if kind is None:
            raise ValueError(
                f"{where}: {module_path} is a {type(module).__name__}; supported layers: {supported_kinds()}"
            )
        reason = cannot_add_reason(module)  # before the shapes: a shard's are its own
        if reason is not None:
            raise ValueError(f"{where}: {module_path}: {reason}")
        if _is_dtensor(module.weight):
            raise ValueError(
                f"{where}: {module_path} is sharded (FSDP2); load adapters before fully_shard"
            )
        spec = _shared_spec(int(r), float(alpha), dropout, rslora, dora)
        kind = kind_for(module, spec)
        if kind is None:
            raise ValueError(f"{where}: {module_path} is a {type(module).__name__}, which cannot carry {spec.variant} adapters")
        problem = kind.weights_problem(module, a, b, r) or kind.extras_problem(module, spec, extras)
        if problem is not None:
            raise ValueError(f"{where}: {module_path} {problem}")
        if not (a.is_floating_point() and b.is_floating_point()):
            raise ValueError(f"{where}: {module_path} weights must be floating point, got {a.dtype}")
        plan.layers[module_path] = LayerPlan(spec, a, b, extras)
    _check_finite(plan, where)
    module_paths = {p for p in plan.layers if not isinstance(by_path.get(p), moe.ExpertsProjection) and p in by_path}
    _check_targets(model, config, module_paths, where, modules)
    return plan


def _check_finite(plan: AdapterPlan, where: str) -> None:
    """A damaged or diverged adapter (every output row it touched would be NaN or inf) is refused."""
    tensors = [t for part in plan.layers.values() for t in (part.a, part.b, *part.extras.values())]
    # One multi-tensor norm per dtype: NaN and inf propagate, so finite norms clear every
    # element (isfinite over each tensor is ~10x slower). A norm that overflows, or a
    # non-finite element, goes on to the per-tensor search, which names the culprit.
    by_dtype: dict[torch.dtype, list] = {}
    for t in tensors:
        by_dtype.setdefault(t.dtype, []).append(t)
    if all(bool(torch.isfinite(torch.stack(torch._foreach_norm(ts)).sum())) for ts in by_dtype.values()):
        return
    for path, part in plan.layers.items():
        for which, t in (("lora_A.weight", part.a), ("lora_B.weight", part.b), *part.extras.items()):
            if not bool(torch.isfinite(t).all()):
                raise ValueError(f"{where}: {path}.{which} holds non-finite values (NaN or inf)")
    # every element finite: the sum overflowed


def _check_targets(model: nn.Module, config: dict, paths: set[str], where: str, modules: list) -> None:
    """The weights must cover exactly the modules ``target_modules`` selects."""
    targets = config.get("target_modules")
    if not targets or any(config.get(k) for k in ("layers_to_transform", "layers_pattern", "exclude_modules")):
        return  # selections lora_ext does not reproduce: trust the keys
    if not isinstance(targets, str):
        targets = sorted(targets)
    try:
        expected = set(resolve_targets(model, targets, modules))
    except (ValueError, TypeError):
        return  # reported by the per-key checks, or a target outside lora_ext's scope
    missing, extra = sorted(expected - paths), sorted(paths - expected)
    if missing or extra:
        raise ValueError(
            f"{where}: the weights do not match target_modules {targets!r}: missing "
            f"{missing[:4]}{' ...' if len(missing) > 4 else ''} ({len(missing)}), extra "
            f"{extra[:4]}{' ...' if len(extra) > 4 else ''} ({len(extra)})"
        )

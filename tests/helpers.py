"""Shared test helpers: the GPU skip, the device parameter, tolerance rules, CUDA probes, tiny models
and a synthetic latency table. Test modules import from here, never from one another."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from flextron.latency.table import LatencyTable, ShapeCosts
from flextron.model.config import ModelConfig
from flextron.model.elastic_model import FlextronModel
from flextron.model.loading import model_from_hf_weights
from flextron.ops.extension import _C
from flextron.routers import Sampling

# --- Devices -------------------------------------------------------------------------------------

# A CUDA test needs a GPU and the extension's CUDA kernels. Neither check creates a CUDA context,
# so importing a test module stays safe on machines without a GPU.
CUDA_AVAILABLE = torch.cuda.is_available() and bool(_C.build_info()["cuda_built"])

# The one GPU skip. `cuda` labels the test for `pytest -m cuda` (benchmarks/gpu_check.sh);
# the skipif does the skipping.
CUDA_MARKS = (
    pytest.mark.cuda,
    pytest.mark.skipif(not CUDA_AVAILABLE, reason="needs a CUDA device and flextron built with CUDA"),
)

# The `device` parameter of an op test whose contract is the same on every device.
DEVICES = ("cpu", pytest.param("cuda", marks=CUDA_MARKS))


def cuda_only(test):
    """Decorator (function or class): run only where CUDA_AVAILABLE, labelled `cuda`."""
    for mark in CUDA_MARKS:
        test = mark(test)
    return test


# --- Tolerances ----------------------------------------------------------------------------------

FP32_TOL = dict(atol=1e-5, rtol=1e-4)


def max_error(actual: torch.Tensor, exact: torch.Tensor) -> float:
    return (actual.double() - exact.double()).abs().max().item() if exact.numel() else 0.0


def assert_matches_reference(
    actual: torch.Tensor, pytorch_same_dtype: torch.Tensor, exact: torch.Tensor
) -> None:
    """fp32: tight closeness to `exact`. Lower precision: our error against `exact`
    (an fp32/fp64 reference) is at most 2x PyTorch's own error at that precision."""
    assert actual.shape == exact.shape, (actual.shape, exact.shape)
    assert actual.dtype == pytorch_same_dtype.dtype
    if actual.dtype in (torch.float32, torch.float64):
        torch.testing.assert_close(actual.double(), exact.double(), **FP32_TOL)
        return
    ours, theirs = max_error(actual, exact), max_error(pytorch_same_dtype, exact)
    assert ours <= 2 * theirs + 1e-6, f"error {ours:.3g} > 2 x PyTorch's {theirs:.3g} in {actual.dtype}"


def assert_as_accurate_as_torch(
    ours: torch.Tensor, theirs: torch.Tensor, exact: torch.Tensor, floor: float
) -> None:
    """Every dtype: max |ours - exact| <= 2 max |theirs - exact| + floor + 4 ulps of the largest
    |exact|, where `theirs` is PyTorch at our precision and `exact` a float64 reference of the
    same shape.  The ulps: outputs near 50 are a few fp32 ulps (4e-6 each) off in any summation
    order, and PyTorch's own error depends on which of its paths the layout picks."""
    assert ours.shape == exact.shape and ours.dtype == theirs.dtype
    our_err = (ours.double() - exact).abs().max().item()
    their_err = (theirs.double() - exact).abs().max().item()
    ulps = 4 * torch.finfo(ours.dtype).eps * exact.abs().max().item()
    assert our_err <= 2 * their_err + floor + ulps, (our_err, their_err, ulps)


def assert_logits_close(ours: torch.Tensor, theirs: torch.Tensor) -> None:
    """Logits (..., vocab) agree within 1e-4 of the logit scale."""
    scale = theirs.abs().max().item()
    error = (ours - theirs).abs().max().item()
    assert error <= 1e-4 * scale, f"max |diff| {error:.3g} > 1e-4 x logit scale {scale:.3g}"


# --- CUDA probes ---------------------------------------------------------------------------------


def poison_cuda_cache(dtype: torch.dtype) -> None:
    """Fill freed blocks of both pools of PyTorch's CUDA caching allocator with NaN, so that a
    kernel that reads a buffer it never wrote (an output element it skipped) returns NaN."""
    small = (1 << 19) // torch.tensor([], dtype=dtype).element_size()  # 512 KiB: the small pool
    blocks = [torch.full((small,), float("nan"), dtype=dtype, device="cuda") for _ in range(8)]
    blocks.append(torch.full((1 << 26,), float("nan"), dtype=dtype, device="cuda"))  # the large pool
    del blocks


def cuda_kernel_names(fn) -> list[str]:
    """Names of the CUDA kernels that `fn()` launches, in launch order (from the profiler)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return [event.name for event in prof.events() if event.device_type == torch.autograd.DeviceType.CUDA]


# --- Tiny models ---------------------------------------------------------------------------------


def tiny_hf_config(kv_heads: int = 2, bias: bool = False, tied: bool = False, **overrides) -> LlamaConfig:
    """4 heads of 16 (GQA with kv_heads=2, MHA with 4), d=64, d_ff=256, 2 layers, 300 tokens."""
    settings = dict(
        vocab_size=300,
        hidden_size=64,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=kv_heads,
        head_dim=16,
        max_position_embeddings=128,
        rms_norm_eps=1e-5,
        attention_bias=bias,
        mlp_bias=bias,
        tie_word_embeddings=tied,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    settings.update(overrides)
    return LlamaConfig(**settings)


def tiny_hf_model(seed: int = 0, **config) -> LlamaForCausalLM:
    """A random tiny LlamaForCausalLM in fp32 eval mode; weights scaled up so logits are O(1)."""
    torch.manual_seed(seed)
    hf_config = tiny_hf_config(**config)
    hf_config._attn_implementation = "eager"
    model = LlamaForCausalLM(hf_config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.copy_(1 + 0.1 * torch.randn_like(param))  # non-trivial norm weights
            else:
                param.normal_(0, 0.1 if param.dim() == 2 else 0.05)
    return model


def flextron_twin(hf_model: LlamaForCausalLM) -> FlextronModel:
    """The FlextronModel with the same weights."""
    return model_from_hf_weights(ModelConfig.from_hf(hf_model.config.to_dict()), hf_model.state_dict())


def tiny_flextron(seed: int = 0, **config) -> FlextronModel:
    return flextron_twin(tiny_hf_model(seed, **config))


def tiny_family_model(family: str):
    """A random tiny Qwen2ForCausalLM or MistralForCausalLM (the tiny Llama's sizes) and its twin."""
    from transformers import MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM

    settings = tiny_hf_config().to_dict()
    for key in ("attention_bias", "mlp_bias", "model_type", "architectures", "transformers_version"):
        settings.pop(key, None)
    config_class, model_class = {
        "qwen2": (Qwen2Config, Qwen2ForCausalLM),
        "mistral": (MistralConfig, MistralForCausalLM),
    }[family]
    torch.manual_seed(0)
    hf_config = config_class(**settings, sliding_window=None)  # (Mistral v0.2+ have none)
    hf_config._attn_implementation = "eager"
    hf = model_class(hf_config).eval()
    with torch.no_grad():
        for name, param in hf.named_parameters():
            if "norm" in name:
                param.copy_(1 + 0.1 * torch.randn_like(param))
            else:
                param.normal_(0, 0.1)
    return hf, model_from_hf_weights(ModelConfig.from_hf(hf_config.to_dict()), hf.state_dict())


def tiny_tokenizer():
    """A byte-level tokenizer (259 ids < the tiny vocab of 300) with a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {"<pad>": 0, "<bos>": 1, "<eos>": 2, **{c: i + 3 for i, c in enumerate(sorted(alphabet))}}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>"
    )
    tokenizer.chat_template = "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}<assistant>"
    return tokenizer


def tiny_hf_dir(path, **config) -> LlamaForCausalLM:
    """Write a tiny Hugging Face model directory (safetensors + tokenizer) to `path`."""
    model = tiny_hf_model(**config)
    model.save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return model


def tiny_bpe_tokenizer(vocab_size: int = 300, split_digits: bool = True):
    """A byte-level BPE tokenizer with real merges (trained on built-in text), digits split
    individually (SmolLM's pre-tokenizer) or not (GPT-2's), special <pad>/<bos>/<eos> (ids 0-2)
    and a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from flextron.data.blocks import read_texts

    backend = Tokenizer(models.BPE())
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.pre_tokenizer = (
        pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
        if split_digits
        else byte_level
    )
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<pad>", "<bos>", "<eos>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(read_texts("builtin", "train")[:50], trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>"
    )
    tokenizer.chat_template = "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}<assistant>"
    return tokenizer


# --- Latency -------------------------------------------------------------------------------------


def synthetic_table() -> LatencyTable:
    """Costs linear in tokens: MLP w costs w/64 * tokens/16 ms, a head 0.5 * tokens/16 ms."""
    table = LatencyTable("cpu", "test cpu", "float32", num_layers=2, num_heads=4, intermediate_size=256)
    for phase, batch, length in (
        ("prefill", 1, 16),
        ("prefill", 1, 32),
        ("prefill", 2, 16),
        ("prefill", 2, 32),
        ("decode", 1, 64),
    ):
        tokens = batch * (length if phase == "prefill" else 1)
        unit = tokens / 16
        table.entries.append(
            ShapeCosts(
                phase,
                batch,
                length,
                fixed_ms=2.0 * unit,
                mlp_ms={w: w / 64 * unit for w in (64, 128, 192, 256)},
                attention_ms={h: 0.5 * h * unit for h in (2, 4)},
            )
        )
    return table


# ---- router tests

TRAIN = Sampling(tau=1.0, noise=True, scale=True)  # the routers' training-time sampling


def tokens(batch: int = 2, length: int = 8, seed: int = 0) -> torch.Tensor:
    """Random token ids (batch, length) of the tiny models' vocabulary."""
    return torch.randint(3, 300, (batch, length), generator=torch.Generator().manual_seed(seed))


def blocks(count: int = 8, length: int = 16, seed: int = 0) -> torch.Tensor:
    """Random training blocks (count, length)."""
    return torch.randint(3, 300, (count, length), generator=torch.Generator().manual_seed(seed))

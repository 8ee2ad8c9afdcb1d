"""Shared fixtures: tiny models, tokenizers, model directories, token blocks and a synthetic
latency table (each fixture hands the test its factory), and a one-thread switch.

Devices: a test that takes `device` runs on "cpu" and on "cuda"; the CUDA case, and every test
marked `@pytest.mark.cuda`, is skipped without a GPU and a CUDA build (`pytest -m cuda` selects
them: benchmarks/gpu_check.sh).  Tolerance rules and CUDA probes of the op tests:
tests/ops/conftest.py."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from flextron.latency.table import LatencyTable, ShapeCosts
from flextron.model.config import ModelConfig
from flextron.model.elastic_model import FlextronModel
from flextron.model.loading import model_from_hf_weights
from flextron.ops.extension import _C

# Neither check creates a CUDA context, so collecting the tests stays safe without a GPU.
CUDA_AVAILABLE = torch.cuda.is_available() and bool(_C.build_info()["cuda_built"])


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """A test taking `device` (and not parametrizing it itself) runs on the CPU and on CUDA."""
    explicit = any("device" in str(mark.args[0]) for mark in metafunc.definition.iter_markers("parametrize"))
    if "device" in metafunc.fixturenames and not explicit:
        metafunc.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip the CUDA tests where there is no GPU or no CUDA build."""
    if CUDA_AVAILABLE:
        return
    skip = pytest.mark.skip(reason="needs a CUDA device and flextron built with CUDA")
    for item in items:
        if item.get_closest_marker("cuda"):
            item.add_marker(skip)


@pytest.fixture
def one_thread():
    """Run a test on one torch thread: tiny ops on a shared, oversubscribed CPU run many times faster."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# --- Tiny models ---------------------------------------------------------------------------------


def make_tiny_hf_config(
    kv_heads: int = 2, bias: bool = False, tied: bool = False, **overrides
) -> LlamaConfig:
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


def make_tiny_hf_model(seed: int = 0, **config) -> LlamaForCausalLM:
    """A random tiny LlamaForCausalLM in fp32 eval mode; weights scaled up so logits are O(1)."""
    torch.manual_seed(seed)
    hf_config = make_tiny_hf_config(**config)
    hf_config._attn_implementation = "eager"
    model = LlamaForCausalLM(hf_config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.copy_(1 + 0.1 * torch.randn_like(param))  # non-trivial norm weights
            else:
                param.normal_(0, 0.1 if param.dim() == 2 else 0.05)
    return model


def make_flextron_twin(hf_model: LlamaForCausalLM) -> FlextronModel:
    """The FlextronModel with the same weights."""
    return model_from_hf_weights(ModelConfig.from_hf(hf_model.config.to_dict()), hf_model.state_dict())


def make_tiny_flextron(seed: int = 0, **config) -> FlextronModel:
    return make_flextron_twin(make_tiny_hf_model(seed, **config))


def make_tiny_family_model(family: str):
    """A random tiny Qwen2ForCausalLM or MistralForCausalLM (the tiny Llama's sizes) and its twin."""
    from transformers import MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM

    settings = make_tiny_hf_config().to_dict()
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


def make_tiny_tokenizer():
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


def make_tiny_hf_dir(path, **config) -> LlamaForCausalLM:
    """Write a tiny Hugging Face model directory (safetensors + tokenizer) to `path`."""
    model = make_tiny_hf_model(**config)
    model.save_pretrained(path)
    make_tiny_tokenizer().save_pretrained(path)
    return model


def make_tiny_bpe_tokenizer(vocab_size: int = 300, split_digits: bool = True):
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


def make_synthetic_table() -> LatencyTable:
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


def make_tokens(batch: int = 2, length: int = 8, seed: int = 0) -> torch.Tensor:
    """Random token ids (batch, length) of the tiny models' vocabulary."""
    return torch.randint(3, 300, (batch, length), generator=torch.Generator().manual_seed(seed))


def make_blocks(count: int = 8, length: int = 16, seed: int = 0) -> torch.Tensor:
    """Random training blocks (count, length)."""
    return torch.randint(3, 300, (count, length), generator=torch.Generator().manual_seed(seed))


# --- Fixtures: each returns its factory, so a test sizes what it builds -----------------------


def make_int8_pair(model: FlextronModel) -> tuple[FlextronModel, FlextronModel]:
    """(model's int8 copy, a float copy of model whose linear weights are the int8 copy's values
    dequantized: int8 times the row's scale); the head and embedding stay the model's."""
    import copy

    from flextron.model.layers import ElasticLinear
    from flextron.model.quantization import quantize_int8_

    int8 = quantize_int8_(copy.deepcopy(model))
    dequantized = copy.deepcopy(model)
    for name, module in int8.named_modules():
        if isinstance(module, ElasticLinear) and name != "int8_head":
            dequantized.get_submodule(name).weight.data = (
                module.qweight.float() * module.weight_scale[:, None]
            )
    return int8, dequantized


@pytest.fixture(scope="session")
def tiny_hf_model():
    """make_tiny_hf_model (see its docstring)."""
    return make_tiny_hf_model


@pytest.fixture(scope="session")
def flextron_twin():
    """make_flextron_twin (see its docstring)."""
    return make_flextron_twin


@pytest.fixture(scope="session")
def tiny_flextron():
    """make_tiny_flextron (see its docstring)."""
    return make_tiny_flextron


@pytest.fixture(scope="session")
def tiny_family_model():
    """make_tiny_family_model (see its docstring)."""
    return make_tiny_family_model


@pytest.fixture(scope="session")
def int8_pair():
    """make_int8_pair (see its docstring)."""
    return make_int8_pair


@pytest.fixture(scope="session")
def tiny_tokenizer():
    """make_tiny_tokenizer (see its docstring)."""
    return make_tiny_tokenizer


@pytest.fixture(scope="session")
def tiny_hf_dir():
    """make_tiny_hf_dir (see its docstring)."""
    return make_tiny_hf_dir


@pytest.fixture(scope="session")
def tiny_bpe_tokenizer():
    """make_tiny_bpe_tokenizer (see its docstring)."""
    return make_tiny_bpe_tokenizer


@pytest.fixture(scope="session")
def synthetic_table():
    """make_synthetic_table (see its docstring)."""
    return make_synthetic_table


@pytest.fixture(scope="session")
def tokens():
    """make_tokens (see its docstring)."""
    return make_tokens


@pytest.fixture(scope="session")
def blocks():
    """make_blocks (see its docstring)."""
    return make_blocks


def check_logits_close(ours: torch.Tensor, theirs: torch.Tensor) -> None:
    """Logits (..., vocab) agree within 1e-4 of the logit scale."""
    scale = theirs.abs().max().item()
    error = (ours - theirs).abs().max().item()
    assert error <= 1e-4 * scale, f"max |diff| {error:.3g} > 1e-4 x logit scale {scale:.3g}"


@pytest.fixture(scope="session")
def assert_logits_close():
    """check_logits_close: logits agree within 1e-4 of their scale."""
    return check_logits_close

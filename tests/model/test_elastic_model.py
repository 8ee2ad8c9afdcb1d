"""The Flextron decoder against Hugging Face transformers' LlamaForCausalLM."""

from __future__ import annotations

import pytest
import torch

from flextron.model.config import ArchConfig, ModelConfig, arch_for_budget, count_parameters
from flextron.model.rope import rope_frequencies
from flextron.ops import reference

VARIANTS = {
    "gqa": dict(kv_heads=2),
    "mha": dict(kv_heads=4),
    "gqa-bias": dict(kv_heads=2, bias=True),
    "mha-bias-tied": dict(kv_heads=4, bias=True, tied=True),
}


@pytest.mark.parametrize("variant", VARIANTS)
def test_full_model_matches_transformers(
    assert_logits_close, flextron_twin, tiny_hf_model, variant: str
) -> None:
    hf = tiny_hf_model(**VARIANTS[variant])
    model = flextron_twin(hf)
    ids = torch.randint(0, 300, (2, 37))
    with torch.no_grad():
        assert_logits_close(model(ids), hf(ids).logits)


@pytest.mark.parametrize(
    "rope",
    [
        {"rope_type": "linear", "factor": 2.0},
        {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 32,
        },
        {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32},
    ],
    ids=lambda r: r["rope_type"],
)
def test_rope_scaling_matches_transformers(
    assert_logits_close, flextron_twin, tiny_hf_model, rope: dict
) -> None:
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    hf = tiny_hf_model(rope_parameters={"rope_theta": 500.0, **rope})
    ours, factor = rope_frequencies(16, 500.0, rope)
    theirs, their_factor = ROPE_INIT_FUNCTIONS[rope["rope_type"]](hf.config, "cpu")
    torch.testing.assert_close(ours, theirs)
    assert factor == pytest.approx(their_factor)
    ids = torch.randint(0, 300, (1, 90))
    with torch.no_grad():
        assert_logits_close(flextron_twin(hf)(ids), hf(ids).logits)


def test_sub_network_is_the_sliced_dense_model(tiny_flextron) -> None:
    """A smaller configuration equals running the prefix weights as a plain model."""
    model = tiny_flextron(kv_heads=2)
    arch = ArchConfig((64, 192), (2, 4))
    ids = torch.randint(0, 300, (2, 20))
    x = model.embed_tokens(ids)
    cos, sin = model.rotary(torch.arange(20), x.dtype)
    with torch.no_grad():
        for layer, width, heads in zip(model.layers, arch.mlp_widths, arch.heads, strict=True):
            attn, hd = layer.self_attn, 16
            h = layer.input_layernorm(x)
            q = (h @ attn.q_proj.weight[: heads * hd].T).view(2, 20, heads, hd).transpose(1, 2)
            k = (h @ attn.k_proj.weight[: heads // 2 * hd].T).view(2, 20, heads // 2, hd).transpose(1, 2)
            v = (h @ attn.v_proj.weight[: heads // 2 * hd].T).view(2, 20, heads // 2, hd).transpose(1, 2)
            rot = lambda t: t * cos + torch.cat((-t[..., 8:], t[..., :8]), -1) * sin  # noqa: E731
            y = reference.varhead_attention(rot(q), rot(k), v, torch.tensor([heads] * 2), True)
            x = x + y.transpose(1, 2).reshape(2, 20, -1) @ attn.o_proj.weight[:, : heads * hd].T
            h = layer.post_attention_layernorm(x)
            mlp = layer.mlp
            x = x + reference.nested_mlp(
                h, mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight, width, "swiglu"
            )
        expected = model.norm(x) @ model.lm_head.weight.T
        torch.testing.assert_close(model(ids, arch), expected, rtol=1e-4, atol=1e-4)


def test_per_sequence_heads_match_separate_runs(tiny_flextron) -> None:
    model = tiny_flextron(kv_heads=2)
    ids = torch.randint(0, 300, (2, 11))
    with torch.no_grad():
        x = model.embed_tokens(ids)
        cos, sin = model.rotary(torch.arange(11), x.dtype)
        attn = model.layers[0].self_attn
        both = attn(x, cos, sin, torch.tensor([2, 4]))
        torch.testing.assert_close(both[0], attn(x[:1], cos, sin, 2)[0])
        torch.testing.assert_close(both[1], attn(x[1:], cos, sin, 4)[0])


def test_budget_rule_smollm2_shapes() -> None:
    config = ModelConfig(
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_layers=30,
        num_heads=9,
        num_kv_heads=3,
        head_dim=64,
        tie_word_embeddings=True,
    )
    expected = {1.0: (1536, 9), 0.75: (1216, 6), 0.5: (704, 6), 0.25: (320, 3)}
    for budget, (width, heads) in expected.items():
        arch = arch_for_budget(config, budget)
        assert arch.is_uniform and arch.mlp_widths[0] == width and arch.heads[0] == heads
    assert count_parameters(config) == 134_515_008  # SmolLM2-135M, tied embeddings
    embedding = 49152 * 576 + 576
    for budget in (0.75, 0.5, 0.25):  # the layers' share of the weights follows the budget
        layers = count_parameters(config, arch_for_budget(config, budget)) - embedding
        assert abs(layers / (count_parameters(config) - embedding) - budget) < 0.02


@pytest.mark.parametrize("budget", [0.0, -0.5, 1.5, float("nan"), "half"])
def test_budget_outside_range_is_rejected(tiny_flextron, budget) -> None:
    model = tiny_flextron()
    with pytest.raises(ValueError, match="budget"):
        model.arch_for_budget(budget)


def test_bad_arch_and_inputs_are_rejected(tiny_flextron) -> None:
    model = tiny_flextron()
    ids = torch.randint(0, 300, (1, 5))
    with pytest.raises(ValueError, match="MLP width 512"):
        model(ids, ArchConfig((512, 256), (4, 4)))
    with pytest.raises(ValueError, match="3 layers"):
        model(ids, ArchConfig((64,) * 3, (4,) * 3))
    with pytest.raises(ValueError, match="context of 128"):
        model(torch.zeros(1, 129, dtype=torch.long))
    with pytest.raises(ValueError, match="unsupported architecture"):
        ModelConfig.from_hf({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]})


def test_kv_cache_decode_equals_full_recompute(tiny_flextron) -> None:
    model = tiny_flextron(kv_heads=2, bias=True)
    arch = model.arch_for_budget(0.5)
    ids = torch.randint(0, 300, (2, 16))
    with torch.no_grad():
        full = model(ids, arch)
        cache = model.new_kv_cache(2, 32)
        steps = [model(ids[:, :10], arch, cache)]
        steps += [model(ids[:, t : t + 1], arch, cache) for t in range(10, 16)]
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-5, atol=1e-5)
    assert cache.length == 16
    with pytest.raises(ValueError, match="fixed at prefill"):
        model(ids[:, :1], model.full_arch(), cache)


def test_kv_cache_takes_operands_again_at_prefill_and_for_another_model(tiny_flextron) -> None:
    """The cache keeps the layers' operands from prefill in its DecodePlan (the weights are fixed
    during a generation); a new prefill, another model or another configuration on the same cache
    takes them again."""
    first, second = tiny_flextron(seed=1).eval(), tiny_flextron(seed=2).eval()
    ids = torch.randint(3, 300, (1, 6))
    with torch.no_grad():
        cache = first.new_kv_cache(1, 8)
        first(ids[:, :5], kv_cache=cache)
        assert cache.plan[:2] == (first, first.full_arch())
        cache.length = 0  # a new prompt
        reused = [second(ids[:, :5], kv_cache=cache), second(ids[:, 5:], kv_cache=cache)]
        fresh = second.new_kv_cache(1, 8)
        expected = [second(ids[:, :5], kv_cache=fresh), second(ids[:, 5:], kv_cache=fresh)]
        first(ids[:, :1], kv_cache=cache)  # another model mid-generation: its own operands
        assert cache.plan[0] is first
        narrow = first.arch_for_budget(0.5)
        first(ids[:, :1], narrow, kv_cache=cache)  # another configuration mid-generation
        assert cache.plan[:2] == (first, narrow)
        down = first.layers[0].mlp.down_proj
        down.weight = torch.nn.Parameter(down.weight * 2)  # new weights between generations
        cache.length = 0
        reused.append(first(ids, kv_cache=cache))
        expected.append(first(ids, kv_cache=first.new_kv_cache(1, 8)))
    for ours, theirs in zip(reused, expected, strict=True):
        torch.testing.assert_close(ours, theirs)

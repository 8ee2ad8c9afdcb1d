"""Static and dynamic routers: shapes, gradients, budgets, Gumbel straight-through, KV-cache decode."""

from __future__ import annotations

import pytest
import torch

from flextron import ops
from flextron.nn.routers import (
    BudgetEncoder,
    DynamicRouter,
    Sampling,
    StaticRouter,
    TemperatureSchedule,
    default_mlp_choices,
)
from tests.tiny_models import tiny_flextron

TRAIN = Sampling(tau=1.0, noise=True, scale=True)


pytestmark = pytest.mark.usefixtures("one_thread")


def tokens(batch: int = 2, length: int = 8, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 300, (batch, length), generator=torch.Generator().manual_seed(seed))


def test_default_choices_span_small_to_full_widest_first() -> None:
    config = tiny_flextron().config  # d_ff 256 -> allowed 64, 128, 192, 256
    assert default_mlp_choices(config, 8) == [256, 192, 128, 64]
    assert default_mlp_choices(config, 2) == [256, 64]
    with pytest.raises(ValueError, match="strictly descending"):
        StaticRouter(config, [0.5, 1.0], mlp_choices=[64, 256])
    with pytest.raises(ValueError, match="subset of the allowed"):
        StaticRouter(config, [0.5, 1.0], mlp_choices=[100])


def test_budget_encoder_interpolates_between_trained_budgets() -> None:
    encoder = BudgetEncoder([1.0, 0.3, 0.5])
    assert encoder.budgets == [0.3, 0.5, 1.0]
    assert torch.equal(encoder(0.5), torch.tensor([[0.0, 1.0, 0.0]]))
    assert torch.allclose(encoder(0.4), torch.tensor([[0.5, 0.5, 0.0]]))
    assert torch.allclose(encoder(torch.tensor([0.3, 0.75])), torch.tensor([[1.0, 0, 0], [0, 0.5, 0.5]]))
    with pytest.raises(ValueError, match=r"trained range \[0.3, 1\]"):
        encoder(0.2)
    with pytest.raises(ValueError, match="distinct numbers in"):
        BudgetEncoder([0.5, 0.5])


def test_temperature_anneals_from_start_to_end() -> None:
    schedule = TemperatureSchedule(1.0, 0.1, steps=10)
    taus = [schedule(s) for s in range(12)]
    assert taus[0] == 1.0 and taus[10] == pytest.approx(0.1) and taus[11] == pytest.approx(0.1)
    assert all(a > b for a, b in zip(taus[:10], taus[1:10], strict=False))
    with pytest.raises(ValueError, match="0 < end <= start"):
        TemperatureSchedule(0.1, 1.0)


def test_static_router_shapes_arch_and_interpolated_budget() -> None:
    model = tiny_flextron()
    router = StaticRouter(model.config, [0.3, 0.6, 1.0], hidden_size=16)
    mlp_logits, head_logits = router(0.45)
    assert mlp_logits.shape == (2, 4) and head_logits.shape == (2, 2)
    arch = router.arch(0.45)
    arch.validate(model.config)
    assert all(w in router.mlp_choices for w in arch.mlp_widths)


def test_static_router_straight_through_keeps_the_forward_and_reaches_the_router() -> None:
    model = tiny_flextron()
    router = StaticRouter(model.config, [0.5, 1.0], hidden_size=16)
    ids = tokens()
    session = router.session(0.5, TRAIN)
    # Hard samples: one-hot probabilities, so each path's scale is exactly 1 in value.
    assert torch.equal(session.mlp_probs.sum(-1), torch.ones(2))
    assert torch.equal(session.mlp_scale.detach(), torch.ones(2))
    logits = model(ids, router=session)
    with torch.no_grad():
        assert torch.allclose(logits, model(ids, session.arch), atol=1e-5)
    logits.square().mean().backward()
    grads = [p.grad for p in router.parameters()]
    assert all(g is not None and g.abs().sum() > 0 for g in grads)


def test_dynamic_router_routes_each_token_through_its_width() -> None:
    model = tiny_flextron()
    router = DynamicRouter(model.config, [0.3, 1.0], hidden_size=16)
    ids = tokens()
    session = router.session(0.5, batch_size=2)
    with torch.no_grad():
        logits = model(ids, router=session)
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


def test_dynamic_router_gradients_reach_every_router_part() -> None:
    model = tiny_flextron()
    router = DynamicRouter(model.config, [0.3, 1.0], hidden_size=16)
    session = router.session(torch.tensor([0.3, 0.8]), batch_size=2, sampling=TRAIN)
    model(tokens(), router=session).square().mean().backward()
    for name, param in router.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name
    mlp, heads = session.usage()
    assert mlp.shape == (2, 2, 4) and heads.shape == (2, 2, 2)
    assert torch.allclose(mlp.sum(-1), torch.ones(2, 2))


def test_dynamic_router_rejects_a_budget_count_mismatch() -> None:
    router = DynamicRouter(tiny_flextron().config, [0.3, 1.0], hidden_size=16)
    with pytest.raises(ValueError, match="3 budgets for a batch of 2"):
        router.session(torch.tensor([0.3, 0.5, 1.0]), batch_size=2)


def test_kv_cache_decode_under_dynamic_routing_equals_full_recompute() -> None:
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
        steps = [model(prompt, kv_cache=cache, router=session)]
        for t in range(rest.shape[1]):
            steps.append(model(rest[:, t : t + 1], kv_cache=cache, router=session))
        cached = torch.cat(steps, 1)  # (2, 12, V)
        # A full recompute of the same sequences with the heads fixed at prefill.
        full = model(ids, router=session)
    widths = {w for c in session.mlp_choice for w in c.tolist()}
    assert len(widths) > 1  # the decode really mixed widths
    assert torch.allclose(cached, full, atol=1e-4)

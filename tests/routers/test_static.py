"""The static router: shapes, straight-through gradients, initialisation to configurations."""

from __future__ import annotations

import pytest
import torch

from flextron.latency.shape import LatencyShape
from flextron.model.config import ArchConfig
from flextron.routers import StaticRouter, uniform_init_archs

pytestmark = pytest.mark.usefixtures("one_thread")
SHAPE = LatencyShape("prefill", 1, 16)


def test_static_router_shapes_arch_and_interpolated_budget(tiny_flextron) -> None:
    model = tiny_flextron()
    router = StaticRouter(model.config, [0.3, 0.6, 1.0], hidden_size=16)
    mlp_logits, head_logits = router(0.45)
    assert mlp_logits.shape == (2, 4) and head_logits.shape == (2, 2)
    arch = router.arch(0.45)
    arch.validate(model.config)
    assert all(w in router.mlp_choices for w in arch.mlp_widths)


def test_static_router_straight_through_keeps_the_forward_and_reaches_the_router(
    train_sampling, tiny_flextron, tokens
) -> None:
    model = tiny_flextron()
    router = StaticRouter(model.config, [0.5, 1.0], hidden_size=16)
    ids = tokens()
    session = router.session(0.5, sampling=train_sampling)
    # Hard samples: one-hot probabilities, so each path's scale is exactly 1 in value.
    assert torch.equal(session.mlp_probs.sum(-1), torch.ones(2))
    assert torch.equal(session.mlp_scale.detach(), torch.ones(2))
    logits = model(ids, session=session)
    with torch.no_grad():
        assert torch.allclose(logits, model(ids, session.arch), atol=1e-5)
    logits.square().mean().backward()
    grads = [p.grad for p in router.parameters()]
    assert all(g is not None and g.abs().sum() > 0 for g in grads)


def test_static_router_init_gives_each_trained_budget_its_configuration(
    synthetic_table, tiny_flextron
) -> None:
    torch.manual_seed(0)
    model, table = tiny_flextron(), synthetic_table()
    router = StaticRouter(model.config, [0.5, 0.75, 1.0], hidden_size=8)
    archs = uniform_init_archs(model, table, router, SHAPE)
    archs[0.75] = ArchConfig((64, 256), (4, 2))  # heterogeneous works as well
    router.init_to(archs, margin=3.0)
    for budget, arch in archs.items():
        assert router.arch(budget) == arch
        with torch.no_grad():
            mlp_logits, head_logits = router(budget)
        assert float(mlp_logits.max(-1).values.min()) == pytest.approx(3.0, abs=1e-4)
        assert float(head_logits.max(-1).values.min()) == pytest.approx(3.0, abs=1e-4)
    with pytest.raises(ValueError, match="one configuration per trained budget"):
        router.init_to({0.5: archs[0.5]})
    with pytest.raises(ValueError, match=r"MLP widths \[192\] are not among"):
        StaticRouter(model.config, [1.0], mlp_choices=[256, 64]).init_to(
            {1.0: ArchConfig((192, 256), (4, 4))}
        )

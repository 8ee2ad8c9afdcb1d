"""Training objectives: the LUT latency expectation and the latency loss."""

from __future__ import annotations

import pytest
import torch

from flextron.latency.shape import LatencyShape
from flextron.model.config import ArchConfig
from flextron.routers import expected_latency, latency_loss

pytestmark = pytest.mark.usefixtures("one_thread")


def test_cost_vectors_match_predict_with_one_hot_probabilities(synthetic_table) -> None:
    table = synthetic_table()
    mlp_choices, head_choices = [256, 128, 64], [4, 2]
    fixed, mlp_costs, head_costs = table.cost_vectors(
        mlp_choices, head_choices, LatencyShape("prefill", 1, 16)
    )
    mlp_probs = torch.tensor([[[0.0, 0.0, 1.0], [1.0, 0.0, 0.0]]])  # layer 0: 64, layer 1: 256
    head_probs = torch.tensor([[[0.0, 1.0], [1.0, 0.0]]])  # layer 0: 2 heads, layer 1: 4
    latency = expected_latency(mlp_probs, head_probs, fixed, mlp_costs, head_costs)
    assert latency.item() == pytest.approx(
        table.predict(ArchConfig((64, 256), (2, 4)), LatencyShape("prefill", 1, 16))
    )
    # Soft probabilities give the expectation, and it is differentiable.
    soft = torch.full((1, 2, 3), 1 / 3, requires_grad=True)
    latency = expected_latency(soft, head_probs, fixed, mlp_costs, head_costs)
    assert latency.item() == pytest.approx(2 + 2 * (4 + 2 + 1) / 3 + 3)
    latency.sum().backward()
    assert torch.allclose(soft.grad[0, 0], mlp_costs)


def test_latency_loss_has_a_dead_zone_and_pushes_towards_the_target() -> None:
    target = 10.0
    inside = torch.tensor([10.4], requires_grad=True)
    assert latency_loss(inside, target, dead_zone=0.05).item() == 0.0
    over = torch.tensor([12.0], requires_grad=True)
    loss = latency_loss(over, target, dead_zone=0.05)
    assert loss.item() == pytest.approx(0.2 - 0.05)
    loss.backward()
    assert over.grad.item() > 0  # descending lowers the latency
    under = torch.tensor([5.0], requires_grad=True)
    latency_loss(under, target, dead_zone=0.05).backward()
    assert under.grad.item() < 0

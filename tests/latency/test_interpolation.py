"""The piecewise-linear interpolation behind LUT costs, the budget encoder and calibration offsets."""

from __future__ import annotations

import torch

from flextron.latency.interpolation import interpolation_weights


def test_weights_are_one_hot_at_points_and_linear_between() -> None:
    points = torch.tensor([0.3, 0.5, 1.0])
    weights = interpolation_weights(points, torch.tensor([0.5, 0.4, 0.75]))
    assert torch.allclose(weights, torch.tensor([[0.0, 1.0, 0.0], [0.5, 0.5, 0.0], [0.0, 0.5, 0.5]]))


def test_beyond_the_ends_held_or_extrapolated() -> None:
    points = torch.tensor([16.0, 32.0], dtype=torch.float64)
    values = torch.tensor([1.0, 2.0], dtype=torch.float64)
    x = torch.tensor([8.0, 48.0], dtype=torch.float64)
    assert (interpolation_weights(points, x) @ values).tolist() == [1.0, 2.0]
    assert (interpolation_weights(points, x, extrapolate=True) @ values).tolist() == [0.5, 3.0]


def test_a_single_point_is_constant() -> None:
    weights = interpolation_weights(torch.tensor([0.5]), torch.tensor([0.2, 0.9]), extrapolate=True)
    assert torch.equal(weights, torch.ones(2, 1))

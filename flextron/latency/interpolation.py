"""Piecewise-linear interpolation as weights over the interpolation points.

One helper for every interpolation of the router subsystem: latency costs between profiled
shapes and choices (extrapolated linearly beyond the ends), the budget encoder's weights over
the trained budgets and the dynamic router's calibration offsets (both held constant beyond
the ends).
"""

from __future__ import annotations

import torch


def interpolation_weights(points: torch.Tensor, x: torch.Tensor, extrapolate: bool = False) -> torch.Tensor:
    """points: (K,) ascending, x: (N,) -> weights (N, K) with y(x) = weights @ y(points).

    Each row has at most two non-zero weights (the neighbouring points), summing to 1.
    Beyond the ends: the end value (extrapolate=False) or the end segment's line (True).
    """
    x = x.to(points.dtype).reshape(-1)
    weights = torch.zeros(x.shape[0], points.shape[0], dtype=points.dtype, device=points.device)
    if points.shape[0] == 1:
        return weights.fill_(1.0)
    if not extrapolate:
        x = x.clamp(float(points[0]), float(points[-1]))
    upper = torch.searchsorted(points, x).clamp(1, points.shape[0] - 1)
    lower = upper - 1
    fraction = (x - points[lower]) / (points[upper] - points[lower])
    weights.scatter_(1, lower[:, None], (1 - fraction)[:, None])
    weights.scatter_add_(1, upper[:, None], fraction[:, None])
    return weights

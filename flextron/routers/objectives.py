"""Training objectives: the LUT latency expectation and its loss, and the task losses.

The router's latency objective: with soft (straight-through) router probabilities the LUT
latency is an expectation, differentiable in them; the loss pushes it towards the target,
latency_budget x the full model's LUT latency, outside a dead zone.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from flextron.latency.shape import DEFAULT_SHAPE, LatencyShape
from flextron.latency.table import LatencyTable
from flextron.model.elastic_model import FlextronModel
from flextron.routers.base import Router
from flextron.routers.sampling import RoutingSession


def expected_latency(
    mlp_probs: torch.Tensor,
    head_probs: torch.Tensor,
    fixed_ms: float,
    mlp_costs: torch.Tensor,
    head_costs: torch.Tensor,
) -> torch.Tensor:
    """LUT latency expectation under router probabilities (differentiable).

    mlp_probs: (B, L, Cm), head_probs: (B, L, Ch), costs (Cm,), (Ch,) ms per layer -> (B,) ms.
    """
    mlp = (mlp_probs * mlp_costs.to(mlp_probs)).sum((-1, -2))
    heads = (head_probs * head_costs.to(head_probs)).sum((-1, -2))
    return fixed_ms + mlp + heads


def latency_loss(
    latency_ms: torch.Tensor, target_ms: torch.Tensor | float, dead_zone: float = 0.05
) -> torch.Tensor:
    """Mean of max(0, |latency - target| / target - dead_zone): no push within the dead zone."""
    target = torch.as_tensor(target_ms, dtype=latency_ms.dtype, device=latency_ms.device)
    return torch.relu((latency_ms - target).abs() / target - dead_zone).mean()


@dataclass
class LatencyTarget:
    """The LUT costs at the shape a latency budget refers to (e.g. prefill, batch 1, 128 tokens)."""

    fixed_ms: float
    mlp_costs: torch.Tensor  # (Cm,) ms per layer, the router's MLP choices
    head_costs: torch.Tensor  # (Ch,)
    full_ms: float

    @classmethod
    def from_table(
        cls, table: LatencyTable, router: Router, model: FlextronModel, shape: LatencyShape = DEFAULT_SHAPE
    ) -> LatencyTarget:
        table.check_model(model.config)
        fixed, mlp, heads = table.cost_vectors(router.mlp_choices, router.head_choices, shape)
        return cls(fixed, mlp, heads, table.predict(model.full_arch(), shape))

    def latency(self, mlp_probs: torch.Tensor, head_probs: torch.Tensor) -> torch.Tensor:
        """(B, L, Cm), (B, L, Ch) -> expected ms (B,)."""
        return expected_latency(mlp_probs, head_probs, self.fixed_ms, self.mlp_costs, self.head_costs)

    def calibration_costs(self) -> dict[str, list[float]]:
        """The per-choice costs in the form DynamicRouter.set_calibration takes them."""
        return {"mlp_costs": self.mlp_costs.tolist(), "head_costs": self.head_costs.tolist()}


def usage_features(session: RoutingSession) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(SM input (1, F) averaged over the batch, mlp probs (1, L, Cm), head probs (1, L, Ch))."""
    mlp, heads = session.usage()
    mlp, heads = mlp.float().mean(0, keepdim=True), heads.float().mean(0, keepdim=True)
    return torch.cat([mlp.flatten(1), heads.flatten(1)], 1), mlp, heads

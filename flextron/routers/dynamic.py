"""The dynamic router: per-token MLP widths and per-sequence head counts.

Per layer, the MLP input hidden state (+ the budget embedding) -> per-token logits over MLP
widths; the head count is chosen per sequence from the mean of the attention input over the
prompt, once, at prefill, and reused at every decode step so the KV cache stays consistent.
Inference runs the fused `ops.route` (logits + argmax + grouping in one op) and
`ops.routed_nested_mlp` (per-token widths, weight prefixes); see flextron.routers.sessions.

A calibration (`set_calibration`, flextron.routers.calibration) lowers every logit by
offset(budget) x the choice's LUT cost, so that each budget lands on its latency target.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from flextron import ops
from flextron.latency.interpolation import interpolation_weights
from flextron.model.config import ArchConfig, ModelConfig
from flextron.routers.base import Router
from flextron.routers.sampling import INFERENCE, Sampling
from flextron.routers.sessions import DynamicSession


def _peaked_bias(choices: Sequence[int], index: int, margin: float) -> torch.Tensor:
    """(C,) logit bias: `margin` at choices[index], falling quadratically with the distance
    |choice - choices[index]| to 0 at a distance of the choices' whole range."""
    values = torch.tensor(choices, dtype=torch.float32)
    span = max(float(values.max() - values.min()), 1.0)
    return margin * (1 - ((values - values[index]) / span) ** 2)


class DynamicRouter(Router):
    """Per-token MLP widths and per-sequence head counts from hidden states + budget."""

    kind = "dynamic"

    def __init__(
        self,
        config: ModelConfig,
        budgets: Sequence[float],
        mlp_choices: Sequence[int] | None = None,
        head_choices: Sequence[int] | None = None,
        hidden_size: int = 128,
        calibration: dict | None = None,
    ) -> None:
        if config.mlp_bias:
            raise ValueError("dynamic routing runs ops.routed_nested_mlp, which has no MLP bias")
        super().__init__(config, budgets, mlp_choices, head_choices, hidden_size)
        d, k, layers = config.hidden_size, len(self.encoder.budgets), config.num_layers
        # Per layer: hidden = LeakyReLU(x W_in^T + budget_embedding); logits = hidden W_out^T.
        self.mlp_in = nn.ModuleList(nn.Linear(d, hidden_size) for _ in range(layers))
        self.mlp_budget = nn.ModuleList(nn.Linear(k, hidden_size, bias=False) for _ in range(layers))
        self.mlp_out = nn.ParameterList(
            nn.Parameter(torch.randn(len(self.mlp_choices), hidden_size) / math.sqrt(hidden_size))
            for _ in range(layers)
        )
        self.head_in = nn.ModuleList(nn.Linear(d, hidden_size) for _ in range(layers))
        self.head_budget = nn.ModuleList(nn.Linear(k, hidden_size, bias=False) for _ in range(layers))
        self.head_out = nn.ModuleList(nn.Linear(hidden_size, len(self.head_choices)) for _ in range(layers))
        # Per layer and trained budget, a direct logit bias (interpolated like the budget):
        # it lets each budget start at its own width (init_to).
        self.mlp_bias = nn.Parameter(torch.zeros(layers, k, len(self.mlp_choices)))
        self.head_bias = nn.Parameter(torch.zeros(layers, k, len(self.head_choices)))
        self.calibration = None
        if calibration is not None:
            self.set_calibration(**calibration)

    def set_calibration(
        self,
        budgets: Sequence[float],
        offsets: Sequence[float],
        mlp_costs: Sequence[float],
        head_costs: Sequence[float],
    ) -> None:
        """Inference-time latency calibration (flextron.routers.calibration).

        At budget b, every logit is lowered by offset(b) x the choice's LUT cost (ms): a
        positive offset steers tokens to cheaper widths, a negative one to wider.  offset(b)
        interpolates linearly between the calibrated budgets (constant beyond them).
        """
        budgets, offsets = [float(b) for b in budgets], [float(o) for o in offsets]
        if not budgets or len(budgets) != len(offsets) or budgets != sorted(set(budgets)):
            raise ValueError(
                f"calibration needs ascending distinct budgets, one offset each, got {budgets}, {offsets}"
            )
        if len(mlp_costs) != len(self.mlp_choices) or len(head_costs) != len(self.head_choices):
            raise ValueError("calibration costs need one value per MLP / head choice")
        self.calibration = {
            "budgets": budgets,
            "offsets": offsets,
            "mlp_costs": [float(c) for c in mlp_costs],
            "head_costs": [float(c) for c in head_costs],
        }

    def offsets(self, budgets: torch.Tensor) -> torch.Tensor:
        """(B,) budgets -> (B,) calibration offsets (zeros without a calibration)."""
        if self.calibration is None:
            return torch.zeros_like(budgets, dtype=torch.float32)
        points = torch.tensor(self.calibration["budgets"], device=budgets.device)
        values = torch.tensor(self.calibration["offsets"], device=budgets.device)
        return interpolation_weights(points, budgets.float()) @ values

    def costs(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """The calibration's (mlp costs (Cm,), head costs (Ch,)); zeros without a calibration."""
        if self.calibration is None:
            return (
                torch.zeros(len(self.mlp_choices), device=device),
                torch.zeros(len(self.head_choices), device=device),
            )
        return (
            torch.tensor(self.calibration["mlp_costs"], device=device),
            torch.tensor(self.calibration["head_costs"], device=device),
        )

    @torch.no_grad()
    def init_to(
        self, archs: dict[float, ArchConfig], margin: float = 3.0, *, hidden_scale: float = 0.1
    ) -> None:
        """Start every trained budget at a given configuration (e.g. the uniform one of its latency).

        The per-budget biases peak at the configuration's choices (`margin`) and fall
        quadratically with the distance in width (head count) to 0 across the choices' range
        (`_peaked_bias`); the hidden-state terms are scaled by `hidden_scale`, so that at
        first each budget routes most tokens to (or next to) its configuration's width, and
        training learns which tokens deserve more or less.  Why peaked rather than one-hot:
        the latency calibration lowers logits by offset x cost; under a one-hot bias every
        other choice ties, so a layer jumps from its width straight to the narrowest one
        (width 64 in layer 0 costs most of a model's quality), while a peaked bias makes it
        step to the next narrower width, and the interpolation between two trained budgets
        peaks between their widths.
        """
        super().init_to(archs, margin)
        for layer in range(self.num_layers):
            self.mlp_out[layer].mul_(hidden_scale)
            self.head_out[layer].weight.mul_(hidden_scale)
            self.head_out[layer].bias.zero_()

    def _init_to_indices(self, indices: list[tuple[list[int], list[int]]], margin: float) -> None:
        for k, (mlp, heads) in enumerate(indices):
            for layer in range(self.num_layers):
                self.mlp_bias[layer, k] = _peaked_bias(self.mlp_choices, mlp[layer], margin)
                self.head_bias[layer, k] = _peaked_bias(self.head_choices, heads[layer], margin)

    def settings(self) -> dict[str, Any]:
        settings = super().settings()
        if self.calibration is not None:
            settings["calibration"] = self.calibration
        return settings

    def session(
        self, budget: float | torch.Tensor, batch_size: int = 1, sampling: Sampling = INFERENCE
    ) -> DynamicSession:
        """A routing session for `batch_size` sequences at `budget` (a number or (B,))."""
        weights = self.encoder(budget)  # (1 or B, K)
        if weights.shape[0] not in (1, batch_size):
            raise ValueError(f"{weights.shape[0]} budgets for a batch of {batch_size}")
        values = torch.as_tensor(budget, dtype=torch.float32, device=weights.device).reshape(-1)
        offsets = self.offsets(values).expand(batch_size)
        return DynamicSession(
            self, weights.expand(batch_size, -1), offsets, self.costs(weights.device), sampling
        )

    def mlp_budget_terms(
        self, layer: int, budget_weights: torch.Tensor, offsets: torch.Tensor, mlp_costs: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """budget_weights: (B, K), offsets: (B,), mlp_costs: (Cm,) (`costs`) -> the parts of a
        layer's MLP routing that depend on the budget, not on the tokens (a routing session
        computes them once): (budget hidden term (B, H), budget features (B, K+1), weight
        (Cm, H+K+1)), in budget_weights' dtype.

        With `mlp_token_features`, logits = features @ weight^T = hidden W_out^T + budget_weights
        @ mlp_bias - offset * costs: one matrix product, so that `ops.route` fuses it with the
        argmax and the grouping.
        """
        budget_hidden = self.mlp_budget[layer](budget_weights)
        extra = torch.cat([budget_weights, offsets[:, None].to(budget_weights)], 1)
        weight = torch.cat([self.mlp_out[layer], self.mlp_bias[layer].T, -mlp_costs[:, None].to(extra)], 1)
        return budget_hidden, extra, weight.to(extra)

    def mlp_token_features(
        self, layer: int, x: torch.Tensor, terms: tuple[torch.Tensor, torch.Tensor, torch.Tensor]
    ) -> torch.Tensor:
        """x: (B, T, D) and `mlp_budget_terms` -> features (B*T, H+K+1)."""
        budget_hidden, extra, _ = terms
        # ops.nested_linear, not nn.Linear: at decode (one row) it streams the weight through the
        # few-row kernel; a BLAS GEMV read it at a third of the bandwidth, 1.1 of the 5.4 ms the
        # routed path cost a SmolLM2 decode step beyond the dense model (docs/routers.md).
        first = self.mlp_in[layer]
        # The router keeps its own dtype (fp32, as trained and calibrated) when the model runs in
        # another (bf16): its features are computed in it.
        hidden = ops.nested_linear(x.to(first.weight.dtype), first.weight, first.bias)  # (B, T, H)
        hidden = hidden + budget_hidden[:, None].to(hidden.dtype)
        batch, tokens = x.shape[:2]
        features = torch.cat(
            [nn.functional.leaky_relu(hidden), extra[:, None].to(hidden.dtype).expand(batch, tokens, -1)], -1
        )
        return features.flatten(0, 1)

    def head_logits(
        self,
        layer: int,
        x: torch.Tensor,
        budget_weights: torch.Tensor,
        offsets: torch.Tensor,
        head_costs: torch.Tensor,
    ) -> torch.Tensor:
        """x: (B, T, D) prompt, head_costs: (Ch,) (`costs`) -> per-sequence logits (B, Ch) from the
        mean over positions."""
        prompt = x.mean(1).to(self.head_in[layer].weight.dtype)  # (B, D), in the router's dtype
        hidden = self.head_in[layer](prompt) + self.head_budget[layer](budget_weights)
        logits = self.head_out[layer](nn.functional.leaky_relu(hidden))
        logits = logits + budget_weights @ self.head_bias[layer]
        return logits - offsets[:, None].to(logits) * head_costs.to(logits)

"""The Router base class: choices, the budget encoder, sessions, initialisation to configurations.

A router picks each layer's sub-network (MLP width, head count) for a budget, a fraction of
the full model's latency at the directory's latency shape.  Choice lists are kept widest
first, the order `ops.route` / `ops.routed_nested_mlp` use.  Two kinds derive from it:
flextron.routers.static (one configuration per budget) and flextron.routers.dynamic (per
token MLP widths, per sequence head counts).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from torch import nn

from flextron.latency.interpolation import interpolation_weights
from flextron.model.config import ArchConfig, ModelConfig
from flextron.routers.sampling import INFERENCE, RoutingSession, Sampling


def default_mlp_choices(config: ModelConfig, count: int = 8) -> list[int]:
    """`count` allowed MLP widths from the smallest allowed to d_ff, evenly spread, widest first.

    The small end is included so that low budgets (e.g. 0.3 of the full latency) are
    reachable; widths stay multiples of the model's MLP granularity (64 for SmolLM2).
    """
    allowed = config.mlp_choices()
    if count < 1:
        raise ValueError(f"count must be >= 1, got {count}")
    if count >= len(allowed):
        return sorted(allowed, reverse=True)
    picks = (
        {allowed[round(i * (len(allowed) - 1) / (count - 1))] for i in range(count)}
        if count > 1
        else {allowed[-1]}
    )
    return sorted(picks, reverse=True)


def default_head_choices(config: ModelConfig) -> list[int]:
    """Every allowed head count (whole KV groups), widest first."""
    return sorted(config.head_choices(), reverse=True)


def _check_choices(name: str, choices: Sequence[int], allowed: Sequence[int]) -> list[int]:
    choices = [int(c) for c in choices]
    if not choices or any(c not in allowed for c in choices):
        raise ValueError(f"{name} must be a non-empty subset of the allowed {list(allowed)}, got {choices}")
    if choices != sorted(set(choices), reverse=True):
        raise ValueError(f"{name} must be strictly descending (widest first), got {choices}")
    return choices


class BudgetEncoder(nn.Module):
    """Budget -> weights over the trained budgets: one-hot at a trained budget, and linear
    interpolation between the two neighbours for a budget in between."""

    def __init__(self, budgets: Sequence[float]) -> None:
        super().__init__()
        budgets = sorted(float(b) for b in budgets)
        if not budgets or any(not 0 < b <= 1 for b in budgets) or len(set(budgets)) != len(budgets):
            raise ValueError(f"trained budgets must be distinct numbers in (0, 1], got {budgets}")
        self.budgets = budgets
        self.register_buffer("points", torch.tensor(budgets), persistent=False)

    def forward(self, budget: float | torch.Tensor) -> torch.Tensor:
        """budget: a number or (B,) -> (B, K) weights (rows sum to 1); (1, K) for a number."""
        values = torch.as_tensor(budget, dtype=torch.float32, device=self.points.device).reshape(-1)
        low, high = self.budgets[0], self.budgets[-1]
        if bool(((values < low - 1e-9) | (values > high + 1e-9)).any()):
            raise ValueError(
                f"budget {', '.join(f'{v:.4g}' for v in values.tolist())} outside the router's trained "
                f"range [{low:g}, {high:g}] "
                f"(trained budgets {self.budgets})"
            )
        return interpolation_weights(self.points, values)


class Router(nn.Module, ABC):
    """Budget -> per-layer choices among `mlp_choices` (MLP widths) and `head_choices`.

    Subclasses build their networks on top of the shared state set here and implement
    `session` (a routing session the model's forward calls per layer) and `_init_to_indices`.
    """

    kind: ClassVar[str]  # "static" or "dynamic": the key in the model directory's router files

    def __init__(
        self,
        config: ModelConfig,
        budgets: Sequence[float],
        mlp_choices: Sequence[int] | None = None,
        head_choices: Sequence[int] | None = None,
        hidden_size: int = 128,
    ) -> None:
        super().__init__()
        self.num_layers = config.num_layers
        self.mlp_choices = _check_choices(
            "mlp_choices", mlp_choices or default_mlp_choices(config), config.mlp_choices()
        )
        self.head_choices = _check_choices(
            "head_choices", head_choices or default_head_choices(config), config.head_choices()
        )
        self.encoder = BudgetEncoder(budgets)
        self.hidden_size = hidden_size

    @property
    def budgets(self) -> list[float]:
        """The trained budgets, ascending."""
        return self.encoder.budgets

    @abstractmethod
    def session(
        self, budget: float | torch.Tensor, batch_size: int = 1, sampling: Sampling = INFERENCE
    ) -> RoutingSession:
        """A routing session for `batch_size` sequences at `budget` (the model's `session=`)."""

    def settings(self) -> dict[str, Any]:
        """What rebuilds the router (with the model's config): budgets, choices, hidden size."""
        return {
            "budgets": self.budgets,
            "mlp_choices": self.mlp_choices,
            "head_choices": self.head_choices,
            "hidden_size": self.hidden_size,
        }

    def arch_indices(self, arch: ArchConfig) -> tuple[list[int], list[int]]:
        """The router's choice indices of a configuration (ValueError naming a value it cannot pick)."""
        indices = []
        for name, values, choices in (
            ("MLP width", arch.mlp_widths, self.mlp_choices),
            ("head count", arch.heads, self.head_choices),
        ):
            if len(values) != self.num_layers:
                raise ValueError(f"configuration has {len(values)} layers, the router {self.num_layers}")
            missing = sorted(set(values) - set(choices))
            if missing:
                raise ValueError(f"{name}s {missing} are not among the router's choices {choices}")
            indices.append([choices.index(v) for v in values])
        return indices[0], indices[1]

    @torch.no_grad()
    def init_to(self, archs: dict[float, ArchConfig], margin: float = 3.0) -> None:
        """Start every trained budget at a given configuration (e.g. the uniform one of its
        latency): `archs` holds one per trained budget; `margin` is the logit margin of its choices."""
        if margin <= 0:
            raise ValueError(f"margin must be > 0, got {margin}")
        given = {round(float(b), 9): a for b, a in archs.items()}
        budgets = [round(b, 9) for b in self.budgets]
        if sorted(given) != budgets:
            raise ValueError(
                f"need one configuration per trained budget {self.budgets}, got budgets {sorted(given)}"
            )
        self._init_to_indices([self.arch_indices(given[b]) for b in budgets], margin)

    @abstractmethod
    def _init_to_indices(self, indices: list[tuple[list[int], list[int]]], margin: float) -> None:
        """indices[k]: (MLP, head) choice indices per layer of trained budget k's configuration."""

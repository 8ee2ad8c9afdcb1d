"""Sub-network sampling for elastic training: one configuration per micro-batch.

With probability `p_full` the full model; otherwise, by `rule`:
  "budget": the configuration of a budget drawn from `budgets` (equally likely, or in the
            proportions `budget_weights`), as `arch_for_budget` resolves it (the model's
            measured choices, flextron.model.budget_configs; default: the fixed rule);
  "random": per layer, an MLP width and a head count drawn independently from the allowed
            choices at or above `min_fraction` of the layer's size;
  "mixed":  "budget" or "random" with equal probability.
The draw depends only on (seed, micro-batch index), so every data-parallel rank draws the
same sub-network without communicating, and a resumed run draws what the uninterrupted
one would have.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from flextron.model.config import DEFAULT_BUDGETS, ArchConfig, ModelConfig, check_budget
from flextron.model.config import arch_for_budget as fixed_rule

RULES = ("budget", "random", "mixed")


def check_budget_weights(weights: tuple[float, ...], budgets: tuple[float, ...]) -> tuple[float, ...]:
    """`weights` as a tuple, or ValueError unless () or one weight >= 0 per budget, not all zero."""
    weights = tuple(float(w) for w in weights)
    if weights and (len(weights) != len(budgets) or min(weights) < 0 or not any(weights)):
        raise ValueError(
            f"budget weights {list(weights)} must be one number >= 0 per budget {list(budgets)}, not all zero"
        )
    return weights


class SubnetSampler:
    """Draws the sub-network of micro-batch i: `sample(i) -> ArchConfig`."""

    def __init__(
        self,
        config: ModelConfig,
        rule: str = "budget",
        *,
        p_full: float = 1 / 3,
        budgets: tuple[float, ...] = DEFAULT_BUDGETS,
        budget_weights: tuple[float, ...] = (),
        min_fraction: float = 0.25,
        seed: int = 0,
        arch_for_budget: Callable[[float], ArchConfig] | None = None,
    ) -> None:
        if rule not in RULES:
            raise ValueError(f"unknown budget rule {rule!r}; choose one of {RULES}")
        if not 0.0 <= p_full <= 1.0:
            raise ValueError(f"p_full must be in [0, 1], got {p_full}")
        if not budgets:
            raise ValueError("budgets must list at least one budget")
        self.budgets = tuple(check_budget(b) for b in budgets)
        self.budget_weights = check_budget_weights(budget_weights, self.budgets)
        # Built once: multinomial draws a budget index from it on every micro-batch.
        self._weights = torch.tensor(self.budget_weights, dtype=torch.float64)  # (len(budgets),)
        self.min_fraction = check_budget(min_fraction)
        self.config, self.rule, self.p_full, self.seed = config, rule, p_full, seed
        self.arch_for_budget = arch_for_budget or (lambda budget: fixed_rule(config, budget))
        layers = range(config.num_layers)
        # Allowed choices per layer, restricted to >= min_fraction of the layer's size.
        self.mlp_choices = [
            [w for w in config.mlp_choices(i) if w >= min_fraction * config.layer_intermediate_size(i)]
            or [config.layer_intermediate_size(i)]
            for i in layers
        ]
        self.head_choices = [
            [h for h in config.head_choices(i) if h >= min_fraction * config.layer_heads(i)]
            or [config.layer_heads(i)]
            for i in layers
        ]

    def sample(self, index: int) -> ArchConfig:
        """The sub-network of micro-batch `index` (0, 1, 2, ... over the whole run)."""
        # A generator of its own: the draw never touches (or depends on) the global RNG.
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + index)

        def uniform() -> float:
            return float(torch.rand((), generator=generator))

        def pick(choices: list) -> object:
            return choices[int(torch.randint(len(choices), (), generator=generator))]

        if uniform() < self.p_full:
            return ArchConfig.full(self.config)
        rule = self.rule if self.rule != "mixed" else pick(["budget", "random"])
        if rule == "budget":
            if not self.budget_weights:
                return self.arch_for_budget(pick(list(self.budgets)))
            drawn = int(torch.multinomial(self._weights, 1, generator=generator))
            return self.arch_for_budget(self.budgets[drawn])
        return ArchConfig(
            tuple(pick(choices) for choices in self.mlp_choices),
            tuple(pick(choices) for choices in self.head_choices),
        )

    def describe(self, arch: ArchConfig) -> str:
        """A short label for logs: "full", "budget 0.5" or "random"."""
        if arch == ArchConfig.full(self.config):
            return "full"
        for budget in self.budgets:
            if arch == self.arch_for_budget(budget):
                return f"budget {budget:g}"
        return "random"

"""Sub-network sampling for elastic training: one configuration per micro-batch.

With probability `p_full` the full model; otherwise, by `rule`:
  "budget": the configuration of a budget drawn from `budgets` (equally likely, or in the
            proportions `budget_weights`), as `arch_for_budget` resolves it (the model's
            measured choices, flextron.model.budget_configs; default: the fixed rule);
  "random": per layer, an MLP width and a head count drawn independently from the allowed
            choices at or above `min_fraction` of the layer's size;
  "mixed":  "budget" or "random" with equal probability;
  "token":  per-token MLP widths (`TokenWidths`): the head counts of a budget drawn as "budget"
            does, and every token, in every layer, at a width drawn from those the trained
            configurations use there (the budgets' widths and the full width).  Why: a dynamic
            router gives each token its own width, so the model must learn to run with widths
            mixed within a sequence (design.md#routers); drawing from the trained widths keeps
            the router's choices inside what training covers.
The draw depends only on (seed, micro-batch index), so every data-parallel rank draws the
same sub-network without communicating, and a resumed run draws what the uninterrupted
one would have.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from flextron.model.config import DEFAULT_BUDGETS, ArchConfig, ModelConfig, check_budget
from flextron.model.config import arch_for_budget as fixed_rule
from flextron.model.mixed_widths import ForcedSession

RULES = ("budget", "random", "mixed", "token")


@dataclass(frozen=True)
class TokenWidths:
    """The "token" rule's draw for one micro-batch: `budget`'s configuration gives the head
    counts; each layer's tokens draw their widths from `layer_widths[layer]` (widest first)."""

    budget: float
    arch: ArchConfig
    layer_widths: tuple[tuple[int, ...], ...]
    seed: int

    def session(self, num_tokens: int, device: torch.device) -> ForcedSession:
        """The forced routing of `num_tokens` tokens (B*T): the same draw on every call."""
        generator = torch.Generator().manual_seed(self.seed)
        choice = torch.stack(
            [torch.randint(len(widths), (num_tokens,), generator=generator) for widths in self.layer_widths]
        )  # (L, B*T)
        return ForcedSession(self.layer_widths, choice.to(device), self.arch.heads)


def check_budget_weights(weights: tuple[float, ...], budgets: tuple[float, ...]) -> tuple[float, ...]:
    """`weights` as a tuple, or ValueError unless () or one weight >= 0 per budget, not all zero."""
    weights = tuple(float(w) for w in weights)
    if weights and (len(weights) != len(budgets) or min(weights) < 0 or not any(weights)):
        raise ValueError(
            f"budget weights {list(weights)} must be one number >= 0 per budget {list(budgets)}, not all zero"
        )
    return weights


class SubnetSampler:
    """Draws the sub-network of micro-batch i: `sample(i) -> ArchConfig` (or `TokenWidths`)."""

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

        # The token rule's widths: per layer, the MLP widths of the budgets' configurations and the
        # full width, widest first (they depend only on the model and the budgets).
        archs = [self.arch_for_budget(b) for b in self.budgets] + [ArchConfig.full(config)]
        self.token_widths = tuple(
            tuple(sorted({arch.mlp_widths[i] for arch in archs}, reverse=True)) for i in layers
        )

    def sample(self, index: int) -> ArchConfig | TokenWidths:
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
        if rule in ("budget", "token"):
            if not self.budget_weights:
                budget = pick(list(self.budgets))
            else:
                budget = self.budgets[int(torch.multinomial(self._weights, 1, generator=generator))]
            if rule == "budget":
                return self.arch_for_budget(budget)
            seed = int(torch.randint(2**62, (), generator=generator))
            return TokenWidths(budget, self.arch_for_budget(budget), self.token_widths, seed)
        return ArchConfig(
            tuple(pick(choices) for choices in self.mlp_choices),
            tuple(pick(choices) for choices in self.head_choices),
        )

    def describe(self, arch: ArchConfig | TokenWidths) -> str:
        """A short label for logs: "full", "budget 0.5", "random" or "tokens at 0.5"."""
        if isinstance(arch, TokenWidths):
            return f"tokens at {arch.budget:g}"
        if arch == ArchConfig.full(self.config):
            return "full"
        for budget in self.budgets:
            if arch == self.arch_for_budget(budget):
                return f"budget {budget:g}"
        return "random"

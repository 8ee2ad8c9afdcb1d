"""Routers: pick each layer's sub-network from a budget (static) or per token (dynamic).

Static router (DESIGN.md §1 step 4): budget -> interpolated one-hot over the trained
budgets -> Linear -> LeakyReLU -> Linear -> per-layer logits over MLP widths and head
counts.  Its choices are one `ArchConfig` per budget, so it serves export as well.

Dynamic router: per layer, the MLP input hidden state (+ the budget embedding) -> per-token
logits over MLP widths; the head count is chosen per sequence from the mean of the
attention input over the prompt, once, at prefill, and reused at every decode step so the
KV cache stays consistent.  Inference runs the fused `ops.route` (logits + argmax +
grouping in one op) and `ops.routed_nested_mlp` (per-token widths, weight prefixes).

Training: discrete choices by Gumbel-softmax with straight-through hard samples (the
one-hot in value, the soft gradient in backward; `ops.route(..., hard=True)`) at an
annealed temperature; the chosen path's output is multiplied by its probability (value 1,
so the forward is unchanged) which carries the gradient to the router.

Choice lists are kept widest first, the order `ops.route` / `ops.routed_nested_mlp` use.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from flextron import ops
from flextron.config import ArchConfig, ModelConfig
from flextron.nn.elastic import ElasticAttention, ElasticMLP, KVCache


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


class TemperatureSchedule:
    """Gumbel-softmax temperature annealed exponentially from `start` to `end` over `steps`."""

    def __init__(self, start: float = 1.0, end: float = 0.1, steps: int = 1000) -> None:
        if not 0 < end <= start or steps < 1:
            raise ValueError(f"need 0 < end <= start and steps >= 1, got {start=}, {end=}, {steps=}")
        self.start, self.end, self.steps = start, end, steps

    def __call__(self, step: int) -> float:
        fraction = min(max(step, 0), self.steps) / self.steps
        return self.start * (self.end / self.start) ** fraction


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
        if len(self.budgets) == 1:
            return torch.ones(values.shape[0], 1, device=values.device)
        upper = torch.searchsorted(self.points, values.clamp(low, high)).clamp(1, len(self.budgets) - 1)
        lower = upper - 1
        fraction = ((values - self.points[lower]) / (self.points[upper] - self.points[lower])).clamp(0, 1)
        weights = torch.zeros(values.shape[0], len(self.budgets), device=values.device)
        weights.scatter_(1, lower[:, None], (1 - fraction)[:, None])
        weights.scatter_add_(1, upper[:, None], fraction[:, None])
        return weights


def gumbel_noise(
    shape: Sequence[int], generator: torch.Generator | None = None, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """Standard Gumbel samples -log(-log(U)), U ~ Uniform(0, 1)."""
    uniform = torch.rand(tuple(shape), generator=generator).clamp_(1e-10, 1 - 1e-7)
    return (-torch.log(-torch.log(uniform))).to(device)


@dataclass
class Sampling:
    """How a routing session draws its choices."""

    tau: float = 1.0  # Gumbel-softmax temperature
    noise: bool = False  # add Gumbel noise (training) or take the argmax (inference)
    scale: bool = False  # multiply each chosen path by its probability (training)
    generator: torch.Generator | None = None

    def __post_init__(self) -> None:
        if not self.tau > 0:
            raise ValueError(f"tau must be > 0, got {self.tau}")


INFERENCE = Sampling()


def _pick(logits: torch.Tensor, sampling: Sampling) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """logits (N, C) -> (choice (N,), probs (N, C) straight-through, scale (N,) or None)."""
    noise = gumbel_noise(logits.shape, sampling.generator, logits.device) if sampling.noise else None
    choice, probs, *_ = ops.route(logits, None, noise, sampling.tau, True)
    scale = probs.gather(1, choice[:, None]).squeeze(1) if sampling.scale else None
    return choice, probs, scale


def _init_router_choices(
    router: nn.Module,
    config: ModelConfig,
    budgets: Sequence[float],
    mlp_choices: Sequence[int] | None,
    head_choices: Sequence[int] | None,
    hidden_size: int,
) -> None:
    """The attributes both routers share: layer count, validated choices, budget encoder, width."""
    router.num_layers = config.num_layers
    router.mlp_choices = _check_choices(
        "mlp_choices", mlp_choices or default_mlp_choices(config), config.mlp_choices()
    )
    router.head_choices = _check_choices(
        "head_choices", head_choices or default_head_choices(config), config.head_choices()
    )
    router.encoder = BudgetEncoder(budgets)
    router.hidden_size = hidden_size


def _arch_indices(router: nn.Module, arch: ArchConfig) -> tuple[list[int], list[int]]:
    """The router's choice indices of a configuration (ValueError naming a value it cannot pick)."""
    indices = []
    for name, values, choices in (
        ("MLP width", arch.mlp_widths, router.mlp_choices),
        ("head count", arch.heads, router.head_choices),
    ):
        if len(values) != router.num_layers:
            raise ValueError(f"configuration has {len(values)} layers, the router {router.num_layers}")
        missing = sorted(set(values) - set(choices))
        if missing:
            raise ValueError(f"{name}s {missing} are not among the router's choices {choices}")
        indices.append([choices.index(v) for v in values])
    return indices[0], indices[1]


def _check_init(router: nn.Module, archs: dict[float, ArchConfig], margin: float) -> list[ArchConfig]:
    """The configurations of `init_to_archs` in trained-budget order (one per trained budget)."""
    if margin <= 0:
        raise ValueError(f"margin must be > 0, got {margin}")
    given = {round(float(b), 9): a for b, a in archs.items()}
    budgets = [round(b, 9) for b in router.encoder.budgets]
    if sorted(given) != budgets:
        raise ValueError(
            f"need one configuration per trained budget {router.encoder.budgets}, got budgets {sorted(given)}"
        )
    return [given[b] for b in budgets]


# ---- static router -----------------------------------------------------------------


class StaticRouter(nn.Module):
    """Budget -> per-layer MLP width and head count (one configuration per budget)."""

    def __init__(
        self,
        config: ModelConfig,
        budgets: Sequence[float],
        mlp_choices: Sequence[int] | None = None,
        head_choices: Sequence[int] | None = None,
        hidden_size: int = 128,
    ) -> None:
        super().__init__()
        _init_router_choices(self, config, budgets, mlp_choices, head_choices, hidden_size)
        outputs = self.num_layers * (len(self.mlp_choices) + len(self.head_choices))
        self.net = nn.Sequential(
            nn.Linear(len(self.encoder.budgets), hidden_size), nn.LeakyReLU(), nn.Linear(hidden_size, outputs)
        )

    def forward(self, budget: float | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """budget: a number -> (mlp logits (L, Cm), head logits (L, Ch))."""
        out = self.net(self.encoder(budget))[0]
        split = self.num_layers * len(self.mlp_choices)
        return out[:split].view(self.num_layers, -1), out[split:].view(self.num_layers, -1)

    @torch.no_grad()
    def init_to_archs(self, archs: dict[float, ArchConfig], margin: float = 3.0) -> None:
        """Start every trained budget at a given configuration (e.g. the uniform one of its latency).

        The last linear layer is solved (least squares, minimum norm) so that at trained
        budget k the logits are `margin` at the configuration's choice and 0 elsewhere; the
        first layer keeps its random initialisation.  The argmax is then exactly that
        configuration, and Gumbel sampling at temperature τ explores around it.
        """
        ordered = _check_init(self, archs, margin)
        first, last = self.net[0], self.net[2]
        hidden = self.net[1](first(torch.eye(len(ordered), device=first.weight.device)))  # (K, H)
        targets = torch.zeros(len(ordered), last.out_features, device=hidden.device)
        cm, ch, layers = len(self.mlp_choices), len(self.head_choices), self.num_layers
        for k, arch in enumerate(ordered):
            mlp, heads = _arch_indices(self, arch)
            for layer in range(layers):
                targets[k, layer * cm + mlp[layer]] = margin
                targets[k, layers * cm + layer * ch + heads[layer]] = margin
        last.bias.zero_()
        last.weight.copy_((torch.linalg.pinv(hidden) @ targets).T)

    def session(self, budget: float, sampling: Sampling = INFERENCE) -> StaticRouting:
        """A routing session for one budget (sampled once: every layer gets one choice)."""
        mlp_logits, head_logits = self(budget)
        return StaticRouting(self, _pick(mlp_logits, sampling), _pick(head_logits, sampling))

    @torch.no_grad()
    def arch(self, budget: float) -> ArchConfig:
        """The configuration for `budget` (argmax per layer)."""
        mlp_logits, head_logits = self(budget)
        return ArchConfig(
            tuple(self.mlp_choices[i] for i in mlp_logits.argmax(-1).tolist()),
            tuple(self.head_choices[i] for i in head_logits.argmax(-1).tolist()),
        )


class StaticRouting:
    """One static router decision, used as the model's `router` (a LayerRouter)."""

    def __init__(self, router: StaticRouter, mlp_pick: tuple, head_pick: tuple) -> None:
        self.mlp_choice, self.mlp_probs, self.mlp_scale = mlp_pick  # (L,), (L, Cm), (L,) | None
        self.head_choice, self.head_probs, self.head_scale = head_pick  # (L,), (L, Ch), (L,) | None
        self.arch = ArchConfig(
            tuple(router.mlp_choices[i] for i in self.mlp_choice.tolist()),
            tuple(router.head_choices[i] for i in self.head_choice.tolist()),
        )

    def attention(
        self,
        layer: int,
        module: ElasticAttention,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        kv_cache: KVCache | None,
    ) -> torch.Tensor:
        out = module(x, cos, sin, self.arch.heads[layer], kv_cache, layer)
        return out if self.head_scale is None else out * self.head_scale[layer]

    def mlp(self, layer: int, module: ElasticMLP, x: torch.Tensor) -> torch.Tensor:
        out = module(x, self.arch.mlp_widths[layer])
        return out if self.mlp_scale is None else out * self.mlp_scale[layer]

    def usage(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Router outputs per sequence: (mlp probs (1, L, Cm), head probs (1, L, Ch))."""
        return self.mlp_probs[None], self.head_probs[None]


# ---- dynamic router ----------------------------------------------------------------


def _peaked_bias(choices: Sequence[int], index: int, margin: float) -> torch.Tensor:
    """(C,) logit bias: `margin` at choices[index], falling quadratically with the distance
    |choice - choices[index]| to 0 at a distance of the choices' whole range."""
    values = torch.tensor(choices, dtype=torch.float32)
    span = max(float(values.max() - values.min()), 1.0)
    return margin * (1 - ((values - values[index]) / span) ** 2)


class DynamicRouter(nn.Module):
    """Per-token MLP widths and per-sequence head counts from hidden states + budget."""

    def __init__(
        self,
        config: ModelConfig,
        budgets: Sequence[float],
        mlp_choices: Sequence[int] | None = None,
        head_choices: Sequence[int] | None = None,
        hidden_size: int = 128,
        calibration: dict | None = None,
    ) -> None:
        super().__init__()
        if config.mlp_bias:
            raise ValueError("dynamic routing runs ops.routed_nested_mlp, which has no MLP bias")
        _init_router_choices(self, config, budgets, mlp_choices, head_choices, hidden_size)
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
        # it lets each budget start at its own width (init_to_archs).
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
        """Inference-time latency calibration (flextron.routing.calibrate_dynamic).

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
        if len(points) == 1:
            return values.expand(budgets.shape[0]).clone()
        b = budgets.float().clamp(float(points[0]), float(points[-1]))
        upper = torch.searchsorted(points, b).clamp(1, len(points) - 1)
        fraction = (b - points[upper - 1]) / (points[upper] - points[upper - 1])
        return values[upper - 1] + fraction * (values[upper] - values[upper - 1])

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
    def init_to_archs(
        self, archs: dict[float, ArchConfig], margin: float = 3.0, hidden_scale: float = 0.1
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
        ordered = _check_init(self, archs, margin)
        for k, arch in enumerate(ordered):
            mlp, heads = _arch_indices(self, arch)
            for layer in range(self.num_layers):
                self.mlp_bias[layer, k] = _peaked_bias(self.mlp_choices, mlp[layer], margin)
                self.head_bias[layer, k] = _peaked_bias(self.head_choices, heads[layer], margin)
        for layer in range(self.num_layers):
            self.mlp_out[layer].mul_(hidden_scale)
            self.head_out[layer].weight.mul_(hidden_scale)
            self.head_out[layer].bias.zero_()

    def session(
        self, budget: float | torch.Tensor, batch_size: int, sampling: Sampling = INFERENCE
    ) -> DynamicRouting:
        """A routing session for `batch_size` sequences at `budget` (a number or (B,))."""
        weights = self.encoder(budget)  # (1 or B, K)
        if weights.shape[0] not in (1, batch_size):
            raise ValueError(f"{weights.shape[0]} budgets for a batch of {batch_size}")
        values = torch.as_tensor(budget, dtype=torch.float32, device=weights.device).reshape(-1)
        offsets = self.offsets(values).expand(batch_size)
        return DynamicRouting(
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
        hidden = ops.nested_linear(x, first.weight, first.bias)  # (B, T, H)
        hidden = hidden + budget_hidden[:, None].to(x.dtype)
        batch, tokens = x.shape[:2]
        features = torch.cat(
            [nn.functional.leaky_relu(hidden), extra[:, None].to(x.dtype).expand(batch, tokens, -1)], -1
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
        hidden = self.head_in[layer](x.mean(1)) + self.head_budget[layer](budget_weights)
        logits = self.head_out[layer](nn.functional.leaky_relu(hidden))
        logits = logits + budget_weights @ self.head_bias[layer]
        return logits - offsets[:, None].to(logits) * head_costs.to(logits)


class DynamicRouting:
    """One generation's (or batch's) dynamic routing: the model's `router` (a LayerRouter).

    Head counts are chosen at the first call (prefill) and kept for later calls (decode,
    or a full recompute of the same sequences), so cached keys/values stay valid.
    """

    def __init__(
        self,
        router: DynamicRouter,
        budget_weights: torch.Tensor,
        offsets: torch.Tensor,
        costs: tuple[torch.Tensor, torch.Tensor],
        sampling: Sampling,
    ) -> None:
        self.router, self.budget_weights, self.sampling = router, budget_weights, sampling
        self.offsets = offsets  # (B,) calibration offsets (DynamicRouter.set_calibration)
        # (Cm,), (Ch,) calibration costs, built once per session rather than per layer call.
        self.mlp_costs, self.head_costs = costs
        layers = router.num_layers
        self.heads: list[torch.Tensor | None] = [None] * layers  # (B,) int64 query heads per layer
        self.head_probs: list[torch.Tensor | None] = [None] * layers  # (B, Ch)
        self.head_scale: list[torch.Tensor | None] = [None] * layers  # (B,)
        self.mlp_probs: list[torch.Tensor | None] = [None] * layers  # (B*T, Cm) of the latest call
        self.mlp_choice: list[torch.Tensor | None] = [None] * layers  # (B*T,)
        # Per layer, the routing terms that depend only on the budget, kept when no autograd graph
        # is recorded (inference: a decode step would rebuild them for one token otherwise).
        self.mlp_terms: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None] = [None] * layers

    def attention(
        self,
        layer: int,
        module: ElasticAttention,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        kv_cache: KVCache | None,
    ) -> torch.Tensor:
        """x: (B, T, D) -> (B, T, D) with per-sequence head counts fixed at prefill."""
        if self.heads[layer] is None:
            budget = self.budget_weights.to(x.dtype)
            logits = self.router.head_logits(layer, x, budget, self.offsets, self.head_costs)
            choice, probs, scale = _pick(logits, self.sampling)
            counts = torch.tensor(self.router.head_choices, device=x.device)
            self.heads[layer], self.head_probs[layer], self.head_scale[layer] = counts[choice], probs, scale
        out = module(x, cos, sin, self.heads[layer], kv_cache, layer)
        scale = self.head_scale[layer]
        return out if scale is None else out * scale[:, None, None].to(out.dtype)

    def mlp(self, layer: int, module: ElasticMLP, x: torch.Tensor) -> torch.Tensor:
        """x: (B, T, D) -> (B, T, D), every token at its own width (one fused routed MLP)."""
        router = self.router
        terms = self.mlp_terms[layer]
        if terms is None:
            budget = self.budget_weights.to(x.dtype)
            terms = router.mlp_budget_terms(layer, budget, self.offsets, self.mlp_costs)
            if not torch.is_grad_enabled():
                self.mlp_terms[layer] = terms
        features, weight = router.mlp_token_features(layer, x, terms), terms[2]
        noise = None
        if self.sampling.noise:
            noise = gumbel_noise((features.shape[0], weight.shape[0]), self.sampling.generator, x.device)
        choice, probs, *_ = ops.route(features, weight, noise, self.sampling.tau, True)
        scale = probs.gather(1, choice[:, None]).squeeze(1) if self.sampling.scale else None
        self.mlp_probs[layer], self.mlp_choice[layer] = probs, choice
        flat = x.reshape(-1, x.shape[-1])  # (B*T, D)
        out = ops.routed_nested_mlp(
            flat,
            module.gate_proj.weight,
            module.up_proj.weight,
            module.down_proj.weight,
            choice,
            router.mlp_choices,
            scale,
        )
        return out.view(x.shape)

    def usage(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Router outputs per sequence, averaged over its tokens:
        (mlp probs (B, L, Cm), head probs (B, L, Ch))."""
        batch = self.budget_weights.shape[0]
        mlp = torch.stack([p.view(batch, -1, p.shape[-1]).mean(1) for p in self.mlp_probs], 1)
        heads = torch.stack(list(self.head_probs), 1)
        return mlp, heads

    def mean_widths(self) -> list[float]:
        """Mean MLP width per layer over the latest call's tokens."""
        widths = torch.tensor(self.router.mlp_choices, dtype=torch.float32)
        return [float(widths[c.cpu()].mean()) for c in self.mlp_choice]


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


# ---- files ---------------------------------------------------------------------------

ROUTERS_FILE, ROUTERS_META_FILE = "routers.safetensors", "routers.json"
ROUTER_KINDS = {"static": StaticRouter, "dynamic": DynamicRouter}


def router_settings(router: StaticRouter | DynamicRouter) -> dict:
    """What rebuilds the router (with the model's config): budgets, choices, hidden size."""
    settings = {
        "budgets": router.encoder.budgets,
        "mlp_choices": router.mlp_choices,
        "head_choices": router.head_choices,
        "hidden_size": router.hidden_size,
    }
    if getattr(router, "calibration", None) is not None:
        settings["calibration"] = router.calibration
    return settings


def save_routers(
    path: str | os.PathLike,
    routers: dict[str, StaticRouter | DynamicRouter],
    latency_shape: dict | None = None,
) -> None:
    """Write routers ({"static": ..., "dynamic": ...}) into a model directory, replacing the files.

    latency_shape: {"phase", "batch", "length"}: the LUT shape that budgets refer to.
    """
    from flextron.atomic_files import save_safetensors_atomic, write_json_atomic

    for kind in routers:
        if kind not in ROUTER_KINDS:
            raise ValueError(f"router kind must be one of {sorted(ROUTER_KINDS)}, got {kind!r}")
    path = Path(path)
    tensors = {f"{kind}.{name}": t for kind, r in routers.items() for name, t in r.state_dict().items()}
    save_safetensors_atomic(path / ROUTERS_FILE, tensors)
    meta = {kind: router_settings(r) for kind, r in routers.items()}
    write_json_atomic(path / ROUTERS_META_FILE, {"routers": meta, "latency_shape": latency_shape})


def load_routers(path: str | os.PathLike, config: ModelConfig) -> tuple[dict, dict | None]:
    """({kind: router}, latency_shape) from a model directory; ({}, None) when it has none."""
    from safetensors.torch import load_file

    path = Path(path)
    if not (path / ROUTERS_META_FILE).is_file():
        return {}, None
    try:
        meta = json.loads((path / ROUTERS_META_FILE).read_text())
        tensors = load_file(path / ROUTERS_FILE)
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(f"{path}: unreadable router files ({error})") from error
    routers = {}
    for kind, settings in meta["routers"].items():
        router = ROUTER_KINDS[kind](config, **settings)
        prefix = f"{kind}."
        state = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
        # Routers saved before the per-budget biases existed load with zero biases.
        missing, unexpected = router.load_state_dict(state, strict=False)
        if unexpected or set(missing) - {"mlp_bias", "head_bias"}:
            raise ValueError(
                f"{path / ROUTERS_FILE}: {kind} router tensors do not match its settings "
                f"(missing {sorted(missing)}, unexpected {sorted(unexpected)})"
            )
        routers[kind] = router.eval()
    return routers, meta.get("latency_shape")

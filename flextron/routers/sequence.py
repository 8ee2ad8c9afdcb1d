"""The sequence router: per sequence, one of a few configurations the model is good at.

Why: an elastically trained model is good at the configurations it was trained at and poor
between them (docs/routers.md: static configurations between trained ones lose up to 1.4x in
perplexity, per-token widths more).  A budget between two good configurations is met on
average instead: a share of the sequences runs the wider one, the rest the narrower one.  Which
sequences get the wider one is the input-adaptive part: a linear predictor, from the mean of
the prompt's first-layer input (known at prefill, before any scored token), of how much loss
each sequence saves at the wider configuration; in each batch, the sequences predicted to save
most take it.  How many: the share times the batch size, the fraction carried over to the next
batch of the same selection, so that the budget is met on average whatever the text (a
threshold on the prediction would move the share with the text's domain).  At batch 1 the
choice alternates at that rate.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from flextron.model.config import ArchConfig, ModelConfig
from flextron.model.layers import ElasticAttention, ElasticMLP, KVCache


class SequenceRouter(nn.Module):
    """Per-sequence choice between two of its configurations at a budget: the neighbours, on the
    hull of (latency at the shape asked for, validation loss), that bracket the budget."""

    kind = "sequence"

    def __init__(
        self,
        config: ModelConfig,
        configurations: Sequence[ArchConfig | dict],
    ) -> None:
        super().__init__()
        self.configurations = [
            a if isinstance(a, ArchConfig) else ArchConfig.from_dict(a) for a in configurations
        ]
        for arch in self.configurations:
            arch.validate(config)
        if len(self.configurations) < 2:
            raise ValueError("a sequence router chooses between at least 2 configurations")
        count, hidden = len(self.configurations), config.hidden_size
        # Every pair (i, j), i < j: which two are neighbours depends on the shape's latencies.
        self.pairs = [(i, j) for i in range(count) for j in range(i + 1, count)]
        self.num_layers = config.num_layers
        # (K,) mean validation loss per configuration: its place on the hull.
        self.register_buffer("validation_loss", torch.zeros(count))
        # Feature standardisation, then per pair a linear predictor of the loss j saves over i.
        self.register_buffer("center", torch.zeros(hidden))
        self.register_buffer("scale", torch.ones(hidden))
        self.register_buffer("weight", torch.zeros(len(self.pairs), hidden))
        self.register_buffer("bias", torch.zeros(len(self.pairs)))

    def settings(self) -> dict[str, Any]:
        return {"configurations": [a.to_dict() for a in self.configurations]}

    def features(self, first_input: torch.Tensor) -> torch.Tensor:
        """first_input: (B, T, D) the first layer's normalised input over the prompt -> (B, D)."""
        return (first_input.float().mean(1) - self.center) / self.scale

    def predicted_gains(self, features: torch.Tensor) -> torch.Tensor:
        """features: (B, D) -> (B, P) predicted loss (nats/token) each pair's second saves over its first."""
        return features @ self.weight.T + self.bias

    def plan(self, fractions: Sequence[float], target: float) -> SequencePlan:
        """The mix for a target latency fraction, given each configuration's latency fraction at
        the shape asked for: the hull neighbours that bracket the target, and the share of
        sequences at the wider one that meets it on average."""
        if len(fractions) != len(self.configurations):
            raise ValueError(f"{len(fractions)} latencies for {len(self.configurations)} configurations")
        points = [float(f) for f in fractions]
        hull = lower_hull(points, self.validation_loss.tolist())
        if len(hull) == 1:  # one configuration is both the cheapest and the best: all run it
            return SequencePlan(self, hull[0], hull[0], None, 1.0, points[hull[0]])
        step = 0
        while step < len(hull) - 2 and target > points[hull[step + 1]]:
            step += 1
        narrow, wide = hull[step], hull[step + 1]
        low, high = points[narrow], points[wide]
        share = min(max((target - low) / (high - low), 0.0), 1.0)
        pair = self.pairs.index((min(narrow, wide), max(narrow, wide)))
        return SequencePlan(self, narrow, wide, pair, share, low + share * (high - low))


def lower_hull(fractions: Sequence[float], losses: Sequence[float]) -> list[int]:
    """Indices of the points on the lower convex hull of (fraction, loss), ascending in fraction,
    from the cheapest point to the lowest loss (points of more latency and no less loss dropped):
    a mix of two hull neighbours beats any point above the segment between them."""
    order = sorted(range(len(fractions)), key=lambda i: (fractions[i], losses[i]))
    hull: list[int] = []
    for index in order:
        if hull and losses[index] >= losses[hull[-1]]:
            continue  # no better than a cheaper point
        while len(hull) >= 2:
            a, b = hull[-2], hull[-1]
            # b is above (or on) the segment from a to index: drop it.
            cross = (fractions[b] - fractions[a]) * (losses[index] - losses[a]) - (losses[b] - losses[a]) * (
                fractions[index] - fractions[a]
            )
            if cross > 0:
                break
            hull.pop()
        hull.append(index)
    return hull


@dataclass
class SequencePlan:
    """One budget's mix: per batch, the share `share` of sequences of highest predicted gain runs
    configuration `wide_index`, the others `narrow_index`; `pair` is the predictor's index (None:
    one configuration for all); `fraction` is the mix's expected latency fraction by the table;
    `carry` the part of a wider sequence that the batches so far owe."""

    router: SequenceRouter
    narrow_index: int
    wide_index: int
    pair: int | None
    share: float
    fraction: float
    carry: float = 0.0

    def wide_count(self, batch_size: int) -> int:
        """How many of a batch's sequences run the wider configuration (the remainder carried)."""
        wanted = self.share * batch_size + self.carry
        count = min(batch_size, math.floor(wanted + 1e-9))
        self.carry = wanted - count
        return count

    @property
    def narrow(self) -> ArchConfig:
        return self.router.configurations[self.narrow_index]

    @property
    def wide(self) -> ArchConfig:
        return self.router.configurations[self.wide_index]

    def predicted_gains(self, features: torch.Tensor) -> torch.Tensor:
        """features: (B, D) -> (B,) predicted loss the wider configuration saves."""
        if self.pair is None:
            return features.new_zeros(features.shape[0])
        sign = 1 if self.narrow_index < self.wide_index else -1
        return sign * self.router.predicted_gains(features)[:, self.pair]

    def session(self, budget: float, batch_size: int) -> SequenceSession:  # noqa: ARG002 - Selection's call
        return SequenceSession(self)


class SequenceSession:
    """One batch's (or generation's) per-sequence configurations: the model's `session=`.

    The choice is made at the first call (prefill) from the prompt's first-layer input and kept
    for later calls (decode), so the KV cache stays consistent.  A batch whose sequences all
    chose alike runs as one configuration; a mixed batch runs per-sequence head counts and each
    side's MLP on its own rows."""

    def __init__(self, plan: SequencePlan) -> None:
        self.plan = plan
        self.wide: torch.Tensor | None = None  # (B,) bool: the sequence runs the wider configuration
        self.heads: list[tuple[int | torch.Tensor, int]] = []  # per layer: heads (int or (B,)), max

    def choose(self, first_input: torch.Tensor) -> None:
        """first_input: (B, T, D) -> each sequence's side of the pair."""
        router, plan = self.plan.router, self.plan
        gains = plan.predicted_gains(router.features(first_input)).cpu()  # (B,)
        self.wide = torch.zeros(gains.shape[0], dtype=torch.bool)  # (B,)
        self.wide[gains.argsort(descending=True, stable=True)[: plan.wide_count(gains.shape[0])]] = True
        for layer in range(router.num_layers):
            narrow, wide = plan.narrow.heads[layer], plan.wide.heads[layer]
            if self.uniform or narrow == wide:
                self.heads.append((wide if bool(self.wide[0]) else narrow, max(narrow, wide)))
            else:
                counts = torch.where(self.wide, wide, narrow).to(first_input.device)  # (B,)
                self.heads.append((counts, max(narrow, wide)))

    @property
    def settled_arch(self) -> ArchConfig | None:
        """After the choice, the configuration of a batch whose sequences all chose alike: the
        model then runs it on its plain path (at decode, the fused layer op)."""
        if self.wide is None or not self.uniform:
            return None
        return self.plan.wide if bool(self.wide[0]) else self.plan.narrow

    @property
    def uniform(self) -> bool:
        """Whether every sequence chose the same side."""
        return bool(self.wide.all() or not self.wide.any())

    def configurations(self) -> list[ArchConfig]:
        """Each sequence's configuration (after the first call)."""
        return [self.plan.wide if w else self.plan.narrow for w in self.wide.tolist()]

    def attention(
        self,
        layer: int,
        module: ElasticAttention,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        kv_cache: KVCache | None,
    ) -> torch.Tensor:
        """x: (B, T, D) -> (B, T, D) at each sequence's head count."""
        if self.wide is None:
            self.choose(x)
        heads, most = self.heads[layer]
        if isinstance(heads, int):
            return module(x, cos, sin, heads, kv_cache, layer)
        if kv_cache is not None:  # one cache for the batch: per-sequence counts, projections at the most
            return module(x, cos, sin, heads, kv_cache, layer, max_heads=most)
        # Without a cache, each side's rows at their own head count: the narrower rows do not pay
        # for the wider count's projections.
        rows = self.wide.to(x.device)
        out = torch.empty_like(x)
        for side, count in ((rows, self.plan.wide.heads[layer]), (~rows, self.plan.narrow.heads[layer])):
            rotary = [t[side] if t.dim() == 4 else t for t in (cos, sin)]  # per-sequence (B, 1, T, hd)
            out[side] = module(x[side], *rotary, count, None, layer)
        return out

    def mlp(self, layer: int, module: ElasticMLP, x: torch.Tensor) -> torch.Tensor:
        """x: (B, T, D) -> (B, T, D) at each sequence's MLP width."""
        narrow, wide = self.plan.narrow.mlp_widths[layer], self.plan.wide.mlp_widths[layer]
        if self.uniform or narrow == wide:
            return module(x, wide if bool(self.wide[0]) else narrow)
        # A mixed batch: each side's sequences through the plain nested kernels (any weight type,
        # int8 included), rather than the per-token routed MLP.
        rows = self.wide.to(x.device)
        out = torch.empty_like(x)
        out[rows] = module(x[rows], wide)
        out[~rows] = module(x[~rows], narrow)
        return out

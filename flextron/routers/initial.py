"""Training-only starting points: per trained budget, the configuration a router starts at.

`uniform_init_archs`: uniform widths of each budget's latency (optionally the best of those
on a probe batch); `trained_init_archs`: between the configurations the model was elastically
trained at; `static_init_archs`: the static router's choices, for a dynamic router.
The router is then initialised to them (`Router.init_to`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from flextron.latency.shape import LatencyShape
from flextron.latency.table import LatencyTable
from flextron.model.config import ArchConfig
from flextron.model.elastic_model import FlextronModel
from flextron.routers.base import Router
from flextron.routers.selection import fit_to_latency, uniform_arch_for_latency
from flextron.routers.static import StaticRouter


def uniform_init_archs(
    model: FlextronModel,
    table: LatencyTable,
    router: Router,
    shape: LatencyShape,
    probe: torch.Tensor | None = None,
    tolerance: float = 0.05,
) -> dict[float, ArchConfig]:
    """Per trained budget of `router`, a uniform configuration (among the router's choices)
    of the budget's latency: the routers' starting point (`Router.init_to`), so that router
    training starts from parity with uniform widths.

    Without `probe`, the one whose predicted latency is nearest budget x the full model's.
    With `probe` (N, S) token ids, the one of lowest perplexity on it among those predicted
    within `tolerance` (relative) of the target (the nearest when none is): on a model not
    trained elastically, configurations of equal latency differ widely in quality (few heads
    cost far more than narrow MLPs), and nearest latency alone picks among them by chance.
    """
    from flextron.eval.perplexity import perplexity

    full = table.predict(model.full_arch(), shape)
    mlp_choices, head_choices = router.mlp_choices, router.head_choices
    candidates = [ArchConfig.uniform(model.config, w, h) for w in mlp_choices for h in head_choices]
    predicted = {arch: table.predict(arch, shape) for arch in candidates}
    scores: dict[ArchConfig, float] = {}

    def score(arch: ArchConfig) -> float:
        if arch not in scores:
            scores[arch] = perplexity(model, probe, arch)[0]
        return scores[arch]

    archs = {}
    for budget in router.encoder.budgets:
        target = budget * full
        nearest = uniform_arch_for_latency(model, table, target, shape, mlp_choices, head_choices)
        near = [arch for arch in candidates if abs(predicted[arch] - target) <= tolerance * target]
        archs[budget] = nearest if probe is None or not near else min(near, key=score)
    return archs


def trained_configurations(model: FlextronModel) -> dict[float, ArchConfig]:
    """The configurations the model was trained at, by parameter budget: its budgets'
    (budget_configs.json), and full at 1."""
    budgets = [] if model.budget_configs is None else model.budget_configs.budgets()
    return {b: model.arch_for_budget(b) for b in budgets} | {1.0: model.full_arch()}


def trained_widths(model: FlextronModel) -> set[int]:
    """Every MLP width some layer of a trained configuration uses."""
    return {w for arch in trained_configurations(model).values() for w in arch.mlp_widths}


def trained_init_archs(
    model: FlextronModel, table: LatencyTable, router: Router, shape: LatencyShape
) -> dict[float, ArchConfig]:
    """Per trained budget of `router`, a configuration between the two trained configurations
    whose predicted latencies bracket the budget's: per layer, widths and head counts
    interpolated linearly in predicted latency, then the router's nearest choice (the cheapest
    trained configuration below, the full model above).  Why: an elastically trained model is
    good at the configurations it was trained at and near them, not anywhere in the space, so
    the router starts where training put the quality (issue: "routers choose within what
    training covered")."""
    full = table.predict(model.full_arch(), shape)
    points = sorted((table.predict(arch, shape), arch) for arch in trained_configurations(model).values())

    def nearest(value: float, choices: Sequence[int]) -> int:
        return min(choices, key=lambda c: (abs(c - value), c))

    archs = {}
    for budget in router.encoder.budgets:
        target = budget * full
        below = [p for p in points if p[0] <= target] or points[:1]
        above = [p for p in points if p[0] >= target] or points[-1:]
        (low_ms, low), (high_ms, high) = below[-1], above[0]
        share = 0.0 if high_ms <= low_ms else (target - low_ms) / (high_ms - low_ms)
        archs[budget] = ArchConfig(
            tuple(
                nearest(a + share * (b - a), router.mlp_choices)
                for a, b in zip(low.mlp_widths, high.mlp_widths, strict=True)
            ),
            tuple(
                nearest(a + share * (b - a), router.head_choices)
                for a, b in zip(low.heads, high.heads, strict=True)
            ),
        )
    return archs


def static_init_archs(
    model: FlextronModel,
    table: LatencyTable,
    static: StaticRouter,
    budgets: Sequence[float],
    shape: LatencyShape,
) -> dict[float, ArchConfig]:
    """Per budget, the static router's configuration as inference selects it (`fit_to_latency`):
    a dynamic router's starting point (`--init static`) that already knows which layers can
    shrink, where a uniform start does not."""
    full = table.predict(model.full_arch(), shape)
    return {budget: fit_to_latency(static, budget, table, budget * full, shape) for budget in budgets}

"""Budget-driven inference: a latency budget or a latency target -> the sub-network to run.

A latency budget is a fraction of the full model's latency on this device, as the latency
lookup table (latency.json, from `flextron profile`) predicts it at one reference shape (the
shape the routers were trained for, else the table's first prefill shape); `latency_ms` is
the same target in milliseconds.  Without a table, a budget is a fraction of the width
(flextron.model.config.arch_for_budget).  The sub-network comes from one of the methods

    uniform: the same MLP width and head count in every layer, the pair whose predicted
             latency is nearest the target;
    static:  the static router (routers.json); budgets between trained ones interpolate;
    dynamic: the dynamic router: per-token MLP widths, per-sequence head counts;
    sequence: the sequence router: per sequence, one of the configurations the model was
             trained at, mixed so that the budget is met on average.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from flextron.latency.shape import DEFAULT_SHAPE, LatencyShape
from flextron.latency.table import LUT_FILE, REPROFILE, LatencyTable
from flextron.model.config import ArchConfig, check_budget
from flextron.model.elastic_model import FlextronModel
from flextron.model.requests import load_one_arch
from flextron.routers.base import Router
from flextron.routers.dynamic import DynamicRouter
from flextron.routers.files import AnyRouter, load_routers
from flextron.routers.sequence import SequencePlan, SequenceRouter, SequenceSession
from flextron.routers.sessions import DynamicSession
from flextron.routers.static import StaticRouter

METHODS = ("auto", "uniform", "static", "dynamic", "sequence")


def reference_shape(table: LatencyTable | None, router_shape: LatencyShape | None) -> LatencyShape:
    """The shape budgets refer to by default: the routers', else the table's first prefill shape."""
    if router_shape is not None:
        return router_shape
    if table is not None and table.shapes("prefill"):
        return table.shapes("prefill")[0]
    return DEFAULT_SHAPE


def uniform_arch_for_latency(
    model: FlextronModel,
    table: LatencyTable,
    target_ms: float,
    shape: LatencyShape,
    mlp_choices: Sequence[int] | None = None,
    head_choices: Sequence[int] | None = None,
) -> ArchConfig:
    """The uniform configuration whose predicted latency is nearest `target_ms` (ties: larger),
    among the given MLP widths and head counts (default: every allowed one)."""
    config = model.config
    candidates = [
        ArchConfig.uniform(config, w, h)
        for w in mlp_choices or config.mlp_choices()
        for h in head_choices or config.head_choices()
    ]
    predicted = {a: table.predict(a, shape) for a in candidates}
    return min(candidates, key=lambda a: (abs(predicted[a] - target_ms), -predicted[a]))


def fit_to_latency(
    router: StaticRouter,
    budget: float,
    table: LatencyTable,
    target_ms: float,
    shape: LatencyShape,
    tolerance: float = 0.02,
) -> ArchConfig:
    """The static router's configuration, nudged with the LUT until its predicted latency is
    within `tolerance` of the target.

    The router is trained to land near the target (within the latency loss's 5% dead zone),
    but its argmax can miss it, at an untrained budget or after a short training.  Each nudge
    moves one layer's MLP width or head count one choice down (too slow) or up (too fast),
    picking the move that gives up the least router logit per millisecond gained, so the
    router's preferences decide which layers change.
    """
    with torch.no_grad():
        mlp_logits, head_logits = (t.float().cpu() for t in router(budget))
    logits = {"mlp": mlp_logits, "heads": head_logits}
    choices = {"mlp": router.mlp_choices, "heads": router.head_choices}  # widest first
    picks = {kind: logits[kind].argmax(-1).tolist() for kind in logits}
    costs = table.costs(shape)

    def arch() -> ArchConfig:
        return ArchConfig(
            tuple(choices["mlp"][i] for i in picks["mlp"]), tuple(choices["heads"][i] for i in picks["heads"])
        )

    mlp_costs, head_costs = costs.choice_costs(choices["mlp"], choices["heads"])
    cost_of = {"mlp": mlp_costs, "heads": head_costs}

    def cost(kind: str, index: int) -> float:
        return cost_of[kind][index]

    for _ in range(sum(len(c) for c in choices.values()) * router.num_layers):
        predicted = table.predict(arch(), shape)
        if abs(predicted - target_ms) <= tolerance * target_ms:
            break
        step = 1 if predicted > target_ms else -1  # +1: a narrower choice (lists are widest first)
        moves = []
        for kind in picks:
            for layer, index in enumerate(picks[kind]):
                new = index + step
                if 0 <= new < len(choices[kind]):
                    gain = abs(cost(kind, index) - cost(kind, new))
                    regret = float(logits[kind][layer, index] - logits[kind][layer, new])
                    moves.append((regret / max(gain, 1e-9), kind, layer, new))
        if not moves:
            break
        _, kind, layer, new = min(moves)
        picks[kind][layer] = new
    return arch()


@dataclass
class Selection:
    """The sub-network chosen for a budget: a configuration, a dynamic router, or a sequence mix."""

    method: str  # "uniform", "static", "dynamic" or "sequence" (or "configuration": given explicitly)
    budget: float  # fraction of the full latency (or width, without a latency table)
    arch: ArchConfig | None = None  # uniform and static selection
    router: DynamicRouter | SequencePlan | None = None  # dynamic and sequence selection
    predicted_ms: float | None = None  # LUT prediction (a sequence mix: its expectation)

    def session(self, batch_size: int) -> DynamicSession | SequenceSession | None:
        """A fresh routing session (choices fixed at its prefill), or None for a configuration."""
        return None if self.router is None else self.router.session(self.budget, batch_size)

    def describe(self) -> str:
        text = f"{self.method} routing at budget {self.budget:.3f}"
        if self.predicted_ms is not None:
            text += f" (predicted {self.predicted_ms:.2f} ms)"
        return text


class BudgetResolver:
    """Reads a model directory's latency table and routers once; `select` per request."""

    def __init__(
        self,
        model: FlextronModel,
        directory: str | os.PathLike | None = None,
        shape: LatencyShape | None = None,
    ) -> None:
        self.model = model
        self.table: LatencyTable | None = None
        self.routers: dict[str, AnyRouter] = {}
        # What the routers were trained (the dynamic one calibrated) for.
        self.router_shape: LatencyShape | None = None
        if directory is not None and Path(directory).is_dir():
            device = model.embed_tokens.weight.device
            if (Path(directory) / LUT_FILE).is_file():
                self.table = LatencyTable.load(directory, device)
                self.table.check_model(model.config)
                self.table.check_dtype(model.weights_dtype)
            self.routers, self.router_shape = load_routers(directory, model.config)
            for router in self.routers.values():
                router.to(device)
        self.shape = shape or reference_shape(self.table, self.router_shape)

    def _router(self, kind: str) -> AnyRouter:
        if kind not in self.routers:
            raise ValueError(
                f"the model has no {kind} router; train one with `flextron train-router --kind {kind}`"
            )
        return self.routers[kind]

    def _check_dynamic_shape(self) -> None:
        # Its calibration offsets put a budget on that shape's latency; another shape's budget
        # would silently get that shape's widths (static choices are refit to any shape).
        if self.router_shape is not None and self.shape != self.router_shape:
            raise ValueError(
                f"the dynamic router is calibrated for {self.router_shape}, not {self.shape}: recalibrate "
                f"it with `flextron train-router --kind dynamic --mode calibrate --latency-shape "
                f"{self.shape}` (or leave --latency-shape out)"
            )

    def _latency_budget(
        self, table: LatencyTable, budget: float | None, latency_ms: float | None, router: Router | None
    ) -> float:
        """The latency budget of a request (a latency target becomes one); warns when a budget is
        below the smallest sub-network among the router's choices (all without a router)."""
        choices = (
            {} if router is None else {"mlp_choices": router.mlp_choices, "head_choices": router.head_choices}
        )
        if latency_ms is not None:
            return table.check_target(latency_ms, self.model.config, self.shape, **choices)
        if budget is None:
            return 1.0
        full = table.predict(self.model.full_arch(), self.shape)
        # A budget below the smallest sub-network runs, but cannot be met: say so, with the range.
        low = table.latency_range(self.model.config, self.shape, **choices)[0]
        if low > full:
            warnings.warn(
                f"the latency table predicts the smallest sub-network ({low:.2f} ms) slower than the "
                f"full model ({full:.2f} ms) at {self.shape}: budget {budget:g} cannot be met as asked; "
                f"{REPROFILE}",
                stacklevel=3,
            )
        elif check_budget(budget) * full < low:
            warnings.warn(
                f"budget {budget:g} ({budget * full:.2f} ms) is below the smallest sub-network's "
                f"{low:.2f} ms at {self.shape}: the achievable budgets are {low / full:.3f} to 1",
                stacklevel=3,
            )
        return budget

    def select(
        self, budget: float | None = None, latency_ms: float | None = None, method: str = "auto"
    ) -> Selection:
        """The sub-network for a budget in (0, 1] or a latency target in ms (not both), chosen by
        `method` (METHODS; auto: the static router when the model has one, else uniform)."""
        if method not in METHODS:
            raise ValueError(f"routing must be one of {METHODS}, got {method!r}")
        if budget is not None and latency_ms is not None:
            raise ValueError("give a budget or a latency target, not both")
        if method == "auto":
            method = "static" if "static" in self.routers else "uniform"
        router = None if method == "uniform" else self._router(method)
        if method == "dynamic":
            self._check_dynamic_shape()
        if isinstance(router, SequenceRouter):
            return self._sequence(router, budget, latency_ms)
        if self.table is not None:
            budget = self._latency_budget(self.table, budget, latency_ms, router)
        elif latency_ms is not None:
            raise ValueError(
                "a latency target needs the model's latency table: run `flextron profile` "
                "on a Flextron directory first"
            )
        budget = check_budget(1.0 if budget is None else budget)
        if isinstance(router, DynamicRouter):
            router.encoder(budget)  # ValueError outside the trained range, now rather than at the forward
            return Selection("dynamic", budget, router=router)
        arch = self._arch(budget, router)
        predicted = None if self.table is None else self.table.predict(arch, self.shape)
        return Selection(method, budget, arch=arch, predicted_ms=predicted)

    def _sequence(self, router: SequenceRouter, budget: float | None, latency_ms: float | None) -> Selection:
        """The sequence router's mix of its configurations for a budget, by the latency table."""
        if self.table is None:
            raise ValueError(
                "sequence routing mixes configurations by their latency: run `flextron profile` on the "
                "model directory first"
            )
        budget = check_budget(self._latency_budget(self.table, budget, latency_ms, None))
        full = self.table.predict(self.model.full_arch(), self.shape)
        fractions = [self.table.predict(arch, self.shape) / full for arch in router.configurations]
        plan = router.plan(fractions, budget)
        return Selection("sequence", budget, router=plan, predicted_ms=plan.fraction * full)

    def _arch(self, budget: float, router: Router | None) -> ArchConfig:
        """The configuration of a static router (refit to the table's latency) or of uniform widths."""
        if self.table is None:
            return self.model.arch_for_budget(budget) if router is None else router.arch(budget)
        full_ms = self.table.predict(self.model.full_arch(), self.shape)
        if router is None:
            return uniform_arch_for_latency(self.model, self.table, budget * full_ms, self.shape)
        return fit_to_latency(router, budget, self.table, budget * full_ms, self.shape)


def choose_configuration(
    model: FlextronModel,
    source: str | os.PathLike,
    *,
    arch_file: str | os.PathLike | None = None,
    budget: float | None = None,
    latency_ms: float | None = None,
    routing: str = "auto",
    shape: LatencyShape | None = None,
) -> ArchConfig | Selection:
    """What a request names: the configuration in `arch_file`, else the Selection for `budget`
    or `latency_ms` with the latency table and routers of `source` (when it is a directory)."""
    if arch_file:
        return load_one_arch(arch_file)
    return BudgetResolver(model, source, shape).select(budget, latency_ms, routing)

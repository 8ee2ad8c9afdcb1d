"""Budget-driven inference: a budget or a latency target -> the sub-network to run.

A budget is a fraction of the full model's latency on this device, as the latency lookup
table (latency.json, from `flextron profile`) predicts it at one reference shape (the
shape the routers were trained for, else the table's first prefill shape); `latency_ms`
is the same target in milliseconds.  Without a table, a budget is a fraction of the
width (flextron.config.arch_for_budget).  The sub-network comes from

    uniform: the same MLP width and head count in every layer, the pair whose predicted
             latency is nearest the target;
    static:  the static router (routers.json); budgets between trained ones interpolate;
    dynamic: the dynamic router: per-token MLP widths, per-sequence head counts.
"""

from __future__ import annotations

import math
import os
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from flextron.config import ArchConfig, check_budget
from flextron.latency import LUT_FILE, PHASES, REPROFILE, LatencyTable
from flextron.model import FlextronModel
from flextron.nn.routers import DynamicRouter, DynamicRouting, StaticRouter, load_routers

ROUTINGS = ("auto", "uniform", "static", "dynamic")
DEFAULT_SHAPE = ("prefill", 1, 128)


def parse_shape(text: str) -> tuple[str, int, int]:
    """ "prefill:1x128" -> ("prefill", 1, 128); ValueError naming the expected form."""
    try:
        phase, sizes = text.split(":")
        batch, length = (int(s) for s in sizes.lower().split("x"))
    except ValueError as error:
        raise ValueError(
            f"latency shape must look like prefill:1x128 or decode:4x512, got {text!r}"
        ) from error
    if phase not in PHASES or batch < 1 or length < 1:
        raise ValueError(f"latency shape must be PHASE:BATCHxLENGTH with PHASE in {PHASES}, got {text!r}")
    return phase, batch, length


def format_shape(shape: tuple[str, int, int]) -> str:
    """("prefill", 1, 128) -> "prefill:1x128" (parse_shape's form)."""
    phase, batch, length = shape
    return f"{phase}:{batch}x{length}"


def saved_shape(meta: dict | None) -> tuple[str, int, int] | None:
    """routers.json's latency_shape {"phase", "batch", "length"} as a shape tuple (None: none saved)."""
    return None if meta is None else (meta["phase"], int(meta["batch"]), int(meta["length"]))


def reference_shape(
    table: LatencyTable | None, router_shape: tuple[str, int, int] | None
) -> tuple[str, int, int]:
    """The shape budgets refer to by default: the routers', else the table's first prefill shape."""
    if router_shape is not None:
        return router_shape
    if table is not None and table.shapes("prefill"):
        return ("prefill", *table.shapes("prefill")[0])
    return DEFAULT_SHAPE


def uniform_arch_for_latency(
    model: FlextronModel,
    table: LatencyTable,
    target_ms: float,
    shape: tuple[str, int, int],
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
    predicted = {a: table.predict(a, *shape) for a in candidates}
    return min(candidates, key=lambda a: (abs(predicted[a] - target_ms), -predicted[a]))


def fit_to_latency(
    router: StaticRouter,
    budget: float,
    table: LatencyTable,
    target_ms: float,
    shape: tuple[str, int, int],
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
    costs = table.costs(*shape)

    def arch() -> ArchConfig:
        return ArchConfig(
            tuple(choices["mlp"][i] for i in picks["mlp"]), tuple(choices["heads"][i] for i in picks["heads"])
        )

    def cost(kind: str, index: int) -> float:
        value = choices[kind][index]
        return table.choice_cost(costs.mlp_ms if kind == "mlp" else costs.attention_ms, value)

    for _ in range(sum(len(c) for c in choices.values()) * router.num_layers):
        predicted = table.predict(arch(), *shape)
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


def uniform_init_archs(
    model: FlextronModel,
    table: LatencyTable,
    router: StaticRouter | DynamicRouter,
    shape: tuple[str, int, int],
    probe: torch.Tensor | None = None,
    tolerance: float = 0.05,
) -> dict[float, ArchConfig]:
    """Per trained budget of `router`, a uniform configuration (among the router's choices)
    of the budget's latency: the routers' starting point (`init_to_archs`), so that router
    training starts from parity with uniform widths.

    Without `probe`, the one whose predicted latency is nearest budget x the full model's.
    With `probe` (N, S) token ids, the one of lowest perplexity on it among those predicted
    within `tolerance` (relative) of the target (the nearest when none is): on a model not
    trained elastically, configurations of equal latency differ widely in quality (few heads
    cost far more than narrow MLPs), and nearest latency alone picks among them by chance.
    """
    from flextron.evaluate import perplexity

    full = table.predict(model.full_arch(), *shape)
    mlp_choices, head_choices = router.mlp_choices, router.head_choices
    candidates = [ArchConfig.uniform(model.config, w, h) for w in mlp_choices for h in head_choices]
    predicted = {arch: table.predict(arch, *shape) for arch in candidates}
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


def static_init_archs(
    model: FlextronModel,
    table: LatencyTable,
    static: StaticRouter,
    budgets: Sequence[float],
    shape: tuple[str, int, int],
) -> dict[float, ArchConfig]:
    """Per budget, the static router's configuration as inference selects it (`fit_to_latency`):
    a dynamic router's starting point (`--init static`) that already knows which layers can
    shrink, where a uniform start does not."""
    full = table.predict(model.full_arch(), *shape)
    return {budget: fit_to_latency(static, budget, table, budget * full, shape) for budget in budgets}


@dataclass
class Selection:
    """The sub-network chosen for a budget: a configuration, or a dynamic router."""

    routing: str  # "uniform", "static" or "dynamic"
    budget: float  # fraction of the full latency (or width, without a latency table)
    arch: ArchConfig | None = None  # uniform and static routing
    router: DynamicRouter | None = None  # dynamic routing
    predicted_ms: float | None = None  # LUT prediction (static configurations only)

    def session(self, batch_size: int) -> DynamicRouting | None:
        """A fresh dynamic routing session (heads fixed at its prefill), or None when static."""
        return None if self.router is None else self.router.session(self.budget, batch_size)

    def describe(self) -> str:
        text = f"{self.routing} routing at budget {self.budget:.3f}"
        if self.predicted_ms is not None:
            text += f" (predicted {self.predicted_ms:.2f} ms)"
        return text


class BudgetResolver:
    """Reads a model directory's latency table and routers once; `select` per request."""

    def __init__(
        self,
        model: FlextronModel,
        directory: str | os.PathLike | None = None,
        shape: tuple[str, int, int] | None = None,
    ) -> None:
        self.model = model
        self.table: LatencyTable | None = None
        self.routers: dict[str, StaticRouter | DynamicRouter] = {}
        router_shape = None
        if directory is not None and Path(directory).is_dir():
            device = model.embed_tokens.weight.device
            if (Path(directory) / LUT_FILE).is_file():
                self.table = LatencyTable.load(directory, device)
                self.table.check_model(model.config)
            self.routers, router_shape = load_routers(directory, model.config)
            for router in self.routers.values():
                router.to(device)
        # What the routers were trained (the dynamic one calibrated) for.
        self.router_shape = saved_shape(router_shape)
        self.shape = shape or reference_shape(self.table, self.router_shape)

    def _router(self, kind: str) -> StaticRouter | DynamicRouter:
        if kind not in self.routers:
            raise ValueError(
                f"the model has no {kind} router; train one with `flextron train-router --kind {kind}`"
            )
        return self.routers[kind]

    def select(
        self, budget: float | None = None, latency_ms: float | None = None, routing: str = "auto"
    ) -> Selection:
        """The sub-network for a budget in (0, 1] or a latency target in ms (not both)."""
        if routing not in ROUTINGS:
            raise ValueError(f"routing must be one of {ROUTINGS}, got {routing!r}")
        if budget is not None and latency_ms is not None:
            raise ValueError("give a budget or a latency target, not both")
        if routing == "auto":
            routing = "static" if "static" in self.routers else "uniform"
        router = None if routing == "uniform" else self._router(routing)
        if routing == "dynamic" and self.router_shape is not None and tuple(self.shape) != self.router_shape:
            # Its calibration offsets put a budget on that shape's latency; another shape's budget
            # would silently get that shape's widths (static choices are refit to any shape below).
            raise ValueError(
                f"the dynamic router is calibrated for {format_shape(self.router_shape)}, not "
                f"{format_shape(self.shape)}: recalibrate it with `flextron train-router --kind dynamic "
                f"--mode calibrate --latency-shape {format_shape(self.shape)}` "
                "(or leave --latency-shape out)"
            )
        if self.table is not None:
            choices = (
                {}
                if router is None
                else {"mlp_choices": router.mlp_choices, "head_choices": router.head_choices}
            )
            full = self.table.predict(self.model.full_arch(), *self.shape)
            if latency_ms is not None:
                budget = self.table.check_target(latency_ms, self.model.config, *self.shape, **choices)
            elif budget is not None:
                # A budget below the smallest sub-network runs, but cannot be met: say so, with the range.
                low = self.table.latency_range(self.model.config, *self.shape, **choices)[0]
                if low > full:
                    warnings.warn(
                        f"the latency table predicts the smallest sub-network ({low:.2f} ms) "
                        f"slower than the full model ({full:.2f} ms) at "
                        f"{format_shape(self.shape)}: budget {budget:g} cannot be met as asked; "
                        f"{REPROFILE}",
                        stacklevel=2,
                    )
                elif check_budget(budget) * full < low:
                    warnings.warn(
                        f"budget {budget:g} ({budget * full:.2f} ms) is below the smallest "
                        f"sub-network's {low:.2f} ms at {format_shape(self.shape)}: the achievable "
                        f"budgets are {low / full:.3f} to 1",
                        stacklevel=2,
                    )
        elif latency_ms is not None:
            raise ValueError(
                "a latency target needs the model's latency table: run `flextron profile` "
                "on a Flextron directory first"
            )
        budget = check_budget(1.0 if budget is None else budget)
        if routing == "dynamic":
            router.encoder(budget)  # ValueError outside the trained range, now rather than at the forward
            return Selection("dynamic", budget, router=router)
        if routing == "static":
            arch = router.arch(budget)
            if self.table is not None:
                arch = fit_to_latency(router, budget, self.table, budget * full, self.shape)
        elif self.table is not None:
            arch = uniform_arch_for_latency(self.model, self.table, budget * full, self.shape)
        else:
            arch = self.model.arch_for_budget(budget)
        predicted = None if self.table is None else self.table.predict(arch, *self.shape)
        return Selection(routing, budget, arch=arch, predicted_ms=predicted)


@torch.no_grad()
def dynamic_perplexity(
    model: FlextronModel, blocks: torch.Tensor, selection: Selection, batch_size: int = 4
) -> tuple[float, int]:
    """(perplexity, mean active parameters per token) under dynamic routing.

    blocks: (N, S) token ids; every batch gets a fresh session (its own prefill head choice).
    Active parameters count each layer at its mean MLP width and mean head count.
    """
    if selection.router is None:
        raise ValueError("dynamic_perplexity needs a dynamic selection")
    config, device = model.config, model.embed_tokens.weight.device
    total, count, widths, heads = 0.0, 0, torch.zeros(config.num_layers), torch.zeros(config.num_layers)
    batches = blocks.split(batch_size)
    for batch in batches:
        batch = batch.to(device)
        session = selection.session(batch.shape[0])
        logits = model(batch, router=session)
        loss = torch.nn.functional.cross_entropy(
            logits[:, :-1].flatten(0, 1).float(), batch[:, 1:].flatten(), reduction="sum"
        )
        total, count = total + float(loss), count + batch[:, 1:].numel()
        widths += torch.tensor(session.mean_widths()) / len(batches)
        heads += torch.stack([h.float().mean().cpu() for h in session.heads]) / len(batches)
    mean_arch = ArchConfig(tuple(round(float(w)) for w in widths), tuple(round(float(h)) for h in heads))
    return math.exp(total / count), model.num_parameters(mean_arch)


def evaluate_selections(
    model: FlextronModel, blocks: torch.Tensor, selections: list[Selection], batch_size: int = 4
) -> list[dict]:
    """flextron.evaluate result rows for selections (static ones through evaluate_archs)."""
    from flextron.evaluate import evaluate_archs

    rows = []
    for selection in selections:
        name = f"{selection.routing} {selection.budget:.2f}"
        if selection.arch is not None:
            row = evaluate_archs(
                model, blocks, {name: (selection.budget, selection.arch)}, batch_size, progress=False
            )[0]
        else:
            start = time.perf_counter()
            perplexity, active = dynamic_perplexity(model, blocks, selection, batch_size)
            row = {
                "name": name,
                "budget": selection.budget,
                "arch": None,
                "parameters": active,
                "tokens_per_s": blocks.numel() / (time.perf_counter() - start),
                "perplexity": perplexity,
            }
        row["predicted_ms"] = selection.predicted_ms
        rows.append(row)
    return rows

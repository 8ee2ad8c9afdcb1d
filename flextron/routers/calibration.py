"""Latency calibration of a dynamic router: per budget, the logit offset that meets its target.

A trained dynamic router can miss its latency targets (e.g. saturate below the full model's
latency at high budgets).  Calibration bisects, per latency budget b, the offset δ(b) by which
logits are lowered per ms of each choice's LUT cost (DynamicRouter.set_calibration), on the
LUT latency of the routed choices (`calibrate_dynamic`, plus the routed path's measured
overhead, `measure_routing_overhead`) or on measured latency (`calibrate_dynamic_measured`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

from flextron.latency.profiling import timed_forward
from flextron.model.elastic_model import FlextronModel
from flextron.routers.dynamic import DynamicRouter
from flextron.routers.objectives import LatencyTarget, usage_features
from flextron.routers.sampling import RoutingSession
from flextron.timing import times_ms


def _bisect_offset(
    latency: Callable[[float], float], goal: float, start: float, iterations: int, tolerance: float
) -> tuple[float, dict[float, float]]:
    """The calibration offset whose latency is nearest `goal`: bracket from `start` (steps
    0.05, doubling, up to |offset| 100), then bisect until within `tolerance` (relative) of it.

    latency(offset) must fall as the offset grows.  Returns (offset, {offset tried: latency}).
    """
    tried = {start: latency(start)}
    # Bracket: `slow` gives latency above the goal, `fast` at or below it.
    direction = 1.0 if tried[start] > goal else -1.0
    step, near, far = 0.05, start, start
    while abs(far - start) < 100.0:
        near, far = far, start + direction * step  # `near` is on start's side of the goal
        tried[far] = latency(far)
        if (tried[far] <= goal) == (direction > 0):
            break
        step *= 2
    slow, fast = (near, far) if direction > 0 else (far, near)
    for _ in range(iterations):
        if min(abs(v - goal) for v in tried.values()) <= tolerance * goal:
            break
        middle = (slow + fast) / 2
        tried[middle] = latency(middle)
        if tried[middle] > goal:
            slow = middle
        else:
            fast = middle
    return min(tried, key=lambda o: (abs(tried[o] - goal), abs(o - start))), tried


def _lut_latency_of_choices(
    model: FlextronModel, router: DynamicRouter, target: LatencyTarget, batch: torch.Tensor, budget: float
) -> float:
    """LUT latency (ms) of the dynamic router's argmax choices on `batch` at latency `budget`."""
    session = router.session(budget, batch.shape[0])
    model(batch, session=session, last_only=True)
    return _session_lut_ms(session, target)


def _session_lut_ms(session: RoutingSession, target: LatencyTarget) -> float:
    """LUT latency (ms) of a routing session's latest call: the mean over sequences of each
    layer's MLP cost (mean over the call's tokens) plus the per-sequence head costs."""
    _, mlp, heads = usage_features(session)
    return float(target.latency(mlp, heads).mean())


def calibration_grid(trained: Sequence[float], smallest: float) -> tuple[list[float], list[float]]:
    """(the budgets to calibrate, those left out): the trained budgets and every 0.1 between,
    from the smallest sub-network's budget up.  Below it a budget cannot be met and bisecting
    it only saturates (decode on a CPU: the smallest is about half the full model), so the
    grid starts at the smallest instead (unless no budget is reachable: then all are kept)."""
    low, high = min(trained), max(trained)
    grid = sorted({*trained, *(round(b / 10, 1) for b in range(1, 11) if low <= b / 10 <= high)})
    if not grid[0] < smallest <= grid[-1]:
        return grid, []
    below = [b for b in grid if b < smallest]
    return sorted({math.ceil(smallest * 1000) / 1000, *(b for b in grid if b >= smallest)}), below


@torch.no_grad()
def calibrate_dynamic(
    model: FlextronModel,
    router: DynamicRouter,
    target: LatencyTarget,
    blocks: torch.Tensor,
    budgets: Sequence[float],
    *,
    overhead: tuple[float, float] = (0.0, 0.0),
    iterations: int = 16,
    tolerance: float = 0.01,
    progress: Callable[[dict], None] | None = None,
) -> list[dict]:
    """Per budget, the logit offset that puts the dynamic router's LUT latency on its target.

    A trained dynamic router can miss its targets (e.g. saturate below the full model's
    latency at high budgets).  For each budget b this bisects the offset δ(b) (logits are
    lowered by δ × each choice's LUT cost, DynamicRouter.set_calibration) until the LUT
    latency of the router's argmax choices on `blocks` (the mean over tokens of each
    layer's MLP cost plus the per-sequence head costs) plus the routed path's overhead
    is within `tolerance` of b × full.  overhead = (fixed ms, fraction): what the routed
    path costs beyond the LUT (the router itself, grouping tokens by width), as
    fixed + fraction × LUT ms (`measure_routing_overhead`), or (0, 0).  Larger δ never makes a layer's argmax
    more expensive, so the latency falls with δ and bisection applies.  The offsets are
    stored in the router (interpolated between budgets); returns one row per budget.
    """
    if not 1 + overhead[1] > 0:
        raise ValueError(f"the overhead's fraction of the LUT latency must be > -1, got {overhead[1]}")
    budgets = sorted(float(b) for b in budgets)
    costs = target.calibration_costs()
    router.eval()
    device = model.embed_tokens.weight.device
    batch = blocks.to(device)

    def latency(budget: float, offset: float) -> float:
        router.set_calibration([budget], [offset], **costs)
        return _lut_latency_of_choices(model, router, target, batch, budget)

    rows = []
    for budget in budgets:
        goal = (budget * target.full_ms - overhead[0]) / (1 + overhead[1])
        offset, tried = _bisect_offset(lambda o, b=budget: latency(b, o), goal, 0.0, iterations, tolerance)
        row = {
            "budget": budget,
            "offset": offset,
            "lut_ms": tried[offset],
            "goal_ms": goal,
            "uncalibrated_ms": tried[0.0],
            "evaluations": len(tried),
        }
        rows.append(row)
        if progress is not None:
            progress(row)
    router.set_calibration([r["budget"] for r in rows], [r["offset"] for r in rows], **costs)
    return rows


Timer = Callable[[dict], dict]


def _routed_and_full(
    model: FlextronModel, router: DynamicRouter, chunks: list[torch.Tensor], budget: float
) -> dict[int | str, Callable[[], list[torch.Tensor]]]:
    """The prefill of each chunk (B, T) routed at `budget`, each through one session (heads fixed
    at its first call), keyed by index; and the dense full model on the first chunk ("full")."""
    functions: dict[int | str, Callable[[], list[torch.Tensor]]] = {
        index: timed_forward(model, [ids], "prefill", sessions=[router.session(budget, ids.shape[0])])
        for index, ids in enumerate(chunks)
    }
    functions["full"] = timed_forward(model, chunks[:1], "prefill")
    return functions


# Timed as generation and the benchmarks run it: under no_grad every custom-op call also
# passes the autograd layer, which made a budget-0.3 routed forward 5% slower relative to the
# dense model than it runs in generation, and the calibration aimed that much too low.
@torch.inference_mode()
def calibrate_dynamic_measured(
    model: FlextronModel,
    router: DynamicRouter,
    target: LatencyTarget,
    blocks: torch.Tensor,
    budgets: Sequence[float],
    *,
    batch_size: int = 1,
    clock: str = "wall",
    repeats: int = 5,
    timer: Timer | None = None,
    iterations: int = 10,
    tolerance: float = 0.02,
    progress: Callable[[dict], None] | None = None,
) -> list[dict]:
    """Per budget, the logit offset that puts the dynamic router's *measured* latency on its target.

    Like `calibrate_dynamic`, but each bisection step times the routed forward (prefill of
    `blocks` in chunks of `batch_size` sequences, the reference shape, last-position logits
    as generation runs it; routing session built once per forward group, heads fixed at its
    first call) round-robin with the full dense model on the first chunk, and uses

        measured = mean routed time / full-model time × full-model LUT latency,

    so that what the LUT misses (the router's matmuls, grouping tokens by width) is measured,
    not modelled, and load from neighbours on a shared machine cancels in the ratio.  The goal
    is b × full LUT latency.  The bracket starts at the router's current offset at b (e.g. a
    `calibrate_dynamic` run just before), 0 without one.  timer(functions) -> {key: ms}
    (default: `times_ms` with `clock`, `repeats`, one warm-up); tests pass a stub.
    Measured latency is noisy: `tolerance` is relative (2%), and the offset kept is the one
    whose measurement came nearest the goal.  Stores the offsets; returns one row per budget.
    """
    budgets = sorted(float(b) for b in budgets)
    costs = target.calibration_costs()
    router.eval()
    device = model.embed_tokens.weight.device
    chunks = [c.to(device) for c in blocks.split(batch_size) if c.shape[0] == batch_size]
    if not chunks:
        raise ValueError(
            f"need at least {batch_size} blocks to time a batch of {batch_size}, got {blocks.shape[0]}"
        )
    if timer is None:

        def timer(functions: dict) -> dict:
            return times_ms(functions, device, repeats, 1, clock)

    starts = router.offsets(torch.tensor(budgets)).tolist()
    history: dict[float, list[dict]] = {}

    def measured(budget: float, offset: float) -> float:
        router.set_calibration([budget], [offset], **costs)
        times = timer(_routed_and_full(model, router, chunks, budget))
        raw = sum(times[index] for index in range(len(chunks))) / len(chunks)
        value = raw / times["full"] * target.full_ms
        history.setdefault(budget, []).append(
            {"offset": offset, "measured_ms": value, "raw_ms": raw, "full_raw_ms": times["full"]}
        )
        return value

    rows = []
    for budget, start in zip(budgets, starts, strict=True):
        goal = budget * target.full_ms
        offset, tried = _bisect_offset(lambda o, b=budget: measured(b, o), goal, start, iterations, tolerance)
        row = {
            "budget": budget,
            "offset": offset,
            "measured_ms": tried[offset],
            "goal_ms": goal,
            "start_offset": start,
            "start_ms": tried[start],
            "evaluations": len(tried),
            "tried": history[budget],
        }
        rows.append(row)
        if progress is not None:
            progress(row)
    router.set_calibration([r["budget"] for r in rows], [r["offset"] for r in rows], **costs)
    return rows


@torch.inference_mode()  # as calibrate_dynamic_measured
def measure_routing_overhead(
    model: FlextronModel,
    router: DynamicRouter,
    target: LatencyTarget,
    ids: torch.Tensor,
    budgets: Sequence[float],
    *,
    clock: str = "wall",
    repeats: int = 7,
    phase: str = "prefill",
) -> tuple[tuple[float, float], list[dict]]:
    """What dynamic routing costs beyond the LUT: ((fixed ms, fraction), rows).

    ids: (N, B, T) token ids, N chunks of the reference shape's batch (prefill: T its length;
    decode: its context + 1, `timed_forward`).  For each budget the routed forward of every
    chunk (last-position logits as generation runs it) is timed (median, round-robin, together
    with the full dense model) and compared with the LUT latency of the choices the timed
    calls made; a least-squares line measured − LUT = fixed + fraction × LUT is fitted (a
    constant alone from one budget).  Times are rescaled by LUT full / measured full of the
    same round: on a shared machine even CPU time inflates with the neighbours' load (shared
    caches, memory bandwidth), and the ratio to the dense model is what stays put.
    """
    device = model.embed_tokens.weight.device
    chunks = list(ids.to(device))
    router.eval()
    sessions = {b: [router.session(b, chunk.shape[0]) for chunk in chunks] for b in budgets}
    functions: dict = {b: timed_forward(model, chunks, phase, sessions=sessions[b]) for b in budgets}
    functions["full"] = timed_forward(model, chunks, phase)
    measured = times_ms(functions, device, repeats, 2, clock)
    scale = target.full_ms / measured["full"]
    # A session keeps its latest call's choices: those of the timed forward (decode: its token).
    predicted = {b: sum(_session_lut_ms(s, target) for s in sessions[b]) / len(chunks) for b in budgets}
    rows = [
        {
            "budget": b,
            "lut_ms": predicted[b],
            "measured_ms": measured[b] * scale,
            "raw_ms": measured[b] / len(chunks),
            "full_raw_ms": measured["full"] / len(chunks),
        }
        for b in budgets
    ]
    xs = torch.tensor([r["lut_ms"] for r in rows], dtype=torch.float64)
    ys = torch.tensor([r["measured_ms"] - r["lut_ms"] for r in rows], dtype=torch.float64)
    if len(rows) < 2 or float(xs.max() - xs.min()) < 1e-6:
        return (float(ys.mean()), 0.0), rows
    fraction = float(((xs - xs.mean()) * (ys - ys.mean())).sum() / ((xs - xs.mean()) ** 2).sum())
    if 1 + fraction < 0.5:
        # Measured latency that barely grows with the LUT's (noise over a narrow LUT range, e.g.
        # a tiny model) fits a slope near -1, which calibration would divide by: a constant.
        return (float(ys.mean()), 0.0), rows
    return (float(ys.mean() - fraction * xs.mean()), fraction), rows

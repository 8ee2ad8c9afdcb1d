"""Router training: the surrogate-model (SM) loop, joint fine-tuning, and the end-to-end baseline.

DESIGN.md §1 step 5.  With the LLM frozen, each step samples a budget and a Gumbel choice
from the router, runs the LLM on that choice and records (router output, LM loss).  A small
MLP, the surrogate model, learns LM loss from router outputs (MSE).  The router is updated
only while the SM's recent error on fresh samples is under a threshold, to minimise

    SM(router output) + λ · max(0, |latency − target| / target − dead_zone)

with latency the LUT expectation under the router's (straight-through) probabilities and
target = budget × the full model's LUT latency.  The SM is then discarded and LLM and router
are fine-tuned jointly on the distillation (or LM) loss through the probability-scaled
paths plus the same latency loss.  `train_end_to_end` with a fresh router is the simpler
baseline (no SM).

Router outputs per sequence: the per-layer MLP and head probabilities, flattened (for a
dynamic router, the MLP probabilities are averaged over the sequence's tokens).
"""

from __future__ import annotations

import copy
import math
import random
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from flextron.latency import LatencyTable, median_times_ms, timed_forward
from flextron.model import FlextronModel
from flextron.nn.routers import (
    DynamicRouter,
    Sampling,
    StaticRouter,
    TemperatureSchedule,
    expected_latency,
    latency_loss,
)

Router = StaticRouter | DynamicRouter


class SurrogateModel(nn.Module):
    """Router outputs (N, F) -> predicted LM loss (N,): a linear term plus a 2-layer MLP.

    The linear term carries the (mostly additive) cost of each layer's choice and generalises
    from few samples; the MLP learns the interactions between layers.
    """

    def __init__(self, in_features: int, hidden_size: int = 256) -> None:
        super().__init__()
        self.linear = nn.Linear(in_features, 1)
        self.net = nn.Sequential(
            nn.Linear(in_features, hidden_size), nn.LeakyReLU(), nn.Linear(hidden_size, 1)
        )

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return (self.linear(features) + self.net(features)).squeeze(-1)


@dataclass
class LatencyTarget:
    """The LUT costs at the shape the budget refers to (e.g. prefill, batch 1, 128 tokens)."""

    fixed_ms: float
    mlp_costs: torch.Tensor  # (Cm,) ms per layer, the router's MLP choices
    head_costs: torch.Tensor  # (Ch,)
    full_ms: float

    @classmethod
    def from_table(
        cls,
        table: LatencyTable,
        router: Router,
        model: FlextronModel,
        phase: str = "prefill",
        batch: int = 1,
        length: int = 128,
    ) -> LatencyTarget:
        table.check_model(model.config)
        fixed, mlp, heads = table.cost_vectors(router.mlp_choices, router.head_choices, phase, batch, length)
        return cls(fixed, mlp, heads, table.predict(model.full_arch(), phase, batch, length))

    def latency(self, mlp_probs: torch.Tensor, head_probs: torch.Tensor) -> torch.Tensor:
        """(B, L, Cm), (B, L, Ch) -> expected ms (B,)."""
        return expected_latency(mlp_probs, head_probs, self.fixed_ms, self.mlp_costs, self.head_costs)

    def calibration_costs(self) -> dict[str, list[float]]:
        """The per-choice costs in the form DynamicRouter.set_calibration takes them."""
        return {"mlp_costs": self.mlp_costs.tolist(), "head_costs": self.head_costs.tolist()}


def _session(router: Router, budget: float, batch_size: int, sampling: Sampling):
    if isinstance(router, StaticRouter):
        return router.session(budget, sampling)
    return router.session(budget, batch_size, sampling)


def _features(session) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(SM input (1, F) averaged over the batch, mlp probs (1, L, Cm), head probs (1, L, Ch))."""
    mlp, heads = session.usage()
    mlp, heads = mlp.float().mean(0, keepdim=True), heads.float().mean(0, keepdim=True)
    return torch.cat([mlp.flatten(1), heads.flatten(1)], 1), mlp, heads


def _lm_loss(logits: torch.Tensor, batch: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), batch[:, 1:].flatten())


def _kd_loss(logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """KL(teacher || student) per token, averaged."""
    student = torch.log_softmax(logits.float(), -1).flatten(0, 1)
    teacher = torch.log_softmax(teacher_logits.float(), -1).flatten(0, 1)
    return nn.functional.kl_div(student, teacher, log_target=True, reduction="batchmean")


def _batches(blocks: torch.Tensor, batch_size: int, seed: int):
    if blocks.dim() != 2 or blocks.shape[0] == 0 or blocks.shape[1] < 2:
        raise ValueError(f"blocks must be (num_blocks, seq_len >= 2), got {tuple(blocks.shape)}")
    generator = torch.Generator().manual_seed(seed)
    while True:
        for index in torch.randperm(blocks.shape[0], generator=generator).split(batch_size):
            yield blocks[index]


@dataclass
class RouterTrainingConfig:
    """Settings shared by the SM loop, joint fine-tuning and the end-to-end baseline."""

    # ---- budgets and latency
    budgets: Sequence[float] = (0.3, 0.5, 0.7, 1.0)
    latency_weight: float = 1.0  # λ
    dead_zone: float = 0.05
    # ---- optimisation
    steps: int = 200
    batch_size: int = 2
    router_lr: float = 1e-3
    model_lr: float = 1e-5  # joint fine-tuning only (DESIGN: router LR ~100x the model's)
    tau_start: float = 1.0
    tau_end: float = 0.1
    # ---- surrogate model
    sm_lr: float = 1e-3
    sm_updates: int = 4  # SM minibatch steps per LLM step
    sm_batch: int = 32
    sm_buffer: int = 1024
    sm_threshold: float = 0.05  # router steps only while the SM's recent relative error is below
    sm_error_decay: float = 0.9  # EMA of the SM's relative error on fresh samples
    sm_probe_blocks: int = 2  # the fixed batch whose LM loss the SM learns
    # ---- misc
    loss: str = "kd"  # "kd" (distil from the full model) or "lm" (next-token loss)
    seed: int = 0

    def __post_init__(self) -> None:
        if self.loss not in ("kd", "lm"):
            raise ValueError(f"loss must be 'kd' or 'lm', got {self.loss!r}")
        if self.steps < 1 or self.batch_size < 1:
            raise ValueError(f"steps and batch_size must be >= 1, got {self.steps}, {self.batch_size}")
        if self.latency_weight < 0 or not 0 <= self.dead_zone < 1 or self.sm_threshold <= 0:
            raise ValueError("need latency_weight >= 0, dead_zone in [0, 1), sm_threshold > 0")


@dataclass
class TrainingLog:
    """Per-step records: one dict per step (keys depend on the phase)."""

    rows: list[dict] = field(default_factory=list)

    def add(self, **values: float) -> None:
        self.rows.append(values)


def fit_surrogate_step(
    sm: SurrogateModel,
    optimizer: torch.optim.Optimizer,
    buffer: deque,
    updates: int,
    batch: int,
    rng: random.Random,
) -> float:
    """`updates` MSE steps of the SM on random minibatches of (features, loss) pairs; last loss."""
    loss = torch.tensor(0.0)
    for _ in range(updates):
        sample = rng.sample(list(buffer), min(batch, len(buffer)))
        features = torch.cat([f for f, _ in sample])
        targets = torch.tensor([t for _, t in sample])
        loss = nn.functional.mse_loss(sm(features), targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return float(loss.detach())


def train_router_surrogate(
    model: FlextronModel,
    router: Router,
    target: LatencyTarget,
    blocks: torch.Tensor,
    config: RouterTrainingConfig,
    progress: Callable[[dict], None] | None = None,
) -> tuple[SurrogateModel, TrainingLog]:
    """The SM loop (LLM frozen).  Returns the trained SM and the per-step log.

    The LM loss is measured on a fixed probe batch of `sm_probe_blocks` blocks.
    """
    rng = random.Random(config.seed)
    torch.manual_seed(config.seed)
    for param in model.parameters():
        param.requires_grad_(False)
    device = model.embed_tokens.weight.device
    router.to(device).train()
    schedule = TemperatureSchedule(config.tau_start, config.tau_end, config.steps)
    generator = torch.Generator().manual_seed(config.seed)
    num_features = router.num_layers * (len(router.mlp_choices) + len(router.head_choices))
    sm = SurrogateModel(num_features).to(device)
    sm_optimizer = torch.optim.Adam(sm.parameters(), lr=config.sm_lr)
    router_optimizer = torch.optim.Adam(router.parameters(), lr=config.router_lr)
    buffer: deque = deque(maxlen=config.sm_buffer)
    error, log = math.inf, TrainingLog()
    # One fixed probe batch: the SM's target is then a function of the configuration alone
    # (batch-to-batch variance of the LM loss would otherwise swamp the SM's error).
    batch = next(_batches(blocks, config.sm_probe_blocks, config.seed)).to(device)
    for step in range(config.steps):
        budget = rng.choice(list(config.budgets))
        tau = schedule(step)
        # The LLM's parameters are frozen and the paths are not scaled, so only the router
        # builds a graph here.
        session = _session(router, budget, batch.shape[0], Sampling(tau, noise=True, generator=generator))
        with torch.no_grad():
            measured = float(_lm_loss(model(batch, router=session), batch))
        features, mlp_probs, head_probs = _features(session)
        with torch.no_grad():
            # The SM's error on a sample it has not seen yet is what says it can be trusted.
            fresh = abs(float(sm(features)) - measured) / measured
        decay = config.sm_error_decay
        error = fresh if math.isinf(error) else decay * error + (1 - decay) * fresh
        buffer.append((features.detach(), measured))
        sm_mse = fit_surrogate_step(sm, sm_optimizer, buffer, config.sm_updates, config.sm_batch, rng)
        row = {
            "step": step,
            "budget": budget,
            "tau": tau,
            "lm_loss": measured,
            "sm_error": error,
            "sm_mse": sm_mse,
            "router_updated": False,
        }
        if error < config.sm_threshold:
            for param in sm.parameters():
                param.requires_grad_(False)
            latency = target.latency(mlp_probs, head_probs)
            lat_loss = latency_loss(latency, budget * target.full_ms, config.dead_zone)
            objective = sm(features).mean() + config.latency_weight * lat_loss
            router_optimizer.zero_grad(set_to_none=True)
            objective.backward()
            router_optimizer.step()
            for param in sm.parameters():
                param.requires_grad_(True)
            row.update(
                router_updated=True,
                latency_ms=float(latency.detach().mean()),
                latency_loss=float(lat_loss.detach()),
            )
        log.add(**row)
        if progress is not None:
            progress(row)
    return sm, log


def train_end_to_end(
    model: FlextronModel,
    router: Router,
    target: LatencyTarget,
    blocks: torch.Tensor,
    config: RouterTrainingConfig,
    train_model: bool = False,
    progress: Callable[[dict], None] | None = None,
) -> TrainingLog:
    """Router (and, with train_model, the LLM) on KD/LM loss through the scaled paths + λ·latency loss.

    After the SM loop this is the joint fine-tuning (train_model=True); from a fresh router
    it is the end-to-end baseline.  The KD teacher is the full model, frozen at the start.
    """
    rng = random.Random(config.seed + 1)
    torch.manual_seed(config.seed + 1)
    device = model.embed_tokens.weight.device
    teacher = None
    if config.loss == "kd":
        teacher = copy.deepcopy(model).eval() if train_model else model
    for param in model.parameters():
        param.requires_grad_(train_model)
    router.to(device).train()
    model.train(train_model)
    groups = [{"params": list(router.parameters()), "lr": config.router_lr}]
    if train_model:
        groups.append({"params": list(model.parameters()), "lr": config.model_lr})
    optimizer = torch.optim.Adam(groups)
    schedule = TemperatureSchedule(config.tau_start, config.tau_end, config.steps)
    generator = torch.Generator().manual_seed(config.seed + 1)
    batches = _batches(blocks, config.batch_size, config.seed + 1)
    log = TrainingLog()
    for step in range(config.steps):
        budget = rng.choice(list(config.budgets))
        batch = next(batches).to(device)
        tau = schedule(step)
        session = _session(
            router, budget, batch.shape[0], Sampling(tau, noise=True, scale=True, generator=generator)
        )
        logits = model(batch, router=session)
        if teacher is not None:
            with torch.no_grad():
                teacher_logits = teacher(batch)
            task = _kd_loss(logits, teacher_logits)
        else:
            task = _lm_loss(logits, batch)
        _, mlp_probs, head_probs = _features(session)
        latency = target.latency(mlp_probs, head_probs)
        lat_loss = latency_loss(latency, budget * target.full_ms, config.dead_zone)
        loss = task + config.latency_weight * lat_loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        row = {
            "step": step,
            "budget": budget,
            "tau": tau,
            "task_loss": float(task.detach()),
            "latency_ms": float(latency.detach().mean()),
            "latency_loss": float(lat_loss.detach()),
        }
        log.add(**row)
        if progress is not None:
            progress(row)
    for param in model.parameters():
        param.requires_grad_(False)
    model.eval()
    router.eval()
    return log


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
    """LUT latency (ms) of the dynamic router's argmax choices on `batch` at `budget`."""
    session = router.session(budget, batch.shape[0])
    model(batch, router=session, last_only=True)
    return _session_lut_ms(session, target)


def _session_lut_ms(session, target: LatencyTarget) -> float:
    """LUT latency (ms) of a routing session's latest call: the mean over sequences of each
    layer's MLP cost (mean over the call's tokens) plus the per-sequence head costs."""
    _, mlp, heads = _features(session)
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
    (default: `median_times_ms` with `clock`, `repeats`, one warm-up); tests pass a stub.
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
            return median_times_ms(functions, device, repeats, 1, clock)

    starts = router.offsets(torch.tensor(budgets)).tolist()
    history: dict[float, list[dict]] = {}

    def measured(budget: float, offset: float) -> float:
        router.set_calibration([budget], [offset], **costs)

        # Each chunk timed on its own, through one session (heads fixed at its first call).
        functions: dict = {
            index: timed_forward(model, [ids], "prefill", sessions=[router.session(budget, batch_size)])
            for index, ids in enumerate(chunks)
        }
        functions["full"] = timed_forward(model, chunks[:1], "prefill")
        times = timer(functions)
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
    measured = median_times_ms(functions, device, repeats, 2, clock)
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

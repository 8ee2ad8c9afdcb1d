"""Router training: the surrogate-model (SM) loop, joint fine-tuning, and the end-to-end baseline.

docs/design.md#routers.  With the LLM frozen, each step samples a budget and a Gumbel choice
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
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

from flextron.model.elastic_model import FlextronModel
from flextron.model.objectives import kd_loss, next_token_cross_entropy
from flextron.routers.base import Router
from flextron.routers.config import RouterTrainingConfig
from flextron.routers.objectives import LatencyTarget, latency_loss, usage_features
from flextron.routers.sampling import Sampling


class TemperatureSchedule:
    """Gumbel-softmax temperature annealed exponentially from `start` to `end` over `steps`."""

    def __init__(self, start: float = 1.0, end: float = 0.1, steps: int = 1000) -> None:
        if not 0 < end <= start or steps < 1:
            raise ValueError(f"need 0 < end <= start and steps >= 1, got {start=}, {end=}, {steps=}")
        self.start, self.end, self.steps = start, end, steps

    def __call__(self, step: int) -> float:
        fraction = min(max(step, 0), self.steps) / self.steps
        return self.start * (self.end / self.start) ** fraction


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


def _batches(blocks: torch.Tensor, batch_size: int, seed: int) -> Iterator[torch.Tensor]:
    """Endless random batches (batch_size, S) of the blocks (N, S), reshuffled every epoch."""
    if blocks.dim() != 2 or blocks.shape[0] == 0 or blocks.shape[1] < 2:
        raise ValueError(f"blocks must be (num_blocks, seq_len >= 2), got {tuple(blocks.shape)}")
    generator = torch.Generator().manual_seed(seed)
    while True:
        for index in torch.randperm(blocks.shape[0], generator=generator).split(batch_size):
            yield blocks[index]


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
        latency_budget = rng.choice(list(config.budgets))
        tau = schedule(step)
        # The LLM's parameters are frozen and the paths are not scaled, so only the router
        # builds a graph here.
        session = router.session(
            latency_budget, batch.shape[0], Sampling(tau, noise=True, generator=generator)
        )
        with torch.no_grad():
            measured = float(next_token_cross_entropy(model(batch, session=session), batch))
        features, mlp_probs, head_probs = usage_features(session)
        with torch.no_grad():
            # The SM's error on a sample it has not seen yet is what says it can be trusted.
            fresh = abs(float(sm(features)) - measured) / measured
        decay = config.sm_error_decay
        error = fresh if math.isinf(error) else decay * error + (1 - decay) * fresh
        buffer.append((features.detach(), measured))
        sm_mse = fit_surrogate_step(sm, sm_optimizer, buffer, config.sm_updates, config.sm_batch, rng)
        row = {
            "step": step,
            "budget": latency_budget,
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
            lat_loss = latency_loss(latency, latency_budget * target.full_ms, config.dead_zone)
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
    *,
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
        latency_budget = rng.choice(list(config.budgets))
        batch = next(batches).to(device)
        tau = schedule(step)
        session = router.session(
            latency_budget, batch.shape[0], Sampling(tau, noise=True, scale=True, generator=generator)
        )
        logits = model(batch, session=session)
        if teacher is not None:
            with torch.no_grad():
                teacher_logits = teacher(batch)
            task = kd_loss(logits, teacher_logits)
        else:
            task = next_token_cross_entropy(logits, batch)
        _, mlp_probs, head_probs = usage_features(session)
        latency = target.latency(mlp_probs, head_probs)
        lat_loss = latency_loss(latency, latency_budget * target.full_ms, config.dead_zone)
        loss = task + config.latency_weight * lat_loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        row = {
            "step": step,
            "budget": latency_budget,
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

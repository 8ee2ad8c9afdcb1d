"""Router training: temperature schedule, surrogate model, SM loop, end-to-end and joint fine-tuning."""

from __future__ import annotations

import random
from collections import deque

import pytest
import torch

from flextron.latency.shape import LatencyShape
from flextron.routers import (
    DynamicRouter,
    LatencyTarget,
    RouterTrainingConfig,
    StaticRouter,
    TemperatureSchedule,
    train_end_to_end,
    train_router_surrogate,
)
from flextron.routers.training import SurrogateModel, fit_surrogate_step

pytestmark = pytest.mark.usefixtures("one_thread")


def test_temperature_anneals_from_start_to_end() -> None:
    schedule = TemperatureSchedule(1.0, 0.1, steps=10)
    taus = [schedule(s) for s in range(12)]
    assert taus[0] == 1.0 and taus[10] == pytest.approx(0.1) and taus[11] == pytest.approx(0.1)
    assert all(a > b for a, b in zip(taus[:10], taus[1:10], strict=False))
    with pytest.raises(ValueError, match="0 < end <= start"):
        TemperatureSchedule(0.1, 1.0)


def test_surrogate_fits_a_synthetic_loss_landscape() -> None:
    # Loss of a 6-layer, 4-choice configuration: each layer's narrower choice costs more loss,
    # deeper layers matter more, plus an interaction between the first two layers.
    torch.manual_seed(0)
    layers, choices = 6, 4
    penalty = torch.linspace(0, 1, choices)[None] * torch.linspace(0.2, 1.0, layers)[:, None]  # (L, C)

    def landscape(one_hot: torch.Tensor) -> float:
        picks = one_hot.view(layers, choices)
        return float(2.0 + (picks * penalty).sum() + 0.3 * picks[0, -1] * picks[1, -1])

    def sample() -> torch.Tensor:
        index = torch.randint(0, choices, (layers,))
        return torch.nn.functional.one_hot(index, choices).float().flatten()[None]

    sm = SurrogateModel(layers * choices, hidden_size=64)
    optimizer = torch.optim.Adam(sm.parameters(), lr=3e-3)
    buffer: deque = deque(maxlen=512)
    rng = random.Random(0)
    for _ in range(400):
        features = sample()
        buffer.append((features, landscape(features)))
        fit_surrogate_step(sm, optimizer, buffer, updates=2, batch=32, rng=rng)
    held_out = [sample() for _ in range(100)]
    errors = [abs(float(sm(f).detach()) - landscape(f)) / landscape(f) for f in held_out]
    assert sum(errors) / len(errors) < 0.03


def test_sm_loop_updates_the_router_only_once_the_sm_is_trusted(
    blocks, synthetic_table, tiny_flextron
) -> None:
    model = tiny_flextron()
    router = StaticRouter(model.config, [0.5, 1.0], hidden_size=16)
    target = LatencyTarget.from_table(synthetic_table(), router, model, LatencyShape("prefill", 1, 16))
    before = [p.detach().clone() for p in router.parameters()]
    config = RouterTrainingConfig(
        budgets=(0.5, 1.0), steps=40, batch_size=2, sm_threshold=0.05, sm_updates=8, sm_lr=1e-2
    )
    sm, log = train_router_surrogate(model, router, target, blocks(), config)
    updated = [row["router_updated"] for row in log.rows]
    assert not updated[0]  # an untrained SM is never trusted
    assert any(updated)
    first = updated.index(True)
    assert all(row["sm_error"] < 0.05 for row in log.rows if row["router_updated"])
    assert log.rows[first]["sm_error"] < log.rows[0]["sm_error"]
    assert any(not torch.equal(a, b) for a, b in zip(before, router.parameters(), strict=True))
    assert all(p.grad is None or not p.requires_grad for p in model.parameters())


def test_latency_loss_drives_the_static_router_to_its_target(blocks, synthetic_table, tiny_flextron) -> None:
    model = tiny_flextron()
    router = StaticRouter(model.config, [0.5, 1.0], hidden_size=16)
    table = synthetic_table()
    target = LatencyTarget.from_table(table, router, model, LatencyShape("prefill", 1, 16))
    # The latency term dominates: the router must learn to meet each budget.
    config = RouterTrainingConfig(
        budgets=(0.5, 1.0), steps=80, latency_weight=20.0, router_lr=2e-2, loss="lm"
    )
    log = train_end_to_end(model, router, target, blocks(), config)
    assert len(log.rows) == 80
    for budget in (0.5, 1.0):
        predicted = table.predict(router.arch(budget), LatencyShape("prefill", 1, 16))
        assert predicted == pytest.approx(budget * target.full_ms, rel=0.15)


def test_joint_fine_tuning_updates_model_and_dynamic_router(blocks, synthetic_table, tiny_flextron) -> None:
    model = tiny_flextron()
    router = DynamicRouter(model.config, [0.5, 1.0], hidden_size=16)
    target = LatencyTarget.from_table(synthetic_table(), router, model, LatencyShape("prefill", 1, 16))
    model_before = [p.detach().clone() for p in model.parameters()]
    router_before = [p.detach().clone() for p in router.parameters()]
    config = RouterTrainingConfig(budgets=(0.5, 1.0), steps=3, model_lr=1e-3)
    log = train_end_to_end(model, router, target, blocks(), config, train_model=True)
    assert all(row["task_loss"] >= 0 for row in log.rows)  # KL to the frozen full model
    assert any(not torch.equal(a, b) for a, b in zip(model_before, model.parameters(), strict=True))
    assert all(not torch.equal(a, b) for a, b in zip(router_before, router.parameters(), strict=True))
    assert not model.training and not any(p.requires_grad for p in model.parameters())


def test_bad_training_settings() -> None:
    with pytest.raises(ValueError, match="loss must be"):
        RouterTrainingConfig(loss="mse")
    with pytest.raises(ValueError, match="steps and batch_size"):
        RouterTrainingConfig(steps=0)

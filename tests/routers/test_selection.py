"""Budget-driven inference: latency budgets and targets -> configurations or the dynamic router."""

from __future__ import annotations

import pytest
import torch

from flextron.latency.shape import LatencyShape
from flextron.routers import BudgetResolver, fit_to_latency

pytestmark = pytest.mark.usefixtures("one_thread")
SHAPE = LatencyShape("prefill", 1, 16)


def test_latency_target_becomes_a_budget_with_the_uniform_configuration_nearest(model_dir) -> None:
    model, path, _ = model_dir
    resolver = BudgetResolver(model, path)
    assert resolver.shape == SHAPE
    # Full model: 2 + 2 * (4 + 2) = 14 ms; 7 ms = budget 0.5.
    selection = resolver.select(latency_ms=7.0, method="uniform")
    assert selection.budget == pytest.approx(0.5)
    assert selection.arch.is_uniform
    assert selection.predicted_ms == pytest.approx(7.0, rel=0.15)
    assert resolver.table.predict(selection.arch, LatencyShape("prefill", 1, 16)) == selection.predicted_ms


def test_latency_target_outside_the_range_names_it(model_dir) -> None:
    model, path, _ = model_dir
    resolver = BudgetResolver(model, path)
    for target in (1.0, 20.0):
        with pytest.raises(ValueError, match=r"achievable range is 6\.000 ms .* to 14\.000 ms"):
            resolver.select(latency_ms=target, method="uniform")
    with pytest.raises(ValueError, match="not both"):
        resolver.select(budget=0.5, latency_ms=7.0)


def test_static_router_interpolates_between_trained_budgets_and_rejects_others(model_dir) -> None:
    model, path, routers = model_dir
    resolver = BudgetResolver(model, path)
    selection = resolver.select(budget=0.6)  # auto: the static router
    assert selection.method == "static"
    assert selection.predicted_ms == pytest.approx(0.6 * 14.0, rel=0.05)
    weights = routers["static"].encoder(0.6)
    assert torch.allclose(weights, torch.tensor([[0.6, 0.4, 0.0]]))
    with pytest.raises(ValueError, match=r"budget 0.45 outside the router.s trained range \[0.5, 1\]"):
        resolver.select(budget=0.45)
    # Below the smallest sub-network a budget runs (the smallest), but says it cannot be met.
    with pytest.warns(UserWarning, match=r"budget 0.3 \(4.20 ms\) is below .* 6.00 ms .* are 0.429 to 1"):
        assert resolver.select(budget=0.3, method="uniform").predicted_ms == pytest.approx(6.0)


def test_dynamic_selection_gives_fresh_sessions(model_dir) -> None:
    model, path, _ = model_dir
    selection = BudgetResolver(model, path).select(budget=0.7, method="dynamic")
    assert selection.arch is None and selection.router is not None
    first, second = selection.session(2), selection.session(2)
    assert first is not second
    ids = torch.randint(3, 300, (2, 6))
    with torch.no_grad():
        assert torch.equal(model(ids, session=first), model(ids, session=second))


def test_dynamic_router_is_refused_at_a_shape_it_was_not_calibrated_for(model_dir) -> None:
    model, path, _ = model_dir
    resolver = BudgetResolver(model, path, shape=LatencyShape("decode", 1, 64))
    assert resolver.router_shape == SHAPE
    with pytest.raises(ValueError, match=r"calibrated for prefill:1x16, not decode:1x64: recalibrate"):
        resolver.select(budget=0.7, method="dynamic")
    # Static choices are refit to the requested shape's latency.
    selection = resolver.select(budget=0.75, method="static")
    full = resolver.table.predict(model.full_arch(), LatencyShape("decode", 1, 64))
    assert selection.predicted_ms == pytest.approx(0.75 * full, rel=0.05)


def test_without_table_or_routers(tiny_flextron, tmp_path) -> None:
    model = tiny_flextron()
    resolver = BudgetResolver(model, None)
    assert resolver.select(budget=0.5).arch == model.arch_for_budget(0.5)
    with pytest.raises(ValueError, match="needs the model's latency table"):
        resolver.select(latency_ms=5.0)
    with pytest.raises(ValueError, match="no static router"):
        resolver.select(budget=0.5, method="static")


def test_fit_to_latency_nudges_the_router_configuration_into_the_band(synthetic_table, model_dir) -> None:
    model, _, routers = model_dir
    router, table, shape = routers["static"], synthetic_table(), SHAPE
    for budget in (0.5, 0.75, 1.0):
        arch = fit_to_latency(router, budget, table, budget * 14.0, shape)
        assert table.predict(arch, shape) == pytest.approx(budget * 14.0, rel=0.05)
    # Already inside the band: the router's own choice is kept.
    raw = router.arch(0.75)
    target = table.predict(raw, shape)
    assert fit_to_latency(router, 0.75, table, target, shape) == raw

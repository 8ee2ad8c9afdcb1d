"""A dynamic router's latency calibration: on the LUT, with the routing overhead, on measured latency."""

from __future__ import annotations

import pytest
import torch

from flextron.latency.shape import LatencyShape
from flextron.model.config import ArchConfig
from flextron.routers import (
    DynamicRouter,
    LatencyTarget,
    calibrate_dynamic,
    calibrate_dynamic_measured,
    calibration_grid,
    load_routers,
    measure_routing_overhead,
    save_routers,
)
from flextron.routers.calibration import _lut_latency_of_choices

pytestmark = pytest.mark.usefixtures("one_thread")
SHAPE = LatencyShape("prefill", 1, 16)


def lut_latency(model, router, target, ids, budget) -> float:
    session = router.session(budget, ids.shape[0])
    with torch.no_grad():
        model(ids, session=session)
    mlp, heads = session.usage()
    return float(target.latency(mlp.mean(0, keepdim=True), heads.mean(0, keepdim=True)))


def test_calibration_puts_a_saturated_dynamic_router_on_every_target(
    blocks, synthetic_table, tiny_flextron, tmp_path
) -> None:
    torch.manual_seed(0)
    model, table = tiny_flextron(), synthetic_table()
    router = DynamicRouter(model.config, [0.5, 1.0], hidden_size=8)
    # A router that saturates: the narrowest width and fewest heads at every budget.
    narrow = ArchConfig((64, 64), (2, 2))
    router.init_to({0.5: narrow, 1.0: narrow}, margin=3.0)
    target = LatencyTarget.from_table(table, router, model, SHAPE)
    ids = blocks(seed=1)
    assert lut_latency(model, router, target, ids, 1.0) < 0.5 * target.full_ms
    rows = calibrate_dynamic(model, router, target, ids, [0.5, 0.7, 1.0], tolerance=0.01)
    assert [r["budget"] for r in rows] == [0.5, 0.7, 1.0]
    for row in rows:
        goal = row["budget"] * target.full_ms
        assert row["goal_ms"] == pytest.approx(goal)
        assert lut_latency(model, router, target, ids, row["budget"]) == pytest.approx(goal, rel=0.03)
    # Between calibrated budgets the offset interpolates; the latency lands between.
    between = lut_latency(model, router, target, ids, 0.6)
    assert 0.5 * target.full_ms - 0.5 <= between <= 0.7 * target.full_ms + 0.5
    # The calibration travels with the router files.
    save_routers(tmp_path, {"dynamic": router})
    loaded = load_routers(tmp_path, model.config)[0]["dynamic"]
    assert loaded.calibration == router.calibration
    assert lut_latency(model, loaded, target, ids, 0.7) == pytest.approx(0.7 * target.full_ms, rel=0.03)


def test_calibration_subtracts_the_measured_overhead(blocks, synthetic_table, tiny_flextron) -> None:
    torch.manual_seed(0)
    model, table = tiny_flextron(), synthetic_table()
    router = DynamicRouter(model.config, [0.5, 1.0], hidden_size=8)
    target = LatencyTarget.from_table(table, router, model, SHAPE)
    rows = calibrate_dynamic(model, router, target, blocks(seed=1), [0.8], overhead=(1.0, 0.1))
    assert rows[0]["goal_ms"] == pytest.approx((0.8 * target.full_ms - 1.0) / 1.1)
    assert rows[0]["lut_ms"] == pytest.approx(rows[0]["goal_ms"], rel=0.03)


def test_measured_calibration_bisects_on_the_timed_ratio_to_the_full_model(
    blocks, synthetic_table, tiny_flextron, tmp_path
) -> None:
    torch.manual_seed(0)
    model, table = tiny_flextron(), synthetic_table()
    router = DynamicRouter(model.config, [0.5, 1.0], hidden_size=8)
    router.init_to({0.5: ArchConfig((64, 64), (2, 2)), 1.0: model.full_arch()}, margin=3.0)
    target = LatencyTarget.from_table(table, router, model, SHAPE)
    ids = blocks(4, seed=1)
    calls = []

    def timer(functions: dict) -> dict:
        # A deterministic stand-in for the clock: every function runs once; a routed forward
        # "takes" 1.1 x its LUT latency + 0.5 ms, and the machine is loaded so that the full
        # model takes 1.5 x its LUT latency (the ratio cancels the load, not the overhead).
        assert set(functions) == {0, 1, "full"}  # 4 blocks in chunks of 2, then the full model
        calls.append(router.calibration["offsets"][0])
        budget = router.calibration["budgets"][0]
        times = {"full": 1.5 * target.full_ms}
        for key in (0, 1):
            functions[key]()
            chunk = ids[2 * key : 2 * key + 2]
            times[key] = 1.5 * (1.1 * lut_latency(model, router, target, chunk, budget) + 0.5)
        return times

    calibrate_dynamic(model, router, target, ids, [0.6, 0.8])  # LUT calibration: the start
    start = router.offsets(torch.tensor([0.6, 0.8])).tolist()
    rows = calibrate_dynamic_measured(
        model, router, target, ids, [0.8, 0.6], batch_size=2, timer=timer, tolerance=0.02
    )
    assert [r["budget"] for r in rows] == [0.6, 0.8]
    assert [r["start_offset"] for r in rows] == start and calls[0] == start[0]
    for row in rows:
        goal = row["budget"] * target.full_ms
        assert row["goal_ms"] == pytest.approx(goal)
        assert row["measured_ms"] == pytest.approx(goal, rel=0.02)
        assert row["offset"] > row["start_offset"]  # the overhead needs cheaper choices than the LUT says
        assert len(row["tried"]) == row["evaluations"]
        # What the stub clock charges at the stored offset: on target; the LUT latency below it.
        lut = (
            lut_latency(model, router, target, ids[:2], row["budget"])
            + lut_latency(model, router, target, ids[2:], row["budget"])
        ) / 2
        assert (1.1 * lut + 0.5) == pytest.approx(goal, rel=0.02)
    assert router.calibration["budgets"] == [0.6, 0.8]
    with pytest.raises(ValueError, match="need at least 2 blocks"):
        calibrate_dynamic_measured(model, router, target, ids[:1], [0.6], batch_size=2, timer=timer)


def stub_timer(times: dict):
    """times_ms stand-in that runs every function once (the sessions make their choices) and
    returns the given times."""

    def timer(functions, *_):
        for function in functions.values():
            function()
        return {key: times[key] for key in functions}

    return timer


def test_measured_routing_overhead_is_a_line_through_measured_minus_lut(
    blocks, synthetic_table, tiny_flextron, monkeypatch
) -> None:
    torch.manual_seed(0)
    model, table = tiny_flextron(), synthetic_table()
    router = DynamicRouter(model.config, [0.5, 1.0], hidden_size=8)
    target = LatencyTarget.from_table(table, router, model, SHAPE)
    calibrate_dynamic(model, router, target, blocks(seed=1), [0.5, 1.0])
    # Routed forwards "take" 0.55 and 1.2 of the dense model's time: an overhead that grows.
    monkeypatch.setattr(
        "flextron.routers.calibration.times_ms", stub_timer({0.5: 5.5, 1.0: 12.0, "full": 10.0})
    )
    (fixed, fraction), rows = measure_routing_overhead(
        model, router, target, blocks(1, seed=1)[None], [0.5, 1.0]
    )
    assert [r["budget"] for r in rows] == [0.5, 1.0]
    assert [r["measured_ms"] / target.full_ms for r in rows] == [pytest.approx(0.55), pytest.approx(1.2)]
    assert fraction > -0.5
    for row in rows:
        # Two points: the line passes through both.
        assert row["measured_ms"] - row["lut_ms"] == pytest.approx(fixed + fraction * row["lut_ms"], abs=1e-6)
    # Measured times that do not grow with the LUT's (noise on a tiny model) would fit a slope
    # near -1, which calibration divides by: a constant overhead instead.
    monkeypatch.setattr(
        "flextron.routers.calibration.times_ms", stub_timer({0.5: 6.0, 1.0: 6.0, "full": 10.0})
    )
    (fixed, fraction), rows = measure_routing_overhead(
        model, router, target, blocks(1, seed=1)[None], [0.5, 1.0]
    )
    assert fraction == 0.0
    assert fixed == pytest.approx(sum(r["measured_ms"] - r["lut_ms"] for r in rows) / 2)
    with pytest.raises(ValueError, match="must be > -1"):
        calibrate_dynamic(model, router, target, blocks(seed=1), [0.5], overhead=(0.0, -1.0))
    # The LUT latency is that of the choices of the timed forward itself.
    assert rows[0]["lut_ms"] == pytest.approx(
        _lut_latency_of_choices(model, router, target, blocks(1, seed=1), 0.5)
    )


def test_routing_overhead_at_a_decode_shape_prices_the_choices_of_the_decoded_tokens(
    blocks, synthetic_table, tiny_flextron
) -> None:
    torch.manual_seed(0)
    model, table = tiny_flextron(), synthetic_table()
    router = DynamicRouter(model.config, [0.5, 1.0], hidden_size=8)
    target = LatencyTarget.from_table(table, router, model, LatencyShape("decode", 1, 64))
    ids = blocks(3, 65, seed=1)[:, None]  # 3 chunks of 1 sequence: a 64-token context, then the timed token
    _, rows = measure_routing_overhead(model, router, target, ids, [0.5, 1.0], repeats=2, phase="decode")
    for row, budget in zip(rows, (0.5, 1.0), strict=True):
        # Each chunk's timed step routes one token: its choices, priced at the decode costs.
        expected = []
        for chunk in ids:
            session, cache = router.session(budget, 1), model.new_kv_cache(1, 65)
            with torch.inference_mode():
                model(chunk[:, :-1], kv_cache=cache, session=session)
                model(chunk[:, -1:], kv_cache=cache, session=session)
            assert session.mlp_probs[0].shape[0] == 1  # the usage of the latest call: one token
            expected.append(float(target.latency(*session.usage()).mean()))
        assert row["lut_ms"] == pytest.approx(sum(expected) / len(expected))


def test_calibration_grid_starts_at_the_smallest_reachable_budget() -> None:
    assert calibration_grid([0.3, 0.5, 1.0], 0.17) == ([0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0], [])
    assert calibration_grid([0.3, 0.5, 1.0], 0.5281) == ([0.529, 0.6, 0.7, 0.8, 0.9, 1.0], [0.3, 0.4, 0.5])
    # Nothing reachable (a noisy table of a tiny model): all kept, calibration saturates.
    assert calibration_grid([0.5, 1.0], 1.07)[1] == []

"""The sequence router: per-sequence configurations, their mix at a budget, and its fitting."""

from __future__ import annotations

import pytest
import torch

from flextron.latency.shape import LatencyShape
from flextron.model.checkpoint import save_pretrained
from flextron.model.config import ArchConfig
from flextron.routers import BudgetResolver, load_routers, save_routers
from flextron.routers.evaluation import block_losses, dynamic_perplexity, prefix_session
from flextron.routers.selection import Selection
from flextron.routers.sequence import SequenceRouter, lower_hull
from flextron.routers.sequence_fitting import (
    first_layer_input,
    fit_sequence_router,
    mix_loss,
    prefix_features,
    ridge,
)


def _configurations(model) -> list[ArchConfig]:
    """Three nested configurations of the tiny model, the middle one not uniform."""
    return [
        ArchConfig.uniform(model.config, 64, 2),
        ArchConfig((192, 128), (4, 2)),
        model.full_arch(),
    ]


def _router(model, seed: int = 0) -> SequenceRouter:
    """A router whose predictions swing with the text; validation losses falling with size (every
    configuration on the hull of latency fractions 0.3, 0.5, 1)."""
    router = SequenceRouter(model.config, _configurations(model))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        router.validation_loss.copy_(torch.tensor([5.0, 3.0, 2.0]))
        router.weight.copy_(torch.randn(router.weight.shape, generator=generator))
    return router


def test_plan_picks_the_bracketing_hull_neighbours_and_the_share_that_meets_the_target(tiny_flextron) -> None:
    router = _router(tiny_flextron())
    assert router.pairs == [(0, 1), (0, 2), (1, 2)]
    fractions = [0.3, 0.5, 1.0]
    plan = router.plan(fractions, 0.4)
    assert (plan.narrow_index, plan.wide_index, plan.pair) == (0, 1, 0)
    assert (plan.share, plan.fraction) == (pytest.approx(0.5), pytest.approx(0.4))
    plan = router.plan(fractions, 0.75)
    assert (plan.narrow_index, plan.wide_index, plan.pair, plan.share) == (1, 2, 2, pytest.approx(0.5))
    low, high = router.plan(fractions, 0.2), router.plan(fractions, 1.0)
    assert (low.narrow_index, low.share, high.wide_index, high.share) == (0, 0.0, 2, 1.0)
    # At a shape where the middle configuration costs as much as the full one, it leaves the hull:
    # the mix is of the smallest and the full, with their own predictor.
    plan = router.plan([0.3, 1.0, 1.0], 0.65)
    assert (plan.narrow_index, plan.wide_index, plan.pair, plan.share) == (0, 2, 1, pytest.approx(0.5))
    features = torch.randn(5, tiny_flextron().config.hidden_size)
    torch.testing.assert_close(plan.predicted_gains(features), router.predicted_gains(features)[:, 1])
    with pytest.raises(ValueError, match="latencies for 3 configurations"):
        router.plan([0.3, 1.0], 0.5)


def test_a_configuration_both_cheapest_and_best_runs_alone(tiny_flextron) -> None:
    router = _router(tiny_flextron())
    plan = router.plan([0.3, 0.2, 1.0], 0.6)  # the middle one: cheaper than the first and better
    assert (plan.narrow_index, plan.wide_index) == (1, 2)
    with torch.no_grad():
        router.validation_loss.copy_(torch.tensor([5.0, 1.0, 2.0]))
    plan = router.plan([0.3, 0.2, 1.0], 0.6)
    assert (plan.narrow_index, plan.wide_index, plan.pair, plan.share) == (1, 1, None, 1.0)
    blocks = torch.randint(3, 300, (2, 6), generator=torch.Generator().manual_seed(12))
    session = plan.session(0.6, 2)
    model = tiny_flextron()
    with torch.no_grad():
        torch.testing.assert_close(model(blocks, session=session), model(blocks, plan.narrow))
    assert session.configurations() == [plan.narrow] * 2
    # Settled on one configuration, the session runs as it: a decode step on the fused layer op.
    assert session.settled_arch == plan.narrow
    cache = model.new_kv_cache(2, 8)
    with torch.no_grad(), torch.profiler.profile() as profile:
        model(blocks[:, :5], kv_cache=cache, session=session)
        step = model(blocks[:, 5:6], kv_cache=cache, session=session)
    assert any("decoder_layer" in event.name for event in profile.events())
    with torch.no_grad():
        torch.testing.assert_close(step, model(blocks[:, :6], plan.narrow)[:, -1:])


def test_each_batch_gives_the_wider_configuration_to_its_best_sequences_and_carries_the_rest(
    tiny_flextron,
) -> None:
    model, router = tiny_flextron(), _router(tiny_flextron())
    plan = router.plan([0.3, 0.5, 1.0], 0.35)  # a share of 0.25 at configuration 1
    counts = [plan.wide_count(3) for _ in range(8)]
    assert sum(counts) == 6 and set(counts) <= {0, 1}  # 24 sequences, a quarter of them wide
    plan.carry = 0.0
    blocks = torch.randint(3, 300, (4, 8), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        session = plan.session(0.35, 4)
        model(blocks, session=session)
        gains = plan.predicted_gains(
            router.features(model.layers[0].input_layernorm(model.embed_tokens(blocks)))
        )
    assert session.wide.tolist() == (gains == gains.max()).tolist()  # one of four: the best
    single = [plan.session(0.35, 1) for _ in range(8)]
    with torch.no_grad():
        for one in single:
            model(blocks[:1], session=one)
    assert [bool(one.wide[0]) for one in single].count(True) == 2  # batch 1: the rate, alternating


def test_a_mixed_batch_runs_each_sequence_at_its_configuration(tiny_flextron) -> None:
    model, router = tiny_flextron(), _router(tiny_flextron())
    blocks = torch.randint(3, 300, (6, 12), generator=torch.Generator().manual_seed(4))
    plan = router.plan([0.3, 0.5, 1.0], 0.75)
    session = plan.session(0.75, blocks.shape[0])
    with torch.no_grad():
        logits = model(blocks, session=session)  # (6, 12, V)
        chosen = session.configurations()
        assert {plan.narrow, plan.wide} == set(chosen)  # a mixed batch: the routed path
        for row, arch in enumerate(chosen):
            torch.testing.assert_close(
                logits[row], model(blocks[row : row + 1], arch)[0], atol=2e-5, rtol=1e-4
            )


def test_a_mixed_batch_of_an_int8_model_runs_each_sequence_at_its_configuration(
    int8_pair, tiny_flextron
) -> None:
    int8, _ = int8_pair(tiny_flextron())
    plan = _router(int8).plan([0.3, 0.5, 1.0], 0.4)
    blocks = torch.randint(3, 300, (6, 12), generator=torch.Generator().manual_seed(11))
    session = plan.session(0.4, blocks.shape[0])
    with torch.no_grad():
        logits = int8(blocks, session=session)
        assert len(set(session.configurations())) == 2
        for row, arch in enumerate(session.configurations()):
            torch.testing.assert_close(
                logits[row], int8(blocks[row : row + 1], arch)[0], atol=1e-4, rtol=1e-4
            )


def test_choices_are_kept_through_decode_and_come_from_the_prompt(tiny_flextron) -> None:
    model, router = tiny_flextron(), _router(tiny_flextron())
    blocks = torch.randint(3, 300, (6, 10), generator=torch.Generator().manual_seed(5))
    plan = router.plan([0.3, 0.5, 1.0], 0.75)
    session, cache = plan.session(0.75, 6), model.new_kv_cache(6, 10)
    with torch.no_grad():
        model(blocks[:, :8], kv_cache=cache, session=session)
        chosen = session.configurations()
        step = model(blocks[:, 8:9], kv_cache=cache, session=session)[:, -1]  # (6, V)
        assert session.configurations() == chosen and session.settled_arch is None  # a mixed batch
        for row, arch in enumerate(chosen):
            expected = model(blocks[row : row + 1, :9], arch)[0, -1]
            torch.testing.assert_close(step[row], expected, atol=2e-5, rtol=1e-4)
        # The choice is made from the prompt alone: other scored tokens do not move it.
        selection = Selection("sequence", 0.75, router=plan)
        other = blocks.clone()
        other[:, 4:] = torch.randint(3, 300, (6, 6), generator=torch.Generator().manual_seed(6))
        first = prefix_session(model, selection, blocks[:, :4]).configurations()
        assert prefix_session(model, selection, other[:, :4]).configurations() == first


def test_lower_hull_keeps_the_points_no_mix_of_others_beats() -> None:
    fractions = [0.2, 0.4, 0.5, 0.6, 0.8, 1.0, 0.9]
    losses = [5.0, 3.0, 3.5, 2.9, 2.2, 2.0, 2.5]
    # 0.5 is worse than 0.4; 0.6 lies above the segment 0.4-0.8; 0.9 is worse than 0.8.
    assert lower_hull(fractions, losses) == [0, 1, 4, 5]
    assert lower_hull([0.5, 0.3], [1.0, 1.0]) == [1]


def test_ridge_recovers_a_linear_relation_and_mix_loss_takes_the_top_share() -> None:
    generator = torch.Generator().manual_seed(7)
    features = torch.randn(400, 5, generator=generator)
    truth = torch.tensor([1.0, -2.0, 0.0, 0.5, 3.0])
    weight, bias = ridge(features, features @ truth + 0.25, 1e-6)
    torch.testing.assert_close(weight, truth, atol=1e-4, rtol=0)
    assert bias == pytest.approx(0.25, abs=1e-4)
    narrow, wide = torch.tensor([3.0, 3.0, 3.0, 3.0]), torch.tensor([1.0, 2.5, 2.0, 2.9])
    predicted = torch.tensor([0.9, 0.1, 0.5, 0.0])  # ranks sequences 0, 2, 1, 3
    assert mix_loss(predicted, narrow, wide, 0.5) == pytest.approx((1.0 + 3.0 + 2.0 + 3.0) / 4)
    assert mix_loss(predicted, narrow, wide, 0.0) == pytest.approx(3.0)


def test_fitting_learns_gains_chooses_on_validation_and_round_trips(tiny_flextron, tmp_path) -> None:
    model = tiny_flextron()
    train = torch.randint(3, 300, (24, 12), generator=torch.Generator().manual_seed(8))
    validation = torch.randint(3, 300, (10, 12), generator=torch.Generator().manual_seed(9))
    # A fourth candidate, as slow as the full model and no better: dropped (above the hull).
    candidates = [*_configurations(model), ArchConfig.uniform(model.config, 64, 4)]
    router, summary = fit_sequence_router(
        model, candidates, [0.3, 0.6, 1.0, 1.0], train, validation, prefix=4
    )
    assert router.configurations == _configurations(model)
    assert len(summary) == 3 and all(row["penalty"] > 0 for row in summary)
    expected = [
        float(block_losses(model, validation, prefix=4, arch=a).mean()) for a in router.configurations
    ]
    assert router.validation_loss.tolist() == pytest.approx(expected)
    features = router.features(first_layer_input(model, validation[:, :4]).detach())
    torch.testing.assert_close(
        prefix_features(model, validation, 4, batch_size=3),
        first_layer_input(model, validation[:, :4]).mean(1),
    )
    for row in summary:  # the oracle's mix is never worse than the fixed mix, the router's is scored
        assert all(o <= f + 1e-6 for o, f in zip(row["oracle_mix_loss"], row["fixed_mix_loss"], strict=True))
    save_pretrained(model, tmp_path)
    save_routers(tmp_path, {"sequence": router}, LatencyShape("prefill", 1, 16))
    loaded = load_routers(tmp_path, model.config)[0]["sequence"]
    assert loaded.configurations == router.configurations
    torch.testing.assert_close(loaded.predicted_gains(features), router.predicted_gains(features))


def test_budget_resolver_mixes_by_the_table_and_evaluates(model_dir) -> None:
    model, path, routers = model_dir
    router = _router(model)
    save_routers(path, {**routers, "sequence": router}, LatencyShape("prefill", 1, 16))
    resolver = BudgetResolver(model, path)
    selection = resolver.select(0.6, method="sequence")
    full = resolver.table.predict(model.full_arch(), resolver.shape)
    fractions = [resolver.table.predict(a, resolver.shape) / full for a in router.configurations]
    assert selection.router.pair == (0 if 0.6 <= fractions[1] else 1)
    assert selection.predicted_ms == pytest.approx(0.6 * full)
    blocks = torch.randint(3, 300, (4, 12), generator=torch.Generator().manual_seed(10))
    perplexity, active = dynamic_perplexity(model, blocks, selection, batch_size=2, prefix=3)
    losses = block_losses(
        model, blocks, prefix=3, sessions=lambda p: prefix_session(model, selection, p), batch_size=2
    )
    assert perplexity == pytest.approx(float(losses.mean().exp()))
    assert model.num_parameters(router.configurations[0]) <= active <= model.num_parameters()


def test_sequence_routing_needs_a_table(tiny_flextron, tmp_path) -> None:
    model = tiny_flextron()
    save_pretrained(model, tmp_path)
    save_routers(tmp_path, {"sequence": _router(model)}, LatencyShape("prefill", 1, 16))
    with pytest.raises(ValueError, match="flextron profile"):
        BudgetResolver(model, tmp_path).select(0.5, method="sequence")

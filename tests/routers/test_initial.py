"""Training-only starting configurations: uniform (nearest latency, or best on a probe), trained."""

from __future__ import annotations

import pytest
import torch

from flextron.latency.shape import LatencyShape
from flextron.model.budget_configs import BudgetConfigs
from flextron.model.config import ArchConfig
from flextron.routers import StaticRouter, uniform_arch_for_latency, uniform_init_archs
from flextron.routers.initial import trained_init_archs, trained_widths

pytestmark = pytest.mark.usefixtures("one_thread")
SHAPE = LatencyShape("prefill", 1, 16)


def test_uniform_init_archs_are_the_uniform_configurations_nearest_each_budget(
    synthetic_table, tiny_flextron
) -> None:
    model, table = tiny_flextron(), synthetic_table()
    router = StaticRouter(model.config, [0.5, 0.75, 1.0], mlp_choices=[256, 128, 64], hidden_size=8)
    archs = uniform_init_archs(model, table, router, SHAPE)
    full = table.predict(model.full_arch(), SHAPE)  # 14 ms
    assert archs[1.0] == model.full_arch()
    for budget, arch in archs.items():
        assert arch.is_uniform and arch.mlp_widths[0] in router.mlp_choices
        assert arch == uniform_arch_for_latency(
            model, table, budget * full, SHAPE, router.mlp_choices, router.head_choices
        )


def test_best_uniform_init_picks_the_lowest_perplexity_among_configurations_of_the_target_latency(
    blocks, synthetic_table, tiny_flextron
) -> None:
    from flextron.eval.perplexity import perplexity

    torch.manual_seed(0)
    model, table = tiny_flextron(), synthetic_table()
    router = StaticRouter(model.config, [0.3, 0.5, 0.75, 1.0], mlp_choices=[256, 192, 128, 64], hidden_size=8)
    probe = blocks(2, seed=1)
    full = table.predict(model.full_arch(), SHAPE)  # 14 ms
    archs = uniform_init_archs(model, table, router, SHAPE, probe, tolerance=0.1)
    assert archs[1.0] == model.full_arch()  # nothing else within 10% of the full model
    target = 0.75 * full
    near = [
        a
        for a in (
            ArchConfig.uniform(model.config, w, h) for w in router.mlp_choices for h in router.head_choices
        )
        if abs(table.predict(a, SHAPE) - target) <= 0.1 * target
    ]
    assert len(near) == 2  # a real choice: (192 wide, 2 heads) vs (128 wide, 4 heads), both 10 ms
    ppl = {a: perplexity(model, probe, a)[0] for a in near}
    assert archs[0.75] == min(ppl, key=ppl.get)
    # Nothing within 10% of 0.3 (4.2 ms, below the smallest configuration's 6 ms) or of 0.5
    # (7 ms; 6 or 8 ms): the nearest latency, as without a probe.
    nearest = uniform_init_archs(model, table, router, SHAPE)
    assert archs[0.3] == nearest[0.3] == ArchConfig((64, 64), (2, 2)) and archs[0.5] == nearest[0.5]


def test_trained_init_archs_start_between_the_trained_configurations(synthetic_table, tiny_flextron) -> None:
    """At a trained configuration's own latency the start is that configuration; between two
    trained configurations, every layer's width lies between theirs."""
    model, table = tiny_flextron(), synthetic_table()
    half = ArchConfig.uniform(model.config, 128, 2)
    model.budget_configs = BudgetConfigs([{"budget": 0.5, "arch": half.to_dict()}])
    full_ms = table.predict(model.full_arch(), SHAPE)
    at_half = table.predict(half, SHAPE) / full_ms
    between = (at_half + 1.0) / 2
    router = StaticRouter(
        model.config, [at_half, between, 1.0], mlp_choices=sorted(trained_widths(model) | {192}, reverse=True)
    )
    archs = trained_init_archs(model, table, router, SHAPE)
    assert archs[at_half] == half and archs[1.0] == model.full_arch()
    assert trained_widths(model) == {128, model.config.intermediate_size}
    middle = archs[between]
    assert all(128 <= w <= model.config.intermediate_size for w in middle.mlp_widths)
    assert middle != half and middle != model.full_arch()

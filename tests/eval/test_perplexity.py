"""Perplexity evaluation, the results table, JSON and plot."""

from __future__ import annotations

import json
import math

import pytest
import torch

from flextron.eval.perplexity import (
    archs_for_budgets,
    evaluate_archs,
    format_table,
    frontier_perplexity,
    pareto_frontier,
    perplexity,
    write_results,
)


def test_perplexity_is_exp_of_mean_next_token_loss(tiny_flextron) -> None:
    model = tiny_flextron()
    blocks = torch.randint(0, 300, (3, 10))
    ppl, tokens_per_s = perplexity(model, blocks, batch_size=2)
    with torch.no_grad():
        logits = model(blocks)
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 300), blocks[:, 1:].reshape(-1))
    assert math.isclose(ppl, math.exp(loss.item()), rel_tol=1e-5)
    assert tokens_per_s > 0


def test_budget_table_json_and_plot(tiny_flextron, tmp_path) -> None:
    model = tiny_flextron()
    rows = evaluate_archs(
        model, torch.randint(0, 300, (2, 12)), archs_for_budgets(model, [1.0, 0.5]), progress=False
    )
    assert [r["budget"] for r in rows] == [1.0, 0.5]
    assert rows[0]["parameters"] > rows[1]["parameters"]
    table = format_table(rows)
    assert "perplexity" in table and "budget 0.5" in table
    write_results(rows, tmp_path / "r.json", tmp_path / "r.png")
    assert json.loads((tmp_path / "r.json").read_text())["results"][1]["arch"]["mlp_widths"] == [128, 128]
    assert (tmp_path / "r.png").read_bytes()[:4] == b"\x89PNG"


def test_pareto_frontier_and_interpolated_perplexity() -> None:
    points = [(100.0, 50.0), (150.0, 20.0), (120.0, 60.0), (200.0, 10.0), (210.0, 12.0)]
    frontier = pareto_frontier(points)
    assert frontier == [(100.0, 50.0), (150.0, 20.0), (200.0, 10.0)]
    assert frontier_perplexity(frontier, 90.0) == 50.0
    assert frontier_perplexity(frontier, 150.0) == pytest.approx(20.0)
    assert frontier_perplexity(frontier, 175.0) == pytest.approx((20.0 * 10.0) ** 0.5)
    assert frontier_perplexity(frontier, 300.0) == 10.0

"""The headroom oracle: first-order loss changes, the Lagrange allocation, forced sessions."""

from __future__ import annotations

import pytest
import torch

from flextron.model.mixed_widths import ForcedSession
from flextron.model.objectives import kd_loss, next_token_cross_entropy
from flextron.routers import StaticRouter
from flextron.routers.oracle import (
    allocate_widths,
    mlp_loss_changes,
    neuron_contributions,
    oracle_sessions,
    restrict_to_window,
)


def _ranks(values: torch.Tensor) -> torch.Tensor:
    return values.argsort().argsort().double()


def _rank_correlation(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.corrcoef(torch.stack([_ranks(a), _ranks(b)]))[0, 1])


def _true_and_estimated_changes(
    model, anchor_choice: int, teacher: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Moving one token's MLP in one layer a little from the anchor width, every (layer, token,
    width): Δ from one backward pass at the anchor, and the loss change of actually running it
    (the next-token loss, or with `teacher` the KL divergence from the full model)."""
    torch.manual_seed(0)
    tokens = torch.randint(0, model.config.vocab_size, (1, 12))
    widths, heads = [256, 248, 240], (4,) * model.config.num_layers
    layers = model.config.num_layers
    with torch.no_grad():
        teacher_logits = model(tokens) if teacher else None  # (1, 12, V)
    anchor = [widths[anchor_choice]] * layers
    estimate = mlp_loss_changes(model, tokens, heads, widths, anchor, teacher_logits)
    assert estimate.shape == (layers, 12, 3)
    assert torch.all(estimate[..., anchor_choice] == 0)  # the anchor width changes nothing

    def loss(choice: torch.Tensor) -> float:
        with torch.no_grad():
            logits = model(tokens, session=ForcedSession.shared(widths, choice, heads))
            if teacher:
                return float(kd_loss(logits, teacher_logits) * tokens.numel())
        return float(next_token_cross_entropy(logits, tokens, reduction="sum"))

    anchored = torch.full((layers, 12), anchor_choice, dtype=torch.int64)
    base = loss(anchored)
    predicted, true = [], []
    for layer in range(layers):
        for token in range(12 if teacher else 11):  # the last output has no next token to score
            for c in {0, 1, 2} - {anchor_choice}:
                choice = anchored.clone()
                choice[layer, token] = c
                predicted.append(float(estimate[layer, token, c]))
                true.append(loss(choice) - base)
    return torch.tensor(predicted), torch.tensor(true)


def test_first_order_estimate_ranks_like_the_true_loss_change(tiny_flextron):
    """Narrowing from the full width (rank correlation ≥ 0.8)."""
    predicted, true = _true_and_estimated_changes(tiny_flextron(), anchor_choice=0)
    assert _rank_correlation(predicted, true) >= 0.8


def test_estimate_anchored_at_a_narrower_width_ranks_like_the_true_change(tiny_flextron):
    """Widening and narrowing from a width between the others, as the bench anchors the oracle at
    the static configuration (rank correlation ≥ 0.8)."""
    predicted, true = _true_and_estimated_changes(tiny_flextron(), anchor_choice=1)
    assert _rank_correlation(predicted, true) >= 0.8


def test_estimate_of_the_divergence_from_the_full_model_ranks_like_the_true_change(tiny_flextron):
    """The oracle's label-free loss (KL from the full model's predictions), anchored below the
    full width where the divergence has a gradient (rank correlation ≥ 0.8)."""
    predicted, true = _true_and_estimated_changes(tiny_flextron(), anchor_choice=2, teacher=True)
    assert _rank_correlation(predicted, true) >= 0.8


def test_window_keeps_every_choice_near_the_anchor():
    changes = torch.zeros(2, 3, 5)  # (L, N, C)
    restricted = restrict_to_window(changes, [0, 3], window=1)
    assert torch.isinf(restricted[0, :, 2:]).all() and (restricted[0, :, :2] == 0).all()
    assert torch.isinf(restricted[1, :, :2]).all() and (restricted[1, :, 2:] == 0).all()
    choice, _ = allocate_widths(restricted - torch.arange(5.0), torch.ones(5), target=2.0)
    assert choice.tolist() == [[1, 1, 1], [4, 4, 4]]  # the widest allowed, never beyond the window


def test_forced_static_choices_reproduce_the_static_configuration_exactly(tiny_flextron):
    model = tiny_flextron()
    torch.manual_seed(1)
    router = StaticRouter(model.config, [0.5, 1.0], hidden_size=8)
    arch = router.arch(0.5)
    tokens = torch.randint(0, model.config.vocab_size, (2, 10))
    index = [router.mlp_choices.index(w) for w in arch.mlp_widths]
    choice = torch.tensor(index)[:, None].expand(-1, tokens.numel()).contiguous()  # (L, B*T)
    with torch.no_grad():
        static = model(tokens, arch)
        forced = model(tokens, session=ForcedSession.shared(router.mlp_choices, choice, arch.heads))
    assert torch.equal(forced, static)


def test_suffix_sums_equal_the_nested_prefixes_outputs(tiny_flextron):
    """Δ(w) from per-neuron contributions equals g · (out_w − out_full) with out_w the MLP run at w."""
    model = tiny_flextron()
    mlp = model.layers[0].mlp
    x, grad = torch.randn(2, 5, model.config.hidden_size), torch.randn(2, 5, model.config.hidden_size)
    contributions = neuron_contributions(mlp, x, grad)  # (10, F)
    with torch.no_grad():
        full = mlp(x, 256)
        for width in (256, 200, 64):
            direct = (grad * (mlp(x, width) - full)).sum(-1).flatten()
            torch.testing.assert_close(-contributions[:, width:].sum(-1), direct, atol=1e-4, rtol=1e-4)


def test_allocation_meets_the_target_cost_and_prefers_cheap_losses():
    # 1 layer, 3 tokens, widths (full, half): token 0 loses little when narrowed, token 2 a lot.
    changes = torch.tensor([[[0.0, 0.1], [0.0, 1.0], [0.0, 5.0]]])
    costs = torch.tensor([2.0, 1.0])
    choice, multiplier = allocate_widths(changes, costs, target=5 / 3)  # room for one narrowed token
    assert choice.tolist() == [[1, 0, 0]]
    assert 0.1 <= multiplier <= 1.0
    assert allocate_widths(changes, costs, target=2.0)[0].tolist() == [[0, 0, 0]]
    with pytest.raises(ValueError, match="cheapest"):
        allocate_widths(changes, costs, target=0.5)


def test_oracle_sessions_follow_the_batches_of_blocks():
    choices = torch.arange(2 * 5 * 3).view(2, 15)  # L=2, 5 blocks of length 3
    sessions = oracle_sessions(choices, [8, 4], (2, 2), batch=2, length=3)
    assert [s.choice.shape for s in sessions] == [(2, 6), (2, 6), (2, 3)]
    assert torch.equal(sessions[1].choice[1], choices[1, 6:12])

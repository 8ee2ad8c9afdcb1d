"""The headroom oracle: first-order loss changes, the Lagrange allocation, forced sessions."""

from __future__ import annotations

import pytest
import torch

from flextron.model.mixed_widths import ForcedSession
from flextron.model.objectives import next_token_cross_entropy
from flextron.routers import StaticRouter
from flextron.routers.oracle import allocate_widths, mlp_loss_changes, neuron_contributions, oracle_sessions


def _ranks(values: torch.Tensor) -> torch.Tensor:
    return values.argsort().argsort().double()


def _rank_correlation(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.corrcoef(torch.stack([_ranks(a), _ranks(b)]))[0, 1])


def test_first_order_estimate_ranks_like_the_true_loss_change(tiny_flextron):
    """Narrowing one token's MLP in one layer a little: Δ from one backward pass against the
    loss change of actually running it (rank correlation ≥ 0.8)."""
    model = tiny_flextron()
    torch.manual_seed(0)
    tokens = torch.randint(0, model.config.vocab_size, (1, 12))
    widths, heads = [256, 248, 240], (4,) * model.config.num_layers
    estimate = mlp_loss_changes(model, tokens, heads, widths)  # (L, T, C)
    assert estimate.shape == (model.config.num_layers, 12, 3)
    assert torch.all(estimate[..., 0] == 0)  # the full width changes nothing

    def loss(choice: torch.Tensor) -> float:
        with torch.no_grad():
            logits = model(tokens, session=ForcedSession.shared(widths, choice, heads))
        return float(next_token_cross_entropy(logits, tokens, reduction="sum"))

    full = torch.zeros(model.config.num_layers, 12, dtype=torch.int64)
    base = loss(full)
    predicted, true = [], []
    for layer in range(model.config.num_layers):
        for token in range(11):  # the last token's output is never scored: both changes are 0
            for c in (1, 2):
                choice = full.clone()
                choice[layer, token] = c
                predicted.append(float(estimate[layer, token, c]))
                true.append(loss(choice) - base)
    assert _rank_correlation(torch.tensor(predicted), torch.tensor(true)) >= 0.8


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

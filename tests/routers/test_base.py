"""The Router base class: choices, the budget encoder, sessions, initialisation to configurations."""

from __future__ import annotations

import pytest
import torch

from flextron.routers import (
    BudgetEncoder,
    StaticRouter,
    default_mlp_choices,
)
from tests.tiny_models import tiny_flextron

pytestmark = pytest.mark.usefixtures("one_thread")


def test_default_choices_span_small_to_full_widest_first() -> None:
    config = tiny_flextron().config  # d_ff 256 -> allowed 64, 128, 192, 256
    assert default_mlp_choices(config, 8) == [256, 192, 128, 64]
    assert default_mlp_choices(config, 2) == [256, 64]
    with pytest.raises(ValueError, match="strictly descending"):
        StaticRouter(config, [0.5, 1.0], mlp_choices=[64, 256])
    with pytest.raises(ValueError, match="subset of the allowed"):
        StaticRouter(config, [0.5, 1.0], mlp_choices=[100])


def test_budget_encoder_interpolates_between_trained_budgets() -> None:
    encoder = BudgetEncoder([1.0, 0.3, 0.5])
    assert encoder.budgets == [0.3, 0.5, 1.0]
    assert torch.equal(encoder(0.5), torch.tensor([[0.0, 1.0, 0.0]]))
    assert torch.allclose(encoder(0.4), torch.tensor([[0.5, 0.5, 0.0]]))
    assert torch.allclose(encoder(torch.tensor([0.3, 0.75])), torch.tensor([[1.0, 0, 0], [0, 0.5, 0.5]]))
    with pytest.raises(ValueError, match=r"trained range \[0.3, 1\]"):
        encoder(0.2)
    with pytest.raises(ValueError, match="distinct numbers in"):
        BudgetEncoder([0.5, 0.5])

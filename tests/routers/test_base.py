"""The Router base class: choices, the budget encoder, sessions, initialisation to configurations."""

from __future__ import annotations

import pytest
import torch

from flextron.model.config import ArchConfig
from flextron.routers import (
    ROUTER_KINDS,
    BudgetEncoder,
    DynamicRouter,
    Router,
    Sampling,
    StaticRouter,
    default_head_choices,
    default_mlp_choices,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def test_default_choices_span_small_to_full_widest_first(tiny_flextron) -> None:
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


# ---- the base-class contract, for both kinds


@pytest.mark.parametrize("router_class", [StaticRouter, DynamicRouter])
def test_both_kinds_share_the_router_contract(tiny_flextron, tokens, router_class: type[Router]) -> None:
    torch.manual_seed(0)
    model = tiny_flextron()
    router = router_class(model.config, [0.5, 1.0], mlp_choices=[256, 128, 64], hidden_size=8)
    assert isinstance(router, Router) and router.kind in ROUTER_KINDS
    assert ROUTER_KINDS[router.kind] is router_class
    assert router.budgets == [0.5, 1.0] and router.mlp_choices == [256, 128, 64]
    assert router.head_choices == default_head_choices(model.config)
    assert router.settings()["mlp_choices"] == [256, 128, 64]
    # session(budget, batch_size, sampling): one signature for both kinds.
    ids = tokens()
    session = router.session(0.5, ids.shape[0], Sampling())
    with torch.no_grad():
        assert model(ids, session=session).shape == (2, 8, 300)
    mlp, heads = session.usage()
    assert mlp.shape[1:] == (2, 3) and heads.shape[1:] == (2, 2)


@pytest.mark.parametrize("router_class", [StaticRouter, DynamicRouter])
def test_init_to_starts_every_trained_budget_at_its_configuration(
    tiny_flextron, tokens, router_class: type[Router]
) -> None:
    torch.manual_seed(0)
    model = tiny_flextron()
    router = router_class(model.config, [0.5, 1.0], hidden_size=8)
    archs = {0.5: ArchConfig((64, 128), (2, 4)), 1.0: model.full_arch()}
    router.init_to(archs, margin=4.0)
    ids = tokens()
    for budget, arch in archs.items():
        session = router.session(budget, ids.shape[0])
        with torch.no_grad():
            model(ids, session=session)
        mlp, heads = session.usage()
        # The argmax of every layer (every token, for the dynamic router) is the configuration's.
        widths = [router.mlp_choices[int(i)] for i in mlp.mean(0).argmax(-1)]
        counts = [router.head_choices[int(i)] for i in heads.mean(0).argmax(-1)]
        assert (tuple(widths), tuple(counts)) == (arch.mlp_widths, arch.heads)
    with pytest.raises(ValueError, match="one configuration per trained budget"):
        router.init_to({0.5: archs[0.5]})
    with pytest.raises(ValueError, match="margin must be > 0"):
        router.init_to(archs, margin=0.0)


def test_the_base_class_is_abstract(tiny_flextron) -> None:
    with pytest.raises(TypeError, match="abstract"):
        Router(tiny_flextron().config, [1.0])  # type: ignore[abstract]

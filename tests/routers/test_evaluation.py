"""Evaluating selections: no peeking at the scored tokens, the same tokens scored for every routing."""

from __future__ import annotations

import pytest
import torch

from flextron.model.objectives import next_token_cross_entropy
from flextron.routers import DynamicRouter
from flextron.routers.evaluation import block_losses, dynamic_perplexity, prefix_session
from flextron.routers.selection import Selection


def _token_sensitive_selection(model) -> Selection:
    """A dynamic router whose head counts swing with the text (large hidden-state terms)."""
    torch.manual_seed(0)
    router = DynamicRouter(model.config, [0.5, 1.0], hidden_size=8)
    with torch.no_grad():
        for layer in range(model.config.num_layers):
            router.head_in[layer].weight.mul_(50)
    return Selection("dynamic", 0.75, router=router)


def test_head_counts_come_from_the_unscored_prefix_only(tiny_flextron):
    model = tiny_flextron()
    selection = _token_sensitive_selection(model)
    prefix, generator = 4, torch.Generator().manual_seed(0)
    base = torch.randint(0, model.config.vocab_size, (1, 16), generator=generator)
    variants = base.repeat(16, 1)
    variants[:, prefix:] = torch.randint(0, model.config.vocab_size, (16, 12), generator=generator)
    with torch.no_grad():
        from_prefix = [prefix_session(model, selection, v[None, :prefix]).heads for v in variants]
        whole = [prefix_session(model, selection, v[None]).heads for v in variants]

    def counts(heads):
        return tuple(int(h) for h in heads)

    # The router does look at the text: choosing from whole blocks, the scored tokens move the heads ...
    assert len({counts(h) for h in whole}) > 1
    # ... and choosing from the prefix, they cannot.
    assert len({counts(h) for h in from_prefix}) == 1
    sessions = []

    def record(prompt):
        sessions.append(prefix_session(model, selection, prompt))
        return sessions[-1]

    block_losses(model, variants, prefix=prefix, sessions=record, batch_size=1)
    assert {counts(s.heads) for s in sessions} == {counts(from_prefix[0])}


def test_block_losses_score_the_tokens_after_the_prefix(tiny_flextron):
    model = tiny_flextron()
    blocks = torch.randint(0, model.config.vocab_size, (3, 10), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        nll = next_token_cross_entropy(model(blocks), blocks, reduction="none").view(3, 9)
    losses = block_losses(model, blocks, prefix=4, batch_size=2)
    torch.testing.assert_close(losses, nll[:, 3:].mean(1))
    with pytest.raises(ValueError, match="prefix"):
        block_losses(model, blocks, prefix=10)


def test_dynamic_perplexity_is_the_exponent_of_the_mean_block_loss(tiny_flextron):
    model = tiny_flextron()
    selection = _token_sensitive_selection(model)
    blocks = torch.randint(0, model.config.vocab_size, (4, 12), generator=torch.Generator().manual_seed(2))
    perplexity, active = dynamic_perplexity(model, blocks, selection, batch_size=2, prefix=3)
    losses = block_losses(
        model, blocks, prefix=3, sessions=lambda p: prefix_session(model, selection, p), batch_size=2
    )
    assert perplexity == pytest.approx(float(losses.mean().exp()))
    assert 0 < active <= model.num_parameters()

"""Fixtures of the router tests."""

from __future__ import annotations

import pytest
import torch

from flextron.latency.shape import LatencyShape
from flextron.model.checkpoint import save_pretrained
from flextron.routers import DynamicRouter, Sampling, StaticRouter, save_routers


@pytest.fixture
def model_dir(synthetic_table, tiny_flextron, tmp_path):
    """A tiny model directory with the synthetic latency table and both routers (at prefill:1x16)."""
    model = tiny_flextron()
    save_pretrained(model, tmp_path)
    synthetic_table().save(tmp_path)
    torch.manual_seed(0)
    routers = {
        "static": StaticRouter(model.config, [0.5, 0.75, 1.0], hidden_size=8),
        "dynamic": DynamicRouter(model.config, [0.5, 1.0], hidden_size=8),
    }
    save_routers(tmp_path, routers, LatencyShape("prefill", 1, 16))
    return model, tmp_path, routers


@pytest.fixture(scope="session")
def train_sampling() -> Sampling:
    """The routers' training-time sampling: Gumbel noise, scaled paths, tau 1."""
    return Sampling(tau=1.0, noise=True, scale=True)

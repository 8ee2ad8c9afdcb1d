"""Router files: routers.safetensors and routers.json round trip."""

from __future__ import annotations

import pytest
import torch

from flextron.latency.shape import LatencyShape
from flextron.routers import load_routers

pytestmark = pytest.mark.usefixtures("one_thread")
SHAPE = LatencyShape("prefill", 1, 16)


def test_router_files_round_trip(model_dir) -> None:
    model, path, routers = model_dir
    loaded, shape = load_routers(path, model.config)
    assert shape == SHAPE
    for kind, router in routers.items():
        assert type(loaded[kind]) is type(router)
        for (name, a), (_, b) in zip(
            router.state_dict().items(), loaded[kind].state_dict().items(), strict=True
        ):
            assert torch.equal(a, b), name
    assert loaded["static"].arch(0.6) == routers["static"].arch(0.6)

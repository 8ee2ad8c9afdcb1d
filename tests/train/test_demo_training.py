"""The demo's elastic-training phase: trained once, then loaded from the cache."""

from __future__ import annotations

import copy

import torch

from flextron.conversion.ranking import convert
from flextron.train.demo_training import elastic_phase


def test_elastic_phase_trains_once_then_loads_the_cache(
    tiny_flextron, tiny_tokenizer, tmp_path, monkeypatch
) -> None:
    monkeypatch.setenv("FLEXTRON_CACHE", str(tmp_path))
    converted = tiny_flextron()
    converted.tokenizer = tiny_tokenizer()
    convert(converted, torch.randint(3, 300, (4, 32)), progress=False)
    trained, checkpoint, cached = elastic_phase(copy.deepcopy(converted), 2, progress=False)
    assert not cached and checkpoint.parent.parent.parent == tmp_path
    assert not torch.equal(trained.layers[0].mlp.up_proj.weight, converted.layers[0].mlp.up_proj.weight)
    again, checkpoint_again, cached = elastic_phase(copy.deepcopy(converted), 2, progress=False)
    assert cached and checkpoint_again == checkpoint
    for name, value in trained.state_dict().items():
        assert torch.equal(again.state_dict()[name], value), name
    _, other, cached = elastic_phase(copy.deepcopy(converted), 3, progress=False)  # other settings
    assert not cached and other.parent.parent != checkpoint.parent.parent

"""save_pretrained / from_pretrained: exact round trip, atomic files, clear errors."""

from __future__ import annotations

import json

import pytest
import torch

from flextron.conversion.ranking import convert
from flextron.model.checkpoint import load_pretrained, save_pretrained
from flextron.model.elastic_model import FlextronModel
from flextron.model.loading import load_model


@pytest.mark.parametrize("tied", [False, True])
def test_round_trip_is_exact(tiny_flextron, tmp_path, tied: bool) -> None:
    model = tiny_flextron(kv_heads=2, bias=True, tied=tied)
    convert(model, torch.randint(0, 300, (2, 16)), progress=False)
    save_pretrained(model, tmp_path)
    assert not list(tmp_path.glob("*.tmp")) and not list(tmp_path.glob(".*")), "temporary files left behind"
    loaded = load_pretrained(tmp_path)
    assert loaded.config == model.config
    assert loaded.state_dict().keys() == model.state_dict().keys()
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    assert loaded.importance.keys() == model.importance.keys()
    for name, scores in model.importance.items():
        assert torch.equal(loaded.importance[name], scores)
    ids = torch.randint(0, 300, (1, 12))
    arch = model.arch_for_budget(0.5)
    with torch.no_grad():
        assert torch.equal(loaded(ids, arch), model(ids, arch))
    assert isinstance(load_model(tmp_path), FlextronModel)


def test_missing_and_corrupt_files_give_clear_errors(tiny_flextron, tmp_path) -> None:
    save_pretrained(tiny_flextron(), tmp_path)
    with pytest.raises(FileNotFoundError, match="not found"):
        load_pretrained(tmp_path / "nowhere")
    (tmp_path / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(ValueError, match="corrupt safetensors"):
        load_pretrained(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="missing model.safetensors"):
        load_pretrained(tmp_path)
    (tmp_path / "config.json").write_text("{oops")
    with pytest.raises(ValueError, match="corrupt JSON"):
        load_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ValueError, match="not a Flextron checkpoint"):
        load_pretrained(tmp_path)
    (tmp_path / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="missing config.json"):
        load_pretrained(tmp_path)


def test_weights_that_do_not_match_the_config_are_rejected(tiny_flextron, tmp_path) -> None:
    save_pretrained(tiny_flextron(), tmp_path)
    meta = json.loads((tmp_path / "config.json").read_text())
    meta["model"]["num_layers"] = 3
    (tmp_path / "config.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="does not match config.json"):
        load_pretrained(tmp_path)

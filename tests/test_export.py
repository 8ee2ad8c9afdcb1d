"""Export: uniform sub-networks to Hugging Face Llama, per-layer ones to Flextron directories."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import LlamaForCausalLM

from flextron.config import ArchConfig
from flextron.convert import convert
from flextron.export import export
from flextron.model import FlextronModel
from tests.test_model import assert_logits_close
from tests.tiny_models import tiny_flextron

VARIANTS = [dict(kv_heads=2), dict(kv_heads=4, bias=True, tied=True)]


@pytest.mark.parametrize("variant", VARIANTS, ids=["gqa", "mha-bias-tied"])
def test_uniform_export_loads_in_transformers_and_matches(tmp_path, variant: dict) -> None:
    model = tiny_flextron(**variant)
    convert(model, torch.randint(0, 300, (2, 16)), progress=False)
    arch = model.arch_for_budget(0.5)
    assert export(model, arch, tmp_path) == "hf"
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["head_dim"] == 16 and config["intermediate_size"] == arch.mlp_widths[0]
    hf = LlamaForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    assert hf.num_parameters() == model.num_parameters(arch)
    ids = torch.randint(0, 300, (2, 21))
    with torch.no_grad():
        assert_logits_close(hf(ids).logits, model(ids, arch))


def test_per_layer_export_is_a_flextron_directory(tmp_path) -> None:
    model = tiny_flextron(kv_heads=2)
    arch = ArchConfig((64, 192), (4, 2))
    assert export(model, arch, tmp_path) == "flextron"
    small = FlextronModel.from_pretrained(tmp_path)
    assert small.config.layer_intermediate_sizes == [64, 192] and small.config.layer_num_heads == [4, 2]
    assert small.num_parameters() == model.num_parameters(arch)
    stored = sum(t.numel() for t in small.state_dict().values())
    assert stored < sum(t.numel() for t in model.state_dict().values())
    ids = torch.randint(0, 300, (1, 15))
    with torch.no_grad():
        torch.testing.assert_close(small(ids), model(ids, arch), rtol=1e-5, atol=1e-5)


def test_partial_kv_groups_cannot_be_exported(tmp_path) -> None:
    model = tiny_flextron(kv_heads=2)
    with pytest.raises(ValueError, match="whole KV groups"):
        export(model, ArchConfig((64, 64), (3, 3)), tmp_path)

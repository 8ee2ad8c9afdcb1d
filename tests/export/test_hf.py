"""Export: uniform sub-networks to Hugging Face Llama, per-layer ones to Flextron directories or,
zero-padded, to Hugging Face Llama."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import LlamaForCausalLM

from flextron.conversion.ranking import convert
from flextron.export.hf import export
from flextron.model.checkpoint import load_pretrained, save_pretrained
from flextron.model.config import ArchConfig

VARIANTS = [dict(kv_heads=2), dict(kv_heads=4, bias=True, tied=True)]


@pytest.mark.parametrize("variant", VARIANTS, ids=["gqa", "mha-bias-tied"])
def test_uniform_export_loads_in_transformers_and_matches(
    assert_logits_close, tiny_flextron, tmp_path, variant: dict
) -> None:
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


def test_per_layer_export_is_a_flextron_directory(tiny_flextron, tmp_path) -> None:
    model = tiny_flextron(kv_heads=2)
    arch = ArchConfig((64, 192), (4, 2))
    assert export(model, arch, tmp_path) == "flextron"
    small = load_pretrained(tmp_path)
    assert small.config.layer_intermediate_sizes == [64, 192] and small.config.layer_num_heads == [4, 2]
    assert small.num_parameters() == model.num_parameters(arch)
    stored = sum(t.numel() for t in small.state_dict().values())
    assert stored < sum(t.numel() for t in model.state_dict().values())
    ids = torch.randint(0, 300, (1, 15))
    with torch.no_grad():
        torch.testing.assert_close(small(ids), model(ids, arch), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("variant", VARIANTS, ids=["gqa", "mha-bias-tied"])
def test_padded_per_layer_export_loads_in_transformers_and_matches(
    assert_logits_close, tiny_flextron, tmp_path, variant: dict
) -> None:
    model = tiny_flextron(**variant)
    arch = ArchConfig((64, 192), (4, 2))
    assert export(model, arch, tmp_path, format="hf", pad_layers=True) == "hf"
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["intermediate_size"] == 192 and config["num_attention_heads"] == 4
    hf = LlamaForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    assert hf.num_parameters() == model.num_parameters(ArchConfig.uniform(model.config, 192, 4))
    layer0 = hf.model.layers[0]
    assert not layer0.mlp.up_proj.weight[64:].any() and not layer0.mlp.down_proj.weight[:, 64:].any()
    assert not hf.model.layers[1].self_attn.o_proj.weight[:, 2 * 16 :].any()
    ids = torch.randint(0, 300, (2, 19))
    with torch.no_grad():
        assert_logits_close(hf(ids).logits, model(ids, arch))
    assert "zero-padded to the widest (MLP 192, 4 heads)" in (tmp_path / "README.md").read_text()


def test_export_command_pads_a_per_layer_configuration(tiny_flextron, tmp_path, capsys) -> None:
    from flextron.cli import main

    save_pretrained(tiny_flextron(kv_heads=2), tmp_path / "model")
    (tmp_path / "arch.json").write_text(json.dumps(ArchConfig((64, 192), (4, 2)).to_dict()))
    common = ["export", "--model", str(tmp_path / "model"), "--arch", str(tmp_path / "arch.json")]
    common += ["--format", "hf"]
    assert main([*common, "--out", str(tmp_path / "refused")]) == 2
    assert "--pad-layers" in capsys.readouterr().err
    assert main([*common, "--pad-layers", "--out", str(tmp_path / "padded")]) == 0
    assert "(zero-padded to its widest layer)" in capsys.readouterr().out
    assert (tmp_path / "padded" / "config.json").is_file()


def test_partial_kv_groups_cannot_be_exported(tiny_flextron, tmp_path) -> None:
    model = tiny_flextron(kv_heads=2)
    with pytest.raises(ValueError, match="whole KV groups"):
        export(model, ArchConfig((64, 64), (3, 3)), tmp_path)


@pytest.mark.parametrize("family", ["qwen2", "mistral"])
def test_qwen2_and_mistral_export_to_their_own_classes(
    assert_logits_close, tiny_family_model, tmp_path, family: str
) -> None:
    from transformers import AutoModelForCausalLM

    hf, model = tiny_family_model(family)
    assert model.config.model_type == family and model.config.qkv_bias == (family == "qwen2")
    convert(model, torch.randint(0, 300, (2, 16)), progress=False)
    arch = model.arch_for_budget(0.5)
    assert export(model, arch, tmp_path) == "hf"
    small = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    assert type(small).__name__ == type(hf).__name__
    assert small.num_parameters() == model.num_parameters(arch)
    ids = torch.randint(0, 300, (2, 21))
    with torch.no_grad():
        assert_logits_close(small(ids).logits, model(ids, arch))
    # Saved and reloaded, the Flextron directory remembers its family.
    save_pretrained(model, tmp_path / "elastic")
    assert load_pretrained(tmp_path / "elastic").config.model_type == family


def test_bf16_export_is_half_the_size_and_close(tiny_flextron, tmp_path) -> None:
    model = tiny_flextron(kv_heads=2)
    arch = model.arch_for_budget(0.5)
    export(model, arch, tmp_path / "f32")
    export(model, arch, tmp_path / "bf16", dtype=torch.bfloat16)
    sizes = [(tmp_path / d / "model.safetensors").stat().st_size for d in ("f32", "bf16")]
    assert 0.49 < sizes[1] / sizes[0] < 0.51
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    hf = LlamaForCausalLM.from_pretrained(tmp_path / "bf16").eval()
    assert hf.dtype == torch.bfloat16
    ids = torch.randint(0, 300, (1, 17))
    with torch.no_grad():
        # bf16 keeps 8 significant bits: logits within a few percent of their scale.
        torch.testing.assert_close(hf.float()(ids).logits, model(ids, arch), rtol=0, atol=0.05)


def test_sharded_export_with_index_and_generation_config(
    assert_logits_close, tiny_flextron, tmp_path
) -> None:
    from transformers import GenerationConfig

    from flextron.model.loading import load_hf_dir

    model = tiny_flextron(kv_heads=2)
    arch = model.arch_for_budget(0.75)
    export(model, arch, tmp_path, max_shard_size="100KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and not (tmp_path / "model.safetensors").exists()
    assert all((tmp_path / shard).stat().st_size <= 100_000 + 4_000 for shard in shards)  # + header
    generation = GenerationConfig.from_pretrained(tmp_path)
    assert (generation.bos_token_id, generation.eos_token_id, generation.pad_token_id) == (1, 2, 0)
    ids = torch.randint(0, 300, (1, 17))
    hf = LlamaForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    with torch.no_grad():
        assert_logits_close(hf(ids).logits, model(ids, arch))
        assert_logits_close(load_hf_dir(tmp_path)(ids), model(ids, arch))


def test_export_command_writes_a_model_card(tiny_hf_dir, tmp_path) -> None:
    from flextron.cli import main

    tiny_hf_dir(tmp_path / "hf", kv_heads=2)
    out = tmp_path / "half"
    argv = [
        "export",
        "--model",
        str(tmp_path / "hf"),
        "--budget",
        "0.5",
        "--out",
        str(out),
        "--dtype",
        "bfloat16",
        "--eval-blocks",
        "1",
    ]
    assert main(argv) == 0
    card = (out / "README.md").read_text()
    for text in (
        str(tmp_path / "hf"),
        "budget 0.500",
        "LlamaForCausalLM",
        "bfloat16",
        "perplexity |",
        "of the built-in held-out text",
        '"mlp_widths"',
    ):
        assert text in card, text


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(format="hf", arch=ArchConfig((64, 192), (4, 2))), "uniform configuration"),
        (dict(format="gguf", dtype=torch.bfloat16), "--gguf-type"),
        (dict(format="hf", gguf_type="q8_0"), "applies to the gguf format"),
        (dict(format="flextron", pad_layers=True), "applies to the hf format"),
        (dict(format="onnx"), "format must be one of"),
    ],
)
def test_export_refuses_bad_combinations(tiny_flextron, tmp_path, kwargs: dict, message: str) -> None:
    model = tiny_flextron(kv_heads=2)
    arch = kwargs.pop("arch", model.arch_for_budget(0.5))
    with pytest.raises(ValueError, match=message):
        export(model, arch, tmp_path, **kwargs)

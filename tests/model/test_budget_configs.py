"""Quality-aware budget configurations: the choice, its file, and its use by every caller."""

from __future__ import annotations

import json

import pytest
import torch

from flextron.conversion.budget_search import calibration_loss, choose_budget_configs
from flextron.model.budget_configs import (
    FILE,
    CalibrationConfig,
    candidate_archs,
    fits,
    resolve_budget,
    smallest_budget,
)
from flextron.model.checkpoint import load_pretrained, save_pretrained
from flextron.model.config import ArchConfig, arch_for_budget
from flextron.train.sampling import SubnetSampler


@pytest.fixture
def model_and_blocks(tiny_flextron):
    torch.manual_seed(0)
    model = tiny_flextron(seed=3)
    blocks = torch.randint(3, 300, (4, 32))
    return model, blocks


def test_candidates_fit_and_include_the_fixed_rule(model_and_blocks) -> None:
    model, _ = model_and_blocks
    for budget in (0.25, 0.5, 0.75):
        candidates = candidate_archs(model.config, budget)
        assert candidates[0] == arch_for_budget(model.config, budget)
        assert all(fits(model.config, arch, budget) for arch in candidates)
        if budget >= 0.5:  # heads-first and MLP-first both tried where both fit
            assert len({arch.heads for arch in candidates}) >= 2


def test_choice_has_calibration_loss_no_higher_than_the_fixed_rule(model_and_blocks) -> None:
    model, blocks = model_and_blocks
    chosen = choose_budget_configs(
        model, blocks, CalibrationConfig(budgets=(0.25, 0.5, 0.75)), progress=False
    )
    for entry in chosen.entries:
        rule = arch_for_budget(model.config, entry["budget"])
        assert entry["loss"] <= calibration_loss(model, blocks, rule) + 1e-9
        assert entry["loss"] == min(c["loss"] for c in entry["candidates"])
        assert entry["rule_loss"] == pytest.approx(calibration_loss(model, blocks, rule))


def test_saved_choices_are_used_and_survive_save_and_training_checkpoints(model_and_blocks, tmp_path) -> None:
    model, blocks = model_and_blocks
    model.budget_configs = choose_budget_configs(
        model, blocks, CalibrationConfig(budgets=(0.5,)), progress=False
    )
    # Force a choice that differs from the fixed rule, to see that callers use the file.
    other = next(a for a in candidate_archs(model.config, 0.5) if a != arch_for_budget(model.config, 0.5))
    model.budget_configs.entries[0]["arch"] = other.to_dict()
    assert model.arch_for_budget(0.5) == other
    assert model.arch_for_budget(0.75) == arch_for_budget(model.config, 0.75)  # not saved: the rule
    save_pretrained(model, tmp_path / "m")
    loaded = load_pretrained(tmp_path / "m")
    assert loaded.arch_for_budget(0.5) == other
    sampler = SubnetSampler(loaded.config, p_full=0.0, budgets=(0.5,), arch_for_budget=loaded.arch_for_budget)
    assert sampler.sample(0) == other and sampler.describe(other) == "budget 0.5"
    # Changed weights (as after training) are re-fingerprinted when saved.
    with torch.no_grad():
        loaded.layers[0].mlp.up_proj.weight.mul_(1.5)
    save_pretrained(loaded, tmp_path / "trained")
    assert load_pretrained(tmp_path / "trained").arch_for_budget(0.5) == other


def test_stale_and_foreign_files_are_refused(tiny_flextron, model_and_blocks, tmp_path) -> None:
    model, blocks = model_and_blocks
    model.budget_configs = choose_budget_configs(
        model, blocks, CalibrationConfig(budgets=(0.5,)), progress=False
    )
    save_pretrained(model, tmp_path / "a")
    # Stale: the weights changed after the choice, and the file was not rewritten.
    weights = load_pretrained(tmp_path / "a")
    weights.budget_configs = None
    with torch.no_grad():
        weights.layers[1].self_attn.q_proj.weight.add_(0.5)
    save_pretrained(weights, tmp_path / "b")
    assert not (tmp_path / "b" / FILE).exists()
    (tmp_path / "b" / FILE).write_text((tmp_path / "a" / FILE).read_text())
    with pytest.raises(ValueError, match="stale"):
        load_pretrained(tmp_path / "b")
    # Foreign: made for another architecture.
    save_pretrained(tiny_flextron(seed=1, num_hidden_layers=3), tmp_path / "c")
    (tmp_path / "c" / FILE).write_text((tmp_path / "a" / FILE).read_text())
    with pytest.raises(ValueError, match="another model"):
        load_pretrained(tmp_path / "c")
    (tmp_path / "c" / FILE).write_text("[1, 2")
    with pytest.raises(ValueError, match="corrupt JSON"):
        load_pretrained(tmp_path / "c")
    (tmp_path / "c" / FILE).write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(ValueError, match="not a budget configurations file"):
        load_pretrained(tmp_path / "c")


def test_a_budget_that_nothing_fits_names_the_achievable_budgets(model_and_blocks) -> None:
    model, _ = model_and_blocks
    lowest = smallest_budget(model.config)
    assert 0 < lowest < 0.5
    with pytest.raises(ValueError, match=r"no configuration fits budget 0.01: the achievable budgets are"):
        model.arch_for_budget(0.01)
    assert resolve_budget(model.config, 1.0, None) == ArchConfig.full(model.config)


def test_cli_convert_saves_choices_that_export_and_info_use(tiny_hf_dir, tmp_path, capsys) -> None:
    from flextron.cli import main

    tiny_hf_dir(tmp_path / "hf", kv_heads=2)
    out = tmp_path / "converted"
    argv = [
        "convert",
        "--model",
        str(tmp_path / "hf"),
        "--out",
        str(out),
        "--samples",
        "4",
        "--seq-len",
        "32",
    ]
    assert main([*argv, "--budgets", "0.5"]) == 0
    assert "budget 0.5:" in capsys.readouterr().out
    saved = json.loads((out / FILE).read_text())
    assert [entry["budget"] for entry in saved["budgets"]] == [0.5]
    # Point 0.5 at another candidate that fits: export and info must follow the file.
    model = load_pretrained(out)
    other = next(a for a in candidate_archs(model.config, 0.5) if a != model.arch_for_budget(0.5))
    saved["budgets"][0]["arch"] = other.to_dict()
    (out / FILE).write_text(json.dumps(saved))
    assert main(["export", "--model", str(out), "--budget", "0.5", "--out", str(tmp_path / "small")]) == 0
    exported = json.loads((tmp_path / "small" / "config.json").read_text())
    assert (exported["intermediate_size"], exported["num_attention_heads"]) == (
        other.mlp_widths[0],
        other.heads[0],
    )
    assert main(["info", "--model", str(out), "--budgets", "0.5"]) == 0
    assert f"budget 0.5: MLP {other.mlp_widths[0]}, heads {other.heads[0]}" in capsys.readouterr().out
    # choose-budgets measures again and rewrites the file.
    assert (
        main(
            [
                "choose-budgets",
                "--model",
                str(out),
                "--budgets",
                "0.25,0.5",
                "--samples",
                "2",
                "--seq-len",
                "32",
            ]
        )
        == 0
    )
    assert [e["budget"] for e in json.loads((out / FILE).read_text())["budgets"]] == [0.25, 0.5]


def test_model_fields_that_do_not_shape_configurations_keep_the_file_valid(
    model_and_blocks, tmp_path
) -> None:
    import dataclasses

    from flextron.model.budget_configs import config_hash

    model, _ = model_and_blocks
    other_eps = dataclasses.replace(model.config, rms_norm_eps=1e-3, pad_token_id=7)
    assert config_hash(other_eps) == config_hash(model.config)
    assert config_hash(dataclasses.replace(model.config, num_layers=3)) != config_hash(model.config)

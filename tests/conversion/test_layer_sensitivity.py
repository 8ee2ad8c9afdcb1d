"""Per-layer budget configurations: the layers' measured sensitivities and the allocation."""

from __future__ import annotations

import itertools

import pytest
import torch

from flextron.conversion.budget_search import calibration_loss, choose_budget_configs
from flextron.conversion.layer_sensitivity import (
    LayerSensitivity,
    allocate,
    cached_layer_sensitivity,
    measure_layer_sensitivity,
    measured_widths,
    sensitivity_cost,
)
from flextron.model.budget_configs import CalibrationConfig, candidate_archs, fits, weight_limit
from flextron.model.config import ArchConfig, layer_weights


@pytest.fixture(scope="module")
def model_and_blocks(tiny_flextron):
    torch.manual_seed(0)
    return tiny_flextron(seed=3), torch.randint(3, 300, (4, 32))


def test_sensitivity_is_each_layer_narrowed_alone(blocks, model_and_blocks) -> None:
    model, blocks = model_and_blocks
    sensitivity = measure_layer_sensitivity(model, blocks, levels=4)
    full = model.full_arch()
    base = calibration_loss(model, blocks, full, batch_size=4)
    assert sensitivity.base_loss == pytest.approx(base, abs=1e-5)
    for layer in range(model.config.num_layers):
        assert (
            sorted(sensitivity.mlp[layer]) == measured_widths(model.config, layer, 4) == [64, 128, 192, 256]
        )
        assert sorted(sensitivity.heads[layer]) == model.config.head_choices(layer)
        widths = list(full.mlp_widths)
        widths[layer] = 128
        narrowed = calibration_loss(model, blocks, ArchConfig(tuple(widths), full.heads), batch_size=4)
        assert sensitivity.mlp[layer][128] == pytest.approx(narrowed - base, abs=1e-5)
        heads = list(full.heads)
        heads[layer] = 2
        narrowed = calibration_loss(model, blocks, ArchConfig(full.mlp_widths, tuple(heads)), batch_size=4)
        assert sensitivity.heads[layer][2] == pytest.approx(narrowed - base, abs=1e-5)
        assert sensitivity.mlp[layer][256] == sensitivity.heads[layer][4] == 0.0


def test_increases_are_interpolated_non_increasing_and_non_negative() -> None:
    # Measured noise: 192 looks worse than 128, and 64 looks better than the full model.
    sensitivity = LayerSensitivity(1.0, [{64: -0.1, 128: 0.2, 192: 0.3, 256: 0.0}], [{2: 0.5, 4: 0.0}])
    assert sensitivity.mlp_increase(0, 192) == pytest.approx(0.3)
    assert sensitivity.mlp_increase(0, 128) == pytest.approx(0.3)  # narrowing never helps
    assert sensitivity.mlp_increase(0, 64) == pytest.approx(0.3)
    assert sensitivity.mlp_increase(0, 224) == pytest.approx(0.15)  # halfway from 192 to 256
    assert sensitivity.heads_increase(0, 4) == 0.0


def test_allocation_is_the_best_that_fits(model_and_blocks) -> None:
    """The knapsack equals brute force over every per-layer configuration of the tiny model."""
    model, _ = model_and_blocks
    config = model.config
    torch.manual_seed(1)
    sensitivity = LayerSensitivity(
        0.0,
        [
            {64: float(a), 128: float(b), 192: float(c), 256: 0.0}
            for a, b, c in torch.rand(2, 3).sort(1, True)[0]
        ],
        [{2: float(v), 4: 0.0} for v in torch.rand(2)],
    )
    options = [(w, h) for h in config.head_choices() for w in config.mlp_choices()]

    def increase(arch: ArchConfig) -> float:
        return sum(
            sensitivity.mlp_increase(i, w) + sensitivity.heads_increase(i, h)
            for i, (w, h) in enumerate(zip(arch.mlp_widths, arch.heads, strict=True))
        )

    for budget in (0.3, 0.5, 0.75, 0.9):
        limit = weight_limit(config, budget)
        arch = allocate(config, sensitivity, limit)
        every = [ArchConfig((a[0], b[0]), (a[1], b[1])) for a, b in itertools.product(options, options)]
        best = min(increase(a) for a in every if layer_weights(config, a) <= limit)
        assert layer_weights(config, arch) <= limit
        assert increase(arch) == pytest.approx(best)
    assert allocate(config, sensitivity, 0.0) is None


def test_choice_searches_per_layer_and_keeps_the_lowest_loss(blocks, model_and_blocks) -> None:
    model, blocks = model_and_blocks
    chosen = choose_budget_configs(
        model, blocks, CalibrationConfig(budgets=(0.25, 0.5, 0.75), layer_levels=4), progress=False
    )
    assert "layer_sensitivity" in chosen.calibration
    per_layer = 0
    for entry in chosen.entries:
        uniform = [a.to_dict() for a in candidate_archs(model.config, entry["budget"])]
        archs = [c["arch"] for c in entry["candidates"]]
        per_layer += any(a not in uniform for a in archs)
        assert entry["loss"] == min(c["loss"] for c in entry["candidates"])
        assert fits(model.config, ArchConfig.from_dict(entry["arch"]), entry["budget"])
    assert per_layer >= 2  # the allocation is a candidate wherever it differs from the uniform ones


def test_layer_levels_zero_keeps_uniform_candidates(blocks, model_and_blocks) -> None:
    model, blocks = model_and_blocks
    chosen = choose_budget_configs(
        model, blocks, CalibrationConfig(budgets=(0.5,), layer_levels=0), progress=False
    )
    assert "layer_sensitivity" not in chosen.calibration
    assert all(ArchConfig.from_dict(c["arch"]).is_uniform for c in chosen.entries[0]["candidates"])


def test_sensitivities_are_cached_per_model_and_text(blocks, model_and_blocks, tmp_path, monkeypatch) -> None:
    import flextron.conversion.layer_sensitivity as layer_search

    model, blocks = model_and_blocks
    first = cached_layer_sensitivity(model, blocks, 4, False, 1, tmp_path)
    assert first == measure_layer_sensitivity(model, blocks[:1], levels=4)  # 1 block: the first
    measured = []
    monkeypatch.setattr(
        layer_search, "measure_layer_sensitivity", lambda *args: measured.append(args) or first
    )
    assert cached_layer_sensitivity(model, blocks, 4, False, 1, tmp_path) == first
    assert not measured and len(list(tmp_path.iterdir())) == 1
    cached_layer_sensitivity(model, blocks.flip(0), 4, False, 1, tmp_path)  # other text: measured
    assert len(measured) == 1
    with torch.autocast("cpu", dtype=torch.bfloat16):  # other precision: measured, kept apart
        cached_layer_sensitivity(model, blocks, 4, False, 1, tmp_path)
    assert len(measured) == 2 and len(list(tmp_path.iterdir())) == 3


def test_bf16_calibration_is_recorded_and_ranks_like_fp32(blocks, model_and_blocks) -> None:
    model, blocks = model_and_blocks
    settings = {"budgets": (0.5,), "layer_levels": 4}
    fp32 = choose_budget_configs(model, blocks, CalibrationConfig(**settings), progress=False)
    bf16 = choose_budget_configs(model, blocks, CalibrationConfig(**settings, bf16=True), progress=False)
    assert bf16.calibration["autocast"] == "bfloat16" and "autocast" not in fp32.calibration
    assert next(model.parameters()).dtype == torch.float32  # the weights stay as they are
    losses = [[c["loss"] for c in chosen.entries[0]["candidates"]] for chosen in (fp32, bf16)]
    assert losses[0] != losses[1]  # measured in bf16, close to fp32
    assert losses[1] == pytest.approx(losses[0], rel=0.02)


def test_sensitivity_cost_counts_the_layers_each_variant_runs(tiny_flextron) -> None:
    config = tiny_flextron().config  # 2 layers; 4 levels: 3 narrowed widths, 1 fewer head count
    assert sensitivity_cost(config, 4) == pytest.approx(4 * (2 + 1) / 2)

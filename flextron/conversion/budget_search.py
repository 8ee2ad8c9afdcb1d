"""Choosing each budget's configuration: measure every candidate that fits the budget on
calibration blocks and keep the lowest loss.  Candidates: the uniform ones
(flextron.model.budget_configs.candidate_archs) and, with CalibrationConfig.layer_levels, the
per-layer allocation of flextron.conversion.layer_sensitivity.

Apart from flextron.model.budget_configs because measuring needs the model and the evaluation
loop, while the saved choices are read by the model itself: kept together they would form
an import cycle (model -> budget_configs -> evaluate -> model).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from tqdm.auto import tqdm

from flextron.conversion.layer_sensitivity import (
    LayerSensitivity,
    allocate,
    cached_layer_sensitivity,
    measure_layer_sensitivity,
)
from flextron.eval.perplexity import perplexity
from flextron.model.budget_configs import (
    BudgetConfigs,
    CalibrationConfig,
    candidate_archs,
    weight_limit,
)
from flextron.model.config import ArchConfig
from flextron.model.elastic_model import FlextronModel


@torch.no_grad()
def calibration_loss(
    model: FlextronModel, blocks: torch.Tensor, arch: ArchConfig, batch_size: int = 4
) -> float:
    """Mean next-token cross-entropy (nats) of `arch` on blocks (N, S)."""
    return math.log(perplexity(model, blocks, arch, batch_size)[0])


def choose_budget_configs(
    model: FlextronModel,
    blocks: torch.Tensor,
    config: CalibrationConfig | None = None,
    source: str = "",
    progress: bool = True,
    sensitivity_cache: Path | None = None,
) -> BudgetConfigs:
    """Measure every candidate of each of config.budgets on `blocks` (N, S) and keep the best of each.

    source: where the calibration text came from (recorded in the file); sensitivity_cache: a
    directory that keeps the layer sensitivities per model and text (None: measured afresh)."""
    calibration = config or CalibrationConfig()
    device_type = model.embed_tokens.weight.device.type
    with torch.autocast(device_type, dtype=torch.bfloat16, enabled=calibration.bf16):
        entries, sensitivity = _measure_budgets(model, blocks, calibration, progress, sensitivity_cache)
    source_info = {"source": source, "blocks": int(blocks.shape[0]), "seq_len": int(blocks.shape[1])}
    if calibration.bf16:
        source_info["autocast"] = "bfloat16"
    if sensitivity is not None:
        source_info["layer_sensitivity"] = sensitivity.to_dict()
        source_info["sensitivity_blocks"] = calibration.sensitivity_blocks
    return BudgetConfigs(entries, source_info)


def _measure_budgets(
    model: FlextronModel,
    blocks: torch.Tensor,
    calibration: CalibrationConfig,
    progress: bool,
    sensitivity_cache: Path | None,
) -> tuple[list[dict], LayerSensitivity | None]:
    """choose_budget_configs' measurements: each budget's entry, and the layer sensitivities."""
    sensitivity = None
    if calibration.layer_levels:
        levels, sample_blocks = calibration.layer_levels, calibration.sensitivity_blocks
        if sensitivity_cache is None:
            sensitivity = measure_layer_sensitivity(model, blocks, levels, progress, sample_blocks)
        else:
            sensitivity = cached_layer_sensitivity(
                model, blocks, levels, progress, sample_blocks, sensitivity_cache
            )
    entries = []
    for budget in tqdm(sorted(set(calibration.budgets)), desc="budgets", disable=not progress):
        measured = []
        candidates = candidate_archs(model.config, budget)
        if sensitivity is not None:
            per_layer = allocate(model.config, sensitivity, weight_limit(model.config, budget))
            if per_layer is not None and per_layer not in candidates:
                candidates.append(per_layer)
        for arch in candidates:
            loss = calibration_loss(model, blocks, arch, calibration.batch_size)
            measured.append({"arch": arch.to_dict(), "loss": loss, "parameters": model.num_parameters(arch)})
        rule = measured[0]
        best = min(measured, key=lambda m: m["loss"])
        entries.append(
            {
                "budget": budget,
                "arch": best["arch"],
                "loss": best["loss"],
                "rule_loss": rule["loss"],
                "parameters": best["parameters"],
                "candidates": measured,
            }
        )
    return entries, sensitivity

"""Choosing each budget's configuration: measure every candidate that fits the budget
(flextron.budget_configs.candidate_archs) on calibration blocks and keep the lowest loss.

Apart from flextron.budget_configs because measuring needs the model and the evaluation
loop, while the saved choices are read by the model itself: kept together they would form
an import cycle (model -> budget_configs -> evaluate -> model).
"""

from __future__ import annotations

import math

import torch
from tqdm.auto import tqdm

from flextron.budget_configs import BudgetConfigs, CalibrationConfig, candidate_archs
from flextron.config import ArchConfig
from flextron.evaluate import perplexity
from flextron.model import FlextronModel


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
) -> BudgetConfigs:
    """Measure every candidate of each of config.budgets on `blocks` (N, S) and keep the best of each.

    source: where the calibration text came from (recorded in the file)."""
    calibration = config or CalibrationConfig()
    entries = []
    for budget in tqdm(sorted(set(calibration.budgets)), desc="budgets", disable=not progress):
        measured = []
        for arch in candidate_archs(model.config, budget):
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
    return BudgetConfigs(
        entries, {"source": source, "blocks": int(blocks.shape[0]), "seq_len": int(blocks.shape[1])}
    )

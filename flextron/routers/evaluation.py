"""Evaluating selections: perplexity and active parameters of each budget's sub-network."""

from __future__ import annotations

import time

import torch

from flextron.model.config import ArchConfig
from flextron.model.elastic_model import FlextronModel
from flextron.model.objectives import PerplexityMeter
from flextron.routers.selection import Selection


@torch.no_grad()
def dynamic_perplexity(
    model: FlextronModel, blocks: torch.Tensor, selection: Selection, batch_size: int = 4
) -> tuple[float, int]:
    """(perplexity, mean active parameters per token) under dynamic routing.

    blocks: (N, S) token ids; every batch gets a fresh session (its own prefill head choice).
    Active parameters count each layer at its mean MLP width and mean head count.
    """
    if selection.router is None:
        raise ValueError("dynamic_perplexity needs a dynamic selection")
    config, device = model.config, model.embed_tokens.weight.device
    meter, widths, heads = PerplexityMeter(), torch.zeros(config.num_layers), torch.zeros(config.num_layers)
    batches = blocks.split(batch_size)
    for batch in batches:
        batch = batch.to(device)
        session = selection.session(batch.shape[0])
        meter.add(model(batch, session=session), batch)
        widths += torch.tensor(session.mean_widths()) / len(batches)
        heads += torch.stack([h.float().mean().cpu() for h in session.heads]) / len(batches)
    mean_arch = ArchConfig(tuple(round(float(w)) for w in widths), tuple(round(float(h)) for h in heads))
    return meter.perplexity, model.num_parameters(mean_arch)


def evaluate_selections(
    model: FlextronModel, blocks: torch.Tensor, selections: list[Selection], batch_size: int = 4
) -> list[dict]:
    """flextron.eval.perplexity result rows for selections (static ones through evaluate_archs)."""
    from flextron.eval.perplexity import evaluate_archs

    rows = []
    for selection in selections:
        name = f"{selection.method} {selection.budget:.2f}"
        if selection.arch is not None:
            row = evaluate_archs(
                model, blocks, {name: (selection.budget, selection.arch)}, batch_size, progress=False
            )[0]
        else:
            start = time.perf_counter()
            perplexity, active = dynamic_perplexity(model, blocks, selection, batch_size)
            row = {
                "name": name,
                "budget": selection.budget,
                "arch": None,
                "parameters": active,
                "tokens_per_s": blocks.numel() / (time.perf_counter() - start),
                "perplexity": perplexity,
            }
        row["predicted_ms"] = selection.predicted_ms
        rows.append(row)
    return rows

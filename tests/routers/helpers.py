"""Helpers shared by the router tests: a synthetic latency table, token ids, training sampling."""

from __future__ import annotations

import torch

from flextron.routers import LatencyTable, Sampling, ShapeCosts

TRAIN = Sampling(tau=1.0, noise=True, scale=True)


def synthetic_table() -> LatencyTable:
    """Costs linear in tokens: MLP w costs w/64 * tokens/16 ms, a head 0.5 * tokens/16 ms."""
    table = LatencyTable("cpu", "test cpu", "float32", num_layers=2, num_heads=4, intermediate_size=256)
    for phase, batch, length in (
        ("prefill", 1, 16),
        ("prefill", 1, 32),
        ("prefill", 2, 16),
        ("prefill", 2, 32),
        ("decode", 1, 64),
    ):
        tokens = batch * (length if phase == "prefill" else 1)
        unit = tokens / 16
        table.entries.append(
            ShapeCosts(
                phase,
                batch,
                length,
                fixed_ms=2.0 * unit,
                mlp_ms={w: w / 64 * unit for w in (64, 128, 192, 256)},
                attention_ms={h: 0.5 * h * unit for h in (2, 4)},
            )
        )
    return table


def tokens(batch: int = 2, length: int = 8, seed: int = 0) -> torch.Tensor:
    """Random token ids (batch, length) of the tiny models' vocabulary."""
    return torch.randint(3, 300, (batch, length), generator=torch.Generator().manual_seed(seed))


def blocks(count: int = 8, length: int = 16, seed: int = 0) -> torch.Tensor:
    """Random training blocks (count, length)."""
    return torch.randint(3, 300, (count, length), generator=torch.Generator().manual_seed(seed))

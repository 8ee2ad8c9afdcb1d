"""Perplexity of sub-networks: per budget or configuration, with measured throughput.

Results are rows {"name", "budget", "arch", "parameters", "tokens_per_s", "perplexity"},
printed as a table, written as JSON, and plotted (perplexity vs parameters).
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from flextron.io.atomic import save_figure_atomic, write_json_atomic
from flextron.model.config import ArchConfig
from flextron.model.elastic_model import FlextronModel
from flextron.model.objectives import PerplexityMeter
from flextron.timing import synchronizer


@torch.no_grad()
def perplexity(
    model: FlextronModel,
    blocks: torch.Tensor,
    arch: ArchConfig | None = None,
    batch_size: int = 4,
    progress: bool = False,
) -> tuple[float, float]:
    """(perplexity, tokens/s) of next-token prediction over blocks (N, S) of token ids.

    Every position but the last of each block is scored; tokens/s counts the tokens run
    through the model (N * S) over the wall time of the forward passes.
    """
    if blocks.dim() != 2 or blocks.shape[0] == 0 or blocks.shape[1] < 2:
        raise ValueError(f"blocks must be (num_blocks, seq_len >= 2), got {tuple(blocks.shape)}")
    device = model.embed_tokens.weight.device
    meter, elapsed, sync = PerplexityMeter(), 0.0, synchronizer(device)
    for batch in tqdm(blocks.split(batch_size), desc="perplexity", disable=not progress, unit="batch"):
        batch = batch.to(device)
        sync()
        start = time.perf_counter()
        logits = model(batch, arch)  # (B, S, V)
        sync()  # the forward's CUDA kernels, not only their launches
        elapsed += time.perf_counter() - start
        meter.add(logits, batch)
    return meter.perplexity, blocks.numel() / elapsed


def evaluate_archs(
    model: FlextronModel,
    blocks: torch.Tensor,
    archs: dict[str, tuple[float | None, ArchConfig]],
    batch_size: int = 4,
    progress: bool = True,
) -> list[dict]:
    """One result row per named (budget or None, configuration)."""
    rows = []
    for name, (budget, arch) in tqdm(archs.items(), desc="configurations", disable=not progress):
        ppl, tokens_per_s = perplexity(model, blocks, arch, batch_size)
        rows.append(
            {
                "name": name,
                "budget": budget,
                "arch": arch.to_dict(),
                "parameters": model.num_parameters(arch),
                "tokens_per_s": tokens_per_s,
                "perplexity": ppl,
            }
        )
    return rows


def archs_for_budgets(
    model: FlextronModel, budgets: list[float]
) -> dict[str, tuple[float | None, ArchConfig]]:
    return {f"budget {b:g}": (b, model.arch_for_budget(b)) for b in budgets}


def format_table(rows: list[dict]) -> str:
    """A plain-text table: name, budget, parameters, tokens/s, perplexity."""
    header = f"{'configuration':<16} {'budget':>6} {'params (M)':>10} {'tokens/s':>9} {'perplexity':>10}"
    lines = [header, "-" * len(header)]
    for row in rows:
        budget = "-" if row["budget"] is None else f"{row['budget']:.2f}"
        lines.append(
            f"{row['name']:<16} {budget:>6} {row['parameters'] / 1e6:>10.1f} "
            f"{row['tokens_per_s']:>9.0f} {row['perplexity']:>10.2f}"
        )
    return "\n".join(lines)


def write_results(
    rows: list[dict],
    json_path: str | os.PathLike | None,
    plot_path: str | os.PathLike | None,
    title: str = "Flextron sub-networks",
) -> None:
    """Write the rows as JSON and/or a PNG plot of perplexity vs parameters."""
    if json_path is not None:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(Path(json_path), {"results": rows})
    if plot_path is not None:
        plot_perplexity(rows, plot_path, title)


def plot_perplexity(rows: list[dict], path: str | os.PathLike, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 4))
    params = [row["parameters"] / 1e6 for row in rows]
    ppls = [row["perplexity"] for row in rows]
    axis.plot(params, ppls, "o-")
    for row, x, y in zip(rows, params, ppls, strict=True):
        axis.annotate(row["name"], (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    axis.set_xlabel("parameters (M)")
    axis.set_ylabel("perplexity")
    axis.set_yscale("log")
    axis.set_title(title)
    axis.grid(alpha=0.3)
    figure.tight_layout()
    save_figure_atomic(figure, path, dpi=120)


def pareto_frontier(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """(latency, perplexity) points -> the Pareto frontier, fastest first: the points that no
    other point beats on both (a slower point is kept only when its perplexity is lower)."""
    frontier: list[tuple[float, float]] = []
    for latency, ppl in sorted(points):
        if not frontier or ppl < frontier[-1][1]:
            frontier.append((latency, ppl))
    return frontier


def frontier_perplexity(frontier: list[tuple[float, float]], latency_ms: float) -> float:
    """The perplexity a Pareto frontier reaches at `latency_ms`: log-linear interpolation between
    its neighbouring points (generous to the frontier: it assumes a configuration in between);
    below its fastest point the fastest point's, above its slowest point the slowest's."""
    if not frontier:
        raise ValueError("empty frontier")
    if latency_ms <= frontier[0][0]:
        return frontier[0][1]
    for (x0, y0), (x1, y1) in zip(frontier, frontier[1:], strict=False):
        if latency_ms <= x1:
            fraction = (latency_ms - x0) / (x1 - x0)
            return math.exp(math.log(y0) + fraction * (math.log(y1) - math.log(y0)))
    return frontier[-1][1]

"""Training feedback: a JSONL metrics log and a PNG of loss and per-budget perplexity over steps.

Each line of metrics.jsonl is one record: {"step", "loss", "kd", "ce", "lr", "grad_norm",
"arch", "seconds"} after a training step, or {"step", "val": {budget: perplexity}} after a
validation.  Appending one line per record keeps the log readable while training runs.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from flextron.io.atomic import save_figure_atomic


class MetricsLog:
    """Appends JSON records to a file (created with its parent directory)."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, record: dict) -> None:
        with self.path.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")

    def truncate_after(self, step: int) -> None:
        """Drop records past `step` (a resumed run rewrites them)."""
        if self.path.is_file():
            kept = [line for line in read_metrics(self.path) if line["step"] <= step]
            temp = self.path.with_name(f".{self.path.name}.tmp")
            temp.write_text("".join(json.dumps(record) + "\n" for record in kept), encoding="utf-8")
            os.replace(temp, self.path)


def read_metrics(path: str | os.PathLike) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


def plot_metrics(
    records: list[dict], path: str | os.PathLike, title: str = "Flextron elastic training"
) -> None:
    """Two panels: training loss per step and sub-network (with moving means), validation
    perplexity per budget."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    train = [r for r in records if "loss" in r]
    val = [r for r in records if "val" in r]
    figure, (loss_axis, ppl_axis) = plt.subplots(1, 2, figsize=(11, 4))
    if train:
        # One series per sub-network (steps are labelled by their last micro-batch's): the
        # full model's KD loss is near zero, the small budgets' far above it.
        series: dict[str, list[tuple[int, float]]] = {}
        for record in train:
            series.setdefault(record["archs"][-1], []).append((record["step"], record["loss"]))
        for label in sorted(series, key=lambda name: (name != "full", name)):
            steps, losses = zip(*series[label], strict=True)
            window = max(1, len(losses) // 8)
            smooth = [
                sum(losses[max(0, i - window + 1) : i + 1]) / min(window, i + 1) for i in range(len(losses))
            ]
            (line,) = loss_axis.plot(steps, smooth, "-", label=f"{label} (moving mean of {window})")
            loss_axis.plot(steps, losses, ".", alpha=0.35, color=line.get_color())
        loss_axis.legend(fontsize=8)
    loss_axis.set_xlabel("step")
    loss_axis.set_ylabel("loss (KD + alpha CE)")
    loss_axis.set_yscale("log")
    loss_axis.grid(alpha=0.3)
    budgets = sorted({b for r in val for b in r["val"]}, key=float, reverse=True)
    for budget in budgets:
        points = [(r["step"], r["val"][budget]) for r in val if budget in r["val"]]
        ppl_axis.plot(*zip(*points, strict=True), "o-", label=f"budget {budget}")
    ppl_axis.set_xlabel("step")
    ppl_axis.set_ylabel("validation perplexity")
    ppl_axis.set_yscale("log")
    ppl_axis.grid(alpha=0.3)
    if budgets:
        ppl_axis.legend()
    figure.suptitle(title)
    figure.tight_layout()
    save_figure_atomic(figure, path, dpi=110)

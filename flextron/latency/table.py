"""Latency lookup table (LUT): the measured cost of every layer choice, and the cost model.

For every profiled shape (flextron.latency.shape.LatencyShape: prefill of a batch of prompts,
or one decode step against a KV cache) the table holds the fixed cost (embedding, rotary
tables, final norm, LM head) and the per-layer cost of each MLP width and head count
(flextron.latency.profiling measures them).  Every layer of a (non-heterogeneous) model has
the same shapes, so one cost per choice serves all layers.  The cost model
(docs/design.md#latency-tables) is

    latency(arch) = fixed + Σ_l mlp[m_l] + attention[a_l]

and, with soft router probabilities, its expectation (flextron.routers.objectives,
differentiable).  Shapes between profiled ones are interpolated linearly (in length, then
batch); widths and head counts between profiled ones likewise.  The table is saved as JSON
in the model directory (`latency.json`).
"""

from __future__ import annotations

import json
import math
import os
import platform
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from flextron.latency.interpolation import interpolation_weights
from flextron.latency.shape import DEFAULT_SHAPE, PHASES, LatencyShape
from flextron.model.config import ArchConfig, ModelConfig

LUT_FILE = "latency.json"
FORMAT, VERSION = "flextron-latency", 1
CHECK_TOLERANCE = 0.10  # a table whose own check is off by more is flagged
MONOTONE_SLACK = 0.05  # a wider choice may time up to 5% below a narrower one (timing noise)
REPROFILE = (
    "re-profile with more --repeats, one thread (--threads 1, or --clock cpu), on an otherwise idle machine"
)


def device_name(device: torch.device) -> str:
    """A human-readable name of the device (GPU model, or CPU model and thread count)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu} ({torch.get_num_threads()} threads)"


def _interpolated(xs: Sequence[float], values: Sequence[float], x: Sequence[float]) -> list[float]:
    """Piecewise-linear values at each of `x` through (xs, values), extrapolated linearly beyond
    the ends and floored at zero: costs never go below zero, whatever a noisy extrapolation says."""
    points = torch.tensor([float(v) for v in xs], dtype=torch.float64)
    weights = interpolation_weights(points, torch.tensor(x, dtype=torch.float64), extrapolate=True)
    return (weights @ torch.tensor(values, dtype=torch.float64)).clamp(min=0.0).tolist()


@dataclass
class ShapeCosts:
    """Milliseconds of every component at one (phase, batch, length)."""

    phase: str
    batch: int
    length: int
    fixed_ms: float
    mlp_ms: dict[int, float]  # MLP width -> ms of one layer's MLP half
    attention_ms: dict[int, float]  # query heads -> ms of one layer's attention half

    @property
    def shape(self) -> LatencyShape:
        return LatencyShape(self.phase, self.batch, self.length)

    def to_dict(self) -> dict[str, Any]:
        return {
            **self.shape.to_dict(),
            "fixed_ms": self.fixed_ms,
            "mlp_ms": {str(k): v for k, v in self.mlp_ms.items()},
            "attention_ms": {str(k): v for k, v in self.attention_ms.items()},
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ShapeCosts:
        return cls(
            data["phase"],
            int(data["batch"]),
            int(data["length"]),
            float(data["fixed_ms"]),
            {int(k): float(v) for k, v in data["mlp_ms"].items()},
            {int(k): float(v) for k, v in data["attention_ms"].items()},
        )

    def choice_costs(
        self, mlp_widths: Sequence[int], heads: Sequence[int]
    ) -> tuple[list[float], list[float]]:
        """(ms of each MLP width, ms of each head count), interpolated between profiled choices."""
        mlp_keys, head_keys = sorted(self.mlp_ms), sorted(self.attention_ms)
        return (
            _interpolated(mlp_keys, [self.mlp_ms[k] for k in mlp_keys], list(mlp_widths)),
            _interpolated(head_keys, [self.attention_ms[k] for k in head_keys], list(heads)),
        )


def _blend(entries: list[ShapeCosts], xs: list[int], x: int, shape: LatencyShape) -> ShapeCosts:
    """The costs at `x` between entries measured at `xs` (one interpolation per component)."""

    def at(values: list[float]) -> float:
        return _interpolated(xs, values, [x])[0]

    first = entries[0]
    return ShapeCosts(
        shape.phase,
        shape.batch,
        shape.length,
        at([e.fixed_ms for e in entries]),
        {k: at([e.mlp_ms[k] for e in entries]) for k in first.mlp_ms},
        {k: at([e.attention_ms[k] for e in entries]) for k in first.attention_ms},
    )


@dataclass
class LatencyTable:
    """Measured per-choice latencies of one model on one device; see the module docstring."""

    device_type: str  # "cpu" or "cuda"
    device_name: str
    dtype: str
    num_layers: int
    num_heads: int
    intermediate_size: int
    threads: int = 1  # CPU threads (torch.get_num_threads()) during profiling
    clock: str = "wall"  # "wall" or "cpu" (process CPU time, one thread); see flextron.timing.check_clock
    entries: list[ShapeCosts] = field(default_factory=list)
    # The self-check per shape: {"phase", "batch", "length", "errors": relative errors of random configs}
    checks: list[dict[str, Any]] = field(default_factory=list)

    # ---- lookups

    def shapes(self, phase: str) -> list[LatencyShape]:
        """Profiled shapes of a phase, sorted by (batch, length)."""
        return sorted((e.shape for e in self.entries if e.phase == phase), key=lambda s: (s.batch, s.length))

    def _check_phase(self, phase: str) -> None:
        if phase not in PHASES:
            raise ValueError(f"phase must be one of {PHASES}, got {phase!r}")
        if not self.shapes(phase):
            raise ValueError(f"the latency table has no {phase} measurements; re-run flextron profile")

    def costs(self, shape: LatencyShape) -> ShapeCosts:
        """Component costs at any shape, interpolated between profiled shapes."""
        self._check_phase(shape.phase)
        for entry in self.entries:
            if entry.shape == shape:
                return entry
        by_batch: dict[int, list[ShapeCosts]] = {}
        for entry in self.entries:
            if entry.phase == shape.phase:
                by_batch.setdefault(entry.batch, []).append(entry)
        # Interpolate in length within each profiled batch, then across batches.
        rows = []
        for profiled_batch, group in sorted(by_batch.items()):
            group.sort(key=lambda e: e.length)
            at_length = LatencyShape(shape.phase, profiled_batch, shape.length)
            rows.append((profiled_batch, _blend(group, [e.length for e in group], shape.length, at_length)))
        return _blend([r for _, r in rows], [b for b, _ in rows], shape.batch, shape)

    def predict(self, arch: ArchConfig, shape: LatencyShape = DEFAULT_SHAPE) -> float:
        """Predicted milliseconds of one forward of sub-network `arch`."""
        if len(arch.mlp_widths) != self.num_layers:
            raise ValueError(f"arch has {len(arch.mlp_widths)} layers, the latency table {self.num_layers}")
        costs = self.costs(shape)
        mlp, attention = costs.choice_costs(arch.mlp_widths, arch.heads)
        return costs.fixed_ms + math.fsum(mlp) + math.fsum(attention)

    def cost_vectors(
        self, mlp_choices: Sequence[int], head_choices: Sequence[int], shape: LatencyShape
    ) -> tuple[float, torch.Tensor, torch.Tensor]:
        """(fixed ms, per-layer ms of each MLP choice (Cm,), of each head choice (Ch,))."""
        costs = self.costs(shape)
        mlp, attention = costs.choice_costs(mlp_choices, head_choices)
        return costs.fixed_ms, torch.tensor(mlp), torch.tensor(attention)

    def latency_range(
        self,
        config: ModelConfig,
        shape: LatencyShape = DEFAULT_SHAPE,
        mlp_choices: Sequence[int] | None = None,
        head_choices: Sequence[int] | None = None,
    ) -> tuple[float, float]:
        """(smallest sub-network's ms, full model's ms) over the given choices (default: all)."""
        mlp_choices = mlp_choices or config.mlp_choices()
        head_choices = head_choices or config.head_choices()
        layers = config.num_layers
        smallest = ArchConfig((min(mlp_choices),) * layers, (min(head_choices),) * layers)
        return self.predict(smallest, shape), self.predict(ArchConfig.full(config), shape)

    def check_target(
        self,
        target_ms: float,
        config: ModelConfig,
        shape: LatencyShape = DEFAULT_SHAPE,
        mlp_choices: Sequence[int] | None = None,
        head_choices: Sequence[int] | None = None,
    ) -> float:
        """The target's latency budget (fraction of the full model's latency); ValueError outside
        the range."""
        low, high = self.latency_range(config, shape, mlp_choices, head_choices)
        where = f"{shape.phase} (batch {shape.batch}, length {shape.length})"
        if low > high:
            raise ValueError(
                f"latency target {target_ms:.3f} ms cannot be resolved for {where}: the latency table "
                f"predicts the smallest sub-network ({low:.3f} ms) slower than the full model "
                f"({high:.3f} ms); {REPROFILE}"
            )
        if not math.isfinite(target_ms) or not low <= target_ms <= high:
            raise ValueError(
                f"latency target {target_ms:.3f} ms is not achievable for {where} on {self.device_name}: "
                f"the achievable range is {low:.3f} ms (smallest sub-network) to {high:.3f} ms "
                f"(full model), budgets {low / high:.3f} to 1"
            )
        return target_ms / high

    # ---- files

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "version": VERSION,
            "device_type": self.device_type,
            "device_name": self.device_name,
            "dtype": self.dtype,
            "num_layers": self.num_layers,
            "num_heads": self.num_heads,
            "intermediate_size": self.intermediate_size,
            "threads": self.threads,
            "clock": self.clock,
            "entries": [e.to_dict() for e in self.entries],
            "checks": self.checks,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LatencyTable:
        if data.get("format") != FORMAT or data.get("version") != VERSION:
            raise ValueError(f"not a Flextron latency table (format {FORMAT!r}, version {VERSION})")
        return cls(
            data["device_type"],
            data["device_name"],
            data["dtype"],
            int(data["num_layers"]),
            int(data["num_heads"]),
            int(data["intermediate_size"]),
            int(data.get("threads", 1)),
            data.get("clock", "wall"),
            [ShapeCosts.from_dict(e) for e in data["entries"]],
            list(data.get("checks", [])),
        )

    def save(self, path: str | os.PathLike) -> Path:
        """Write to `path` (a model directory gets latency.json); returns the file written."""
        from flextron.io.atomic import write_json_atomic

        path = Path(path)
        if path.is_dir():
            path = path / LUT_FILE
        write_json_atomic(path, self.to_dict())
        return path

    @classmethod
    def load(cls, path: str | os.PathLike, device: torch.device | str | None = None) -> LatencyTable:
        """Read a table (a file, or a model directory's latency.json).

        Warns when it was measured on another device type than `device` (if given).
        """
        path = Path(path)
        if path.is_dir():
            path = path / LUT_FILE
        if not path.is_file():
            raise FileNotFoundError(f"no latency table at {path}; run `flextron profile` first")
        try:
            table = cls.from_dict(json.loads(path.read_text()))
        except (ValueError, KeyError, TypeError, AttributeError) as error:
            raise ValueError(f"{path}: corrupt latency table ({error!r})") from error
        if device is not None:
            table.check_device(torch.device(device))
        table.check_monotone()
        table.check_accuracy()
        return table

    # ---- quality

    def check_monotone(self) -> list[str]:
        """Warn (and return them) about rows where a wider choice costs less than a narrower one
        (beyond MONOTONE_SLACK): budgets between them resolve poorly, and when the smallest
        sub-network is predicted slower than the full model, latency targets cannot be met."""
        rows = []
        for entry in self.entries:
            for kind, costs in (("MLP width", entry.mlp_ms), ("heads", entry.attention_ms)):
                keys = sorted(costs)
                for narrow, wide in zip(keys, keys[1:], strict=False):
                    if costs[wide] < costs[narrow] * (1 - MONOTONE_SLACK):
                        rows.append(
                            f"{entry.phase} {entry.batch}x{entry.length} {kind} {wide} "
                            f"({costs[wide]:.3f} ms) < {narrow} ({costs[narrow]:.3f} ms)"
                        )
        if rows:
            shown = "; ".join(rows[:4]) + (f"; and {len(rows) - 4} more" if len(rows) > 4 else "")
            warnings.warn(f"the latency table is not monotone in cost: {shown}; {REPROFILE}", stacklevel=2)
        return rows

    def record_check(self, rows: list[dict[str, Any]]) -> None:
        """Store check_table's rows (their relative errors per shape) and warn when off by more
        than CHECK_TOLERANCE."""
        by_shape: dict[tuple[str, int, int], list[float]] = {}
        for row in rows:
            by_shape.setdefault((row["phase"], row["batch"], row["length"]), []).append(row["error"])
        self.checks = [
            {"phase": phase, "batch": batch, "length": length, "errors": errors}
            for (phase, batch, length), errors in by_shape.items()
        ]
        self.check_accuracy()

    def check_accuracy(self) -> None:
        """Warn when the stored self-check found predictions off by more than CHECK_TOLERANCE."""
        for check in self.checks:
            worst = max((abs(e) for e in check["errors"]), default=0.0)
            if worst > CHECK_TOLERANCE:
                low, high = min(check["errors"]), max(check["errors"])
                warnings.warn(
                    f"the latency table's own check is off by up to {100 * worst:.0f}% at {check['phase']} "
                    f"{check['batch']}x{check['length']} (errors {100 * low:+.0f}% to {100 * high:+.0f}%, "
                    f"limit {100 * CHECK_TOLERANCE:.0f}%): its predictions are unreliable; {REPROFILE}",
                    stacklevel=2,
                )

    def check_device(self, device: torch.device) -> None:
        """Warn when this table was measured on another device type (or CPU thread count):
        its numbers do not apply."""
        if device.type != self.device_type:
            warnings.warn(
                f"the latency table was measured on {self.device_type} ({self.device_name}) but the "
                f"model runs on {device.type}: latency predictions will be wrong; re-run flextron profile",
                stacklevel=3,
            )
        elif device.type == "cpu" and torch.get_num_threads() != self.threads:
            warnings.warn(
                f"the latency table was measured with {self.threads} CPU threads, this process uses "
                f"{torch.get_num_threads()}: latency predictions will be off (run with OMP_NUM_THREADS="
                f"{self.threads}, or --threads {self.threads} where the command has it)",
                stacklevel=3,
            )

    def check_dtype(self, name: str) -> None:
        """ValueError when the table was measured with weights of another type (a model's
        `weights_dtype`: float32, bfloat16, float16 or int8): each streams other bytes and runs
        other kernels, so each has its own costs."""
        if name != self.dtype:
            article = "an" if name == "int8" else "a"
            raise ValueError(
                f"the latency table was measured in {self.dtype}, the model runs in {name}: load the "
                f"model with --dtype {self.dtype}, or measure {article} {name} table with "
                f"`flextron profile --dtype {name}` (it replaces the {self.dtype} one)"
            )

    def check_model(self, config: ModelConfig) -> None:
        """ValueError when the table belongs to a model of other sizes."""
        mine = (self.num_layers, self.num_heads, self.intermediate_size)
        theirs = (config.num_layers, config.num_heads, config.intermediate_size)
        if mine != theirs:
            raise ValueError(
                f"the latency table was measured for (layers, heads, d_ff) = {mine}, the model has {theirs}"
            )

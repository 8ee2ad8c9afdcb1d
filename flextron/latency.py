"""Latency lookup table (LUT): measured cost of every layer choice, and the cost model.

`profile_latency` times, on the model's device, each MLP width and each head count of a
decoder layer (pre-norm + sublayer + residual, exactly the code the model runs, run in
every layer so that weights stream from memory as in the real forward), plus the fixed
cost (embedding, rotary tables, final norm, LM head on the last position, as generation
runs it), for every profiled shape:

    prefill (batch, sequence length): one forward over the whole prompt;
    decode  (batch, context):         one new token per sequence against a KV cache of `context`.

Every layer of a (non-heterogeneous) model has the same shapes, so one cost per choice
serves all layers.  A two-parameter fit against three measured whole-model forwards
(`_calibrate`) adds what the parts miss.  The cost model (DESIGN.md §1 step 5) is

    latency(arch) = fixed + Σ_l mlp[m_l] + attention[a_l]

and, with soft router probabilities, its expectation (`expected_latency`, differentiable).
Shapes between profiled ones are interpolated linearly (in length, then batch); widths
and head counts between profiled ones likewise.

Timings are medians over repeats, measured round-robin (each repeat times every component
once) so that a load spike on a shared machine hits all choices alike.  The table is saved
as JSON in the model directory (`latency.json`).
"""

from __future__ import annotations

import json
import math
import os
import platform
import random
import statistics
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from flextron.config import ArchConfig, ModelConfig
from flextron.model import FlextronModel

LUT_FILE = "latency.json"
PHASES = ("prefill", "decode")
CLOCKS = ("wall", "cpu")
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


@dataclass
class ShapeCosts:
    """Milliseconds of every component at one (phase, batch, length)."""

    phase: str
    batch: int
    length: int
    fixed_ms: float
    mlp_ms: dict[int, float]  # MLP width -> ms of one layer's MLP half
    attention_ms: dict[int, float]  # query heads -> ms of one layer's attention half

    def to_dict(self) -> dict[str, Any]:
        return {
            "phase": self.phase,
            "batch": self.batch,
            "length": self.length,
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


def _interpolate(xs: Sequence[float], ys: Sequence[float], x: float) -> float:
    """Piecewise-linear y(x) through sorted points; linear extrapolation beyond the ends."""
    if len(xs) == 1:
        return ys[0]
    index = min(max(1, next((i for i, v in enumerate(xs) if v >= x), len(xs) - 1)), len(xs) - 1)
    x0, x1, y0, y1 = xs[index - 1], xs[index], ys[index - 1], ys[index]
    return y0 + (y1 - y0) * (x - x0) / (x1 - x0)


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
    clock: str = "wall"  # "wall" or "cpu" (process CPU time, one thread); see median_times_ms
    entries: list[ShapeCosts] = field(default_factory=list)
    # The self-check per shape: {"phase", "batch", "length", "errors": relative errors of random configs}
    checks: list[dict[str, Any]] = field(default_factory=list)

    # ---- lookups

    def shapes(self, phase: str) -> list[tuple[int, int]]:
        """Profiled (batch, length) pairs of a phase, sorted."""
        return sorted((e.batch, e.length) for e in self.entries if e.phase == phase)

    def _check_phase(self, phase: str) -> None:
        if phase not in PHASES:
            raise ValueError(f"phase must be one of {PHASES}, got {phase!r}")
        if not self.shapes(phase):
            raise ValueError(f"the latency table has no {phase} measurements; re-run flextron profile")

    def costs(self, phase: str, batch: int, length: int) -> ShapeCosts:
        """Component costs at any (batch, length), interpolated between profiled shapes."""
        self._check_phase(phase)
        if batch < 1 or length < 1:
            raise ValueError(f"batch and length must be positive, got batch={batch}, length={length}")
        for entry in self.entries:
            if (entry.phase, entry.batch, entry.length) == (phase, batch, length):
                return entry
        by_batch: dict[int, list[ShapeCosts]] = {}
        for entry in self.entries:
            if entry.phase == phase:
                by_batch.setdefault(entry.batch, []).append(entry)
        # Interpolate in length within each profiled batch, then across batches.
        rows = []
        for profiled_batch, group in sorted(by_batch.items()):
            group.sort(key=lambda e: e.length)
            rows.append((profiled_batch, self._blend(group, [e.length for e in group], length)))
        return self._blend([r for _, r in rows], [b for b, _ in rows], batch, phase, batch, length)

    @staticmethod
    def _blend(
        entries: list[ShapeCosts],
        xs: list[int],
        x: int,
        phase: str | None = None,
        batch: int | None = None,
        length: int | None = None,
    ) -> ShapeCosts:
        first = entries[0]

        def at(values: list[float]) -> float:
            # Costs never go below zero, whatever a noisy extrapolation says.
            return max(0.0, _interpolate(xs, values, x))

        return ShapeCosts(
            phase or first.phase,
            batch or first.batch,
            length or x,
            at([e.fixed_ms for e in entries]),
            {k: at([e.mlp_ms[k] for e in entries]) for k in first.mlp_ms},
            {k: at([e.attention_ms[k] for e in entries]) for k in first.attention_ms},
        )

    @staticmethod
    def choice_cost(table: dict[int, float], choice: int) -> float:
        keys = sorted(table)
        return max(0.0, _interpolate(keys, [table[k] for k in keys], choice))

    def predict(self, arch: ArchConfig, phase: str = "prefill", batch: int = 1, length: int = 128) -> float:
        """Predicted milliseconds of one forward of sub-network `arch`."""
        if len(arch.mlp_widths) != self.num_layers:
            raise ValueError(f"arch has {len(arch.mlp_widths)} layers, the latency table {self.num_layers}")
        costs = self.costs(phase, batch, length)
        total = costs.fixed_ms
        for width, heads in zip(arch.mlp_widths, arch.heads, strict=True):
            total += self.choice_cost(costs.mlp_ms, width) + self.choice_cost(costs.attention_ms, heads)
        return total

    def cost_vectors(
        self, mlp_choices: Sequence[int], head_choices: Sequence[int], phase: str, batch: int, length: int
    ) -> tuple[float, torch.Tensor, torch.Tensor]:
        """(fixed ms, per-layer ms of each MLP choice (Cm,), of each head choice (Ch,))."""
        costs = self.costs(phase, batch, length)
        mlp = torch.tensor([self.choice_cost(costs.mlp_ms, w) for w in mlp_choices])
        attention = torch.tensor([self.choice_cost(costs.attention_ms, h) for h in head_choices])
        return costs.fixed_ms, mlp, attention

    def latency_range(
        self,
        config: ModelConfig,
        phase: str = "prefill",
        batch: int = 1,
        length: int = 128,
        mlp_choices: Sequence[int] | None = None,
        head_choices: Sequence[int] | None = None,
    ) -> tuple[float, float]:
        """(smallest sub-network's ms, full model's ms) over the given choices (default: all)."""
        mlp_choices = mlp_choices or config.mlp_choices()
        head_choices = head_choices or config.head_choices()
        layers = config.num_layers
        smallest = ArchConfig((min(mlp_choices),) * layers, (min(head_choices),) * layers)
        return self.predict(smallest, phase, batch, length), self.predict(
            ArchConfig.full(config), phase, batch, length
        )

    def check_target(
        self,
        target_ms: float,
        config: ModelConfig,
        phase: str = "prefill",
        batch: int = 1,
        length: int = 128,
        mlp_choices: Sequence[int] | None = None,
        head_choices: Sequence[int] | None = None,
    ) -> float:
        """The target's budget (fraction of the full model's latency); ValueError outside the range."""
        low, high = self.latency_range(config, phase, batch, length, mlp_choices, head_choices)
        if low > high:
            raise ValueError(
                f"latency target {target_ms:.3f} ms cannot be resolved for {phase} (batch {batch}, length "
                f"{length}): the latency table predicts the smallest sub-network ({low:.3f} ms) slower than "
                f"the full model ({high:.3f} ms); {REPROFILE}"
            )
        if not math.isfinite(target_ms) or not low <= target_ms <= high:
            raise ValueError(
                f"latency target {target_ms:.3f} ms is not achievable for {phase} (batch {batch}, "
                f"length {length}) on {self.device_name}: the achievable range is "
                f"{low:.3f} ms (smallest sub-network) to {high:.3f} ms (full model), "
                f"budgets {low / high:.3f} to 1"
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
        from flextron.atomic_files import write_json_atomic

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

    def check_model(self, config: ModelConfig) -> None:
        """ValueError when the table belongs to a model of other sizes."""
        mine = (self.num_layers, self.num_heads, self.intermediate_size)
        theirs = (config.num_layers, config.num_heads, config.intermediate_size)
        if mine != theirs:
            raise ValueError(
                f"the latency table was measured for (layers, heads, d_ff) = {mine}, the model has {theirs}"
            )


# ---- measuring -------------------------------------------------------------------


def _synchronizer(device: torch.device) -> Callable[[], None]:
    return (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)


def _check_clock(clock: str, device: torch.device) -> None:
    if clock not in CLOCKS:
        raise ValueError(f"clock must be one of {CLOCKS}, got {clock!r}")
    if clock == "cpu" and (device.type != "cpu" or torch.get_num_threads() != 1):
        raise ValueError(
            "clock 'cpu' (process CPU time) measures latency only on the CPU with one thread "
            f"(device {device.type}, {torch.get_num_threads()} threads); use clock 'wall'"
        )


def median_times_ms(
    functions: dict[Any, Callable[[], object]],
    device: torch.device,
    repeats: int = 15,
    warmup: int = 2,
    clock: str = "wall",
) -> dict[Any, float]:
    """Median milliseconds of each function, timed round-robin `repeats` times after `warmup`.

    clock "wall": elapsed time (synchronised on CUDA); "cpu": this process's CPU time, which on
    one CPU thread is the latency the forward would have on a core of its own (a shared,
    oversubscribed machine inflates wall time by whatever else runs).
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    _check_clock(clock, device)
    sync = _synchronizer(device)
    now = time.process_time if clock == "cpu" else time.perf_counter
    samples: dict[Any, list[float]] = {key: [] for key in functions}
    for repeat in range(warmup + repeats):
        for key, function in functions.items():
            sync()
            start = now()
            function()
            sync()
            if repeat >= warmup:
                samples[key].append((now() - start) * 1e3)
    return {key: statistics.median(values) for key, values in samples.items()}


def _filled_cache(model: FlextronModel, batch: int, context: int):
    """A KV cache that looks filled with `context` positions by the full model (random values)."""
    cache = model.new_kv_cache(batch, context + 1)
    for keys, values in zip(cache.keys, cache.values, strict=True):
        keys.normal_()
        values.normal_()
    cache.kv_heads = [model.config.num_kv_heads] * model.config.num_layers
    cache.length = context
    return cache


def _component_functions(
    model: FlextronModel,
    phase: str,
    batch: int,
    length: int,
    mlp_choices: Sequence[int],
    head_choices: Sequence[int],
) -> dict[Any, Callable[[], object]]:
    """Closures running each component once at one shape: "fixed", ("mlp", w), ("attention", h)."""
    config, device = model.config, model.embed_tokens.weight.device
    tokens = length if phase == "prefill" else 1
    start = 0 if phase == "prefill" else length
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, config.vocab_size, (batch, tokens), generator=generator).to(device)
    positions = torch.arange(start, start + tokens, device=device)
    x = model.embed_tokens(ids)  # (B, T, D)
    cos, sin = model.rotary(positions, x.dtype)
    layers = model.layers
    cache = _filled_cache(model, batch, length) if phase == "decode" else None
    head = model.embed_tokens.weight if model.lm_head is None else model.lm_head.weight

    def fixed() -> object:
        hidden = model.embed_tokens(ids)
        model.rotary(positions, hidden.dtype)
        return model.norm(hidden[:, -1:]) @ head.T  # (B, 1, V): generation needs the last logits only

    # Each component runs in every layer and the time is divided by the layer count: one layer
    # timed alone would keep its weights in cache, which the real forward (all layers) does not.
    def attention(heads: int) -> Callable[[], object]:
        def run() -> None:
            for index, layer in enumerate(layers):
                x + layer.self_attn(layer.input_layernorm(x), cos, sin, heads, cache, index)

        return run

    def mlp(width: int) -> Callable[[], object]:
        def run() -> None:
            for layer in layers:
                x + layer.mlp(layer.post_attention_layernorm(x), width)

        return run

    functions: dict[Any, Callable[[], object]] = {"fixed": fixed}
    functions.update({("attention", h): attention(h) for h in head_choices})
    functions.update({("mlp", w): mlp(w) for w in mlp_choices})
    return functions


@torch.inference_mode()
def profile_latency(
    model: FlextronModel,
    prefill_shapes: Sequence[tuple[int, int]] = ((1, 128),),
    decode_shapes: Sequence[tuple[int, int]] = ((1, 256),),
    mlp_choices: Sequence[int] | None = None,
    head_choices: Sequence[int] | None = None,
    repeats: int = 15,
    warmup: int = 2,
    progress: Callable[[str], None] | None = None,
    clock: str = "wall",
) -> LatencyTable:
    """Measure a LatencyTable for `model` on its device (default: every allowed choice)."""
    config = model.config
    if config.layer_intermediate_sizes is not None or config.layer_num_heads is not None:
        raise ValueError("profile the elastic (full) model, not a heterogeneous export")
    mlp_choices = sorted(mlp_choices or config.mlp_choices())
    head_choices = sorted(head_choices or config.head_choices())
    for width in mlp_choices:
        if width not in config.mlp_choices():
            raise ValueError(f"MLP width {width} is not an allowed choice {config.mlp_choices()}")
    for heads in head_choices:
        if heads not in config.head_choices():
            raise ValueError(f"head count {heads} is not an allowed choice {config.head_choices()}")
    weight = model.embed_tokens.weight
    device = weight.device
    table = LatencyTable(
        device.type,
        device_name(device),
        str(weight.dtype).removeprefix("torch."),
        config.num_layers,
        config.num_heads,
        config.intermediate_size,
        torch.get_num_threads(),
        clock,
    )
    _check_clock(clock, device)
    for phase, shapes in (("prefill", prefill_shapes), ("decode", decode_shapes)):
        for batch, length in shapes:
            if batch < 1 or length < 1 or length + 1 > config.max_position_embeddings:
                raise ValueError(
                    f"{phase} shape (batch {batch}, length {length}) must be positive and fit the "
                    f"context of {config.max_position_embeddings}"
                )
            if progress is not None:
                progress(f"profiling {phase} batch={batch} length={length}")
            functions = _component_functions(model, phase, batch, length, mlp_choices, head_choices)
            times = median_times_ms(functions, device, repeats, warmup, clock)
            layers = config.num_layers
            entry = ShapeCosts(
                phase,
                batch,
                length,
                times["fixed"],
                {w: times[("mlp", w)] / layers for w in mlp_choices},
                {h: times[("attention", h)] / layers for h in head_choices},
            )
            _calibrate(model, entry, mlp_choices, head_choices, repeats, warmup, clock)
            table.entries.append(entry)
    return table


def _calibrate(
    model: FlextronModel,
    entry: ShapeCosts,
    mlp_choices: Sequence[int],
    head_choices: Sequence[int],
    repeats: int,
    warmup: int,
    clock: str,
) -> None:
    """Fit whole-model latency = fixed + overhead + scale * Σ layer costs on three uniform anchors.

    The sum of separately timed parts misses what only the whole forward has (the layer
    loop, cache traffic between sublayers); a two-parameter fit on the smallest, a middle
    and the full configuration absorbs it.  The random-configuration check (check_table)
    tests the fitted model on configurations it was not fitted on.
    """
    config = model.config
    middle_width = mlp_choices[len(mlp_choices) // 2]
    middle_heads = head_choices[len(head_choices) // 2]
    anchors = [
        ArchConfig.uniform(config, min(mlp_choices), min(head_choices)),
        ArchConfig.uniform(config, middle_width, middle_heads),
        ArchConfig.full(config),
    ]
    measured = measure_latency(
        model, anchors, entry.phase, entry.batch, entry.length, repeats, warmup, clock=clock
    )
    measured = torch.tensor(measured, dtype=torch.float64)
    sums = torch.tensor(
        [
            sum(entry.mlp_ms[w] + entry.attention_ms[h] for w, h in zip(a.mlp_widths, a.heads, strict=True))
            for a in anchors
        ],
        dtype=torch.float64,
    )
    design = torch.stack([torch.ones_like(sums), sums], 1)  # measured - fixed = overhead + scale * sums
    overhead, scale = torch.linalg.lstsq(design, (measured - entry.fixed_ms)[:, None]).solution[:, 0].tolist()
    if scale <= 0:  # a degenerate fit on a very noisy machine: keep the raw sum, shift only
        scale, overhead = 1.0, float((measured - entry.fixed_ms - sums).mean())
    entry.fixed_ms = max(0.0, entry.fixed_ms + overhead)
    entry.mlp_ms = {w: v * scale for w, v in entry.mlp_ms.items()}
    entry.attention_ms = {h: v * scale for h, v in entry.attention_ms.items()}


def random_archs(config: ModelConfig, count: int, seed: int = 0) -> list[ArchConfig]:
    """`count` random per-layer configurations over the allowed choices."""
    rng = random.Random(seed)
    layers = range(config.num_layers)
    return [
        ArchConfig(
            tuple(rng.choice(config.mlp_choices(i)) for i in layers),
            tuple(rng.choice(config.head_choices(i)) for i in layers),
        )
        for _ in range(count)
    ]


@torch.inference_mode()
def measure_latency(
    model: FlextronModel,
    archs: Sequence[ArchConfig],
    phase: str = "prefill",
    batch: int = 1,
    length: int = 128,
    repeats: int = 15,
    warmup: int = 2,
    router: object | None = None,
    clock: str = "wall",
) -> list[float]:
    """Median measured ms of a whole-model forward for each configuration (round-robin).

    `router` (a flextron.nn.routers routing session) replaces the configurations' choices
    when given; then `archs` only sets how many (identical) measurements to take.
    """
    if phase not in PHASES:
        raise ValueError(f"phase must be one of {PHASES}, got {phase!r}")
    config, device = model.config, model.embed_tokens.weight.device
    tokens = length if phase == "prefill" else 1
    ids = torch.randint(0, config.vocab_size, (batch, tokens), generator=torch.Generator().manual_seed(0))
    ids = ids.to(device)
    cache = _filled_cache(model, batch, length) if phase == "decode" else None

    def run(arch: ArchConfig) -> Callable[[], object]:
        def forward() -> object:
            if cache is not None:
                cache.length = length  # every timed step decodes at the same context
            # Generation needs the last position's logits only, so that is what is timed.
            return model(ids, arch, cache, last_only=True, router=router)

        return forward

    times = median_times_ms({i: run(a) for i, a in enumerate(archs)}, device, repeats, warmup, clock)
    return [times[i] for i in range(len(archs))]


def timed_forward(
    model: FlextronModel,
    chunks: Sequence[torch.Tensor],
    phase: str,
    arch: ArchConfig | None = None,
    sessions: Sequence[object] | None = None,
) -> Callable[[], list[torch.Tensor]]:
    """What one timing of real text runs, last-position logits as generation computes them.

    chunks: token ids (batch, tokens) each; arch, or one routing session per chunk (dynamic
    heads are fixed at a session's first call, as in generation).  Prefill: each whole chunk.
    Decode: each chunk but its last token is prefilled into a KV cache here, untimed; the
    returned function decodes that last token, at the same context on every call.
    """
    if phase not in PHASES:
        raise ValueError(f"phase must be one of {PHASES}, got {phase!r}")
    sessions = list(sessions) if sessions is not None else [None] * len(chunks)
    if phase == "prefill":
        return lambda: [
            model(ids, arch, last_only=True, router=routing)
            for ids, routing in zip(chunks, sessions, strict=True)
        ]
    caches = []
    for ids, routing in zip(chunks, sessions, strict=True):
        caches.append(model.new_kv_cache(ids.shape[0], ids.shape[1]))
        model(ids[:, :-1], arch, caches[-1], last_only=True, router=routing)

    def step() -> list[torch.Tensor]:
        outputs = []
        for ids, routing, cache in zip(chunks, sessions, caches, strict=True):
            cache.length = ids.shape[1] - 1  # every timed step decodes at the same context
            outputs.append(model(ids[:, -1:], arch, cache, last_only=True, router=routing))
        return outputs

    return step


def check_table(
    model: FlextronModel,
    table: LatencyTable,
    count: int = 10,
    phase: str = "prefill",
    batch: int = 1,
    length: int = 128,
    repeats: int = 15,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """Predicted vs measured latency of `count` random configurations (rows with the error)."""
    archs = random_archs(model.config, count, seed)
    measured = measure_latency(model, archs, phase, batch, length, repeats, clock=table.clock)
    rows = []
    for arch, ms in zip(archs, measured, strict=True):
        predicted = table.predict(arch, phase, batch, length)
        rows.append(
            {
                "phase": phase,
                "batch": batch,
                "length": length,
                "predicted_ms": predicted,
                "measured_ms": ms,
                "error": (predicted - ms) / ms,
                "arch": arch.to_dict(),
            }
        )
    return rows

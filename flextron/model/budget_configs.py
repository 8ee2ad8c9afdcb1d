"""Quality-aware budget configurations: for each budget, the sub-network with the lowest
measured calibration loss among those that fit it.

Where heads or MLP neurons should go first differs by budget and by model (on SmolLM2 at
0.75, keeping all 9 heads and narrowing the MLPs beats the fixed rule's 6 heads), so the
fixed rule of flextron.model.config.arch_for_budget is only the fallback.  A budget b is a
fraction of the layers' weights; a configuration fits it when its layers hold at most
b x the full layers' weights plus half an MLP width step per layer (the rounding the fixed
rule itself allows).  Candidates per budget: for every allowed head count, the widest
uniform MLP width that fits, plus the fixed rule's configuration.  Each candidate's loss is
next-token cross-entropy on calibration blocks (measured by flextron.conversion.budget_search).

The choices are saved as budget_configs.json in the model directory:
    {"format": "flextron-budget-configs", "version": 1,
     "model": <hash of the model's sizes (SHAPE_FIELDS)>, "weights": <weights fingerprint>,
     "calibration": {"source": ..., "blocks": N, "seq_len": S},
     "budgets": [{"budget": 0.75, "arch": {...}, "loss": ..., "rule_loss": ...,
                  "parameters": ..., "candidates": [{"arch", "loss", "parameters"}, ...]}]}
A file made for another model or other weights is refused (ValueError), never ignored.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from flextron.io.atomic import write_json_atomic
from flextron.model.config import (
    DEFAULT_BUDGETS,
    ArchConfig,
    ModelConfig,
    arch_for_budget,
    check_budget,
    layer_weights,
)
from flextron.options import non_negative_int, option, parse_budgets, positive_int

FILE = "budget_configs.json"
FORMAT, VERSION = "flextron-budget-configs", 1


@dataclass
class CalibrationConfig:
    """How calibration text is cut and batched, and which budgets get a configuration chosen on
    it: the options `flextron convert` and `flextron choose-budgets` share."""

    seq_len: int = option(256, "tokens per calibration block", type=positive_int)
    batch_size: int = option(4, "calibration blocks per forward pass", type=positive_int)
    budgets: tuple[float, ...] = option(
        DEFAULT_BUDGETS, "budgets whose configurations are chosen by calibration loss", type=parse_budgets
    )
    layer_levels: int = option(
        8,
        "MLP widths measured per layer to search per-layer configurations (0: uniform "
        "configurations only, which every export format can hold)",
        type=non_negative_int,
    )
    # The sensitivities only rank the layers' options, and the chosen allocation is then
    # measured on every calibration block: a few blocks suffice.
    sensitivity_blocks: int = option(
        4,
        "calibration blocks each layer's sensitivity is measured on (fewer: faster and coarser)",
        type=positive_int,
    )
    bf16: bool = option(
        False,
        "measure the calibration losses in bfloat16 autocast: faster where bf16 is fast (AVX-512 "
        "BF16 CPUs, GPUs); it only ranks the candidates, the weights stay as they are",
    )

    def __post_init__(self) -> None:
        if self.layer_levels < 0:
            raise ValueError(f"CalibrationConfig.layer_levels must be >= 0, got {self.layer_levels}")
        for name in ("seq_len", "batch_size", "sensitivity_blocks"):
            if getattr(self, name) <= 0:
                raise ValueError(f"CalibrationConfig.{name} must be positive, got {getattr(self, name)}")
        self.budgets = tuple(check_budget(b) for b in self.budgets)


def weight_limit(config: ModelConfig, budget: float) -> float:
    """The most layer weights a configuration for `budget` may hold."""
    full = layer_weights(config, ArchConfig.full(config))
    half_step = 1.5 * config.hidden_size * config.mlp_granularity * config.num_layers
    return budget * full + half_step


def smallest_budget(config: ModelConfig) -> float:
    """The smallest budget some configuration fits: every layer at its narrowest choices."""
    layers = range(config.num_layers)
    smallest = ArchConfig(
        tuple(config.mlp_choices(i)[0] for i in layers), tuple(config.head_choices(i)[0] for i in layers)
    )
    full = layer_weights(config, ArchConfig.full(config))
    return (layer_weights(config, smallest) - weight_limit(config, 0.0)) / full


def resolve_budget(config: ModelConfig, budget: float, saved: BudgetConfigs | None) -> ArchConfig:
    """The configuration serving `budget`: the measured choice where one is saved, else the
    fixed rule; ValueError naming the achievable budgets when no configuration fits."""
    budget = check_budget(budget)
    lowest = smallest_budget(config)
    if budget < lowest - 1e-9:
        raise ValueError(
            f"no configuration fits budget {budget:g}: the achievable budgets are "
            f"{math.ceil(lowest * 100) / 100:g} to 1"
        )
    chosen = saved.arch_for_budget(config, budget) if saved is not None else None
    return chosen or arch_for_budget(config, budget)


def fits(config: ModelConfig, arch: ArchConfig, budget: float) -> bool:
    return layer_weights(config, arch) <= weight_limit(config, budget)


def candidate_archs(config: ModelConfig, budget: float) -> list[ArchConfig]:
    """The fixed rule's configuration, then per head count the widest uniform MLP that fits."""
    candidates = [arch_for_budget(config, budget)]
    limit = weight_limit(config, budget)
    for heads in config.head_choices():
        fitting = [
            w
            for w in config.mlp_choices()
            if layer_weights(config, ArchConfig.uniform(config, w, heads)) <= limit
        ]
        if fitting:
            arch = ArchConfig.uniform(config, max(fitting), heads)
            if arch not in candidates:
                candidates.append(arch)
    return candidates


Weights = torch.nn.Module | Iterable[tuple[str, torch.Tensor]]


def fingerprint(weights: Weights) -> str:
    """A short hash of the weights that survives fp32 <-> bf16 loading: up to 256 evenly spaced
    values of every tensor, rounded to bf16.  weights: a model, or its (name, tensor) pairs
    (sampled one at a time: a file can stream them)."""
    items = weights.state_dict().items() if isinstance(weights, torch.nn.Module) else weights
    samples = {}
    for name, tensor in items:
        flat = tensor.detach().reshape(-1)
        samples[name] = flat[:: max(1, flat.numel() // 256)][:256].to("cpu", torch.bfloat16, copy=True)
    digest = hashlib.sha256()
    for name in sorted(samples):
        digest.update(name.encode())
        digest.update(samples[name].view(torch.int16).numpy().tobytes())
    return digest.hexdigest()[:16]


# The fields that decide which configurations exist; other fields (and fields added to
# ModelConfig later) do not make saved choices foreign.
SHAPE_FIELDS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_layers",
    "num_heads",
    "num_kv_heads",
    "head_dim",
    "layer_intermediate_sizes",
    "layer_num_heads",
)


def config_hash(config: ModelConfig) -> str:
    shape = {name: getattr(config, name) for name in SHAPE_FIELDS}
    return hashlib.sha256(json.dumps(shape, sort_keys=True).encode()).hexdigest()[:16]


@dataclass
class BudgetConfigs:
    """Chosen configuration per budget, with the evidence (losses) behind each choice."""

    entries: list[dict]  # sorted by budget: {"budget", "arch", "loss", "rule_loss", "parameters", ...}
    calibration: dict = field(default_factory=dict)

    def budgets(self) -> list[float]:
        return [entry["budget"] for entry in self.entries]

    def arch_for_budget(self, config: ModelConfig, budget: float) -> ArchConfig | None:
        """The measured choice for a saved budget; None for any other budget."""
        budget = check_budget(budget)
        for entry in self.entries:
            if abs(entry["budget"] - budget) < 1e-9:
                return ArchConfig.from_dict(entry["arch"])
        return None

    def to_json(self, model: torch.nn.Module, config: ModelConfig) -> dict:
        return {
            "format": FORMAT,
            "version": VERSION,
            "model": config_hash(config),
            "weights": fingerprint(model),
            "calibration": self.calibration,
            "budgets": self.entries,
        }

    @classmethod
    def from_json(cls, data: object, model: Weights, config: ModelConfig, path: Path) -> BudgetConfigs:
        """Validate a loaded budget_configs.json against the model; ValueError names the problem."""
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise ValueError(f'{path}: not a budget configurations file (no "format": "{FORMAT}")')
        if data.get("version") != VERSION:
            raise ValueError(f"{path}: unsupported version {data.get('version')!r}")
        redo = "rerun `flextron choose-budgets --model DIR` or delete the file"
        if data.get("model") != config_hash(config):
            raise ValueError(f"{path} was made for another model (config hash differs): {redo}")
        if data.get("weights") != fingerprint(model):
            raise ValueError(f"{path} is stale: it was chosen for other weights: {redo}")
        entries = data.get("budgets")
        if not isinstance(entries, list) or not entries:
            raise ValueError(f'{path}: "budgets" must be a non-empty list')
        for entry in entries:
            try:
                budget = check_budget(entry["budget"])
                arch = ArchConfig.from_dict(entry["arch"])
                arch.validate(config)
            except (KeyError, TypeError, ValueError) as error:
                raise ValueError(f"{path}: bad entry {str(entry)[:80]}: {error}") from error
            if not fits(config, arch, budget):
                raise ValueError(f"{path}: the configuration saved for budget {budget:g} does not fit it")
        return cls(sorted(entries, key=lambda e: e["budget"]), data.get("calibration", {}))

    def save(self, directory: str | os.PathLike, model: torch.nn.Module, config: ModelConfig) -> None:
        write_json_atomic(Path(directory) / FILE, self.to_json(model, config))

    @classmethod
    def load(cls, directory: str | os.PathLike, model: Weights, config: ModelConfig) -> BudgetConfigs | None:
        """The directory's choices, None when it has none; ValueError when they do not match."""
        path = Path(directory) / FILE
        if not path.is_file():
            return None
        try:
            data = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise ValueError(f"{path}: corrupt JSON ({error})") from error
        return cls.from_json(data, model, config, path)

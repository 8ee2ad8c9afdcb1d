"""Per-layer budget configurations: how much the loss suffers when each layer alone is
narrowed, then the split of a budget's weights across the layers that loses least.

Layers differ a lot.  On SmolLM2, the first layer's MLP at 1/8 width costs 2.5 nats of
calibration loss and a middle layer's 0.05, yet a uniform configuration narrows them alike
(at budget 0.5 per-layer widths lower the calibration loss from 5.81 to 5.03 nats).

1. `measure_layer_sensitivity`: for each layer alone, the calibration loss with its MLP at
   each of `levels` widths and with each smaller head count, every other layer full.  The
   layers before it run once: their outputs are cached.  This is the slow part of choosing
   budgets (each variant runs the layers after it), so `cached_layer_sensitivity` keeps the
   result per model fingerprint and text, and fewer blocks or levels make it coarser and cheaper.
2. `allocate`: the per-layer (heads, MLP width) minimising the sum of the layers' loss
   increases within a budget's weight limit, by dynamic programming over the weights (a
   knapsack).  Increases are assumed to add up, which they only roughly do, so
   flextron.conversion.budget_search measures the allocation as a whole beside the uniform candidates
   and keeps whichever is best.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from flextron.data.blocks import evenly_spaced
from flextron.io.atomic import write_json_atomic
from flextron.model.budget_configs import CalibrationConfig, fingerprint
from flextron.model.config import ArchConfig, ModelConfig, attention_weights
from flextron.model.elastic_model import FlextronModel
from flextron.model.objectives import next_token_cross_entropy

# The knapsack counts weights in at most this many units (costs rounded up, so it never
# overshoots the limit); finer units add time, not quality.
WEIGHT_UNITS = 8192


@dataclass
class LayerSensitivity:
    """Per layer, the calibration-loss increase (nats) when only that layer is narrowed."""

    base_loss: float  # the full model's loss
    mlp: list[dict[int, float]]  # per layer: MLP width -> increase (the measured widths)
    heads: list[dict[int, float]]  # per layer: head count -> increase (every smaller count)

    def mlp_increase(self, layer: int, width: int) -> float:
        return _increase(self.mlp[layer], width)

    def heads_increase(self, layer: int, heads: int) -> float:
        return _increase(self.heads[layer], heads)

    def to_dict(self) -> dict:
        return {
            "base_loss": self.base_loss,
            "mlp": [{str(w): v for w, v in layer.items()} for layer in self.mlp],
            "heads": [{str(h): v for h, v in layer.items()} for layer in self.heads],
        }

    @classmethod
    def from_dict(cls, data: dict) -> LayerSensitivity:
        def sizes(layers: list[dict]) -> list[dict[int, float]]:
            return [{int(size): float(v) for size, v in layer.items()} for layer in layers]

        return cls(float(data["base_loss"]), sizes(data["mlp"]), sizes(data["heads"]))


def _increase(measured: dict[int, float], size: int) -> float:
    """The loss increase at `size`, interpolated between measured sizes.  Noise can make a
    measured increase negative or not monotone; narrowing never helps, so the curve is made
    non-increasing in size and non-negative."""
    sizes = sorted(measured)
    values = np.maximum.accumulate(np.array([measured[s] for s in reversed(sizes)]))[::-1]
    return max(0.0, float(np.interp(size, sizes, values)))


def measured_widths(config: ModelConfig, layer: int, levels: int) -> list[int]:
    """The MLP widths measured per layer: the narrowest choice and `levels` - 1 evenly spaced
    fractions of d_ff (nearest allowed widths), the full width last."""
    choices = config.mlp_choices(layer)
    full = choices[-1]
    targets = [full * k / levels for k in range(1, levels)]
    widths = {choices[0], full} | {min(choices, key=lambda c: abs(c - t)) for t in targets}
    return sorted(widths)


def sensitivity_cost(config: ModelConfig, levels: int) -> float:
    """The sensitivities' work in whole-model forward passes per measured block: each layer's
    narrowed variants run the layers from that one to the last."""
    layers = config.num_layers
    return sum(
        (len(measured_widths(config, layer, levels)) + len(config.head_choices(layer)) - 2)
        * (layers - layer)
        / layers
        for layer in range(layers)
    )


@torch.no_grad()
def measure_layer_sensitivity(
    model: FlextronModel,
    blocks: torch.Tensor,
    levels: int = 8,
    progress: bool = False,
    sample_blocks: int = CalibrationConfig.sensitivity_blocks,
) -> LayerSensitivity:
    """Each layer's loss increases on `sample_blocks` evenly spaced blocks of `blocks` (N, S),
    measured one layer at a time.  The cost: each narrowed variant runs the layers from its own
    to the last, so about num_layers / 2 forward passes per layer and level."""
    config, full = model.config, model.full_arch()
    blocks = evenly_spaced(blocks, sample_blocks).to(model.embed_tokens.weight.device)
    x = model.embed_tokens(blocks)  # (N, S, D)
    cos, sin = model.rotary(torch.arange(blocks.shape[1], device=x.device), x.dtype)  # (S, hd)

    def run(layer_input: torch.Tensor, start: int, arch: ArchConfig) -> float:
        h = layer_input
        for index in range(start, config.num_layers):
            h = model.layers[index](
                h, cos, sin, arch.mlp_widths[index], arch.heads[index], kv_cache=None, layer=index
            )
        return float(next_token_cross_entropy(model.logits(h), blocks))

    inputs = []  # inputs[i]: the full model's input to layer i, (N, S, D)
    for index, layer in enumerate(model.layers):
        inputs.append(x)
        x = layer(x, cos, sin, full.mlp_widths[index], full.heads[index], kv_cache=None, layer=index)
    base = float(next_token_cross_entropy(model.logits(x), blocks))
    mlp, heads = [], []
    for layer in tqdm(range(config.num_layers), desc="layer sensitivity", disable=not progress):

        def narrowed(width: int, head_count: int, layer: int = layer) -> ArchConfig:
            widths, counts = list(full.mlp_widths), list(full.heads)
            widths[layer], counts[layer] = width, head_count
            return ArchConfig(tuple(widths), tuple(counts))

        full_width, full_heads = full.mlp_widths[layer], full.heads[layer]
        mlp.append(
            {
                w: (run(inputs[layer], layer, narrowed(w, full_heads)) - base) if w < full_width else 0.0
                for w in measured_widths(config, layer, levels)
            }
        )
        heads.append(
            {
                h: (run(inputs[layer], layer, narrowed(full_width, h)) - base) if h < full_heads else 0.0
                for h in config.head_choices(layer)
            }
        )
    return LayerSensitivity(base, mlp, heads)


def cached_layer_sensitivity(
    model: FlextronModel,
    blocks: torch.Tensor,
    levels: int,
    progress: bool,
    sample_blocks: int,
    cache: Path,
) -> LayerSensitivity:
    """measure_layer_sensitivity, kept in directory `cache` under a key of the model's weights,
    the measured blocks, `levels` and the autocast dtype: a rerun on the same model and text
    loads it in a moment."""
    measured = evenly_spaced(blocks, sample_blocks)  # (n, S)
    device_type = model.embed_tokens.weight.device.type
    # Autocast changes the measured numbers: bf16 sensitivities are kept apart from fp32 ones.
    precision = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else ""
    digest = hashlib.sha256(f"{fingerprint(model)} {levels} {precision}".encode())
    digest.update(measured.to("cpu", torch.int64).numpy().tobytes())
    path = cache / f"layer-sensitivity-{digest.hexdigest()[:16]}.json"
    if path.is_file():
        return LayerSensitivity.from_dict(json.loads(path.read_text()))
    sensitivity = measure_layer_sensitivity(model, blocks, levels, progress, sample_blocks)
    cache.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, sensitivity.to_dict())
    return sensitivity


def allocate(config: ModelConfig, sensitivity: LayerSensitivity, limit: float) -> ArchConfig | None:
    """The per-layer configuration with the least summed loss increase whose layer weights
    (flextron.model.config.layer_weights) are at most `limit`; None when nothing fits."""
    hidden = config.hidden_size
    options = [  # per layer: (weights, loss increase, MLP width, heads) of every choice
        [
            (
                attention_weights(config, h) + 3 * hidden * w,
                sensitivity.mlp_increase(layer, w) + sensitivity.heads_increase(layer, h),
                w,
                h,
            )
            for h in config.head_choices(layer)
            for w in config.mlp_choices(layer)
        ]
        for layer in range(config.num_layers)
    ]
    weights = [option[0] for layer_options in options for option in layer_options]
    unit = max(math.gcd(*weights), math.ceil(max(weights) * config.num_layers / WEIGHT_UNITS))
    capacity = int(limit // unit)
    # best[c]: the least summed increase of the layers so far with total cost exactly c.
    best = np.full(capacity + 1, np.inf)
    best[0] = 0.0
    picks = []  # per layer: (capacity + 1,) index of the option that reached each cost
    for layer_options in options:
        new, pick = np.full(capacity + 1, np.inf), np.full(capacity + 1, -1)
        for index, (layer_weights, increase, _, _) in enumerate(layer_options):
            cost = math.ceil(layer_weights / unit)
            if cost > capacity:
                continue
            reached = np.full(capacity + 1, np.inf)
            reached[cost:] = best[: capacity + 1 - cost] + increase
            better = reached < new
            new[better], pick[better] = reached[better], index
        best = new
        picks.append(pick)
    if not np.isfinite(best).any():
        return None
    total = int(np.argmin(best))
    widths, heads = [], []
    for layer in reversed(range(config.num_layers)):
        layer_weights, _, width, head_count = options[layer][picks[layer][total]]
        widths.append(width)
        heads.append(head_count)
        total -= math.ceil(layer_weights / unit)
    return ArchConfig(tuple(reversed(widths)), tuple(reversed(heads)))

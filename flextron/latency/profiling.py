"""Measuring latency: timing components and whole forwards, profiling a LatencyTable, checking it.

`profile_latency` times, on the model's device, each MLP width and each head count of a
decoder layer (pre-norm + sublayer + residual, exactly the code the model runs, run in
every layer so that weights stream from memory as in the real forward; at decode whole
layers, as the cached forward runs them in one op), plus the fixed
cost (embedding, rotary tables, final norm, LM head on the last position, as generation
runs it), for every profiled shape (flextron.latency.shape).  A two-parameter fit against
three measured whole-model forwards (`_calibrate`) adds what the parts miss.

Timings are medians over repeats, measured round-robin (each repeat times every component
once) so that a load spike on a shared machine hits all choices alike.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from typing import Any

import torch

from flextron.latency.shape import DEFAULT_SHAPE, PHASES, LatencyShape
from flextron.latency.table import LatencyTable, ShapeCosts, device_name
from flextron.model.config import ArchConfig, ModelConfig
from flextron.model.elastic_model import FlextronModel
from flextron.timing import check_clock, times_ms


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
    model: FlextronModel, shape: LatencyShape, mlp_choices: Sequence[int], head_choices: Sequence[int]
) -> dict[Any, Callable[[], object]]:
    """Closures running each component once at one shape: "fixed", ("mlp", w), ("attention", h)."""
    config, device = model.config, model.embed_tokens.weight.device
    phase, batch, length = shape.phase, shape.batch, shape.length
    tokens = length if phase == "prefill" else 1
    start = 0 if phase == "prefill" else length
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, config.vocab_size, (batch, tokens), generator=generator).to(device)
    positions = torch.arange(start, start + tokens, device=device)
    x = model.embed_tokens(ids)  # (B, T, D)
    cos, sin = model.rotary(positions, x.dtype)
    layers = model.layers
    cache = _filled_cache(model, batch, length) if phase == "decode" else None

    def fixed() -> object:
        hidden = model.embed_tokens(ids)
        model.rotary(positions, hidden.dtype)
        return model.logits(hidden[:, -1:])  # (B, 1, V): generation needs the last logits only

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

    # A cached decode step runs each layer as one op (ops.decoder_layer, all layers from one
    # DecodePlan), which has no sublayer boundary to time at: time whole layers, each head count at
    # the narrowest MLP and each MLP width at every head (`_per_layer_costs` keeps the MLP's
    # increment over its narrowest width).
    def layer_at(heads: int, width: int) -> Callable[[], object]:
        arch = ArchConfig((width,) * config.num_layers, (heads,) * config.num_layers)
        plan = model.decode_plan(arch, cache, tokens)  # made once, as at a generation's prefill
        return lambda: plan.run(x, cos, sin, cache.length)

    functions: dict[Any, Callable[[], object]] = {"fixed": fixed}
    if phase == "decode":
        functions.update({("attention", h): layer_at(h, min(mlp_choices)) for h in head_choices})
        functions.update({("mlp", w): layer_at(max(head_choices), w) for w in mlp_choices})
        return functions
    functions.update({("attention", h): attention(h) for h in head_choices})
    functions.update({("mlp", w): mlp(w) for w in mlp_choices})
    return functions


def _per_layer_costs(
    times: dict[Any, float], phase: str, layers: int
) -> tuple[dict[int, float], dict[int, float]]:
    """(MLP ms per width, attention ms per head count) of one layer from the timed components.
    At decode both are whole layers (`_component_functions`): attention[h] holds the layer at the
    narrowest MLP, and the MLP its increment over that width, so that attention[h] + mlp[w] is
    the layer at (h, w) where the two add up."""
    mlp = {w: ms / layers for (kind, w), ms in times.items() if kind == "mlp"}
    attention = {h: ms / layers for (kind, h), ms in times.items() if kind == "attention"}
    if phase == "decode":
        narrowest = mlp[min(mlp)]
        mlp = {w: max(0.0, ms - narrowest) for w, ms in mlp.items()}
    return mlp, attention


@torch.inference_mode()
def profile_latency(
    model: FlextronModel,
    prefill_shapes: Sequence[tuple[int, int]] = ((1, 128),),
    decode_shapes: Sequence[tuple[int, int]] = ((1, 256),),
    *,
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
        model.weights_dtype,
        config.num_layers,
        config.num_heads,
        config.intermediate_size,
        torch.get_num_threads(),
        clock,
    )
    check_clock(clock, device)
    for phase, shapes in (("prefill", prefill_shapes), ("decode", decode_shapes)):
        for batch, length in shapes:
            if batch < 1 or length < 1 or length + 1 > config.max_position_embeddings:
                raise ValueError(
                    f"{phase} shape (batch {batch}, length {length}) must be positive and fit the "
                    f"context of {config.max_position_embeddings}"
                )
            shape = LatencyShape(phase, batch, length)
            if progress is not None:
                progress(f"profiling {phase} batch={batch} length={length}")
            functions = _component_functions(model, shape, mlp_choices, head_choices)
            times = times_ms(functions, device, repeats, warmup, clock)
            fixed = times.pop("fixed")
            mlp_ms, attention_ms = _per_layer_costs(times, phase, config.num_layers)
            entry = ShapeCosts(phase, batch, length, fixed, mlp_ms, attention_ms)
            _calibrate(model, entry, mlp_choices, head_choices, repeats=repeats, warmup=warmup, clock=clock)
            table.entries.append(entry)
    return table


def _calibrate(
    model: FlextronModel,
    entry: ShapeCosts,
    mlp_choices: Sequence[int],
    head_choices: Sequence[int],
    *,
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
    measured = measure_latency(model, anchors, entry.shape, repeats=repeats, warmup=warmup, clock=clock)
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
    shape: LatencyShape = DEFAULT_SHAPE,
    *,
    repeats: int = 15,
    warmup: int = 2,
    session: object | None = None,
    clock: str = "wall",
) -> list[float]:
    """Median measured ms of a whole-model forward for each configuration (round-robin).

    `session` (a routing session, flextron.routers.sessions) replaces the configurations'
    choices when given; then `archs` only sets how many (identical) measurements to take.
    """
    config, device = model.config, model.embed_tokens.weight.device
    phase, batch, length = shape.phase, shape.batch, shape.length
    tokens = length if phase == "prefill" else 1
    ids = torch.randint(0, config.vocab_size, (batch, tokens), generator=torch.Generator().manual_seed(0))
    ids = ids.to(device)

    def run(arch: ArchConfig) -> Callable[[], object]:
        # A cache per configuration: it keeps the DecodePlan its first (warm-up) step makes, as a
        # generation keeps the one its prefill made, so the timed steps are decode steps only.
        cache = _filled_cache(model, batch, length) if phase == "decode" else None

        def forward() -> object:
            if cache is not None:
                cache.length = length  # every timed step decodes at the same context
            # Generation needs the last position's logits only, so that is what is timed.
            return model(ids, arch, cache, last_only=True, session=session)

        return forward

    times = times_ms({i: run(a) for i, a in enumerate(archs)}, device, repeats, warmup, clock)
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
            model(ids, arch, last_only=True, session=session)
            for ids, session in zip(chunks, sessions, strict=True)
        ]
    caches = []
    for ids, session in zip(chunks, sessions, strict=True):
        caches.append(model.new_kv_cache(ids.shape[0], ids.shape[1]))
        model(ids[:, :-1], arch, caches[-1], last_only=True, session=session)

    def step() -> list[torch.Tensor]:
        outputs = []
        for ids, session, cache in zip(chunks, sessions, caches, strict=True):
            cache.length = ids.shape[1] - 1  # every timed step decodes at the same context
            outputs.append(model(ids[:, -1:], arch, cache, last_only=True, session=session))
        return outputs

    return step


def check_table(
    model: FlextronModel,
    table: LatencyTable,
    count: int = 10,
    shape: LatencyShape = DEFAULT_SHAPE,
    *,
    repeats: int = 15,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """Predicted vs measured latency of `count` random configurations (rows with the error)."""
    archs = random_archs(model.config, count, seed)
    measured = measure_latency(model, archs, shape, repeats=repeats, clock=table.clock)
    rows = []
    for arch, ms in zip(archs, measured, strict=True):
        predicted = table.predict(arch, shape)
        rows.append(
            {
                **shape.to_dict(),
                "predicted_ms": predicted,
                "measured_ms": ms,
                "error": (predicted - ms) / ms,
                "arch": arch.to_dict(),
            }
        )
    return rows

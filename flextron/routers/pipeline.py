"""train_routers: what `flextron train-router` runs, from one RouterTrainingConfig.

In a model directory with a latency table: pick the latency shape (the directory's routers'
own by default: one shape per directory), build or reload the router, start it at each
budget's configuration, train it (the surrogate-model loop then joint fine-tuning, the
end-to-end baseline, or joint fine-tuning alone), calibrate a dynamic router's latency, and
save it next to the directory's other router.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from flextron.latency.shape import LatencyShape
from flextron.latency.table import LatencyTable
from flextron.model.checkpoint import save_pretrained
from flextron.model.config import ArchConfig
from flextron.model.elastic_model import FlextronModel
from flextron.routers.base import Router, default_mlp_choices
from flextron.routers.calibration import (
    calibrate_dynamic,
    calibrate_dynamic_measured,
    calibration_grid,
    measure_routing_overhead,
)
from flextron.routers.config import RouterTrainingConfig
from flextron.routers.dynamic import DynamicRouter
from flextron.routers.files import AnyRouter, load_routers, save_routers
from flextron.routers.initial import (
    static_init_archs,
    trained_configurations,
    trained_init_archs,
    trained_widths,
    uniform_init_archs,
)
from flextron.routers.objectives import LatencyTarget
from flextron.routers.selection import fit_to_latency, reference_shape
from flextron.routers.sequence_fitting import fit_sequence_router
from flextron.routers.static import StaticRouter
from flextron.routers.training import train_end_to_end, train_router_surrogate

Report = Callable[[str], None]


def _to_stderr(text: str) -> None:
    print(text, file=sys.stderr)


@dataclass
class _Job:
    """What every step of one train_routers call shares."""

    model: FlextronModel
    directory: Path
    config: RouterTrainingConfig
    table: LatencyTable
    shape: LatencyShape
    report: Report


@dataclass
class RouterTrainingResult:
    """The trained router, the shape its budgets refer to, the logs and what to tell the user."""

    router: AnyRouter
    shape: LatencyShape
    logs: dict[str, Any] = field(default_factory=dict)
    messages: list[str] = field(default_factory=list)  # results, in order (the command prints them)


def train_routers(
    model: FlextronModel,
    directory: str | os.PathLike,
    config: RouterTrainingConfig,
    *,
    report: Report = _to_stderr,
) -> RouterTrainingResult:
    """Train (or fine-tune, or calibrate) the config's router in `directory` and save it there.

    `report` receives progress lines (every 10th training step, initial configurations,
    calibration rows).  A jointly fine-tuned LLM is saved to the directory as well.
    """
    directory = Path(directory)
    table = LatencyTable.load(directory, model.embed_tokens.weight.device)
    table.check_dtype(model.weights_dtype)
    existing, existing_shape = load_routers(directory, model.config)
    shape = _latency_shape(config, table, directory, "dynamic" in existing, existing_shape)
    if model.tokenizer is None:
        raise ValueError(f"{directory} has no tokenizer: training text cannot be tokenized")
    from flextron.data.blocks import load_blocks

    if config.kind == "sequence":
        return _fit_sequence(_Job(model, directory, config, table, shape, report), existing)

    blocks = load_blocks(model.tokenizer, config.data, config.seq_len, split="train")
    router, config = _router(model, config, existing, directory)
    job = _Job(model, directory, config, table, shape, report)
    starts = None
    if config.init != "random" and config.mode in ("surrogate", "end-to-end"):
        starts = _initialise(job, router, blocks[: config.sm_probe_blocks], existing.get("static"))
    target = LatencyTarget.from_table(table, router, model, shape)
    result = RouterTrainingResult(router, shape)
    _train(job, router, target, blocks, result)
    if isinstance(router, StaticRouter) and starts is not None:
        _keep_better_starts(job, router, starts, blocks[-config.sm_probe_blocks :])
    if isinstance(router, DynamicRouter) and (config.calibrate_blocks > 0 or config.mode == "calibrate"):
        result.logs |= _calibrate(job, router, target)
    save_routers(directory, {**existing, config.kind: router}, shape)
    result.messages.append(f"saved the {config.kind} router to {directory}")
    if isinstance(router, StaticRouter):
        for budget in config.budgets:
            arch = router.arch(budget)
            result.messages.append(
                f"budget {budget:g}: predicted {table.predict(arch, shape):.2f} ms of "
                f"{budget * target.full_ms:.2f} ms target; MLP widths {list(arch.mlp_widths)}, heads "
                f"{list(arch.heads)}"
            )
    return result


def _fit_sequence(job: _Job, existing: dict[str, AnyRouter]) -> RouterTrainingResult:
    """Fit and save the sequence router over the model's trained configurations (and the static
    router's, when the directory has one)."""
    from flextron.data.blocks import load_blocks

    model, config, table, shape = job.model, job.config, job.table, job.shape
    if model.budget_configs is None:
        raise ValueError(
            f"{job.directory} has no trained configurations (budget_configs.json): the sequence router "
            "mixes the configurations an elastically trained model was trained at"
        )
    full = table.predict(model.full_arch(), shape)
    candidates = list(trained_configurations(model).values())
    if "static" in existing:
        static = existing["static"]
        candidates += [fit_to_latency(static, b, table, b * full, shape) for b in static.budgets]
    candidates = sorted(set(candidates), key=lambda a: (table.predict(a, shape), a.mlp_widths, a.heads))
    fractions = [table.predict(arch, shape) / full for arch in candidates]
    # Evenly spaced over the whole training text (its files are genres, one after another).
    train = load_blocks(model.tokenizer, config.data, config.seq_len, config.sequence_blocks, split="train")
    validation = load_blocks(
        model.tokenizer, config.validation_data, config.seq_len, config.validation_blocks, split="eval"
    )
    router, summary = fit_sequence_router(
        model, candidates, fractions, train, validation, prefix=config.prefix, report=job.report
    )
    save_routers(job.directory, {**existing, "sequence": router}, job.shape)
    result = RouterTrainingResult(router, job.shape, logs={"sequence": summary})
    result.messages.append(f"saved the sequence router to {job.directory}")
    for arch in router.configurations:
        result.messages.append(
            f"configuration of {model.num_parameters(arch) / 1e6:.1f}M parameters: "
            f"{table.predict(arch, shape) / full:.3f} of the full model's latency at {shape}"
        )
    return result


def _latency_shape(
    config: RouterTrainingConfig,
    table: LatencyTable,
    directory: Path,
    has_dynamic: bool,
    existing: LatencyShape | None,
) -> LatencyShape:
    """The shape the budgets refer to: the config's, else the directory routers' (so retraining
    keeps it), else the table's first prefill shape; refused where it would mislabel a router."""
    shape = config.latency_shape or reference_shape(table, existing)
    if config.kind == "dynamic" and config.calibrate_by == "measured" and shape.phase != "prefill":
        # Refused before training: a decode step times one token's choices (use the LUT + overhead).
        raise ValueError(f"--calibrate-by measured times prefill shapes; the budgets refer to {shape.phase}")
    recalibrated = config.kind == "dynamic" and config.mode != "joint"
    if has_dynamic and existing not in (None, shape) and not recalibrated:
        raise ValueError(
            f"{directory}'s dynamic router is calibrated for {existing}; training at {shape} would "
            f"mislabel it: use --latency-shape {existing}, or recalibrate the dynamic router at the new "
            "shape afterwards (--kind dynamic --mode calibrate)"
        )
    return shape


def _router(
    model: FlextronModel, config: RouterTrainingConfig, existing: dict[str, Router], directory: Path
) -> tuple[Router, RouterTrainingConfig]:
    """The router to train (the directory's, for joint fine-tuning or calibration alone; a new
    one otherwise) and the config with the router's trained budgets."""
    if config.mode in ("joint", "calibrate"):
        if config.kind not in existing:
            raise ValueError(
                f"--mode {config.mode} needs a trained {config.kind} router; {directory} has none"
            )
        router = existing[config.kind]
        return router, dataclasses.replace(config, budgets=tuple(router.budgets))
    if config.init == "static":
        static = existing.get("static")
        if static is None:
            raise ValueError(
                f"--init static needs a trained static router in {directory}: run "
                "`flextron train-router --kind static` first"
            )
        choices = (static.mlp_choices, static.head_choices)
        return DynamicRouter(model.config, config.budgets, *choices, hidden_size=config.hidden_size), config
    router_class = StaticRouter if config.kind == "static" else DynamicRouter
    mlp_choices = default_mlp_choices(model.config, config.mlp_choices)
    if config.init == "trained":  # the trained configurations' widths must be reachable
        mlp_choices = sorted(set(mlp_choices) | trained_widths(model), reverse=True)
    return router_class(model.config, config.budgets, mlp_choices, hidden_size=config.hidden_size), config


def _initialise(
    job: _Job, router: Router, probe: torch.Tensor, static: Router | None
) -> dict[float, ArchConfig]:
    """Start every trained budget at its configuration (config.init); probe: (N, S) token ids.
    Returns the starts."""
    model, table, config, shape = job.model, job.table, job.config, job.shape
    if config.init == "static":
        starts = static_init_archs(model, table, static, config.budgets, shape)
    elif config.init == "trained":
        starts = trained_init_archs(model, table, router, shape)
    else:
        starts = uniform_init_archs(
            model, table, router, shape, probe if config.init == "best-uniform" else None
        )
    router.init_to(starts, config.init_margin)
    for budget, arch in starts.items():
        layers = len(arch.heads)
        job.report(
            f"budget {budget:g} starts at mean MLP width {sum(arch.mlp_widths) / layers:.0f}, "
            f"mean heads {sum(arch.heads) / layers:.1f} ({table.predict(arch, shape):.2f} ms)"
        )
    return starts


def _keep_better_starts(
    job: _Job, router: StaticRouter, starts: dict[float, ArchConfig], probe: torch.Tensor
) -> None:
    """Per trained budget, whichever of what training found, its start and the configurations
    the model was trained at (`trained_configurations`) has the lowest loss on `probe` (N, S),
    among those predicted within the budget (or no slower than what training found).  Why: the
    surrogate model can lead the router away from a good start into configurations the LLM was
    never trained at, and on an elastically trained model a configuration between two trained
    ones is worse than the cheaper trained one: a router must never be worse than its start or
    than what training covered."""
    from flextron.eval.perplexity import perplexity

    model, table, shape = job.model, job.table, job.shape
    full_ms = table.predict(model.full_arch(), shape)
    trained_archs = [  # those the router can express (--init trained adds their widths to its choices)
        arch
        for arch in trained_configurations(model).values()
        if set(arch.mlp_widths) <= set(router.mlp_choices) and set(arch.heads) <= set(router.head_choices)
    ]
    chosen, replaced = {}, []
    for budget, start in starts.items():
        found = router.arch(budget)
        limit = max(budget * full_ms, table.predict(found, shape)) * 1.001
        others = {
            arch for arch in [start, *trained_archs] if arch != found and table.predict(arch, shape) <= limit
        }
        scores = {arch: perplexity(model, probe, arch)[0] for arch in [found, *others]}
        chosen[budget] = min(scores, key=scores.get)
        if chosen[budget] != found:
            origin = "its start" if chosen[budget] == start else "a trained configuration"
            replaced.append(
                f"{budget:g} ({origin}: perplexity {scores[chosen[budget]]:.2f} vs {scores[found]:.2f})"
            )
    if replaced:
        router.init_to(chosen, job.config.init_margin)
        job.report(
            f"kept better configurations at budgets {', '.join(replaced)}: training did not improve on them"
        )


def _train(
    job: _Job, router: Router, target: LatencyTarget, blocks: torch.Tensor, result: RouterTrainingResult
) -> None:
    """The config's training mode on blocks (N, S); logs and messages go into `result`."""
    model, config = job.model, job.config

    def show(row: dict) -> None:
        if row["step"] % 10 == 0:
            job.report(
                " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items())
            )

    if config.mode == "end-to-end":
        result.logs["end_to_end"] = train_end_to_end(
            model, router, target, blocks, config, progress=show
        ).rows
    if config.mode not in ("surrogate", "joint"):
        return
    if config.mode == "surrogate":
        result.logs["surrogate"] = train_router_surrogate(model, router, target, blocks, config, show)[1].rows
    steps = config.steps if config.mode == "joint" else config.finetune_steps
    if steps > 0:
        tune = dataclasses.replace(config, steps=steps, tau_start=config.tau_end)
        log = train_end_to_end(model, router, target, blocks, tune, train_model=True, progress=show)
        result.logs["joint"] = log.rows
        save_pretrained(model, job.directory)
        result.messages.append(f"saved the jointly fine-tuned model to {job.directory}")


def _calibrate(job: _Job, router: DynamicRouter, target: LatencyTarget) -> dict[str, Any]:
    """The dynamic router's latency calibration on the trained budgets and every 0.1 between
    (from the smallest sub-network up); returns its logs."""
    from flextron.data.blocks import load_blocks

    model, table, config, shape, report = job.model, job.table, job.config, job.shape, job.report

    # Decode: each block is a context of `length` tokens and the token decoded after it.
    probe = load_blocks(
        model.tokenizer, config.data, shape.tokens, max(config.calibrate_blocks, 1), split="train"
    )
    smallest = table.latency_range(model.config, shape, router.mlp_choices, router.head_choices)[0]
    grid, below = calibration_grid(config.budgets, smallest / target.full_ms)
    if below:
        report(
            f"budgets {below} are below the smallest sub-network ({smallest / target.full_ms:.3f} of the "
            f"full model at {shape}): calibrating from {grid[0]:g}"
        )
    logs = _calibrate_on_lut(job, router, target, probe, grid)
    if config.calibrate_by == "measured":
        logs["calibration_lut"] = logs["calibration"]
        logs["calibration"] = calibrate_dynamic_measured(
            model,
            router,
            target,
            probe,
            grid,
            batch_size=shape.batch,
            clock=table.clock,
            repeats=config.calibrate_repeats,
            progress=lambda row: report(
                f"calibrated budget {row['budget']:g} on measured latency: offset "
                f"{row['offset']:+.4f}, {row['measured_ms']:.2f} ms (goal {row['goal_ms']:.2f}; "
                f"from offset {row['start_offset']:+.4f}: {row['start_ms']:.2f} ms), "
                f"{row['evaluations']} timings"
            ),
        )
    return logs


def _calibrate_on_lut(
    job: _Job, router: DynamicRouter, target: LatencyTarget, probe: torch.Tensor, grid: list[float]
) -> dict[str, Any]:
    """Calibration on the LUT latency of the routed choices plus the routed path's overhead
    (given, or measured and recalibrated: --calibrate-overhead auto); probe: (N, tokens) ids."""
    model, config, shape, report = job.model, job.config, job.shape, job.report

    def calibrated(row: dict) -> None:
        report(
            f"calibrated budget {row['budget']:g}: offset {row['offset']:+.4f}, LUT {row['lut_ms']:.2f} ms "
            f"(goal {row['goal_ms']:.2f}, uncalibrated {row['uncalibrated_ms']:.2f})"
        )

    overhead = config.given_overhead
    logs: dict[str, Any] = {
        "calibration": calibrate_dynamic(
            model, router, target, probe, grid, overhead=overhead, progress=calibrated
        )
    }
    # Timed in chunks of the shape's batch: prefill one (its tokens spread over the widths),
    # decode all (one token each is timed).
    chunks = probe[: probe.shape[0] // shape.batch * shape.batch].view(-1, shape.batch, shape.tokens)
    # Measured at the calibrated budgets, then calibrated again with it; twice, since the overhead
    # depends on how the tokens spread over widths (more groups, more small GEMMs), which the
    # calibration changes.
    for _ in range(2 if config.measures_overhead and chunks.shape[0] > 0 else 0):
        overhead, measured = measure_routing_overhead(
            model,
            router,
            target,
            chunks[:1] if shape.phase == "prefill" else chunks,
            grid,
            clock=job.table.clock,
            phase=shape.phase,
        )
        pairs = ", ".join(f"{r['measured_ms']:.1f}/{r['lut_ms']:.1f}" for r in measured)
        report(
            f"routing overhead: {overhead[0]:.2f} ms + {100 * overhead[1]:.1f}% of the LUT latency "
            f"(measured/LUT ms: {pairs})"
        )
        logs["overhead"] = {"fixed_ms": overhead[0], "fraction": overhead[1], "measured": measured}
        logs["calibration"] = calibrate_dynamic(
            model, router, target, probe, grid, overhead=overhead, progress=calibrated
        )
    return logs

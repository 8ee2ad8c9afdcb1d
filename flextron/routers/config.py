"""RouterTrainingConfig: every setting of `flextron train-router`, with its option, default and check.

The fields declared with `option(...)` become train-router's command-line options
(flextron.options.config_options); the others are settings of the training loops that the
command line leaves at their defaults.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from flextron.latency.shape import LatencyShape, shape_argument
from flextron.options import (
    non_negative_float,
    non_negative_int,
    option,
    parse_budgets,
    positive_float,
    positive_int,
)

KINDS = ("static", "dynamic", "sequence")
MODES = ("surrogate", "end-to-end", "joint", "calibrate")
INITS = ("best-uniform", "uniform", "trained", "static", "random")
LOSSES = ("kd", "lm")
CALIBRATE_BY = ("lut", "measured")


def latency_budgets(text: str) -> list[float]:
    """Comma-separated latency budgets (fractions of the full model's latency) in (0, 1]."""
    return parse_budgets(text)


def overhead_text(text: str) -> str:
    """--calibrate-overhead: auto, none, or MS[,FRACTION] (non-negative numbers)."""
    if text not in ("auto", "none"):
        parts = text.split(",")
        if len(parts) > 2:
            raise argparse.ArgumentTypeError(f"expected auto, none or MS[,FRACTION], got {text!r}")
        for part in parts:
            non_negative_float(part)
    return text


@dataclass(frozen=True)
class RouterTrainingConfig:
    """Which router to train, how it starts, trains and is calibrated (see docs/routers.md)."""

    # ---- which router, and what to do with it
    kind: str = option("static", "the router to train", choices=KINDS)
    mode: str = option(
        "surrogate",
        "surrogate: the SM loop (docs/design.md#routers), then --finetune-steps of joint fine-tuning; "
        "end-to-end: the baseline without SM; joint: only the joint LLM + router fine-tuning, "
        "from the directory's trained router of --kind; calibrate: only the dynamic router's "
        "latency calibration, of the directory's trained dynamic router",
        choices=MODES,
    )
    # Latency budgets: fractions of the full model's LUT latency at `latency_shape`.
    budgets: tuple[float, ...] = option((0.3, 0.5, 0.7, 1.0), "trained latency budgets", type=latency_budgets)
    latency_shape: LatencyShape | None = option(
        None,
        "the shape budgets refer to, e.g. prefill:1x128 (default: the routers', else the "
        "latency table's first prefill shape)",
        type=shape_argument,
    )
    # ---- training text and optimisation
    data: str = option("builtin", "training text: builtin | file | dir | .jsonl | saved dataset")
    seq_len: int = option(128, "tokens per training block", type=positive_int)
    steps: int = option(200, "SM-loop (or end-to-end) steps", type=positive_int)
    finetune_steps: int = option(
        50,
        "joint LLM + router fine-tuning steps after the SM loop (0: keep the LLM; saves the model)",
        type=non_negative_int,
    )
    batch_size: int = option(2, "blocks per step", type=positive_int)
    latency_weight: float = option(1.0, "λ of the latency loss", type=non_negative_float)
    dead_zone: float = 0.05  # relative latency error without a push
    router_lr: float = option(1e-3, "router learning rate", type=positive_float)
    model_lr: float = option(1e-5, "LLM learning rate of joint fine-tuning", type=positive_float)
    tau_start: float = 1.0  # Gumbel-softmax temperature, annealed exponentially to tau_end
    tau_end: float = 0.1
    loss: str = option("kd", "kd: distil from the full model; lm: next-token loss", choices=LOSSES)
    seed: int = option(0, "random seed", type=int)
    # ---- the router
    mlp_choices: int = option(8, "MLP widths the router picks from (smallest to full)", type=positive_int)
    hidden_size: int = option(128, "router width", type=positive_int)
    init: str = option(
        "best-uniform",
        "best-uniform: each trained budget starts at the uniform configuration of lowest perplexity "
        "on --sm-probe-blocks training blocks among those within 5%% of its latency (parity with "
        "uniform widths); uniform: at the one nearest its latency; trained: between the configurations "
        "the model was trained at (its budgets and full), its widths among the choices; static "
        "(--kind dynamic): at the directory's static router's configuration, with its choices; "
        "random: plain random initialisation",
        choices=INITS,
    )
    init_margin: float = option(3.0, "logit margin of the initial configuration", type=non_negative_float)
    # ---- surrogate model
    sm_lr: float = 1e-3
    sm_updates: int = option(4, "SM minibatch steps per LLM step", type=positive_int)
    sm_batch: int = 32
    sm_buffer: int = 1024
    sm_threshold: float = option(
        0.05, "router steps only while the SM's relative error is below", type=positive_float
    )
    sm_error_decay: float = 0.9  # EMA of the SM's relative error on fresh samples
    sm_probe_blocks: int = option(2, "blocks of the fixed batch whose loss the SM learns", type=positive_int)
    # ---- dynamic router: latency calibration
    calibrate_blocks: int = option(
        4,
        "dynamic: blocks of training text on which each budget's latency offset is calibrated (0: none)",
        type=non_negative_int,
    )
    calibrate_overhead: str = option(
        "auto",
        "dynamic: the routed path's cost beyond the LUT (router, grouping tokens): auto (measured with "
        "the table's clock, prefill shapes), none, or MS[,FRACTION] (MS + FRACTION x LUT ms); "
        "--calibrate-by lut only",
        type=overhead_text,
    )
    calibrate_by: str = option(
        "lut",
        "dynamic: lut: bisect each budget's offset on the LUT latency of the routed choices "
        "(+ --calibrate-overhead); measured: start there (no overhead), then bisect on the routed "
        "forward timed with the table's clock at the LUT shape (prefill only), as a ratio to the "
        "dense full model timed in the same round x its LUT latency (minutes on CPU)",
        choices=CALIBRATE_BY,
    )
    # ---- sequence router: fitted, not trained (flextron.routers.sequence_fitting)
    validation_data: str = option(
        "builtin",
        "sequence: validation text, on which the candidates are kept or dropped and the predictor's "
        "penalty is chosen (not the text results are reported on)",
    )
    sequence_blocks: int = option(
        256,
        "sequence: training blocks of --seq-len, spread over --data, each run at every configuration",
        type=positive_int,
    )
    validation_blocks: int = option(64, "sequence: validation blocks of --seq-len", type=positive_int)
    prefix: int = option(
        32, "sequence: the prompt tokens a sequence's choice is made from (not scored)", type=positive_int
    )
    calibrate_repeats: int = option(
        5, "dynamic, --calibrate-by measured: timed repeats per bisection step (median)", type=positive_int
    )

    def __post_init__(self) -> None:
        if self.loss not in LOSSES:
            raise ValueError(f"loss must be 'kd' or 'lm', got {self.loss!r}")
        if self.steps < 1 or self.batch_size < 1:
            raise ValueError(f"steps and batch_size must be >= 1, got {self.steps}, {self.batch_size}")
        if self.latency_weight < 0 or not 0 <= self.dead_zone < 1 or self.sm_threshold <= 0:
            raise ValueError("need latency_weight >= 0, dead_zone in [0, 1), sm_threshold > 0")
        if not 0 < self.tau_end <= self.tau_start:
            raise ValueError(f"--tau needs 0 < END <= START, got {self.tau_start} {self.tau_end}")
        if self.kind == "sequence" and self.mode != "surrogate":
            raise ValueError("the sequence router is fitted in one way: leave --mode out")
        if self.kind == "sequence" and self.prefix >= self.seq_len:
            raise ValueError(f"--prefix {self.prefix} must be shorter than --seq-len {self.seq_len}")
        if self.mode == "calibrate" and self.kind != "dynamic":
            raise ValueError("--mode calibrate applies to the dynamic router (--kind dynamic)")
        if self.init == "static" and self.kind != "dynamic" and self.mode in ("surrogate", "end-to-end"):
            raise ValueError(
                "--init static starts a dynamic router (--kind dynamic) at the static router's configurations"
            )

    @property
    def given_overhead(self) -> tuple[float, float]:
        """--calibrate-overhead MS[,FRACTION] as (fixed ms, fraction of the LUT ms); (0, 0) otherwise."""
        if self.calibrate_by != "lut" or self.calibrate_overhead in ("auto", "none"):
            return 0.0, 0.0
        values = [float(v) for v in self.calibrate_overhead.split(",")]
        return values[0], values[1] if len(values) > 1 else 0.0

    @property
    def measures_overhead(self) -> bool:
        """Whether LUT calibration measures the routed path's overhead (--calibrate-overhead auto)."""
        return self.calibrate_by == "lut" and self.calibrate_overhead == "auto"
